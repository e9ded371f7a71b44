"""Experiment tables and figures: mean ± sd per method and M, a paired Wilcoxon test against random
init (pairs = same fold and seed, hence the same labelled patients), and a Dice-vs-M plot."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap, wilcoxon

from medssl.data.atomic import atomic_path


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def paired_diffs(rows: list[dict], method: str, m, key: str = "dice_mean", reference: str = "random"
                 ) -> np.ndarray:
    """``method`` - ``reference`` per (fold, seed) pair at label budget ``m`` (pairs share the labelled patients)."""
    base = {(r["fold"], r["seed"]): r[key] for r in rows if r["method"] == reference and r["M"] == m}
    return np.array([r[key] - base[(r["fold"], r["seed"])] for r in rows
                     if r["method"] == method and r["M"] == m and (r["fold"], r["seed"]) in base], dtype=float)


def bootstrap_ci(diff: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean paired difference (scipy, 10,000 resamples, seeded); None below 3 pairs."""
    if len(diff) < 3:
        return None
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])
    res = bootstrap((diff,), np.mean, confidence_level=level, n_resamples=10_000, method="percentile",
                    random_state=0)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_test(rows: list[dict], method: str, m, key: str = "dice_mean", reference: str = "random"
                ) -> tuple[float | None, float | None, int]:
    """(mean difference vs the reference row, two-sided Wilcoxon p, number of pairs) over (fold, seed) pairs."""
    diff = paired_diffs(rows, method, m, key, reference)
    if not len(diff):
        return None, None, 0
    try:
        p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    except ValueError:
        p = None
    return float(diff.mean()), p, len(diff)


