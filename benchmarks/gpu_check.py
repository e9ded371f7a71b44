"""One-command GPU check of medssl (``bash scripts/gpu_check.sh``): every part timed, within 8 minutes.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--hippocampus [PATH]] [--budget 420] [--allow-cpu]

With CUDA it writes the demo phantom (16 cases) into ``--out`` and runs these parts, each timed and isolated (a
failing part is recorded, the others still run): ``data`` (phantom + slice cache); ``pretrain`` (every registered
method for a few steps; kaf on ``kaf-unet`` with the ``kaf_hippocampus`` sizes); ``finetune`` (bf16 autocast);
``evaluate`` (``evaluate_run``, 3D Dice); ``predict`` (a couple of test volumes); ``ddp_finetune`` (``torchrun
--nproc_per_node <visible GPUs>``: NCCL, gloo on CPU); ``sam_refine`` (LiteMedSAM refinement of the predictions,
Dice before/after); ``sam_propagate`` (one annotated slice through one volume); ``hippocampus`` (optional, MSD
Task04 fine-tuning + evaluation if time is left).

``<out>/gpu_check.json`` (rewritten atomically after each part): GPUs, versions, per part a status (ok / failed /
skipped, with a one-line error), seconds, ms per step, images/s, Dice and peak GPU memory in MiB
(``torch.cuda.max_memory_allocated``; torchrun ranks report their own). In-process parts run under a SIGALRM
time limit and torchrun under a timeout, so the whole check stays within ``--budget`` seconds. Without CUDA it
prints one line and exits 0; ``--allow-cpu`` runs the sequence on CPU at tiny sizes instead (wiring test).
Exit status 1 if any part failed.

The parts themselves live in ``benchmarks/gpu_check_parts.py`` (``Parts``, mixed into ``Check``); this file
has the command line, the torchrun worker mode, the orchestration, the time limits and the JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/ is no package: run as a script and as torchrun's worker
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from gpu_check_parts import REPO, WORKER, Parts, PartTimeout, write_json_atomic  # noqa: E402

HIPPOCAMPUS = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
SKIP_LINE = "gpu_check: no CUDA device; skipped (pass --allow-cpu to run the tiny CPU sequence)"
PARTS = ("data", "pretrain", "finetune", "evaluate", "predict", "ddp_finetune", "sam_refine", "sam_propagate",
         "hippocampus")
# Sizes. GPU: the real widths, ~30 pretraining steps per method at batch 32, 200 fine-tuning steps.
GPU = dict(n_cases=16, shape=None, size=64, features=32, val=2, budget=4, pre_steps=30, pre_batch=32,
           ft_epochs=4, ft_steps=50, ft_batch=32, ddp_steps=20, ddp_batch=32, n_predict=2, n_refine=2,
           hip_steps=100, total=420,
           limits=dict(data=40, pretrain=150, pretrain_method=45, finetune=75, evaluate=25, predict=20,
                       ddp_finetune=90, sam_refine=45, sam_propagate=30, hippocampus=90))
CPU = dict(n_cases=8, shape=(32, 32, 16), size=32, features=4, val=1, budget=2, pre_steps=2, pre_batch=4,
           ft_epochs=2, ft_steps=2, ft_batch=4, ddp_steps=2, ddp_batch=4, n_predict=2, n_refine=1,
           hip_steps=2, total=1500,
           limits=dict(data=120, pretrain=600, pretrain_method=150, finetune=150, evaluate=60, predict=60,
                       ddp_finetune=240, sam_refine=180, sam_propagate=120, hippocampus=300))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread after ``seconds`` (SIGALRM)."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # an enclosing limit keeps running (nested limits)
    limit = max(0.5, min(seconds, outer) if outer > 0 else seconds)

    def handler(signum, frame):
        raise PartTimeout(f"time limit of {limit:.0f} s reached")
    old = signal.signal(signal.SIGALRM, handler)
    t = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(0.01, outer - (time.monotonic() - t)))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]



class Check(Parts):
    def __init__(self, args, cuda: bool):
        import torch

        self.torch, self.cuda, self.args = torch, cuda, args
        self.s = GPU if cuda else CPU
        self.out = Path(args.out).expanduser().resolve()
        self.deadline = time.monotonic() + (args.budget or self.s["total"])
        self.t0 = time.time()
        self.ctx: dict = {}
        self.report = {"version": 1, "mode": "gpu" if cuda else "cpu", "device": "cuda" if cuda else "cpu",
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_seconds": args.budget or self.s["total"],
                       "environment": self.environment(), "settings": dict(self.s),
                       "parts": {p: {"status": "skipped", "note": "not reached"} for p in PARTS},
                       "notes": {"images_per_s": "batch slices per second of the training loop (validation "
                                                 "excluded); contrastive views are not counted twice",
                                 "peak_mem_mib": "torch.cuda.max_memory_allocated per part (per rank for "
                                                 "torchrun); null on CPU"}}

    # ------------------------------------------------------------------ bookkeeping
    def environment(self) -> dict:
        torch = self.torch
        import medssl

        env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if self.cuda else None, "medssl": medssl.__version__,
               "gpus": [{"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"} for i, p in
                        ((i, torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count()))]
               if self.cuda else [], "bf16_supported": torch.cuda.is_bf16_supported() if self.cuda else None}
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if self.cuda else None
        with contextlib.suppress(Exception):
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.report["total_seconds"] = round(time.time() - self.t0, 1)
        write_json_atomic(self.out / "gpu_check.json", self.report)

    def peak(self, reset: bool = False):
        """Peak allocated GPU memory (MiB) since the last reset; None on CPU."""
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        if reset:
            return self.torch.cuda.reset_peak_memory_stats()
        return round(self.torch.cuda.max_memory_allocated() / 2**20, 1)

    def run_part(self, name: str, fn, *, needs: tuple[str, ...] = (), in_process: bool = True,
                 optional: bool = False) -> None:
        """Run one part with its time limit; record status, seconds, peak memory and fn's result.

        ``optional``: run only with at least half its limit left, and a timeout is "skipped", not "failed".
        """
        missing = [n for n in needs if self.report["parts"][n]["status"] != "ok"]
        limit = min(self.s["limits"][name], self.remaining())
        if missing:
            entry = {"status": "skipped", "note": f"needs {', '.join(missing)}"}
        elif limit < (self.s["limits"][name] / 2 if optional else 5):
            entry = {"status": "skipped", "note": f"time budget spent ({self.remaining():.0f} s left)"}
        else:
            print(f"gpu_check: {name} ...", flush=True)
            entry = self.guarded(name, fn, limit, alarm=in_process, optional=optional)
        self.report["parts"][name] = entry
        self.save()
        if "seconds" not in entry:
            print(f"gpu_check: {name}: {entry['status']}: {entry['note']}", flush=True)

    def guarded(self, label: str, fn, limit: float, *, alarm: bool = True, optional: bool = False) -> dict:
        """``fn(limit)`` under the limit -> {status, error, seconds, peak_mem_mib, **its result}; never raises."""
        self.peak(reset=True)
        t, entry = time.perf_counter(), {"status": "ok", "error": None}
        try:
            with (time_limit(limit) if alarm else contextlib.nullcontext()):
                entry.update(fn(limit) or {})
        except PartTimeout as exc:
            entry.update(status="skipped" if optional else "failed", error=one_line(exc))
        except Exception as exc:  # noqa: BLE001 - a failing part must not stop the others
            entry.update(status="failed", error=one_line(exc))
            with open(self.out / "gpu_check_errors.log", "a") as fh:
                fh.write(f"--- {label}\n{traceback.format_exc()}\n")
        entry.update(seconds=round(time.perf_counter() - t, 2), limit_seconds=round(limit, 1))
        if alarm:
            entry.setdefault("peak_mem_mib", self.peak())
        print(f"gpu_check: {label}: {entry['status']} ({entry['seconds']} s)"
              + (f": {entry.get('error') or entry.get('note')}" if entry["status"] != "ok" else ""), flush=True)
        return entry

    def run(self) -> int:
        for sub in ("runs", "pred", "refined", "propagate", "ddp_ranks"):  # the check's own outputs only
            shutil.rmtree(self.out / sub, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.out / "gpu_check_errors.log").unlink()
        self.save()
        self.run_part("data", self.part_data)
        self.run_part("pretrain", self.part_pretrain, needs=("data",))
        self.run_part("finetune", self.part_finetune, needs=("data",))
        self.run_part("evaluate", self.part_evaluate, needs=("finetune",))
        self.run_part("predict", self.part_predict, needs=("finetune",))
        self.run_part("ddp_finetune", self.part_ddp, needs=("data",), in_process=False)
        self.run_part("sam_refine", self.part_refine, needs=("predict",))
        self.run_part("sam_propagate", self.part_propagate, needs=("data",))
        if self.args.hippocampus:
            self.run_part("hippocampus", self.part_hippocampus, optional=True)
        else:
            self.report["parts"]["hippocampus"] = {"status": "skipped", "note": "not requested (--hippocampus)"}
        failed = [p for p, e in self.report["parts"].items() if e["status"] == "failed"]
        self.report.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), failed_parts=failed, ok=not failed)
        self.save()
        print(f"gpu_check: {'all parts ok' if not failed else 'failed: ' + ', '.join(failed)}; "
              f"{self.report['total_seconds']} s; {self.out / 'gpu_check.json'}", flush=True)
        return 1 if failed else 0


def ddp_worker(argv: list[str]) -> int:
    """Run under torchrun: ``medssl`` with ``argv[1:]``, then record this rank's peak GPU memory."""
    import torch
    import torch.distributed as dist

    from medssl.cli import main

    rc = main(argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    rec = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "returncode": rc,
           "backend": dist.get_backend() if dist.is_initialized() else None,
           "peak_mem_mib": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                            if torch.cuda.is_available() else None)}
    write_json_atomic(Path(argv[0]) / f"rank{rank}.json", rec)
    if dist.is_initialized():
        dist.destroy_process_group()
    return rc


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="work folder (phantom, runs, gpu_check.json)")
    p.add_argument("--hippocampus", nargs="?", const=str(HIPPOCAMPUS), default=None, metavar="PATH",
                   help=f"also fine-tune + evaluate on MSD Task04 if time is left (default path {HIPPOCAMPUS})")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 420 on GPU, 1500 on CPU)")
    p.add_argument("--methods", nargs="+", default=None, help="pretraining methods (default: every registered one)")
    p.add_argument("--ddp-nproc", type=int, default=None, help="torchrun ranks (default: visible GPUs; 2 on CPU)")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the sequence on CPU at tiny sizes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == WORKER:
        return ddp_worker(argv[1:])
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(SKIP_LINE, flush=True)
        return 0
    out = Path(args.out).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / "gpu_check.json").is_file():  # its runs/ etc. are wiped
        print(f"gpu_check: error: {out} is not empty and is no gpu_check work folder; choose another --out",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    return Check(args, cuda).run()


if __name__ == "__main__":
    sys.exit(main())
