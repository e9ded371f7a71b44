"""The ``medssl`` command line. Commands take ``--config PRESET|FILE``, ``--data PATH`` and dotted overrides.

    medssl finetune --config hippocampus --data ../shared/data/Task04_Hippocampus split.budget=5 train.epochs=20

Every error about input (files, keys, values, options) prints one ``medssl: error:`` line and exits non-zero;
nothing half-written is left behind. The commands are in :mod:`medssl.cli.commands` and :mod:`medssl.cli.sam`,
what they share (options, overrides, choices) in :mod:`medssl.cli.common`.
"""

from __future__ import annotations

import sys

from medssl.cli import commands, sam  # noqa: F401  (registration of the commands)
from medssl.cli.common import app, usage_message
from medssl.errors import MedsslError

__all__ = ["app", "main"]


def _is_usage_error(exc: Exception) -> bool:
    """A click usage error (typer's bundled click or click itself): bad choice, missing argument, no such option."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=sys.argv[1:] if argv is None else argv, prog_name="medssl", standalone_mode=False)
    except MedsslError as exc:
        print(f"medssl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            print(f"medssl: error: {usage_message(exc)}", file=sys.stderr)
        return exc.exit_code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
