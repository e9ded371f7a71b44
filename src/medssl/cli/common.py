"""What the ``medssl`` commands share: the app, ``--config`` / ``--data``, choices, and the extra arguments.

Commands that take settings read everything click did not match (``ctx.args``) with :func:`extras`:

* ``KEY=VALUE`` -- a dotted override (``train.lr=1e-3``; the old ``--train.lr=1e-3`` spelling still works);
* ``--xxx`` -- a misspelt or removed option: one error line, with the closest option or, for an option that
  became a setting, the override to use instead (``--merge`` -> ``sam.merge=VALUE``);
* a bare word -- only where a command had a positional config or data argument (``medssl check DATA``,
  ``medssl experiment FILE``): a deprecated alias of ``--data`` / ``--config``, with a warning.

Choices that are only known after a slow import (pretraining methods, advisor strategies) are checked by
:func:`lazy_choice` when given and listed by :class:`ChoicesCommand` in ``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from enum import StrEnum
from typing import Callable, Optional, Sequence

import typer
from typer.core import TyperCommand

from medssl.errors import ConfigError

HELP = ("Self-supervised pretraining and low-label fine-tuning for medical image segmentation.\n\n"
        "Every command takes --config/-c (a preset or YAML file) and --data/-d (the dataset or image files) "
        "where it reads them, and settings as dotted KEY=VALUE overrides after the options, e.g. "
        "train.lr=1e-3 split.budget=5 (medssl config -c PRESET lists every key).")
SETTINGS = "Settings: dotted KEY=VALUE overrides after the options, e.g. train.epochs=20 split.budget=5."

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

ConfigOpt = typer.Option(None, "--config", "-c", help="preset name (demo, hippocampus, ct, ...) or YAML file")
DataOpt = typer.Option(None, "--data", "-d", help="dataset folder (sets data.path)")


def choices(name: str, values: Sequence[str]) -> type[StrEnum]:
    """A str enum whose values are ``values``: typer shows them in --help and rejects anything else."""
    return StrEnum(name, {v: v for v in values})


Modality = choices("Modality", ("CT", "MRI"))


# ------------------------------------------------------------------ choices known only after an import
LAZY: dict[str, Callable[[], Sequence[str]]] = {}


def lazy_choice(param: str, loader: Callable[[], Sequence[str]]) -> Callable[[Optional[str]], Optional[str]]:
    """A typer callback that checks a value against ``loader()`` (called only when a value is given)."""
    LAZY[param] = loader

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in loader():
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, loader()))}.")
        return value

    return check


class ChoicesCommand(TyperCommand):
    """Lists the choices of :func:`lazy_choice` options in --help (the import happens only then)."""

    def format_help(self, ctx, formatter):
        for p in self.params:
            if p.name in LAZY:
                p.metavar = "<" + "|".join(LAZY[p.name]()) + ">"
        return super().format_help(ctx, formatter)


# ------------------------------------------------------------------ extra arguments
def warn(message: str) -> None:
    print(f"medssl: warning: {message}", file=sys.stderr)


def _long_options(ctx: typer.Context) -> list[str]:
    return [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def no_such_option(name: str, candidates: Sequence[str], moved: dict[str, str] | None = None) -> str:
    """``no such option --confg (did you mean --config?)``; for an option that became a setting, the override."""
    if moved and name in moved:
        return f"no such option {name}: it is a setting now, use {moved[name]}"
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"no such option {name}" + (f" (did you mean {close[0]}?)" if close else "")


def moved_options(cls: type, prefix: str) -> dict[str, str]:
    """``{"--iou-threshold": "sam.iou_threshold=VALUE", ...}`` for the fields of settings dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {"--" + f.name.replace("_", "-"): f"{prefix}.{f.name}=" + ("true" if hints[f.name] is bool else "VALUE")
            for f in dataclasses.fields(cls)}


def extras(ctx: typer.Context, moved: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Split the unmatched arguments into ``(overrides, bare words)``; an unknown ``--option`` is an error."""
    overrides, words = [], []
    for arg in ctx.args:
        if arg.startswith("-") and len(arg) > 1 and not arg.lstrip("-").replace(".", "", 1).isdigit():
            name, eq, _ = arg.partition("=")
            if eq and "." in name:  # --train.lr=1e-3: an override with dashes, accepted as before
                overrides.append(arg.lstrip("-"))
                continue
            raise ConfigError(no_such_option(name, _long_options(ctx), moved))
        (overrides if "=" in arg else words).append(arg)
    return overrides, words


def legacy(words: list[str], given: Optional[str], command: str, option: str) -> Optional[str]:
    """The deprecated positional form of ``option`` (``medssl check DATA``): its value, with a warning."""
    if not words:
        return given
    if given is not None or len(words) > 1:
        raise ConfigError(f"unexpected argument {words[-1]!r} (settings are KEY=VALUE, e.g. train.lr=1e-3)")
    warn(f"'medssl {command} {words[0]}' is deprecated: use 'medssl {command} {option} {words[0]}'")
    return words[0]


def no_words(words: list[str]) -> None:
    if words:
        raise ConfigError(f"unexpected argument {words[0]!r} (settings are KEY=VALUE, e.g. train.lr=1e-3)")


def split_section(overrides: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """``(overrides of section prefix.*, the rest)``."""
    mine = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] == prefix]
    return mine, [o for o in overrides if o not in mine]


def section_settings(cls: type, overrides: list[str], prefix: str):
    """Dataclass ``cls`` from ``prefix.key=value`` overrides (unknown key or wrong type: one error naming it)."""
    from medssl.config import build_dataclass, parse_overrides

    tree = parse_overrides(overrides).get(prefix, {})
    if not isinstance(tree, dict):
        raise ConfigError(f"override '{prefix}' needs a key: {prefix}.KEY=VALUE")
    settings = build_dataclass(cls, tree, prefix + ".")
    settings.validate()
    return settings


def load(config: Optional[str], overrides: list[str], *, section: str | None = None, **extra):
    """The resolved :class:`~medssl.config.Config`: ``config`` + ``extra`` (dotted keys) + ``overrides``."""
    import medssl.config as mc

    known = {f.name for f in dataclasses.fields(mc.Config)}
    for item in overrides if section else ():  # name the command's own section among the known keys
        key = item.split("=", 1)[0]
        if key.split(".", 1)[0] not in known:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(known | {section}))})")
    tree: dict = {}
    for dotted, value in extra.items():
        if value is None:
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    import medssl.methods  # noqa: F401  (registers the methods' option sections, so pretrain.<section> is checked)

    return mc.load_config(config, overrides=overrides, extra=tree)


def usage_message(exc: Exception) -> str:
    """One line for a click usage error (bad choice, missing argument, unknown option)."""
    name = getattr(exc, "option_name", None)
    if type(exc).__name__ == "NoSuchOption" and name:
        return no_such_option(name, getattr(exc, "possibilities", None) or [])
    text = " ".join(exc.format_message().split()).replace("Value error, ", "")
    return text[:1].lower() + text[1:]