def _paired_cells(rows: list[dict], method: str, budgets: list, key: str, reference: str) -> list[str]:
    """One table cell per M: ``Δ mean [bootstrap CI], p=…, (n=…)`` of ``method`` against ``reference``."""
    cells = []
    for m in budgets:
        d, p, n = paired_test(rows, method, m, key, reference)
        ci = bootstrap_ci(paired_diffs(rows, method, m, key, reference))
        cells.append("–" if d is None else f"Δ {d:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                     + f", p={'n/a' if p is None else f'{p:.2f}'} (n={n})")
    return cells


def results_table(rows: list[dict], key: str = "dice_mean", reference: str = "random",
                  controls: dict | None = None) -> str:
    """Markdown: one row per method, one column per M (mean ± sd over folds x seeds), then the paired tests against
    ``reference`` and, for the rows in ``controls`` ({row: control}), against their own control row."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["M"] for r in rows})
    def head(first: str) -> list[str]:
        return [f"| {first} | " + " | ".join(f"M={m}" for m in budgets) + " |", "|---|" + "---|" * len(budgets)]

    lines = [f"Per-volume 3D Dice ({key}), mean ± sd over folds × seeds", "", *head("method")]
    for method in methods:
        cells = [_mean_sd([r[key] for r in rows if r["method"] == method and r["M"] == m]) for m in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if reference in methods and len(methods) > 1:
        lines += ["", f"Paired differences against '{reference}' (pairs: same fold and seed, so the same labelled "
                  "patients): Δ = mean difference [percentile bootstrap 95 % CI, given from 3 pairs on], "
                  "two-sided Wilcoxon signed-rank p, n = pairs. The smallest possible p is 2/2^n (0.25 at 3 "
                  "pairs, 0.004 at 9).", "", *head("method")]
        lines += [f"| {method} | " + " | ".join(_paired_cells(rows, method, budgets, key, reference)) + " |"
                  for method in methods if method != reference]
    pairs = [(row, control) for row, control in (controls or {}).items() if row in methods and control in methods]
    if pairs:
        lines += ["", "Paired differences against each row's own control (the same network or init without the "
                  "part the row adds), as above:", "", *head("row − control")]
        lines += [f"| {row} − {control} | " + " | ".join(_paired_cells(rows, row, budgets, key, control)) + " |"
                  for row, control in pairs]
    return "\n".join(lines)


def sam_table(rows: list[dict]) -> str:
    """Markdown for the "+SAM" post-step: per method and M, Dice of the coarse predictions and of their
    refinement on the same test cases ("<method>+SAM" or "<method>+SAM (auto)"), the paired gain (pairs: fold
    and seed; bootstrap CI from 3 pairs, Wilcoxon p, pairs made worse), the coarse → refined Dice and paired gain
    per class, and for ``policy: auto`` the policies chosen per class on validation (count over the cells)."""
    bases = [m for m in dict.fromkeys(r["method"] for r in rows) if "+SAM" not in m]
    refined = {b: [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith(f"{b}+SAM")] for b in bases}
    budgets = sorted({r["M"] for r in rows})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    classes = [k[5:] for k in keys if k.startswith("dice_") and k != "dice_mean"]
    n = sorted({r["n_test"] for r in rows})
    lines = [f"SAM refinement of each cell's test predictions ({', '.join(map(str, n))} test volumes per cell): "
             "per-volume 3D Dice, mean ± sd over folds × seeds; Δ = paired mean gain [bootstrap 95 % CI, given from "
             "3 pairs on], Wilcoxon p, n = pairs (worse = pairs the refinement made worse).", "",
             "| method | " + " | ".join(f"M={m}" for m in budgets) + " |", "|---|" + "---|" * len(budgets)]
    gains = {}
    for method in bases:
        for name in (method, *refined[method]):
            cells = [_mean_sd([r["dice_mean"] for r in rows if r["method"] == name and r["M"] == m])
                     for m in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for name in refined[method]:
            cells = []
            for m in budgets:
                before = {(r["fold"], r["seed"]): r for r in rows if r["method"] == method and r["M"] == m}
                pairs = [(r, before[(r["fold"], r["seed"])]) for r in rows
                         if r["method"] == name and r["M"] == m and (r["fold"], r["seed"]) in before]
                gains[(name, m)] = pairs
                diff = np.array([a["dice_mean"] - b["dice_mean"] for a, b in pairs], dtype=float)
                if not len(diff):
                    cells.append("–")
                    continue
                p = float(wilcoxon(diff).pvalue) if len(diff) > 1 and np.any(diff != 0) else None
                ci = bootstrap_ci(diff)
                worse = int((diff < 0).sum())
                cells.append(f"Δ {diff.mean():+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                             + f", p={'n/a' if p is None else f'{p:.2f}'} (n={len(diff)}, worse {worse})")
            label = f"{method}: gain" + (name[len(method) + 4:] if len(refined[method]) > 1 else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if classes:
        lines += ["", "Per class: coarse → refined (mean over folds × seeds), paired gain Δ", "",
                  "| method | M | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for (name, m), pairs in gains.items():
            if pairs:
                cells = []
                for c in classes:
                    b, a = (np.array([x[i].get(f"dice_{c}", np.nan) for x in pairs], dtype=float) for i in (1, 0))
                    cells.append(f"{np.nanmean(b):.3f} → {np.nanmean(a):.3f} (Δ {np.nanmean(a - b):+.3f})")
                lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    choice_cols = [k for k in keys if k.startswith("choice_")]
    if choice_cols:
        lines += ["", "Policy chosen per class on each cell's validation patients (number of cells; keep = coarse "
                  "mask unchanged)", "", "| method | M | " + " | ".join(k[7:] for k in choice_cols) + " |",
                  "|---|---|" + "---|" * len(choice_cols)]
        for (name, m), pairs in gains.items():
            picked = [a for a, _ in pairs if any(a.get(k) for k in choice_cols)]
            if picked:
                cells = [", ".join(f"{v} ×{k}" for v, k in Counter(str(a.get(c, "–")) for a in picked).most_common())
                         for c in choice_cols]
                lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: list[dict], path: str | Path, key: str = "dice_mean", reference: str = "random") -> Path:
    """Dice vs M per method (mean ± sd) and, next to it, each method's paired Δ against ``reference`` with its
    bootstrap 95 % CI (mean only below 3 pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    paired = reference in methods and len(methods) > 1
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12 if paired else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if paired:
        _delta_panel(axes[0, 1], rows, methods, key, reference)
    for method in dict.fromkeys(r["method"] for r in rows):
        budgets = sorted({r["M"] for r in rows if r["method"] == method})
        vals = [[r[key] for r in rows if r["method"] == method and r["M"] == m] for m in budgets]
        means = [np.mean(v) for v in vals]
        sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(budgets, means, yerr=sds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("labelled patients M")
    ax.set_ylabel("per-volume 3D Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _delta_panel(ax, rows: list[dict], methods: list[str], key: str, reference: str) -> None:
    others = [m for m in methods if m != reference]
    budgets = sorted({r["M"] for r in rows})
    width = 0.8 / max(1, len(budgets))
    for j, m in enumerate(budgets):
        xs, means, lo, hi = [], [], [], []
        for i, method in enumerate(others):
            diff = paired_diffs(rows, method, m, key, reference)
            if not len(diff):
                continue
            ci = bootstrap_ci(diff) or (diff.mean(), diff.mean())
            xs.append(i + (j - (len(budgets) - 1) / 2) * width)
            means.append(diff.mean())
            lo.append(diff.mean() - ci[0])
            hi.append(ci[1] - diff.mean())
        ax.errorbar(xs, means, yerr=[lo, hi], fmt="o", capsize=3, label=f"M={m}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(others)), others, rotation=45, ha="right")
    ax.set_ylabel(f"paired Δ Dice vs {reference} (95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend()
