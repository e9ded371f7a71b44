"""Validation-gated SAM refinement ("+SAM (auto)", ``policy: auto``) against the coarse masks, LiteMedSAM on CPU.

    python benchmarks/sam_auto.py hippocampus               # random init, M = 1, 2, 3 seeds (medssl experiment)
    python benchmarks/sam_auto.py hippocampus --reuse-cells runs/hippocampus_cpu   # skip the training if done
    python benchmarks/sam_auto.py ct                        # the CT example
    python benchmarks/sam_auto.py phantom                   # the demo phantom, M = 1, 4, 3 seeds
    python benchmarks/sam_auto.py phantom --quick           # smoke test: one tiny cell, results not written
    python benchmarks/sam_auto.py all                       # hippocampus, ct and phantom

Tables go to ``benchmarks/results/sam_auto_{hippocampus,ct,phantom}.md`` (+ ``.csv``); work files to ``--work``
(default ``runs/sam_auto``), where a killed run resumes (finished cells and SAM steps are read back).

* Hippocampus and the phantom run ``medssl experiment`` with ``sam: {policy: auto}``: each cell's policy per
  class is chosen on that cell's validation patients (predicted by the cell's model) and applied to its test
  volumes; ``results_sam.md`` pairs coarse and refined Dice per (M, seed). The Hippocampus grid is the
  ``hippocampus_cpu`` preset restricted to random init at M = 1, 2 (3 seeds, the first 8 test volumes per cell).
* The CT example is one volume, so it has no validation patients. As a stand-in, the validation cases are the
  same CT with the ground truth degraded under other seeds (``--val-seeds``, default 1 2 3) and the test case is
  the seed-0 degradation of ``sam_results.py refine-ct``: the choice never sees the test coarse mask, but it does
  see the same image and anatomy, so this is a check of the rule, not a held-out test. For reference only (not
  used for choosing), every candidate policy is also scored on the test case.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sam_results import CT_IMAGE, CT_ORGANS, CT_SEG, RESULTS, degrade  # noqa: E402

TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "train.epochs=1", "train.steps_per_epoch=2"]


def validation_table(src_dir: Path) -> str:
    """Per (M, class): mean validation Dice over the cells of keep, fixed ``replace`` and the chosen policy
    (from each cell's ``sam/refined/refine.json``): what the choice avoided or gained on validation."""
    acc: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for f in sorted(src_dir.glob("cells/*/sam/refined/refine.json")):
        m = int(re.search(r"-f\d+-m(\d+)-s\d+$", f.parts[-4]).group(1))  # <method>-f<fold>-m<M>-s<seed>
        for cls, rec in json.loads(f.read_text()).get("policy", {}).get("classes", {}).items():
            v = rec["val_dice"]
            acc.setdefault((m, cls), []).append((v["keep"], v["replace"], rec["val_dice_choice"]))
    lines = ["Validation patients of each cell (what the choice saw): mean 3D Dice over the cells of keep (the "
             "coarse mask), fixed `replace` and the chosen policy.", "",
             "| M | class | cells | keep | fixed replace | chosen |", "|---|---|---|---|---|---|"]
    for (m, cls), vals in sorted(acc.items()):
        k, r, c = (float(np.mean([v[i] for v in vals])) for i in range(3))
        lines.append(f"| {m} | {cls} | {len(vals)} | {k:.3f} | {r:.3f} | {c:.3f} |")
    return "\n".join(lines) + "\n"


def _publish(src_dir: Path, name: str, header: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(header + "\n\n" + (src_dir / "results_sam.md").read_text() + "\n"
                                        + validation_table(src_dir))
    shutil.copyfile(src_dir / "results_sam.csv", RESULTS / f"{name}.csv")
    print(f"-> {RESULTS / name}.md", flush=True)


def _copy_cells(src: Path, out: Path, names: list[str]) -> None:
    """Copy finished fine-tuning cells (not their SAM outputs) so that only the SAM step runs."""
    for name in names:
        cell = src / "cells" / name
        if (cell / "train_state.json").is_file() and not (out / "cells" / name).exists():
            shutil.copytree(cell, out / "cells" / name, ignore=shutil.ignore_patterns("sam", "metrics_sam.json"))
            print(f"reusing cell {name} from {src}", flush=True)


def run_hippocampus(work: Path, budgets: list[int], seeds: list[int], sam_cases: int, reuse: str | None) -> None:
    from medssl.pipeline.experiment import load_experiment, run_experiment

    out = work / "hippocampus"
    exp = load_experiment("hippocampus_cpu", overrides=[
        "methods=[random]", f"budgets={budgets}", f"seeds={seeds}", "sam_methods=[random]", f"sam_budgets={budgets}",
        f"sam_cases={sam_cases}", "sam={policy: auto}", f"output_dir={out}"])
    if reuse:
        _copy_cells(Path(reuse).expanduser(), out, [f"random-f0-m{b}-s{s}" for b in budgets for s in seeds])
    t0 = time.perf_counter()
    run_experiment(exp)
    _publish(out, "sam_auto_hippocampus",
             f"**Hippocampus, `hippocampus_cpu` random init, M = {budgets}, seeds {seeds}, first {sam_cases} test "
             f"volumes per cell, `sam: {{policy: auto}}`** ({time.perf_counter() - t0:.0f} s; "
             "`python benchmarks/sam_auto.py hippocampus`)")


def run_phantom(work: Path, quick: bool) -> None:
    from medssl.data.phantom import write_phantom_dataset
    from medssl.pipeline.experiment import load_experiment, run_experiment

    out = work / ("phantom_quick" if quick else "phantom")
    root = write_phantom_dataset(out / "data", n_cases=8 if quick else 16, **({"shape": (32, 32, 16)} if quick else {}))
    spec = {"base": "demo", "data": str(root), "output_dir": str(out / "exp"), "methods": ["random"],
            "budgets": [1] if quick else [1, 4], "seeds": [0] if quick else [0, 1, 2],
            "finetune": [*TINY, f"data.cache_dir={out / 'cache'}"] if quick else [],
            "sam_methods": ["random"], "sam_cases": 1 if quick else 0, "sam": {"policy": "auto"}}
    (out / "exp.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    run_experiment(load_experiment(out / "exp.yaml"))
    print((out / "exp" / "results_sam.md").read_text())
    if not quick:
        _publish(out / "exp", "sam_auto_phantom",
                 f"**Demo phantom (16 cases, `demo` preset), random init, M = 1, 4, seeds 0-2, all test volumes, "
                 f"`sam: {{policy: auto}}`** ({time.perf_counter() - t0:.0f} s; "
                 "`python benchmarks/sam_auto.py phantom`)")


def _ct_inputs(d: Path, val_seeds: list[int]) -> None:
    from medssl.data.readers import read_volume
    from medssl.data.volume import save_like

    seg_vol = read_volume(CT_SEG, role="label")
    classes = sorted(CT_ORGANS)
    gt = np.where(np.isin(seg_vol.array, classes), seg_vol.array, 0).astype(np.uint8)
    names = {"labels": {"0": "background", **{str(k): v for k, v in CT_ORGANS.items()}}}
    for part, seeds in (("test", [0]), ("val", val_seeds)):
        for seed in seeds:
            case = f"{part}_s{seed}"
            img = d / "images" / f"{case}.nii.gz"
            img.parent.mkdir(parents=True, exist_ok=True)
            if not img.exists():
                os.symlink(CT_IMAGE.resolve(), img)
            save_like(gt, seg_vol, d / "labels" / f"{case}.nii.gz")
            save_like(degrade(gt, classes, seed)[0], seg_vol, d / part / f"{case}.nii.gz")
        (d / part / "predictions.json").write_text(json.dumps(names))


def run_ct(work: Path, val_seeds: list[int]) -> None:
    from medssl.config import DataConfig
    from medssl.sam.policy import choose_policies, pick
    from medssl.sam.refine import RefineConfig
    from medssl.pipeline.refine import refine_predictions
    from medssl.sam.segmenter import build_segmenter

    d = work / "ct"
    _ct_inputs(d, val_seeds)
    seg = build_segmenter("litemedsam")
    t0 = time.perf_counter()
    res = refine_predictions(d / "test", d / "images", d / "labels", out_dir=d / "auto",
                             cfg=RefineConfig(policy="auto"), data=DataConfig(), segmenter=seg,
                             validation=(d / "val", d / "images", d / "labels"))
    ref = choose_policies(d / "test", d / "images", d / "labels", cfg=RefineConfig(policy="auto"), data=DataConfig(),
                          segmenter=seg)  # reference only: every candidate on the test case
    secs = time.perf_counter() - t0
    rows, lines = [], [
        f"**CT example, `policy: auto`**: validation = the CT degraded with seeds {val_seeds}, test = seed 0 (the "
        "`sam_refine_ct` coarse mask); 3D Dice per organ. `fixed replace` and `best on test` are reference columns "
        "computed on the test case (one class refined at a time), never used for the choice. "
        f"({secs:.0f} s; `python benchmarks/sam_auto.py ct`)", "",
        "| organ | choice (validation Dice keep → choice) | coarse | +SAM (auto) | fixed replace | best on test |",
        "|---|---|---|---|---|---|"]
    for name, pc in res["per_class"].items():
        ch, rf = res["policy"]["classes"][name], ref["classes"][name]
        best = pick(rf["val_dice"], ref["candidates"], 0.0)  # keep on ties
        rows.append({"organ": name, "choice": ch["choice"], "val_keep": ch["val_dice_keep"],
                     "val_choice": ch["val_dice_choice"], "coarse": pc["dice_before"], "auto": pc["dice_after"],
                     "replace": rf["val_dice"]["replace"], "best_on_test": best,
                     "best_on_test_dice": rf["val_dice"][best]})
        lines.append(f"| {name} | {ch['choice']} ({ch['val_dice_keep']:.3f} → {ch['val_dice_choice']:.3f}) | "
                     f"{pc['dice_before']:.3f} | {pc['dice_after']:.3f} | {rf['val_dice']['replace']:.3f} | "
                     f"{best} {rf['val_dice'][best]:.3f} |")
    lines += ["", f"Mean over organs: coarse {res['before']['dice_mean']:.3f}, "
                  f"+SAM (auto) {res['after']['dice_mean']:.3f}."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sam_auto_ct.md").write_text("\n".join(lines) + "\n")
    with open(RESULTS / "sam_auto_ct.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["hippocampus", "ct", "phantom", "all"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "sam_auto"), help="work folder (resumable)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2], help="hippocampus: label budgets M")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="hippocampus: seeds")
    ap.add_argument("--sam-cases", type=int, default=8, help="hippocampus: test volumes refined per cell (0 = all)")
    ap.add_argument("--reuse-cells", default=None, help="hippocampus: an experiment folder with finished cells")
    ap.add_argument("--val-seeds", type=int, nargs="+", default=[1, 2, 3], help="ct: degradations used as validation")
    ap.add_argument("--quick", action="store_true", help="phantom: one tiny cell, a smoke test")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the presets' relative data paths
    work = Path(args.work).expanduser().resolve()
    if args.what in ("ct", "all"):
        run_ct(work, args.val_seeds)
    if args.what in ("phantom", "all"):
        run_phantom(work, args.quick)
    if args.what in ("hippocampus", "all"):
        run_hippocampus(work, args.budgets, args.seeds, args.sam_cases, args.reuse_cells)


if __name__ == "__main__":
    main()
