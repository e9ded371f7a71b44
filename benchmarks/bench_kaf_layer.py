"""KAF layer: medssl's sparse diffusion vs the dense formulation (docs/kaf.md#kaf-layer), one training step.

Both compute the same function (checked here with ``allclose`` on every configuration before timing): the
medssl :class:`~medssl.models.kaf.KAFLayer` works on the cells the keypoints reach only; the dense reference
(``benchmarks/kaf_dense_reference.py``, the released code's formulation) writes s_k into a zero
B x D x H x W map and convolves it. Same weights, same inputs; a step is forward + backward of
``sum(out * w) + sum(S)``.

Time: median step time from ``torch.utils.benchmark.Timer`` (about ``--steps`` timed steps after its own
warm-up; it synchronises CUDA before reading the clock). Peak memory: each (size, implementation) runs
in a fresh subprocess and makes one warm-up step first (kernel choice, library code paged in, caches).
On CPU it then resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) and reports
``VmHWM`` after the timed steps minus the resident set before them, i.e. the extra memory a step needs
(torch's CPU allocator returns large blocks to the OS, so this tracks the tensors' peak plus allocator
slack; ``getrusage``'s ``ru_maxrss`` is not usable: Linux carries the forking parent's peak into it); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the first step.

    python benchmarks/bench_kaf_layer.py [--steps 5] [--batch 4] [--keypoints 256] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_md import measure, write_section  # noqa: E402
from kaf_dense_reference import dense_kaf_forward  # noqa: E402

from medssl.models.kaf import KAFLayer  # noqa: E402


def _status_kb(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark of this process image) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def make_case(size: int, args, device, dtype=torch.float32):
    torch.manual_seed(0)
    layer = KAFLayer(args.channels, 1, dim=args.dim, heads=4, n_attention=args.attention).to(device, dtype).train()
    feat = torch.randn(args.batch, args.channels, size, size, device=device, dtype=dtype, requires_grad=True)
    cells = torch.stack([torch.randperm(size * size)[: args.keypoints] for _ in range(args.batch)])  # no collisions
    xy = torch.stack([cells % size, cells // size], -1).to(device, dtype)
    valid = torch.ones(args.batch, args.keypoints, dtype=torch.bool, device=device)
    w = torch.randn(args.batch, 2 * args.channels, size, size, device=device, dtype=dtype)
    return layer, feat, xy, valid, w


def step_fn(impl: str, layer, feat, xy, valid, w):
    def step():
        out, s = layer(feat, xy, valid) if impl == "medssl" else dense_kaf_forward(layer, feat, xy)
        ((out * w).sum() + s.sum()).backward()
        layer.zero_grad(set_to_none=True)
        feat.grad = None
    return step


def child(args) -> None:
    """One (size, implementation) in this process: JSON with the median step time and the peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    case = make_case(args.size, args, device)
    step = step_fn(args.impl, *case)
    cuda = device.type == "cuda"
    step()  # warm-up: kernels chosen, library code paged in, caches filled
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base_rss = _status_kb("VmRSS")
    time_s = measure(step, args.steps, threads=args.threads).median
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_status_kb("VmHWM") - base_rss) / 1024
    print(json.dumps({"time_s": time_s, "peak_mb": peak_mb}))


