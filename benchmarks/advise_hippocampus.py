"""Which patients (and which slice) to label first on Hippocampus: the advisor against seeded random draws.

    python benchmarks/advise_hippocampus.py                      # both parts below
    python benchmarks/advise_hippocampus.py --part patients      # the label-budget comparison only
    python benchmarks/advise_hippocampus.py --part slices        # the key-slice comparison only (minutes)
    python benchmarks/advise_hippocampus.py --part patients --tabulate-only   # tables from an existing grid

**patients** writes ``experiment.yaml`` (an experiment with the ``selection:`` axis) to ``--out`` and runs it with
``output_dir`` ``--runs``: random init and PCL-pretrained fine-tuning, M = 1, 2, 5, folds 0-2, seeds 0-2, each
cell once with the seeded draw and once per advisor selection (by default ``kcenter``, ``typical`` and
``facility`` on the fold's PCL encoder, and ``facility`` on intensity statistics). Everything but the labelled
patients is shared by the cells of one (method, fold, M, seed), so each advisor cell is paired with a seeded
draw. ``medssl experiment`` resumes, so a killed run continues. Tables: ``patients.md`` / ``patients.csv`` --
per method, selection and M, the mean, sd and worst test Dice over the fold x seed draws, the mean over folds
of each fold's worst seed, and the paired difference to the seeded draw: per fold, with a 95 % t-interval over
the folds (the advice is one choice per fold) and a Wilcoxon test over the fold x seed pairs.

**slices** compares key-slice rules for propagation on the test volumes of fold 0 (never seen by a fold-0
encoder): the oracles ``largest`` / ``middle`` (per class, from the full label) against the label-free
``centre`` (slice Z // 2), ``appearance`` and ``medoid`` (:mod:`medssl.advise.slices`, on 8 x 8 thumbnails and,
with ``--init``, on an encoder's features). Each key slice's annotation is propagated by copy +-k and, when the installed
medssl has it, by registration; a class missing from a label-free key slice scores Dice 0. Tables:
``slices.md`` / ``slices.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
SELECTIONS = ["seeded", "kcenter@pcl", "typical@pcl", "facility@pcl", "facility"]
PRETRAIN = ["train.epochs=20", "train.steps_per_epoch=100", "train.batch_size=32", "train.lr=0.001",
            "pretrain.pcl_theta=0.1"]  # as the hippocampus_ssl experiment
FINETUNE = ["train.epochs=12", "train.steps_per_epoch=25", "train.warmup_steps=25"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------ patients
def experiment_spec(args) -> dict:
    pcl = {"name": "pcl", "method": "pcl"}
    if args.pcl_init:
        pcl["init"] = args.pcl_init
    methods = [pcl if m == "pcl" else m for m in args.methods.split(",")]
    return {"base": args.base, "data": str(args.data), "output_dir": str(args.runs), "methods": methods,
            "budgets": _ints(args.budgets), "seeds": _ints(args.seeds), "folds": _ints(args.folds),
            "pretrain": PRETRAIN, "finetune": FINETUNE, "selection": args.selections.split(","),
            "reference": "random"}


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, selection, M): mean / sd / worst over draws, mean of per-fold worst, paired Δ vs seeded.

    The advice is one choice per fold (the seeds vary only the training), so the 95 % interval of Δ is a
    t-interval over the folds' mean paired differences, not over the fold x seed pairs."""
    from scipy.stats import t as student_t
    from scipy.stats import wilcoxon

    out = []
    key = lambda r: (r["method"], r.get("selection") or "seeded", int(r["M"]))  # noqa: E731
    seeded = {(r["method"], int(r["M"]), int(r["fold"]), int(r["seed"])): float(r["dice_mean"])
              for r in rows if (r.get("selection") or "seeded") == "seeded"}
    for k in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == k]
        dice = [float(r["dice_mean"]) for r in group]
        folds = sorted({int(r["fold"]) for r in group})
        worst_fold = [min(float(r["dice_mean"]) for r in group if int(r["fold"]) == f) for f in folds]
        pairs = [(int(r["fold"]), float(r["dice_mean"]) - seeded[(k[0], k[2], int(r["fold"]), int(r["seed"]))])
                 for r in group if (k[0], k[2], int(r["fold"]), int(r["seed"])) in seeded]
        diff = np.array([d for _, d in pairs], dtype=float)
        per_fold = np.array([np.mean([d for f, d in pairs if f == g]) for g in sorted({f for f, _ in pairs})])
        paired = k[1] != "seeded" and len(diff) > 0
        p = float(wilcoxon(diff).pvalue) if paired and len(diff) > 1 and np.any(diff != 0) else None
        ci = (None, None)
        if paired and len(per_fold) > 1:
            half = student_t.ppf(0.975, len(per_fold) - 1) * per_fold.std(ddof=1) / np.sqrt(len(per_fold))
            ci = (float(per_fold.mean() - half), float(per_fold.mean() + half))
        out.append({"method": k[0], "selection": k[1], "M": k[2], "n": len(dice), "folds": len(folds),
                    "mean": statistics.mean(dice), "sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                    "worst": min(dice), "mean_fold_worst": statistics.mean(worst_fold),
                    "delta_vs_seeded": float(diff.mean()) if paired else None,
                    "fold_deltas": " ".join(f"{d:+.3f}" for d in per_fold) if paired else "",
                    "ci_low": ci[0], "ci_high": ci[1], "p": p})
    return out


