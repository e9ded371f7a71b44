"""Where the time of ``medssl finetune`` / ``medssl pretrain`` goes, end to end (torch.profiler).

    python benchmarks/profile_train.py [--steps 12] [--amp auto] [--write]

Each cell runs the real command in this process (the presets as a user runs them) for one epoch of
``--steps`` steps; the profiler starts after 3 warm-up steps and stops when training ends, so the epoch's
validation and checkpoint are inside. Phases come from the labels the training loop puts on its work
(``medssl.forward`` and, inside it, ``medssl.augment`` / ``medssl.views``; ``medssl.backward``,
``medssl.optimizer``, ``medssl.validate``, ``medssl.checkpoint``) and the DataLoader's own label. Per-step
figures are ms per step; validation and checkpoint are ms per epoch (the presets run 30-250 steps per epoch).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "Task04_Hippocampus"
WARM = 3
# label, command, preset, overrides ("PHANTOM" = the phantom written at 256 px, sized by data.size)
CELLS = [
    ("finetune 64² Hippocampus", "finetune", "hippocampus_plan", ["split.budget=20"]),
    ("finetune 128² phantom", "finetune", "demo", ["data.size=128", "PHANTOM"]),
    ("finetune 256² phantom", "finetune", "demo", ["data.size=256", "PHANTOM"]),
    ("pretrain simclr 64²", "pretrain", "hippocampus_plan", ["pretrain.method=simclr"]),
    ("pretrain polycl-s 64²", "pretrain", "hippocampus_plan", ["pretrain.method=polycl-s",
                                                               "pretrain.slab_fraction=1.0"]),
    ("pretrain kaf 64²", "pretrain", "kaf_hippocampus", ["pretrain.method=kaf"]),
]
PHASES = ["data", "augment/views", "forward", "backward", "optimizer"]


def run_cell(cell, steps: int, amp: str, tmp: Path, phantom: Path) -> dict:
    from medssl.config import load_config
    from medssl.engine import trainer as T

    label, command, preset, over = cell
    over = [f"data.path={phantom}" if o == "PHANTOM" else o for o in over]
    cfg = load_config(preset, overrides=[f"data.path={DATA}", *over, f"train.steps_per_epoch={steps + WARM}",
                                         "train.epochs=1", f"output_dir={tmp}", "name=prof", f"train.amp={amp}"])
    shutil.rmtree(tmp / "prof", ignore_errors=True)
    prof = profile(activities=[ProfilerActivity.CPU])
    state = {"n": 0}
    init = T.Trainer.__init__

    def patched(self, **kw):
        init(self, **kw)
        make = self.make_loader

        def loader(epoch):
            for batch in make(epoch):
                if state["n"] == WARM:
                    state["t0"] = time.perf_counter()
                    prof.start()
                state["n"] += 1
                yield batch
        self.make_loader = loader
    T.Trainer.__init__ = patched
    try:
        if command == "finetune":
            from medssl.engine.finetune import finetune as run
        else:
            from medssl.engine.pretrain import pretrain as run
        run(cfg, progress=False)
    finally:
        T.Trainer.__init__ = init
    wall = time.perf_counter() - state["t0"]
    prof.stop()
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        name = "data" if ev.key.startswith("enumerate(DataLoader)") else ev.key
        totals[name] = totals.get(name, 0.0) + ev.cpu_time_total / 1e3  # ms, inclusive
    inner = totals.get("medssl.augment", 0.0) + totals.get("medssl.views", 0.0)
    phases = {"data": totals.get("data", 0.0), "augment/views": inner,
              "forward": totals.get("medssl.forward", 0.0) - inner,
              "backward": totals.get("medssl.backward", 0.0), "optimizer": totals.get("medssl.optimizer", 0.0)}
    per_epoch = {"validate": totals.get("medssl.validate", 0.0), "checkpoint": totals.get("medssl.checkpoint", 0.0)}
    step_wall = (wall * 1e3 - sum(per_epoch.values())) / steps
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda kv: -kv[1])[:4]
    return {"label": label, "phases": {k: v / steps for k, v in phases.items()}, "per_epoch": per_epoch,
            "step_ms": step_wall, "batch": cfg.train.batch_size, "ops": ops, "op_total": sum(
                e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("aten::"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--cells", nargs="+", default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data/Task04_Hippocampus")
    from medssl.machine import describe_cpu
    from medssl.data.phantom import write_phantom_dataset
    from medssl.engine.trainer import amp_enabled

    tmp = Path(tempfile.mkdtemp(prefix="medssl-profile-"))
    phantom = write_phantom_dataset(tmp / "phantom", shape=(256, 256, 24), spacing=(0.8, 0.8, 2.5))
    rows = []
    for cell in CELLS:
        if args.cells and cell[0] not in args.cells:
            continue
        r = run_cell(cell, args.steps, args.amp, tmp, phantom)
        print(r, flush=True)
        rows.append(r)
    bf16 = amp_enabled(args.amp, torch.device("cpu"))
    lines = [f"Command: `python benchmarks/profile_train.py --steps {args.steps} --amp {args.amp}"
             f"{' --write' if args.write else ''}`",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {describe_cpu()}; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; bf16 autocast {'on' if bf16 else 'off'}.",
             "", "| cell | batch | step ms (wall) | " + " | ".join(f"{p} ms" for p in PHASES)
             + " | other ms | validation ms / epoch | checkpoint ms / epoch | top operators (share of operator time) |",
             "|---|---:|---:|" + "---:|" * (len(PHASES) + 3) + "---|"]
    for r in rows:
        other = r["step_ms"] - sum(r["phases"].values())
        ops = ", ".join(f"{k[6:]} {100 * v / r['op_total']:.0f}%" for k, v in r["ops"])
        lines.append(f"| {r['label']} | {r['batch']} | {r['step_ms']:.0f} | "
                     + " | ".join(f"{r['phases'][p]:.1f}" for p in PHASES)
                     + f" | {other:.1f} | {r['per_epoch']['validate']:.0f} | {r['per_epoch']['checkpoint']:.0f} | "
                     f"{ops} |")
    table = "\n".join(lines)
    print(table)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.write:
        from bench_md import write_section

        write_section(f"profile_train_{'bf16' if bf16 else 'fp32'}",
                      f"Where training time goes ({'bf16' if bf16 else 'fp32'})", table)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
