"""Names of the per-class merge policies for SAM refinement and their parsing (see :mod:`medssl.sam.policy`)."""

from __future__ import annotations

from dataclasses import dataclass

from medssl.errors import ConfigError

KEEP = "keep"
POLICY_MODES = ("fixed", "auto")
RULES = ("replace", "intersect", "union")
DEFAULT_CANDIDATES = ("replace", "intersect", "union", "gate0.5", "gate0.8", "component-replace",
                      "component-intersect", "component-union", "component-gate0.5", "component-gate0.8")
RULE = ("per class, the candidate with the highest mean validation 3D Dice (the first in candidate order on ties) "
        "is chosen only if it beats keep's mean by more than the margin; otherwise keep")


@dataclass(frozen=True)
class Policy:
    name: str
    box_mode: str = "global"
    merge: str = "replace"
    iou_threshold: float = 0.0

    @property
    def keep(self) -> bool:
        return self.name == KEEP


def parse_policy(name) -> Policy:
    """``keep`` or ``[component-](replace|intersect|union|gate<t>)`` -> :class:`Policy` (ConfigError otherwise)."""
    text = str(name).strip()
    if text == KEEP:
        return Policy(KEEP)
    box, rule = ("per_component", text[len("component-"):]) if text.startswith("component-") else ("global", text)
    if rule in RULES:
        return Policy(text, box, rule)
    if rule.startswith("gate"):
        try:
            t = float(rule[4:])
        except ValueError:
            t = -1.0
        if 0.0 < t <= 1.0:
            return Policy(text, box, "replace", t)
    raise ConfigError(f"refine policy {name!r}: expected keep, replace, intersect, union or gate<t> with "
                      "0 < t <= 1, optionally prefixed 'component-' (e.g. component-gate0.8)")


def check_policy_options(cfg) -> None:
    """The policy options of a :class:`~medssl.sam.refine.RefineConfig` (one-line ConfigError)."""
    if cfg.policy not in POLICY_MODES:
        raise ConfigError(f"refine option 'policy' must be one of {POLICY_MODES}, got {cfg.policy!r}")
    for name in [*cfg.candidates, *cfg.class_policies.values()]:
        parse_policy(name)
    if any(not str(c).isdigit() or int(c) <= 0 for c in cfg.class_policies):
        raise ConfigError(f"refine option 'class_policies': keys must be class ids > 0, got {list(cfg.class_policies)}")
    if cfg.policy == "auto" and cfg.class_policies:
        raise ConfigError("refine options 'class_policies' and policy 'auto' exclude each other")
    if not 0.0 <= float(cfg.auto_margin) < 1.0:
        raise ConfigError(f"refine option 'auto_margin' must lie in [0, 1), got {cfg.auto_margin}")


def candidates_of(cfg) -> list[Policy]:
    out = [parse_policy(n) for n in (cfg.candidates or DEFAULT_CANDIDATES)]
    return list({p.name: p for p in out if not p.keep}.values())
