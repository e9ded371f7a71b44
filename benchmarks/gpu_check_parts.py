"""The parts of the GPU check (``benchmarks/gpu_check.py``): data, pretrain, finetune, evaluate, predict,
ddp_finetune, sam_refine, sam_propagate and hippocampus, as the ``Parts`` mixin of ``gpu_check.Check``.

Each ``part_*(limit)`` returns its entry for ``gpu_check.json`` (a dict; ``status``/``error`` keys override the
defaults) and may raise; ``Check.run_part`` times, limits and records it. Also the helpers both files share.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("gpu_check.py")  # torchrun runs it in its worker mode
WORKER = "_ddp_worker"
KAF_CPU = dict(options={"kaf_dim": 16, "kaf_heads": 2, "kaf_layers": 1, "max_keypoints": 32, "sift_upsample": 4,
                        "dedupe_keypoints": True},
               pretrain=dict(proj_dim=16, kaf_match_dim=16, kaf_match_heads=2, kaf_head_dim=16,
                             kaf_match_layers=2, kaf_sinkhorn_iters=10))


class PartTimeout(Exception):
    pass


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def train_rate(run_dir: Path, batch: int) -> dict:
    """ms per optimiser step and images/s from the run's log.jsonl (training loop only, validation excluded)."""
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    steps, secs = recs[-1]["step"], sum(r["seconds"] for r in recs)
    return {"steps": steps, "batch": batch, "train_seconds": round(secs, 2),
            "ms_per_step": round(1000 * secs / max(1, steps), 2),
            "images_per_s": round(steps * batch / secs, 1) if secs > 0 else None,
            "final_loss": recs[-1].get("train_loss")}


