"""What machine a run or benchmark ran on: CPU model, the instruction-set features that decide fp32/bf16 speed,
logical CPUs, torch threads and GPUs. Saved in every run folder (``environment.json``) and printed by the
benchmarks, so that figures and results are never compared across machines without knowing it."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# The CPU features that change training and SAM speed on CPU (bf16 matrix units, AVX-512, AVX2).
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """``{"model", "logical_cpus", "features"}`` from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(m.group(1).split()) if (m := re.search(r"^flags\s*:\s*(.+)$", text, re.M)) else set()
    return {"model": name.group(1).strip() if name else (platform.processor() or "unknown"),
            "logical_cpus": os.cpu_count(), "features": [f for f in FEATURES if f in flags]}


def has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), by torch's own detection: where it
    does, ``train.amp=auto`` trains in bf16 and the benchmarks compare bf16 with fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def describe_cpu() -> str:
    """One line: ``model (N logical CPUs; avx2, ...)``."""
    c = cpu()
    return f"{c['model']} ({c['logical_cpus']} logical CPUs; {', '.join(c['features']) or 'no AVX2'})"


def machine() -> dict:
    """The CPU, torch's thread count and the visible GPUs (name each), for ``environment.json``."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu(), "torch_threads": torch.get_num_threads(), "gpus": gpus}
