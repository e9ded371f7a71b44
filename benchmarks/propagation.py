"""Propagation from one annotated slice: every method against the simple baselines, in one command.

    python benchmarks/propagation.py                      # 20 Hippocampus test volumes (+ 20 validation), CT, phantom
    python benchmarks/propagation.py --n-test 2 --n-val 2 --methods register,copy --datasets hippocampus  # smoke run

Methods (the key slice per class is the one with the largest area; axis 2):

* ``chain`` -- LiteMedSAM box chain (``backend=litemedsam``, defaults: stop at predicted IoU < 0.5);
* ``chain_dense`` -- the same with the previous mask as a dense mask prompt;
* ``hybrid`` -- LiteMedSAM prompted with the registered mask's box, registered mask kept where SAM disagrees
  (``backend=hybrid``, defaults); ``hybrid_stop`` -- stop there instead; ``hybrid_dense`` -- plus the dense prompt;
* ``register`` -- registration propagation (``backend=register``, defaults), and "register +-k*": the same
  with at most k* slices per direction, k* chosen on the validation volumes;
* ``copy`` -- copy the annotated mask to every slice, to the key slice +-k* (k* chosen on the validation volumes),
  and the annotated slice alone.

Validation, never the test volumes, chooses k* (0..8 for copy, 0..--reg-k-max for registration; best mean 3D
Dice, ties to the smaller k): Hippocampus -- volumes sampled from the folds other than the ``hippocampus``
preset's test fold; demo phantom -- other phantom cases than the test ones; CT example -- there is only one
volume, so k* is chosen on its *other* organs (kidneys, gallbladder, pancreas) and reported on liver, spleen
and stomach. All SAM methods of a volume share one image embedding per slice. Per-volume results are cached as
JSON under ``--work`` (a killed run resumes); tables go to ``--results`` (``propagation.{csv,md}``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sam_results import CT_IMAGE, CT_SEG, HIPPO, _write, hippocampus_test_cases, sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAM_METHODS = {"chain": {}, "chain_dense": {"dense_prompt": True}, "hybrid": {"backend": "hybrid"},
               "hybrid_stop": {"backend": "hybrid", "on_disagree": "stop"},
               "hybrid_dense": {"backend": "hybrid", "dense_prompt": True}}
ALL_METHODS = list(SAM_METHODS) + ["register", "copy"]
DATASETS = ("hippocampus", "ct_example", "phantom")
CT_TEST, CT_VAL = {5: "liver", 1: "spleen", 6: "stomach"}, {2: "kidney_right", 3: "kidney_left", 4: "gallbladder",
                                                             7: "pancreas"}
HIPPO_CLASSES, PHANTOM_CLASSES = {1: "Anterior", 2: "Posterior"}, {1: "liver", 2: "kidney", 3: "spleen"}
COPY_K = range(0, 9)


# ----------------------------------------------------------------------------------------- data
def hippocampus_volumes(n_test: int, n_val: int, seed: int):
    """(test, validation) lists of (name, loader); loader() -> (normalised image, labels, spacing)."""
    if not HIPPO.is_dir():
        print(f"skip Hippocampus: {HIPPO} not found", flush=True)
        return [], []
    from medssl.config import DataConfig
    from medssl.data.layouts import open_dataset
    from medssl.data.readers import read_volume
    from medssl.sam.refine import sam_intensity

    def loader(case):
        def load():
            img = read_volume(HIPPO / "imagesTr" / f"{case}.nii.gz")
            lab = read_volume(HIPPO / "labelsTr" / f"{case}.nii.gz", role="label").array
            return sam_intensity(img.array, "MRI", DataConfig()), lab, img.spacing
        return load

    test_fold = hippocampus_test_cases()
    others = sorted(c.case_id for c in open_dataset(HIPPO).cases if c.case_id not in set(test_fold))
    return ([(c, loader(c)) for c in sample(test_fold, n_test, seed)],
            [(c, loader(c)) for c in sample(others, n_val, seed)])


def ct_volume():
    if not CT_IMAGE.is_file():
        print(f"skip CT example: {CT_IMAGE} not found", flush=True)
        return None
    from medssl.config import DataConfig
    from medssl.data.readers import read_volume
    from medssl.sam.refine import sam_intensity

    def load():
        img = read_volume(CT_IMAGE)
        return sam_intensity(img.array, "CT", DataConfig()), read_volume(CT_SEG, role="label").array, img.spacing
    return load


def phantom_volumes(n_test: int, n_val: int):
    from medssl.config import DataConfig
    from medssl.data.phantom import DEFAULT_SPACING, generate_case
    from medssl.sam.refine import sam_intensity

    def loader(i):
        def load():
            img, lab = generate_case(i)
            return sam_intensity(img.astype(np.float32), "CT", DataConfig()), lab, DEFAULT_SPACING
        return load
    return ([(f"phantom_{100 + i:03d}", loader(100 + i)) for i in range(n_test)],
            [(f"phantom_{i:03d}", loader(i)) for i in range(n_val)])


# ----------------------------------------------------------------------------------------- methods
def restrict(labels: np.ndarray, classes) -> np.ndarray:
    return np.where(np.isin(labels, list(classes)), labels, 0)


def choose_windows(volumes, classes, reg_k_max: int) -> dict:
    """k* for copy +-k and registration +-k from validation volumes (registration run once per volume)."""
    from medssl.data.slicing import volume_slices
    from medssl.sam.prop_baselines import best_k, copy_window_scores, window_scores
    from medssl.sam.propagate import PropagateConfig, annotation_from_volume
    from medssl.sam.register import register_masks

    pairs, reg = [], []
    for _, load in volumes:
        norm, lab, _ = load()
        gt = restrict(lab, classes)
        ann = annotation_from_volume(gt, "largest", 2)
        masks, _, _ = register_masks(np.ascontiguousarray(volume_slices(norm, 2)), ann,
                                     PropagateConfig(backend="register"))
        pairs.append((ann, gt))
        reg.append((ann, masks, gt))
    copy_scores = copy_window_scores(pairs, COPY_K)
    reg_scores = window_scores(reg, range(0, reg_k_max + 1))
    return {"n": len(volumes), "copy_k": best_k(copy_scores), "register_k": best_k(reg_scores),
            "copy_scores": copy_scores, "register_scores": reg_scores}


def score(pred, gt, ann, spacing) -> dict:
    from medssl.evaluation.metrics import volume_scores

    classes = ann.classes
    s = volume_scores(restrict(pred, classes), gt, max(classes) + 1, spacing, axis=2)
    return {"dice": {str(c): float(s["dice"][c]) for c in classes},
            "hd95": {str(c): None if np.isnan(s["hd95"][c]) else float(s["hd95"][c]) for c in classes}}


def run_case(load, classes, methods, seg, ks: dict, cached: dict) -> dict:
    from medssl.data.slicing import stack_slices, volume_slices
    from medssl.sam.chain import box_chain, combine
    from medssl.sam.prop_baselines import baselines, window_masks
    from medssl.sam.propagate import PropagateConfig, annotation_from_volume
    from medssl.sam.register import register_masks

    norm, lab, spacing = load()
    gt = restrict(lab, classes)
    ann = annotation_from_volume(gt, "largest", 2)
    slices = np.ascontiguousarray(volume_slices(norm, 2))
    out = {"key_slices": {str(c): k for c, (k, _) in ann.keys.items()}, "n_slices": int(slices.shape[0]),
           "methods": dict(cached.get("methods", {}))}
    res = out["methods"]

    def put(name, labels_zhw, t0, extra=None):
        res[name] = {**score(stack_slices(labels_zhw, 2), gt, ann, spacing), "seconds": time.perf_counter() - t0,
                     **(extra or {})}

    for m in methods:
        if m in SAM_METHODS and m not in res:
            t0 = time.perf_counter()
            labels, info = box_chain(slices, ann, seg, PropagateConfig(**SAM_METHODS[m]))
            put(m, labels, t0, {"stops": info["stops"], "set_image_calls": info["set_image_calls"],
                                "registered_slices": sum(len(v) for v in info.get("registered_slices", {}).values())})
    if "register" in methods:
        t0 = time.perf_counter()
        masks, score_z, stops = register_masks(slices, ann, PropagateConfig(backend="register"))
        if "register" not in res:
            put("register", combine(masks, score_z), t0, {"stops": stops})
        if res.get("register +-k*", {}).get("k") != ks["register_k"]:
            put("register +-k*", combine(window_masks(masks, ann, ks["register_k"]), score_z), t0,
                {"k": ks["register_k"]})
    if "copy" in methods:
        t0 = time.perf_counter()
        for name, k in (("copy all slices", None), ("copy +-k*", ks["copy_k"]), ("slice only", 0)):
            if name not in res or res[name].get("k") != k:
                vol = baselines(ann, gt.shape, k)["slice_only" if name == "slice only" else "copy"]
                put(name, volume_slices(vol, 2), t0, {"k": k})
    if seg is not None:
        seg.clear()
    return out


# ----------------------------------------------------------------------------------------- report
def _ms(v) -> str:
    return "–" if not v else f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"


ORDER = ["chain", "chain_dense", "hybrid", "hybrid_stop", "hybrid_dense", "register", "register +-k*",
         "copy +-k*", "copy all slices", "slice only"]


def table(title: str, res: dict[str, dict], names: dict, ks: dict | None) -> tuple[str, list[dict]]:
    methods = [m for m in ORDER if all(m in r["methods"] for r in res.values())]
    ref = "copy +-k*" if "copy +-k*" in methods else None
    lines = [f"**{title}** ({len(res)} test volume(s)); 3D Dice over the whole volume, mean ± sd over volumes", "",
             "| method | " + " | ".join(names.values()) + " | mean |" + (f" Δ vs {ref} (wins) |" if ref else ""),
             "|---|" + "---|" * (len(names) + 1 + bool(ref))]
    rows = []
    for m in methods:
        per_vol = {case: statistics.mean(r["methods"][m]["dice"][str(c)] for c in names) for case, r in res.items()}
        cells = [_ms([r["methods"][m]["dice"][str(c)] for r in res.values()]) for c in names]
        delta = ""
        if ref:
            d = [per_vol[case] - statistics.mean(r["methods"][ref]["dice"][str(c)] for c in names)
                 for case, r in res.items()]
            delta = f" {statistics.mean(d):+.3f} ({sum(x > 0 for x in d)}/{len(d)}) |"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_ms(list(per_vol.values()))} |" + delta)
        for case, r in res.items():
            rows += [{"dataset": title, "case": case, "method": m, "class": names[c],
                      "dice": r["methods"][m]["dice"][str(c)], "hd95": r["methods"][m]["hd95"][str(c)],
                      "k": r["methods"][m].get("k"), "key_slice": r["key_slices"][str(c)],
                      "seconds": round(r["methods"][m]["seconds"], 3)} for c in names]
    if ks:
        lines += ["", f"k* chosen on {ks['n']} validation volume(s): copy ±{ks['copy_k']}, registration "
                      f"±{ks['register_k']} (mean validation Dice by k: copy "
                      + ", ".join(f"{k}: {v:.3f}" for k, v in ks["copy_scores"].items()) + ")."]
    for m in ("register", "hybrid", "hybrid_stop", "chain"):
        if m in methods:
            reasons: dict[str, int] = {}
            for r in res.values():
                for by_dir in r["methods"][m]["stops"].values():
                    for v in by_dir.values():
                        reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
            secs = statistics.mean(r["methods"][m]["seconds"] for r in res.values())
            lines.append(f"{m}: stops " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                         + f"; {secs:.1f} s per volume")
    return "\n".join(lines), rows


def write(results: Path, md: list[str], rows: list[dict], name: str) -> None:
    _write(results, name, rows, "\n\n".join(md))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-test", type=int, default=20, help="Hippocampus test-fold volumes")
    ap.add_argument("--n-val", type=int, default=20, help="Hippocampus validation volumes (other folds)")
    ap.add_argument("--n-phantom", type=int, default=4, help="phantom test and validation volumes (each)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list of {ALL_METHODS}")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {list(DATASETS)}")
    ap.add_argument("--reg-k-max", type=int, default=15, help="largest registration window k tried on validation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for LiteMedSAM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "propagation_bench"), help="per-volume JSON cache")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--name", default="propagation", help="file stem of the tables in --results")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [m for m in methods if m not in ALL_METHODS] + [d for d in datasets if d not in DATASETS]
    if bad:
        ap.error(f"unknown method/dataset: {bad}")
    seg = None
    if any(m in SAM_METHODS for m in methods):
        from medssl.sam.mask_prompt import CachedSegmenter
        from medssl.sam.segmenter import build_segmenter

        seg = CachedSegmenter(build_segmenter("litemedsam", threads=args.threads))
    work = Path(args.work).expanduser()
    jobs = []  # (title, names, test volumes, validation volumes, validation classes)
    if "hippocampus" in datasets:
        test, val = hippocampus_volumes(args.n_test, args.n_val, args.seed)
        if test:
            jobs.append(("Hippocampus test fold", HIPPO_CLASSES, test, val, HIPPO_CLASSES))
    if "ct_example" in datasets and (load := ct_volume()) is not None:
        jobs.append(("CT example", CT_TEST, [("ct_example", load)], [("ct_example", load)], CT_VAL))
    if "phantom" in datasets:
        test, val = phantom_volumes(args.n_phantom, args.n_phantom)
        jobs.append(("demo phantom", PHANTOM_CLASSES, test, val, PHANTOM_CLASSES))
    md, rows = [], []
    for title, names, test, val, val_classes in jobs:
        ks = choose_windows(val, val_classes, args.reg_k_max) if val and {"register", "copy"} & set(methods) else \
            {"n": 0, "copy_k": 0, "register_k": 0, "copy_scores": {}, "register_scores": {}}
        print(f"{title}: k* copy {ks['copy_k']}, registration {ks['register_k']} ({ks['n']} validation volumes)",
              flush=True)
        res = {}
        for case, load in test:
            path = work / title.split()[0].lower() / f"{case}.json"
            cached = json.loads(path.read_text()) if path.is_file() else {}
            res[case] = run_case(load, names, methods, seg, ks, cached)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res[case], indent=1))
            print(f"  {case}: done", flush=True)
        text, r = table(title, res, names, ks if ks["n"] else None)
        md.append(text)
        rows += r
    if seg is not None:
        md.append(f"LiteMedSAM: {seg.encoded} slice embeddings, shared by every SAM method of a volume.")
    md.append("Command: `python benchmarks/propagation.py " + " ".join(argv if argv is not None else sys.argv[1:])
              + "`")
    write(Path(args.results).expanduser(), md, rows, args.name)
    print("\n\n".join(md))


if __name__ == "__main__":
    main()
