"""Per-slice latency of LiteMedSAM box refinement on CPU: the per-call baseline vs medssl's path.

    python benchmarks/bench_sam.py [--slices 4] [--threads 2] [--write]

Workload: axial slices of ``../shared/data/ct_example`` (122×101 CT, resized to the model's 256²
input like every slice) on which liver, spleen and stomach are all present; one box per organ
(the tight ground-truth box), i.e. 3 boxes per slice, as in multi-class refinement.

* **baseline (per call)**: for every box, ``set_image`` + ``predict(one box)`` — the image is
  re-encoded for each prompt (plain fp32 model, BatchNorm not fused); the straightforward use of
  upstream's ``medsam_inference`` (about 1.9 s per call on 2 cores).
* **medssl**: one ``set_image`` per slice, all boxes in one decoder batch, BatchNorm folded into
  the convolutions, channels_last memory (the default); variants: NCHW, bfloat16 autocast of the
  encoder.

Reported per variant: median seconds per slice, encoder share, CPU seconds, mean Dice against the
(model-generated) labels, and the minimum Dice between the variant's masks and the baseline's (1.0 = identical
decisions). Every slice is timed with ``torch.utils.benchmark.Timer``
(one warm-up call, then one timed call; CPU seconds the same way with ``time.process_time`` as Timer's clock).
Timings on a shared machine are provisional.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_md import measure_once, write_section

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ct_example"
ORGANS = {"liver": 5, "spleen": 1, "stomach": 6}
VARIANTS = {  # name -> build_segmenter options
    "medssl fp32, NCHW": dict(fuse_bn=True, channels_last=False),
    "medssl fp32 (default)": dict(fuse_bn=True, channels_last=True),
    "medssl bf16, NCHW": dict(fuse_bn=True, precision="bf16", channels_last=False),
    "medssl bf16": dict(fuse_bn=True, precision="bf16", channels_last=True),
}


def _import_medssl():
    try:
        import medssl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


def load_case(n_slices: int):
    import nibabel as nib

    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: ../shared/data/ct_example is needed for this benchmark")
    img = np.asarray(nib.as_closest_canonical(nib.load(DATA / "example_ct_sm.nii.gz")).dataobj, np.float32)
    lab = np.asarray(nib.as_closest_canonical(nib.load(DATA / "example_seg.nii.gz")).dataobj).astype(np.int16)
    zs = [z for z in range(lab.shape[2]) if all((lab[:, :, z] == c).sum() > 50 for c in ORGANS.values())]
    pick = [zs[i] for i in np.linspace(0, len(zs) - 1, min(n_slices + 1, len(zs))).round().astype(int)]
    return img, lab, pick  # pick[0] is not timed (the former warm-up slice: the same slices stay timed)


def dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def run_baseline(seg, img, lab, zs, mask_to_box):
    """Wall and CPU seconds per timed slice (``zs[1:]``) and the masks of every timed slice."""
    times, cpu, out = [], [], {}
    for z in zs[1:]:
        def work(z=z):
            masks = []
            for c in ORGANS.values():
                seg.set_image(img[:, :, z])  # re-encode per prompt
                masks.append(seg.predict(mask_to_box(lab[:, :, z] == c)[None])[0][0])
            out[z] = masks

        times.append(measure_once(work))
        cpu.append(measure_once(work, timer=time.process_time))
    return times, cpu, out


def run_medssl(seg, img, lab, zs, mask_to_box):
    """Wall, CPU and encoder seconds per timed slice (``zs[1:]``) and the masks of every timed slice."""
    times, cpu, enc, out = [], [], [], {}
    for z in zs[1:]:
        boxes = np.stack([mask_to_box(lab[:, :, z] == c) for c in ORGANS.values()])

        def encode(z=z):
            seg.set_image(img[:, :, z])
            seg.embedding()

        def work(z=z, boxes=boxes, encode=encode):
            encode()
            masks, _ = seg.predict(boxes)
            out[z] = list(masks)

        times.append(measure_once(work))
        cpu.append(measure_once(work, timer=time.process_time))
        enc.append(measure_once(encode))
    return times, cpu, enc, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=4, help="timed slices (the first picked slice is skipped)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    args = ap.parse_args(argv)

    _import_medssl()
    import torch

    from medssl.sam.litemedsam import load_litemedsam
    from medssl.sam.segmenter import build_segmenter, mask_to_box

    torch.set_num_threads(args.threads)
    img, lab, zs = load_case(args.slices)
    gts = {z: [lab[:, :, z] == c for c in ORGANS.values()] for z in zs}
    t0 = time.perf_counter()
    base_model = load_litemedsam()
    load_s = time.perf_counter() - t0
    base = build_segmenter("litemedsam", intensity="ct", fuse_bn=False, channels_last=False, model=base_model)
    b_times, b_cpu, b_out = run_baseline(base, img, lab, zs, mask_to_box)
    b_dice = np.mean([dice(p, g) for z in zs[1:] for p, g in zip(b_out[z], gts[z])])
    rows = [("baseline (per call, re-encode per box)", statistics.median(b_times), statistics.median(b_cpu),
             None, b_dice, 1.0)]
    print(f"{rows[-1][0]}: {rows[-1][1]:.3f} s/slice, dice {b_dice:.4f}", flush=True)
    for name in args.variants:
        seg = build_segmenter("litemedsam", intensity="ct", model=load_litemedsam(), **VARIANTS[name])
        times, cpu, enc, out = run_medssl(seg, img, lab, zs, mask_to_box)
        d = np.mean([dice(p, g) for z in zs[1:] for p, g in zip(out[z], gts[z])])
        agree = min(dice(p, q) for z in zs[1:] for p, q in zip(out[z], b_out[z]))
        rows.append((name, statistics.median(times), statistics.median(cpu), statistics.median(enc), d, agree))
        print(f"{name}: {rows[-1][1]:.3f} s/slice (encoder {rows[-1][3]:.3f}), dice {d:.4f}, "
              f"agreement {agree:.4f}", flush=True)

    base_t = rows[0][1]
    lines = [
        f"Provisional ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads, load average "
        f"{os.getloadavg()[0]:.1f} at the end — a shared machine). "
        f"`python benchmarks/bench_sam.py --slices {args.slices} --threads {args.threads}`: "
        f"{len(zs) - 1} timed CT slices (ct_example, 122×101 → 256² model input), 3 boxes per slice "
        f"(liver, spleen, stomach ground-truth boxes), each timed with `torch.utils.benchmark.Timer` after a "
        f"warm-up call. Model load {load_s:.1f} s.",
        "",
        "| path | wall s / slice (3 boxes) | of which encoder | speed-up (wall) | CPU s / slice "
        "(all threads) | mean Dice vs labels | min Dice vs baseline masks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t, c, e, d, a in rows:
        lines.append(f"| {name} | {t:.3f} | {'' if e is None else f'{e:.3f}'} | {base_t / t:.1f}× | {c:.3f} | "
                     f"{d:.4f} | {a:.4f} |")
    lines += ["", "CPU s = process CPU time summed over threads (less sensitive to other jobs than wall time). "
              "Labels are TotalSegmentator outputs (model-generated): Dice shows agreement, not accuracy. "
              "bf16 = `torch.autocast` of the encoder (fast with AMX / AVX512-BF16; slower without). "
              "NCHW = `channels_last=False`."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("sam_refine_speed", "SAM refinement speed (LiteMedSAM, CPU)", text)


if __name__ == "__main__":
    main()
