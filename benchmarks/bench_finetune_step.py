"""Benchmark ONE fine-tuning step (forward + DiceCE + backward + Adam) of the medssl UNet vs MONAI UNets.

    python benchmarks/bench_finetune_step.py --size 128 --batch 16 --steps 10 --features 16 [--write]

Every (model, dtype) pair runs in a fresh subprocess so that its peak-memory figure is its own: the figure is the
growth of the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) from just after the
imports and a tiny warm-up convolution to the end of the timed steps. It covers weights, gradients, Adam state, activations, the input
batch and whatever the allocator (glibc, oneDNN scratch) keeps, i.e. what the OS had to give the process.
Throughput is batch / median step time (``torch.utils.benchmark.Timer``) after ``--warmup`` untimed steps. FLOPs are the analytic count of
``torch.utils.flop_counter.FlopCounterMode`` over forward + loss + backward of one step (convolutions and matmuls
only; the elementwise Adam update, BN and activations are not counted). The peak is a big ``torch.mm`` in fp32 and
bf16, timed with ``torch.utils.benchmark.Timer`` in the same run with the same thread count.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_md import measure, write_section

REPO = Path(__file__).resolve().parents[1]
MODELS = ("medssl-unet", "monai-basicunet", "monai-unet")
DTYPES = ("fp32", "bf16")


def _ensure_medssl_importable() -> None:
    try:
        import medssl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def choose(name: str, features: int, n_classes: int):
    """(factory, description) of the medssl UNet(f) or of a MONAI net whose width matches its parameter count."""
    _ensure_medssl_importable()
    from monai.networks.nets import UNet as MonaiUNet
    from monai.networks.nets import BasicUNet

    from medssl.models import build_model

    def ours():
        return build_model("unet", in_channels=1, n_classes=n_classes, features=features)

    if name == "medssl-unet":
        return ours, f"UNet(c1) f={features}"
    target = _count(ours())
    if name == "monai-basicunet":
        make = lambda a: BasicUNet(2, 1, n_classes, features=(a, a, 2 * a, 4 * a, 8 * a, a))  # noqa: E731
        desc = "BasicUNet features=({a},{a},{a2},{a4},{a8},{a})"
    elif name == "monai-unet":
        make = lambda a: MonaiUNet(  # noqa: E731
            2, 1, n_classes, channels=(a, 2 * a, 4 * a, 8 * a, 16 * a), strides=(2, 2, 2, 2), num_res_units=2
        )
        desc = "UNet channels=({a},{a2},{a4},{a8},{a16}), res_units=2"
    else:
        raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    lo, hi = 2, 4 * features + 8  # parameter count grows monotonically with a: bisect for the closest width
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _count(make(mid)) <= target else (lo, mid)
    a = min((lo, hi), key=lambda w: abs(_count(make(w)) - target))
    return (lambda: make(a)), desc.format(a=a, a2=2 * a, a4=4 * a, a8=8 * a, a16=16 * a)


def worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: time `--steps` steps of one (model, dtype) and print one JSON line."""
    import torch
    from monai.losses import DiceCELoss
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16 = args.worker_dtype == "bf16"
    _ensure_medssl_importable()
    import monai.networks.nets  # noqa: F401  (import everything before the memory baseline)

    import medssl.models  # noqa: F401

    # initialise oneDNN / the thread pool on a tiny conv so that their one-off RSS is not billed to the model
    tiny = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = tiny(torch.randn(1, 1, 16, 16))
    out.float().sum().backward()
    del tiny, out
    make, desc = choose(args.worker_model, args.features, args.classes)  # width search before the baseline
    gc.collect()
    rss0_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = make()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch, 1, args.size, args.size))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    # step 0, untimed: analytic FLOPs and the bytes autograd saves for backward
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = [step()]
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        losses.append(step())
    # CPU use is process CPU time over wall time of the whole measurement (Timer's warm-up included)
    ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    m = measure(lambda: losses.append(step()), args.steps, threads=args.threads)
    ru1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    peak_kib = ru1.ru_maxrss
    med = m.median
    print(
        json.dumps(
            {
                "model": args.worker_model,
                "desc": desc,
                "dtype": args.worker_dtype,
                "params": _count(model),
                "step_s": med,
                "step_s_min": min(m.times),
                "images_per_s": args.batch / med,
                "flops": flops,
                "gflops_per_s": flops / med / 1e9,
                "rss_delta_mib": (peak_kib - rss0_kib) / 1024,
                "saved_mib": sum(saved.values()) / 2**20,
                "state_mib": 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                "cpu_use": cpu_s / ((w1 - w0) * args.threads),
                "loss_first_last": [losses[0], losses[-1]],
            }
        )
    )


