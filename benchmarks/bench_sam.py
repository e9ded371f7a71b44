"""Per-slice latency of LiteMedSAM box refinement on CPU: the per-call baseline vs medssl's paths and encoder engines.

    python benchmarks/bench_sam.py [--slices 4] [--threads 2] [--repeats 3] [--write]
    python benchmarks/bench_sam.py --quick          # smoke run: 2 slices, 1 repeat, no per-call baseline

Workload: axial slices of ``../shared/data/ct_example`` (122×101 CT, resized to the model's 256²
input like every slice) on which liver, spleen and stomach are all present; one box per organ
(the tight ground-truth box), i.e. 3 boxes per slice, as in multi-class refinement.

* **baseline (per call)**: for every box, ``set_image`` + ``predict(one box)`` — the image is
  re-encoded for each prompt (plain fp32 model, BatchNorm not fused); the straightforward use of
  upstream's ``medsam_inference`` (about 1.9 s per call on 2 cores).
* **medssl**: one ``set_image`` per slice, all boxes in one decoder batch, BatchNorm folded into
  the convolutions, channels_last memory (the default); variants: NCHW, bfloat16 autocast of the
  encoder (all with ``engine="eager"``).
* **encoder engines** (``sam.engine``, medssl.sam.engines): ``torch.compile`` (fp32 and bf16), dynamic int8
  quantisation of the encoder's ``nn.Linear`` layers, ONNX Runtime on the CPU. An engine that cannot be built
  here (no onnxruntime, a compile error) is a row with the reason, not a crash.

Reported per variant: median seconds per slice (encoder + decoder, 3 boxes), encoder-only seconds, build seconds
(model load, engine build -- compile / export / quantise -- and the first, untimed slice), CPU seconds, mean Dice
against the (model-generated) labels, and the min / mean Dice between the variant's masks and fp32 eager's on the
same slices (1.0 = identical decisions); "goal": <= 0.5 s per slice with min Dice >= 0.98. Every slice is timed
with ``torch.utils.benchmark.Timer`` (``--repeats 1``: one warm-up call, then one timed call; more: the median of
Timer's blocked_autorange over about that many calls; CPU seconds once, with ``time.process_time`` as Timer's
clock). The header names the CPU's flags (avx2 / avx512 / avx512_bf16 / amx) and the engine ``auto`` picks.
Timings on a shared machine are provisional.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_md import measure, measure_once, write_section

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ct_example"
ORGANS = {"liver": 5, "spleen": 1, "stomach": 6}
VARIANTS = {  # name -> build_segmenter options
    "medssl fp32, NCHW": dict(fuse_bn=True, channels_last=False, engine="eager"),
    "medssl fp32 (default)": dict(fuse_bn=True, channels_last=True, engine="eager"),
    "medssl bf16, NCHW": dict(fuse_bn=True, precision="bf16", channels_last=False, engine="eager"),
    "medssl bf16": dict(fuse_bn=True, precision="bf16", channels_last=True, engine="eager"),
    "torch.compile": dict(engine="compile"),
    "torch.compile, bf16": dict(engine="compile", precision="bf16"),
    "int8 dynamic (nn.Linear)": dict(engine="int8"),
    "ONNX Runtime (CPU)": dict(engine="onnx"),
}
REFERENCE = "medssl fp32 (default)"  # fp32 eager: the masks every variant is compared with
GOAL_S, GOAL_DICE = 0.5, 0.98


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


def cpu_header() -> str:
    """CPU model, the flags that decide the engines' speed, torch's CPU capability and what ``auto`` picks."""
    import torch

    from medssl.machine import describe_cpu
    from medssl.sam.engines import AUTO_ENGINE, cpu_kind

    try:
        import onnxruntime

        ort = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = "onnxruntime not installed"
    kind = cpu_kind()
    return (f"CPU: {describe_cpu()}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, CPU kind {kind} (sam.engine=auto -> {AUTO_ENGINE[kind]}); "
            f"{ort}.")


def timed(fn, repeats: int, timer=None) -> float:
    """Seconds per call of ``fn``: one warm-up and one timed call, or Timer's median over about ``repeats`` calls."""
    if repeats <= 1:
        return measure_once(fn, timer=timer)
    return measure(fn, repeats, timer=timer).median


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


def run_medssl(seg, img, lab, zs, mask_to_box, repeats: int = 1):
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

        times.append(timed(work, repeats))
        cpu.append(measure_once(work, timer=time.process_time))
        enc.append(timed(encode, repeats))
    return times, cpu, enc, out


def build_variant(opts: dict, img, zs, cache: str):
    """The segmenter of one variant on a freshly loaded model, and the seconds to load, build and run the first
    (untimed) slice -- where compile compiles and onnx exports."""
    from medssl.sam.litemedsam import load_litemedsam
    from medssl.sam.segmenter import build_segmenter

    t0 = time.perf_counter()
    seg = build_segmenter("litemedsam", intensity="ct", model=load_litemedsam(), engine_cache=cache, **opts)
    seg.set_image(img[:, :, zs[0]])
    seg.embedding()
    return seg, time.perf_counter() - t0


def reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {first}".replace("|", "\\|")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=4, help="timed slices (the first picked slice is skipped)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (ONNX Runtime uses as many)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per slice (1: one warm-up + one call)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 slices, 1 repeat, no per-call baseline")
    ap.add_argument("--no-baseline", action="store_true", help="skip the per-call baseline (slow)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help=f"variants to run ({REFERENCE!r}, fp32 eager, always runs: the masks' reference)")
    ap.add_argument("--engine-cache", default=None, help="folder for the ONNX export (default: a fresh temporary "
                    "folder, so the build time includes the export)")
    ap.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.repeats, args.no_baseline = 2, 1, True

    _import_medssl()
    import torch

    from medssl.sam.litemedsam import load_litemedsam
    from medssl.sam.segmenter import build_segmenter, mask_to_box

    torch.set_num_threads(args.threads)
    header = cpu_header()
    print(header, flush=True)
    img, lab, zs = load_case(args.slices)
    gts = {z: [lab[:, :, z] == c for c in ORGANS.values()] for z in zs}
    timed_zs = zs[1:]
    t0 = time.perf_counter()
    base_model = load_litemedsam()
    load_s = time.perf_counter() - t0
    rows = []  # dicts: name, engine, wall, cpu, enc, build, dice, masks | failed
    if not args.no_baseline:
        base = build_segmenter("litemedsam", intensity="ct", fuse_bn=False, channels_last=False, model=base_model,
                               engine="eager")
        b_times, b_cpu, b_out = run_baseline(base, img, lab, zs, mask_to_box)
        b_dice = np.mean([dice(p, g) for z in timed_zs for p, g in zip(b_out[z], gts[z])])
        rows.append(dict(name="baseline (per call, re-encode per box)", engine="eager", wall=statistics.median(b_times),
                         cpu=statistics.median(b_cpu), enc=None, build=None, dice=b_dice, masks=b_out))
        print(f"{rows[-1]['name']}: {rows[-1]['wall']:.3f} s/slice, dice {b_dice:.4f}", flush=True)
    names = [REFERENCE] + [n for n in args.variants if n != REFERENCE]
    with tempfile.TemporaryDirectory(prefix="medssl_onnx_") as tmp:
        cache = args.engine_cache or tmp
        for name in names:
            try:
                seg, build_s = build_variant(VARIANTS[name], img, zs, cache)
                times, cpu, enc, out = run_medssl(seg, img, lab, zs, mask_to_box, args.repeats)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot be built or run here is a row
                if name == REFERENCE:
                    raise
                rows.append(dict(name=name, engine=VARIANTS[name].get("engine", "auto"), failed=reason(exc)))
                print(f"{name}: failed ({rows[-1]['failed']})", flush=True)
                continue
            d = np.mean([dice(p, g) for z in timed_zs for p, g in zip(out[z], gts[z])])
            rows.append(dict(name=name, engine=seg.engine, wall=statistics.median(times), cpu=statistics.median(cpu),
                             enc=statistics.median(enc), build=build_s, dice=d, masks=out))
            print(f"{name} [{seg.engine}]: {rows[-1]['wall']:.3f} s/slice (encoder {rows[-1]['enc']:.3f}, build "
                  f"{build_s:.1f} s), dice {d:.4f}", flush=True)
            del seg

    ref = next(r for r in rows if r["name"] == REFERENCE)
    lines = [
        f"Provisional ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, load average "
        f"{os.getloadavg()[0]:.1f} at the end — a shared machine). {header} "
        f"`python benchmarks/bench_sam.py --slices {args.slices} --threads {args.threads} --repeats {args.repeats}"
        f"{' --no-baseline' if args.no_baseline else ''}`: "
        f"{len(timed_zs)} timed CT slices (ct_example, 122×101 → 256² model input), 3 boxes per slice "
        f"(liver, spleen, stomach ground-truth boxes), each timed with `torch.utils.benchmark.Timer` after a "
        f"warm-up call. Model load {load_s:.1f} s.",
        "",
        "| path | engine | wall s / slice (3 boxes) | encoder only | build + first slice s | speed-up vs fp32 eager "
        "| CPU s / slice (all threads) | mean Dice vs labels | min Dice vs fp32 eager | mean Dice vs fp32 eager "
        f"| goal (≤ {GOAL_S} s, min Dice ≥ {GOAL_DICE}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['engine']} | | | | | | | | | failed: {r['failed']} |")
            continue
        agree = [dice(p, q) for z in timed_zs for p, q in zip(r["masks"][z], ref["masks"][z])]
        ok = r["wall"] <= GOAL_S and min(agree) >= GOAL_DICE
        enc = "" if r["enc"] is None else f"{r['enc']:.3f}"
        build = "" if r["build"] is None else f"{r['build']:.1f}"
        lines.append(f"| {r['name']} | {r['engine']} | {r['wall']:.3f} | {enc} | {build} "
                     f"| {ref['wall'] / r['wall']:.1f}× "
                     f"| {r['cpu']:.3f} | {r['dice']:.4f} | {min(agree):.4f} | {np.mean(agree):.4f} "
                     f"| {'yes' if ok else 'no'} |")
    lines += ["", "CPU s = process CPU time summed over threads (less sensitive to other jobs than wall time). "
              "Labels are TotalSegmentator outputs (model-generated): Dice shows agreement, not accuracy. "
              "bf16 = `torch.autocast` of the encoder (fast with AMX / AVX512-BF16; slower without). "
              "NCHW = `channels_last=False`. Engines (`sam.engine`, docs/sam.md#encoder-engines): compile = "
              "`torch.compile` (inductor, frozen weights; its build time is the compilation), int8 = "
              "`quantize_dynamic` of the encoder's `nn.Linear` layers, ONNX Runtime = the encoder exported to ONNX "
              "(build time includes the export) run on the CPU with graph optimisation ALL and as many intra-op "
              "threads as torch. The decoder is eager fp32 in every row."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("sam_refine_speed", "SAM refinement speed (LiteMedSAM, CPU)", text)


if __name__ == "__main__":
    main()