def patients_table(summary: list[dict]) -> str:
    lines = ["Per-volume 3D Dice on the test fold; draws = folds x seeds. worst = lowest draw; fold-worst = mean over "
             "folds of each fold's lowest seed; Δ = paired mean difference to the seeded draw of the same "
             "(method, fold, M, seed); per fold = each fold's mean Δ; 95 % CI = t-interval over those fold means "
             "(the advice is one choice per fold); p = two-sided Wilcoxon over the fold x seed pairs.", "",
             "| method | selection | M | folds | n | mean ± sd | worst | fold-worst | Δ vs seeded | per fold | 95 % CI "
             "| p |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        d = "–" if s["delta_vs_seeded"] is None else f"{s['delta_vs_seeded']:+.3f}"
        ci = "–" if s["ci_low"] is None else f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
        p = "–" if s["p"] is None else f"{s['p']:.2g}"
        lines.append(f"| {s['method']} | {s['selection']} | {s['M']} | {s['folds']} | {s['n']} "
                     f"| {s['mean']:.3f} ± {s['sd']:.3f} | {s['worst']:.3f} | {s['mean_fold_worst']:.3f} | {d} "
                     f"| {s['fold_deltas'] or '–'} | {ci} | {p} |")
    return "\n".join(lines)


def patients_plot(rows: list[dict], path: Path) -> None:
    """One panel per fine-tuning method: each draw's test Dice, seeded (left) and advised (right) per M, a thin
    line joining each paired (fold, seed); colour = fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.data import atomic

    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({int(r["M"]) for r in rows})
    advised = [s for s in dict.fromkeys(r.get("selection") or "seeded" for r in rows) if s != "seeded"]
    folds = sorted({int(r["fold"]) for r in rows})
    colour = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(folds)}
    dice = {(r["method"], r.get("selection") or "seeded", int(r["M"]), int(r["fold"]), int(r["seed"])):
            float(r["dice_mean"]) for r in rows}
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, m in enumerate(budgets):
            for (meth, sel, mm, f, s), d in dice.items():
                if meth != method or mm != m:
                    continue
                if sel == "seeded":
                    ax.scatter(i - 0.2, d, color=colour[f], marker="o", s=22)
                else:
                    x = i + 0.2 * (1 + advised.index(sel))
                    ax.scatter(x, d, color=colour[f], marker="*", s=60)
                    if (meth, "seeded", mm, f, s) in dice:
                        ax.plot([i - 0.2, x], [dice[(meth, "seeded", mm, f, s)], d], color=colour[f], lw=0.6,
                                alpha=0.6)
        ax.set_xticks(range(len(budgets)), [f"M = {m}" for m in budgets])
        ax.set_title(f"{method} init: seeded (o) vs {', '.join(advised)} (*)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test Dice (mean over the test volumes)")
    handles = [plt.Line2D([], [], color=colour[f], marker="o", ls="", label=f"fold {f}") for f in folds]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def run_patients(args) -> None:
    from medssl.pipeline.experiment import load_experiment, read_results, run_experiment

    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / "experiment.yaml"
    spec_path.write_text(yaml.safe_dump(experiment_spec(args), sort_keys=False))
    if not args.tabulate_only:
        t0 = time.time()
        run_experiment(load_experiment(spec_path))
        print(f"grid finished in {(time.time() - t0) / 3600:.2f} h")
    rows = read_results(args.runs / "results.csv")
    summary = summarise(rows)
    write_csv(args.out / "patients.csv", summary)
    (args.out / "patients.md").write_text(patients_table(summary) + "\n")
    patients_plot(rows, args.out / "patients.png")
    print(patients_table(summary))


# ------------------------------------------------------------------------------------------------ slices
def copy_window(key: int, mask: np.ndarray, z: int, k: int) -> np.ndarray:
    vol = np.zeros((z,) + mask.shape, bool)
    vol[max(0, key - k):min(z, key + k + 1)] = mask
    return vol


def registration_backend():
    """A function (slices, Annotation) -> {class: (Z, h, w) mask}, or None when medssl has no registration."""
    try:
        from medssl.sam import propagate as prop
    except ImportError:
        return None
    for name in ("registration", "register"):
        if name in getattr(prop, "propagation_backends", tuple)():
            def run(slices, ann, name=name):
                labels, _ = prop.propagate_volume(slices, ann, prop.PropagateConfig(backend=name))
                return {c: labels == c for c in ann.keys}
            return run
    try:
        from medssl.sam.register import register_masks

        cfg = prop.PropagateConfig()
        for key in ("reg_max_shift", "reg_max_fold", "reg_max_area_change", "reg_max_steps"):
            getattr(cfg, key)
    except (ImportError, AttributeError):
        return None
    return lambda slices, ann: register_masks(slices, ann, cfg)[0]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = int(pred.sum()) + int(gt.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & gt).sum()) / s


def key_slices(labels: np.ndarray, classes: list[int], feats: dict, rules: list[str]) -> dict[str, dict]:
    """{rule: {class: key slice}}; label-free rules give every class the same slice."""
    from medssl.advise.slices import advise_slice
    from medssl.sam.propagate import pick_key_slice

    out = {}
    for rule in rules:
        if rule in ("largest", "middle"):
            out[rule] = {c: pick_key_slice(labels == c, rule, 0) for c in classes}
        else:
            base, _, source = rule.partition(":")
            k = advise_slice(feats[source or "thumbnails"], base)
            out[rule] = {c: k for c in classes}
    return out


def run_slices(args) -> list[dict]:
    from medssl.advise.embed import load_encoder_model
    from medssl.advise.slices import slice_features
    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.engine.finetune import build_split
    from medssl.sam.propagate import Annotation

    cfg = load_config(args.base, overrides=[f"data.path={args.data}", "split.fold=0", *args.override])
    cache = prepare(cfg.data, progress=False)
    cases = sorted(build_split(cfg, cache).test)[:args.volumes]
    model = load_encoder_model(args.init.replace("{fold}", "0"), cache.n_classes) if args.init else None
    rules = ["largest", "middle", "centre", "appearance", "medoid"] + (
        ["appearance:encoder", "medoid:encoder"] if model is not None else [])
    methods = {f"copy±{k}": k for k in _ints(args.copy_k)}
    reg = registration_backend()
    rows = []
    for case in cases:
        images, labels = (np.asarray(a) for a in cache.case_volume(case))
        z = len(labels)
        classes = [int(c) for c in np.unique(labels) if c]
        feats = {"thumbnails": slice_features(cache, case)}
        if model is not None:
            feats["encoder"] = slice_features(cache, case, model)
        for rule, keys in key_slices(labels, classes, feats, rules).items():
            ann = Annotation({c: (k, labels[k] == c) for c, k in keys.items() if (labels[k] == c).any()}, 0, case)
            preds = {name: {c: copy_window(k_, m, z, k) for c, (k_, m) in ann.keys.items()}
                     for name, k in methods.items()}
            if reg is not None and ann.keys:
                preds["registration"] = reg(np.ascontiguousarray(images), ann)
            for name, masks in preds.items():
                for c in classes:
                    pred = masks.get(c, np.zeros(labels.shape, bool))
                    rows.append({"case": case, "rule": rule, "method": name, "class": c, "key": keys[c],
                                 "annotated": int(c in ann.keys), "dice": round(dice(pred, labels == c), 6)})
    if reg is None:
        print("registration propagation is not available in this medssl: copy baselines only", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "slices.csv", rows)
    text = slices_table(rows, len(cases))
    (args.out / "slices.md").write_text(text + "\n")
    print(text)
    return rows


def slices_table(rows: list[dict], n_volumes: int) -> str:
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Key slice rules on {n_volumes} volumes: 3D Dice per (volume, class), mean ± sd; `largest` and "
             "`middle` read the full label (oracles); the other rules read only the image. missed = share of "
             "(volume, class) absent from a label-free key slice (Dice 0).", "",
             "| rule | " + " | ".join(methods) + " | missed |", "|---|" + "---|" * (len(methods) + 1)]
    for rule in rules:
        cells = []
        for m in methods:
            d = [r["dice"] for r in rows if r["rule"] == rule and r["method"] == m]
            cells.append(f"{statistics.mean(d):.3f} ± {statistics.stdev(d) if len(d) > 1 else 0.0:.3f}")
        ann = [r["annotated"] for r in rows if r["rule"] == rule and r["method"] == methods[0]]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {1 - statistics.mean(ann):.0%} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    from medssl.data import atomic

    atomic.write_csv(path, rows)  # every key of every row as a column


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("patients", "slices", "all"), default="all")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--base", default="hippocampus_plan", help="preset or config file of every run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "advise")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "advise_hippocampus")
    ap.add_argument("--selections", default=",".join(SELECTIONS))
    ap.add_argument("--methods", default="random,pcl", help="patients: fine-tuning rows (random, pcl)")
    ap.add_argument("--budgets", default="1,2,5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--pcl-init", default="", help="reuse PCL checkpoints ('{fold}' replaced) instead of pretraining")
    ap.add_argument("--tabulate-only", action="store_true")
    ap.add_argument("--init", default="", help="slices: encoder checkpoint for medoid:encoder ('{fold}' -> 0)")
    ap.add_argument("--volumes", type=int, default=52, help="slices: test volumes of fold 0 (at most)")
    ap.add_argument("--copy-k", default="1,3,5", help="slices: copy windows k")
    ap.add_argument("--override", nargs="*", default=[], help="slices: extra config overrides")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.part in ("slices", "all"):
        run_slices(args)
    if args.part in ("patients", "all"):
        run_patients(args)


if __name__ == "__main__":
    main()