def matmul_peak(n: int, dtype_name: str, threads: int, reps: int = 15) -> float:
    """GFLOP/s of an n x n x n torch.mm (fp32 or bf16) in its fastest Timer block, same thread count as the
    benchmark."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    best = min(measure(lambda: torch.mm(a, b, out=out), reps, threads=threads).times)
    return 2 * n**3 / best / 1e9


def run_all(args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    peaks = {d: matmul_peak(args.peak_n, d, args.threads) for d in args.dtypes}
    print(f"matmul peak (n={args.peak_n}): " + ", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in peaks.items()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)

    def spawn(argv: list[str], model: str, dtype: str) -> dict:
        cmd = [sys.executable, __file__, *argv, "--worker-model", model, "--worker-dtype", dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"worker {model}/{dtype} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    # RSS floor: the same script on a ~30k-parameter UNet at 32x32, batch 1 (first-use kernels, caches, threads)
    floor = spawn(["--size=32", "--batch=1", "--steps=2", "--warmup=1", "--features=2", f"--threads={args.threads}"],
                  "medssl-unet", "fp32")  # fmt: skip
    args.rss_floor = floor["rss_delta_mib"]
    print(f"RSS floor (tiny model): +{args.rss_floor:.0f} MiB")
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            row = spawn(_shared_argv(args), model, dtype)
            row["pct_peak"] = 100 * row["gflops_per_s"] / peaks[dtype]
            rows.append(row)
            print(
                f"  {model:16s} {dtype}: {row['images_per_s']:.1f} img/s, {row['gflops_per_s']:.1f} GFLOP/s, "
                f"RSS +{row['rss_delta_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return rows, peaks


def _shared_argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--size={args.size}", f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
        f"--features={args.features}", f"--classes={args.classes}", f"--threads={args.threads}",
    ]  # fmt: skip


def markdown_table(rows: list[dict], peaks: dict[str, float]) -> str:
    lines = [
        "| model | config | params (M) | dtype | step (ms, median) | images/s | GFLOP/step | achieved GFLOP/s "
        "| % of mm peak | CPU use | saved act. (MiB) | weights+grads+Adam (MiB) | peak RSS Δ (MiB) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['desc']} | {r['params'] / 1e6:.2f} | {r['dtype']} | {1e3 * r['step_s']:.0f} "
            f"| {r['images_per_s']:.1f} | {r['flops'] / 1e9:.3g} | {r['gflops_per_s']:.3g} | {r['pct_peak']:.2g} "
            f"| {100 * r['cpu_use']:.0f}% | {r['saved_mib']:.0f} | {r['state_mib']:.0f} | {r['rss_delta_mib']:.0f} |"
        )
    peak_line = ", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in peaks.items())
    return "\n".join(lines) + (f"\n\nMatmul peak (`torch.mm`, fastest `torch.utils.benchmark.Timer` block): "
                                f"{peak_line}.")


def section(args: argparse.Namespace, table: str) -> str:
    _ensure_medssl_importable()
    from medssl.machine import describe_cpu

    import torch

    cmd = "python benchmarks/bench_finetune_step.py " + shlex.join(sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        import monai

        monai_v = monai.__version__
    except ImportError:
        monai_v = "?"
    return f"""One fine-tuning step = `zero_grad` → forward → `monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)` (on fp32
logits) → backward → `Adam.step`, models in train mode, random 1×{args.size}×{args.size} inputs, {args.classes}
classes, batch {args.batch}. bf16 = forward under `torch.autocast("cpu", dtype=torch.bfloat16)` (the weights, the
optimizer and the loss stay fp32). MONAI widths are chosen to match the medssl UNet's parameter count.

- **images/s**: batch / median step time (`torch.utils.benchmark.Timer`, about {args.steps} timed steps after its
  own warm-up), after one untimed counting step (FLOPs, saved tensors) and {args.warmup} warm-up step(s).
- **CPU use**: process CPU time / (wall time × threads) over the timed steps; well under 100% means the threads
  were descheduled (other processes on the machine) and the row's speed is understated.
- **GFLOP/step**: analytic, `torch.utils.flop_counter.FlopCounterMode` over forward + loss + backward (convolutions
  and matmuls only: BN, activations, pooling and the Adam update are not counted).
- **% of mm peak**: achieved GFLOP/s over the `torch.mm` peak of the same dtype measured in the same run.
- **saved act.**: bytes of the distinct storages autograd saves for backward in one step
  (`torch.autograd.graph.saved_tensors_hooks`); **weights+grads+Adam**: 4 × parameter bytes (fp32).
- **peak RSS Δ**: growth of the peak resident set (`getrusage` max RSS) of a fresh process per row, from after the
  imports and a tiny warm-up conv to the end of the timed steps: weights + grads + Adam state + activations + the
  input batch + what the allocator / oneDNN keep cached. It is what the OS had to hand over, not a tensor census.
  The same measurement on a tiny UNet (f=2, 32×32, batch 1) gives a floor of +{args.rss_floor:.0f} MiB in this run.

Command: `{cmd}`
Date: {date}; torch {torch.__version__}, MONAI {monai_v}, Python {platform.python_version()};
CPU: {describe_cpu()}; torch threads: {args.threads}; 1-min load average before / after the run:
{args.load[0]:.2f} / {args.load[1]:.2f} (a load near the core count before the run means other processes competed).

{table}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="square patch side (divisible by 16)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--features", type=int, default=16, help="medssl UNet base width f")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list from fp32, bf16")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix side of the torch.mm peak loop")
    p.add_argument("--write", action="store_true", help="update the section of BENCHMARKS.md")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size must be divisible by 16, got {args.size}")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; choose from fp32, bf16")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker_model:
        worker(args)
        return
    args.load = [os.getloadavg()[0]]
    rows, peaks = run_all(args)
    args.load.append(os.getloadavg()[0])
    print(f"1-min load average before / after: {args.load[0]:.2f} / {args.load[1]:.2f}")
    table = markdown_table(rows, peaks)
    print("\n" + table)
    if args.write:
        write_section("finetune_step", "Fine-tuning step", section(args, table), path=args.out)
        print(f"\nwrote the fine-tuning step section of {args.out}")


if __name__ == "__main__":
    main()
