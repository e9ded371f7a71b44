"""SAM box refinement and single-slice propagation results, with LiteMedSAM on CPU.

    python benchmarks/sam_results.py refine-ct                       # CT example, degraded ground truth
    python benchmarks/sam_results.py refine-runs --runs RUN [RUN ...]  # Hippocampus fine-tuned run folders
    python benchmarks/sam_results.py propagate --n-cases 20           # 20 Hippocampus test-fold volumes + CT
    python benchmarks/sam_results.py report                          # tables -> results/, BENCHMARKS.md

Every per-volume result is cached as JSON under ``--work`` (default ``runs/sam_bench``), so a killed run
resumes and ``report`` only reads. Comparisons, all in the same run:

* refinement: the coarse mask itself (no SAM) vs LiteMedSAM box refinement under several merge policies
  (one SAM pass: all variants, box modes -- one box per class, per component, per class grown by
  2 px -- and policies share the per-slice embedding). On the CT example the
  coarse mask is the ground truth degraded in a seeded way (per organ: erosion or dilation by 1-2 px in
  plane, then an in-plane shift of up to 3 px; organs painted in label order), plus SAM on the untouched
  ground truth (what box prompting does to a perfect mask). On Hippocampus the coarse masks are the run's
  own test-fold predictions, and again the ground truth.
* propagation: the LiteMedSAM box chain (a stand-in for SAM 2) under several stopping rules vs
  copying the annotated slice to every slice, to key +-3 slices, and the annotated slice alone. The key
  slice per class is the one with the largest area. The chain is run once with the permissive stop
  IoU < 0.3 and replayed with the stricter rules (identical to separate runs). Test-fold volumes (fold 0
  of the ``hippocampus`` preset) are sampled with ``numpy.random.default_rng(seed)``.

Latency is not reported here (these runs shared the CPU with training jobs); ``bench_sam.py`` measures it.
The comparison of every propagation method (chain, hybrid, registration, copy +-k with k chosen on validation
volumes) is ``benchmarks/propagation.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "Task04_Hippocampus"
CT_IMAGE, CT_SEG = DATA / "ct_example" / "example_ct_sm.nii.gz", DATA / "ct_example" / "example_seg.nii.gz"
CT_ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
             7: "pancreas"}  # TotalSegmentator v2 ids
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = [("replace", 0.0), ("intersect", 0.0), ("union", 0.0), ("replace", 0.5), ("replace", 0.8)]
RECORD_IOU = 0.3  # the chain is run once with this (permissive) stop; stricter rules are replayed
STOP_RULES = {"IoU<0.3": {"iou_threshold": 0.3}, "IoU<0.5 (default)": {"iou_threshold": 0.5},
              "IoU<0.7": {"iou_threshold": 0.7},
              "IoU<0.5 or area x<0.3 / >3": {"iou_threshold": 0.5, "min_area_ratio": 0.3, "max_area_ratio": 3.0}}
COPY_WINDOW = 3
BOX_MODES = {"global": {}, "per_component": {"box_mode": "per_component"}, "global_pad2": {"box_pad": 2}}


def _segmenter():
    from medssl.sam.segmenter import build_segmenter

    return build_segmenter("litemedsam")


def _json_cache(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    out = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def _dice_hd(scores: dict, classes) -> dict:
    return {str(c): {"dice": float(scores["dice"][c]),
                     "hd95": None if np.isnan(scores["hd95"][c]) else float(scores["hd95"][c]),
                     "both_empty": bool(scores["both_empty"][c])} for c in classes}


# ----------------------------------------------------------------------------------------- refinement
def degrade(gt: np.ndarray, classes, seed: int) -> tuple[np.ndarray, dict]:
    """Seeded coarse mask: per class erosion/dilation (1-2 px, in plane), then an in-plane shift (<= 3 px)."""
    rng = np.random.default_rng(seed)
    out, params = np.zeros_like(gt), {}
    st = np.zeros((3, 3, 3), bool)
    st[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    for c in classes:
        m = gt == c
        op, it = str(rng.choice(["erode", "dilate"])), int(rng.integers(1, 3))
        shift = [int(v) for v in rng.integers(-3, 4, size=2)]
        m = (ndimage.binary_erosion if op == "erode" else ndimage.binary_dilation)(m, st, iterations=it)
        m = ndimage.shift(m.astype(np.uint8), (*shift, 0), order=0, mode="constant") > 0
        out[m] = c
        params[str(c)] = {"op": op, "iterations": it, "shift_xy": shift}
    return out, params


def refine_sweep(norm, variants: dict[str, np.ndarray], gt, spacing, axis, seg, classes,
                 box_modes=("global", "per_component", "global_pad2")) -> dict[str, dict]:
    """Per coarse variant: scores of the coarse mask and of every (box mode, merge, IoU threshold) policy.

    All variants and box modes share one image embedding per slice (one SAM pass in total)."""
    from medssl.evaluation.metrics import volume_scores
    from medssl.sam.refine import RefineConfig, merge_volume, predict_volume_multi, prediction_stats

    n = max(classes) + 1
    jobs = [(name, bm) for name in variants for bm in box_modes]
    t0 = time.perf_counter()
    preds = predict_volume_multi(norm, [(variants[v], RefineConfig(**BOX_MODES[bm])) for v, bm in jobs], seg,
                                 axis, classes=classes)
    n_emb = sum(any(p[z] is not None for p in preds) for z in range(len(preds[0])))
    sps = (time.perf_counter() - t0) / max(n_emb, 1)
    out = {v: {"coarse": _dice_hd(volume_scores(variants[v], gt, n, spacing, axis=axis), classes), "stats": {}}
           for v in variants}
    for (v, bm), pr in zip(jobs, preds):
        out[v]["stats"][bm] = {**prediction_stats(pr), "seconds_per_slice": sps, "embeddings": n_emb}
        for merge, thr in POLICIES:
            refined = merge_volume(variants[v], pr, RefineConfig(**BOX_MODES[bm], merge=merge, iou_threshold=thr),
                                   axis)
            out[v][f"{bm}/{merge}/iou>={thr}"] = _dice_hd(volume_scores(refined, gt, n, spacing, axis=axis), classes)
    return out


def run_refine_ct(work: Path, seed: int) -> None:
    from medssl.config import DataConfig
    from medssl.data.readers import read_volume
    from medssl.sam.refine import sam_intensity

    def job():
        image, seg_vol = read_volume(CT_IMAGE), read_volume(CT_SEG, role="label")
        classes = sorted(CT_ORGANS)
        gt = np.where(np.isin(seg_vol.array, classes), seg_vol.array, 0).astype(np.uint8)
        degraded, params = degrade(gt, classes, seed)
        norm = sam_intensity(image.array, "CT", DataConfig())
        res = refine_sweep(norm, {f"degraded_seed{seed}": degraded, "ground_truth": gt}, gt, image.spacing, 2,
                           _segmenter(), classes, box_modes=("global", "per_component"))
        res[f"degraded_seed{seed}"]["degradation"] = params
        return res
    res = _json_cache(work / "refine_ct" / f"seed{seed}.json", job)
    for name, r in res.items():
        (work / "refine_ct" / f"{name}.json").write_text(json.dumps(r, indent=1))
    print("refine-ct: done", flush=True)


def run_refine_runs(work: Path, runs: list[str], n_cases: int, seed: int) -> None:
    from medssl.data.layouts import open_dataset
    from medssl.data.readers import read_case
    from medssl.data.splits import load_split
    from medssl.engine.inference import load_predictor
    from medssl.engine.runs import RunDir
    from medssl.evaluation.evaluate import run_checkpoint
    from medssl.sam.refine import sam_intensity

    seg = _segmenter()
    for run_path in runs:
        run = RunDir(run_path)
        cfg = run.saved_config()
        split = load_split(run.path / "splits.json")
        cases = sample(split.test, n_cases, seed)
        predictor = load_predictor(run_checkpoint(run.path), batch_size=32)
        info = open_dataset(cfg.data.path, modality=cfg.data.modality)
        classes = sorted(c for c in predictor.class_names if c)
        for case in cases:
            def job():
                image, label = read_case(info.case(case), info)
                coarse = predictor.predict_volume(image)
                norm = sam_intensity(image.array, info.modality, cfg.data)
                res = refine_sweep(norm, {"pred": coarse, "gt": label.array}, label.array, image.spacing,
                                   cfg.data.axis, seg, classes)
                res["pred"]["budget_m"] = split.budget_m
                return res
            _json_cache(work / "refine_runs" / run.path.name / f"{case}.json", job)
            print(f"refine-runs {run.path.name} {case}: done", flush=True)


# ----------------------------------------------------------------------------------------- propagation
def sample(cases: list[str], n: int, seed: int) -> list[str]:
    cases = sorted(cases)
    if n >= len(cases):
        return cases
    return sorted(np.random.default_rng(seed).choice(cases, size=n, replace=False).tolist())


def hippocampus_test_cases() -> list[str]:
    from medssl.config import load_config
    from medssl.data.layouts import open_dataset
    from medssl.data.splits import kfold_patients

    cfg = load_config("hippocampus").split
    ids = [c.case_id for c in open_dataset(HIPPO).cases]
    return sorted(kfold_patients(ids, cfg.n_folds, cfg.fold_seed)[cfg.fold])


def propagate_all(image, labels: np.ndarray, classes, modality: str, seg, axis: int = 2) -> dict:
    from medssl.config import DataConfig
    from medssl.data.slicing import stack_slices, volume_slices
    from medssl.sam.propagate import PropagateConfig, annotation_from_volume, box_chain, evaluate, replay_chain
    from medssl.sam.refine import sam_intensity

    lab = np.where(np.isin(labels, classes), labels, 0)
    ann = annotation_from_volume(lab, "largest", axis)
    slices = np.ascontiguousarray(volume_slices(sam_intensity(image.array, modality, DataConfig()), axis))
    record: dict = {}
    t0 = time.perf_counter()
    _, info = box_chain(slices, ann, seg, PropagateConfig(iou_threshold=RECORD_IOU), record=record)
    secs = time.perf_counter() - t0
    out = {"key_slices": {str(c): k for c, (k, _) in ann.keys.items()}, "n_slices": int(slices.shape[0]),
           "set_image_calls": info["set_image_calls"], "seconds": secs, "methods": {}}
    for name, rule in STOP_RULES.items():
        pred = stack_slices(replay_chain(record, ann, slices.shape[0], PropagateConfig(**rule)), axis)
        ev = evaluate(pred, lab, ann, image.spacing, copy_window=COPY_WINDOW)
        out["methods"][f"chain: {name}"] = ev["propagated"]
        if name.endswith("(default)"):
            out["methods"][f"copy key+-{COPY_WINDOW}"] = ev["copy"]
            out["methods"]["slice only"] = ev["slice_only"]
            out["methods"]["copy all slices"] = evaluate(pred, lab, ann, image.spacing)["copy"]
    return out


def run_propagate(work: Path, n_cases: int, seed: int) -> None:
    from medssl.data.readers import read_volume

    seg = _segmenter()
    img, lab = read_volume(CT_IMAGE), read_volume(CT_SEG, role="label")
    _json_cache(work / "propagate" / "ct_example.json", lambda: propagate_all(img, lab.array, [1, 5, 6], "CT", seg))
    print("propagate ct_example: done", flush=True)
    for case in sample(hippocampus_test_cases(), n_cases, seed):
        def job():
            image = read_volume(HIPPO / "imagesTr" / f"{case}.nii.gz")
            label = read_volume(HIPPO / "labelsTr" / f"{case}.nii.gz", role="label")
            return propagate_all(image, label.array, [1, 2], "MRI", seg)
        _json_cache(work / "propagate" / "hippocampus" / f"{case}.json", job)
        print(f"propagate {case}: done", flush=True)


# ----------------------------------------------------------------------------------------- report
def _ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"


def _write(results: Path, name: str, rows: list[dict], md: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(results / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (results / f"{name}.md").write_text(md + "\n")


def _policy_table(results: list[dict], names: dict[int, str], title: str) -> tuple[list[dict], str]:
    """Mean Dice per class (over volumes, both-empty excluded) for the coarse mask and every policy."""
    policies = [k for k in results[0] if k not in ("stats", "degradation", "budget_m")]
    rows, lines = [], [f"**{title}** ({len(results)} volume(s)); 3D Dice per class, mean over volumes", "",
                       "| policy | " + " | ".join(names.values()) + " | mean |",
                       "|---|" + "---|" * (len(names) + 1)]
    for pol in policies:
        per = []
        for c in names:
            per.append([r[pol][str(c)]["dice"] for r in results if not r[pol][str(c)]["both_empty"]])
        means = [statistics.mean(v) if v else None for v in per]
        rows.append({"policy": pol, **{names[c]: m for c, m in zip(names, means)}})
        cells = [("–" if m is None else f"{m:.3f}") for m in means]
        defined = [m for m in means if m is not None]
        lines.append(f"| {pol} | " + " | ".join(cells) + f" | {statistics.mean(defined):.3f} |")
    emb = sum(next(iter(r["stats"].values()))["embeddings"] for r in results)
    modes = list(results[0]["stats"])
    boxes = {m: sum(r["stats"][m]["boxes"] for r in results) for m in modes}
    ious = {m: statistics.mean(r["stats"][m]["mean_predicted_iou"] for r in results
                               if r["stats"][m]["mean_predicted_iou"] is not None) for m in modes}
    lines += ["", f"LiteMedSAM: {emb} slice embeddings (shared by every box mode and policy); boxes "
                  + ", ".join(f"{m} {boxes[m]} (mean predicted IoU {ious[m]:.3f})" for m in modes)
                  + ". Latency: see the SAM speed section of BENCHMARKS.md (these runs shared the CPU)."]
    return rows, "\n".join(lines)


def report(work: Path, results: Path = RESULTS, benchmarks_md: bool = True) -> str:
    parts = []
    ct = sorted(f for f in (work / "refine_ct").glob("*.json") if not f.stem.startswith("seed"))
    if ct:
        md = []
        all_rows = []
        for f in ct:
            r = json.loads(f.read_text())
            rows, text = _policy_table([r], CT_ORGANS, f"CT example, coarse = {f.stem}")
            all_rows += [{"coarse": f.stem, **row} for row in rows]
            md.append(text)
            if r.get("degradation"):
                md.append("\nDegradation: " + ", ".join(
                    f"{CT_ORGANS[int(c)]} {p['op']}×{p['iterations']} shift {tuple(p['shift_xy'])}"
                    for c, p in r["degradation"].items()))
        _write(results, "sam_refine_ct", all_rows, "\n\n".join(md))
        parts.append("### Refinement, CT example\n\n" + "\n\n".join(md))
    runs = sorted(p for p in (work / "refine_runs").glob("*") if p.is_dir()) if (work / "refine_runs").exists() else []
    if runs:
        md, all_rows = [], []
        for run in runs:
            res = [json.loads(f.read_text()) for f in sorted(run.glob("*.json"))]
            rows, text = _policy_table([r["pred"] for r in res], {1: "Anterior", 2: "Posterior"},
                                       f"Hippocampus run {run.name} (M={res[0]['pred'].get('budget_m')})")
            all_rows += [{"run": run.name, "coarse": "prediction", **row} for row in rows]
            md.append(text)
        res = [json.loads(f.read_text()) for f in sorted(runs[0].glob("*.json"))]
        rows, text = _policy_table([r["gt"] for r in res], {1: "Anterior", 2: "Posterior"},
                                   "Hippocampus, coarse = ground truth (boxes from the true masks)")
        all_rows += [{"run": "-", "coarse": "ground truth", **row} for row in rows]
        md.append(text)
        _write(results, "sam_refine_runs", all_rows, "\n\n".join(md))
        parts.append("### Refinement, Hippocampus predictions\n\n" + "\n\n".join(md))
    prop = work / "propagate"
    if prop.exists():
        md, rows = [], []
        for title, files, names in (("Hippocampus test fold", sorted((prop / "hippocampus").glob("*.json")),
                                     {"1": "Anterior", "2": "Posterior"}),
                                    ("CT example", [prop / "ct_example.json"],
                                     {"5": "liver", "1": "spleen", "6": "stomach"})):
            res = [json.loads(f.read_text()) for f in files if f.is_file()]
            if not res:
                continue
            methods = sorted(res[0]["methods"], key=lambda m: not m.startswith("chain"))
            lines = [f"**{title}** ({len(res)} volume(s)); 3D Dice over the whole volume, mean ± sd", "",
                     "| method | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
            for m in methods:
                cells = [_ms([r["methods"][m]["dice"][c] for r in res]) for c in names]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
                for r, f in zip(res, files):
                    rows += [{"dataset": title, "case": f.stem, "method": m, "class": names[c],
                              "dice": r["methods"][m]["dice"][c], "hd95": r["methods"][m]["hd95"][c],
                              "key_slice": r["key_slices"][c]} for c in names]
            calls = sum(r["set_image_calls"] for r in res)
            lines += ["", f"{calls} slice embeddings (latency: BENCHMARKS.md, SAM speed section)."]
            md.append("\n".join(lines))
        _write(results, "sam_propagate", rows, "\n\n".join(md))
        parts.append("### Propagation from one annotated slice (LiteMedSAM box chain, a stand-in for SAM 2)\n\n"
                     + "\n\n".join(md))
    text = "\n\n".join(parts)
    if text and benchmarks_md:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_md import write_section

        write_section("sam", "SAM refinement and propagation (LiteMedSAM, CPU)",
                      text + "\n\nCommand: `python benchmarks/sam_results.py "
                      "{refine-ct,refine-runs,propagate,report}`.")
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["refine-ct", "refine-runs", "propagate", "report", "all"])
    ap.add_argument("--runs", nargs="*", default=[], help="fine-tuned run folders (refine-runs)")
    ap.add_argument("--n-cases", type=int, default=20, help="test-fold volumes sampled per experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "sam_bench"), help="per-volume JSON cache")
    ap.add_argument("--results", default=str(RESULTS), help="where sam_*.csv / sam_*.md go")
    ap.add_argument("--no-benchmarks-md", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    work = Path(args.work).expanduser()

    if args.what in ("refine-ct", "all"):
        run_refine_ct(work, args.seed)
    if args.what in ("refine-runs", "all") and args.runs:
        run_refine_runs(work, args.runs, args.n_cases, args.seed)
    if args.what in ("propagate", "all"):
        run_propagate(work, args.n_cases, args.seed)
    print(report(work, Path(args.results).expanduser(), benchmarks_md=not args.no_benchmarks_md))


if __name__ == "__main__":
    main()