def check_same(size: int, args) -> float:
    """The two implementations agree on this configuration: forward outputs in float32 (the benchmark's
    precision), and outputs and gradients in float64 on one sample (returned: the largest difference
    relative to the tensor's maximum).

    float32 *gradients* are not compared: in both formulations most of the diffusion map is the constant
    bias, which BatchNorm sends to a value within rounding of 0 right before the ReLU, so its gate (and
    the gradient) flips on rounding differences; the float64 comparison shows the two are the same function.
    """
    worst = 0.0
    for dtype in (torch.float64, torch.float32):
        exact = dtype == torch.float64
        sub = argparse.Namespace(**{**vars(args), "batch": 1}) if exact else args  # float64 on one sample
        layer, feat, xy, valid, w = make_case(size, sub, torch.device(args.device), dtype)
        with torch.set_grad_enabled(exact):
            out, s = layer(feat, xy, valid)
            ref_out, ref_s = dense_kaf_forward(layer, feat, xy)
        pairs = [(out, ref_out), (s, ref_s)]
        if exact:
            params = [feat, *layer.parameters()]
            g = torch.autograd.grad((out * w).sum() + s.sum(), params)
            rg = torch.autograd.grad((ref_out * w).sum() + ref_s.sum(), params)
            pairs += list(zip(g, rg))
        tol = 1e-8 if exact else 2e-3  # float32: BatchNorm of a nearly constant map amplifies rounding
        for a, b in pairs:
            a, b = a.detach(), b.detach()
            scale = max(float(b.abs().max()), 1.0)  # biases before a BatchNorm get gradients ~1e-12 (zero)
            assert torch.allclose(a, b, rtol=tol, atol=tol * scale), f"implementations differ ({dtype})"
            if exact:
                worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--keypoints", type=int, default=256)
    ap.add_argument("--channels", type=int, default=32, help="C_l of the map (level 1 at f=32)")
    ap.add_argument("--dim", type=int, default=256, help="attention width D (paper 256)")
    ap.add_argument("--attention", type=int, default=2, help="attention layers (identical work in both)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    ap.add_argument("--child", choices=["medssl", "dense"], dest="impl", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return child(args)

    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        err = check_same(size, args)
        res = {}
        for impl in ("medssl", "dense"):
            cmd = [sys.executable, __file__, "--child", impl, "--size", str(size)] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "keypoints", "channels", "dim", "attention", "steps",
                                                      "threads", "device")]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
        m, d = res["medssl"], res["dense"]
        rows.append(f"| {size}x{size} | {m['time_s'] * 1e3:.0f} | {d['time_s'] * 1e3:.0f} | "
                    f"{d['time_s'] / m['time_s']:.1f}x | {m['peak_mb']:.0f} | {d['peak_mb']:.0f} | "
                    f"{d['peak_mb'] / max(m['peak_mb'], 1e-3):.1f}x | {err:.1e} |")
        print(rows[-1], flush=True)
    mem = ("CUDA max_memory_allocated above the pre-step allocation" if args.device.startswith("cuda") else
           "resident-set high-water mark (VmHWM, reset after a warm-up step) above the RSS before the timed "
           "steps, fresh process per cell")
    text = "\n".join([
        f"KAF layer, one training step (forward + backward), batch {args.batch}, {args.keypoints} keypoints per "
        f"image (no collisions), C={args.channels}, D={args.dim}, {args.attention} attention layers, "
        f"{args.device}, {args.threads} thread(s), median step time (`torch.utils.benchmark.Timer`, about "
        f"{args.steps} timed steps after its warm-up). "
        "medssl: sparse throughout (Conv3x3 D->64, BatchNorm, ReLU and Conv3x3 64->C on the cells the "
        "keypoints reach plus one constant; no 64-channel map is built); dense: the released code's "
        "formulation (a zero B x D x H x W map, then Conv3x3), `benchmarks/kaf_dense_reference.py`. "
        f"Peak memory: {mem}. Same outputs: float32 outputs allclose, float64 outputs and all gradients allclose "
        "(largest float64 difference relative to the tensor's max in the last column).",
        "",
        "| map | medssl ms | dense ms | speed-up | medssl peak MB | dense peak MB | memory ratio | max rel. diff |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_kaf_layer.py --steps {args.steps} --batch {args.batch} "
        f"--keypoints {args.keypoints} --threads {args.threads} --device {args.device}`",
    ])
    print(text)
    if args.write:
        write_section("kaf_layer", "KAF layer: sparse vs dense diffusion", text)


if __name__ == "__main__":
    main()