class Parts:
    """The parts, mixed into ``gpu_check.Check``: they use its ``torch``, ``cuda``, ``args``, ``s`` (sizes), ``out``,
    ``ctx`` (results handed between parts) and ``guarded`` (a timed sub-step, for the pretraining methods)."""

    # ------------------------------------------------------------------ configuration
    def config(self, name: str, data_path, **sections):
        from medssl.config import load_config

        s = self.s
        extra = {"name": name, "output_dir": str(self.out / "runs"),
                 "data": {"path": str(data_path), "cache_dir": str(self.out / "cache"), "size": s["size"]},
                 "split": {"n_folds": 4, "val": s["val"], "budget": s["budget"]},
                 "model": {"backbone": "unet", "features": s["features"]}}
        for key, value in sections.items():
            extra[key] = {**extra.get(key, {}), **value}
        return load_config("demo", extra=extra)

    def kaf_sections(self) -> dict:
        """model/pretrain settings for kaf: the kaf_hippocampus preset's sizes (GPU) or test-sized (CPU)."""
        from medssl.config import load_config

        if not self.cuda:
            return {"model": {"backbone": "kaf-unet", "features": self.s["features"], "options": KAF_CPU["options"]},
                    "pretrain": dict(KAF_CPU["pretrain"])}
        k = load_config("kaf_hippocampus")
        return {"model": k.to_dict()["model"], "pretrain": {"kaf": k.to_dict()["pretrain"].get("kaf", {})}}

    # ------------------------------------------------------------------ parts
    def part_data(self, limit):
        from medssl.data.cache import prepare
        from medssl.data.phantom import write_phantom_dataset

        s, kw = self.s, {} if self.s["shape"] is None else {"shape": self.s["shape"]}
        t = time.perf_counter()
        root = write_phantom_dataset(self.out / "phantom", n_cases=s["n_cases"], seed=0, **kw)
        phantom_s = time.perf_counter() - t
        cache = prepare(self.config("data", root).data, progress=False)
        self.ctx["phantom"] = Path(root)
        return {"path": str(root), "cases": s["n_cases"], "slices": cache.meta["n_slices"],
                "phantom_seconds": round(phantom_s, 2)}

    def part_pretrain(self, limit):
        from medssl.engine.pretrain import pretrain
        from medssl.methods import available_methods

        methods = self.args.methods or available_methods()
        s, results, end = self.s, {}, time.monotonic() + limit
        for m in methods:
            sections = {"train": {"epochs": 1, "steps_per_epoch": s["pre_steps"], "batch_size": s["pre_batch"],
                                  "lr": 1e-3, "amp": "auto"},
                        "pretrain": {"method": m, "slab_fraction": 1.0}}
            if not self.cuda:
                sections["pretrain"]["proj_dim"] = 16
            if m == "kaf":
                for key, value in self.kaf_sections().items():
                    sections[key] = {**sections.get(key, {}), **value}
            left = min(s["limits"]["pretrain_method"], end - time.monotonic() - 1)
            if left < 3:
                results[m] = {"status": "skipped", "note": "pretraining time budget spent"}
                continue

            def one(lim, m=m, sections=sections):
                run = pretrain(self.config(f"pre-{m}", self.ctx["phantom"], **sections), progress=False)
                return {**train_rate(run, s["pre_batch"]),
                        "backbone": sections.get("model", {}).get("backbone", "unet")}
            results[m] = self.guarded(f"  pretrain {m}", one, left)
        bad = [m for m, r in results.items() if r["status"] != "ok"]
        out = {"methods": results, "peak_mem_mib": max((r.get("peak_mem_mib") or 0 for r in results.values()),
                                                        default=0) if self.cuda else None}
        if bad:  # the part fails (its methods keep their own status), the check goes on
            out.update(status="failed", error=f"{len(bad)} of {len(results)} methods not ok: " + "; ".join(
                f"{m}: {results[m].get('error') or results[m].get('note')}" for m in bad)[:400])
        return out

    def part_finetune(self, limit):
        from medssl.engine.finetune import finetune

        s = self.s
        train = {"epochs": s["ft_epochs"], "steps_per_epoch": s["ft_steps"], "batch_size": s["ft_batch"], "amp": "bf16"}
        run = finetune(self.config("finetune", self.ctx["phantom"], train=train), progress=False)
        self.ctx["ft_run"] = run
        state = json.loads((run / "train_state.json").read_text())
        return {"run_dir": str(run), "amp": "bf16", **train_rate(run, s["ft_batch"]),
                "best_val_dice": state["best_score"]}

    def part_evaluate(self, limit):
        from medssl.evaluation.evaluate import evaluate_run

        m = evaluate_run(self.ctx["ft_run"], part="test", progress=False)
        return {"dice_mean": m["dice_mean"], "dice": {k: v["mean"] for k, v in m["dice"].items()},
                "hd95_mean": m["hd95_mean"], "n_cases": m["n_cases"]}

    def part_predict(self, limit):
        from medssl.data.splits import load_split
        from medssl.evaluation.evaluate import predict_files

        run = self.ctx["ft_run"]
        cases = load_split(run / "splits.json").test[: self.s["n_predict"]]
        t = time.perf_counter()
        written = predict_files(run / "checkpoints" / "best.pt", self.ctx["phantom"], self.out / "pred",
                                cases=cases, progress=False)
        secs = time.perf_counter() - t
        self.ctx["pred"] = written
        return {"cases": cases, "files": [str(p) for p in written], "volumes_per_s": round(len(written) / secs, 2)}

    def part_ddp(self, limit):
        s = self.s
        nproc = self.args.ddp_nproc or (self.torch.cuda.device_count() if self.cuda else 2)
        mem_dir = self.out / "ddp_ranks"
        if self.cuda:
            self.torch.cuda.empty_cache()  # leave the ranks the memory this process no longer needs
        mem_dir.mkdir(parents=True, exist_ok=True)
        cfg_args = [f"data.size={s['size']}", "split.n_folds=4", f"split.val={s['val']}", f"split.budget={s['budget']}",
                    f"model.features={s['features']}", "train.epochs=1", f"train.steps_per_epoch={s['ddp_steps']}",
                    f"train.batch_size={s['ddp_batch']}", "train.amp=bf16", f"output_dir={self.out / 'runs'}",
                    f"data.cache_dir={self.out / 'cache'}", "name=ddp"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(DRIVER), WORKER, str(mem_dir), "finetune", "--config", "demo",
               "--data", str(self.ctx["phantom"]), "--no-evaluate", *cfg_args]
        log_path = self.out / "ddp_finetune.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # our own torchrun and its ranks (one process group): TERM, then KILL after 15 s
                for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, sig)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=wait)
        ranks = {str(r["rank"]): r for r in (json.loads(f.read_text()) for f in sorted(mem_dir.glob("rank*.json")))}
        out = {"nproc": nproc, "command": " ".join(["torchrun", *cmd[3:]]), "returncode": rc, "log": str(log_path),
               "backend": next((r["backend"] for r in ranks.values() if r.get("backend")), None),
               "ddp_active": nproc > 1,
               "peak_mem_mib": {k: r["peak_mem_mib"] for k, r in ranks.items()} if self.cuda and ranks else None}
        if nproc == 1:
            out["note"] = "WORLD_SIZE=1: medssl starts no process group and no DDP wrapper; use >= 2 GPUs for NCCL"
        run = self.out / "runs" / "ddp"
        if (run / "log.jsonl").is_file():
            out.update(train_rate(run, s["ddp_batch"]))
        if rc is None:
            raise PartTimeout(f"torchrun killed after the time limit of {limit:.0f} s (log: {log_path})")
        if rc != 0:
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            err = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
            out.update(status="failed", error=f"torchrun exit {rc}: {err.strip()}"[:400])
        return out

    def segmenter(self):
        if "sam" not in self.ctx:
            from medssl.sam.segmenter import build_segmenter

            t = time.perf_counter()
            self.ctx["sam"] = build_segmenter("litemedsam", device="cuda" if self.cuda else "cpu")
            self.ctx["sam_load_seconds"] = round(time.perf_counter() - t, 2)
        return self.ctx["sam"]

    def part_refine(self, limit):
        from medssl.config import load_config
        from medssl.sam.refine import RefineConfig
        from medssl.pipeline.refine import refine_predictions

        seg = self.segmenter()
        preds = self.ctx["pred"][: self.s["n_refine"]]
        src = preds[0] if len(preds) == 1 else preds[0].parent
        device = "cuda" if self.cuda else "cpu"
        res = refine_predictions(src, self.ctx["phantom"], self.ctx["phantom"], out_dir=self.out / "refined",
                                 cfg=RefineConfig(device=device), data=load_config("demo").data, segmenter=seg,
                                 progress=False)
        prompted = sum(v["slices_prompted"] for v in res["stats"].values())
        return {"cases": res["cases"], "load_seconds": self.ctx.get("sam_load_seconds"),
                "refine_seconds": res["seconds"], "boxes": sum(v["boxes"] for v in res["stats"].values()),
                "prompted_slices": prompted,
                "prompted_slices_per_s": round(prompted / res["seconds"], 2) if res["seconds"] else None,
                "dice_before": res["before"]["dice_mean"], "dice_after": res["after"]["dice_mean"],
                "per_class": {k: {"before": v["dice_before"], "after": v["dice_after"]}
                              for k, v in res["per_class"].items()}}

    def part_propagate(self, limit):
        from medssl.config import load_config
        from medssl.pipeline.propagate import run_propagate

        seg = self.segmenter()
        case = sorted((self.ctx["phantom"] / "labelsTr").glob("*.nii.gz"))[0].name
        out = self.out / "propagate" / case
        out.parent.mkdir(parents=True, exist_ok=True)
        info = run_propagate(self.ctx["phantom"] / "imagesTr" / case, out,
                             {"device": "cuda" if self.cuda else "cpu"}, load_config("demo").data,
                             labels=str(self.ctx["phantom"] / "labelsTr" / case), segmenter=seg)
        m = info["metrics"]
        return {"case": case.split(".nii")[0], "load_seconds": self.ctx.get("sam_load_seconds"),
                "propagate_seconds": info["seconds"], "dice": m["propagated"]["dice_mean"],
                "dice_copy_baseline": m["copy"]["dice_mean"], "dice_slice_only": m["slice_only"]["dice_mean"]}

    def part_hippocampus(self, limit):
        from medssl.config import load_config
        from medssl.engine.finetune import finetune
        from medssl.evaluation.evaluate import evaluate_run

        path = Path(self.args.hippocampus).expanduser()
        if not path.is_dir():
            return {"status": "skipped", "note": f"{path} not found"}
        s = self.s
        extra = {"name": "hippocampus", "output_dir": str(self.out / "runs"),
                 "data": {"path": str(path), "cache_dir": str(self.out / "cache")},
                 "train": {"epochs": 1, "steps_per_epoch": s["hip_steps"], "batch_size": s["ft_batch"],
                           "amp": "bf16"}}
        if not self.cuda:
            extra["model"] = {"features": s["features"]}
        run = finetune(load_config("hippocampus", extra=extra), progress=False)
        m = evaluate_run(run, part="test", progress=False)
        return {"run_dir": str(run), **train_rate(run, s["ft_batch"]), "dice_mean": m["dice_mean"],
                "dice": {k: v["mean"] for k, v in m["dice"].items()}, "n_cases": m["n_cases"]}
