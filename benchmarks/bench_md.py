"""Shared by the benchmark scripts: timing with ``torch.utils.benchmark.Timer``, and replacing (or appending) one
marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def measure(fn: Callable[[], object], calls: int, threads: int | None = None, timer: Callable[[], float] | None = None):
    """Time ``fn()`` with :class:`torch.utils.benchmark.Timer`; returns its ``Measurement``.

    ``Timer.timeit(1)`` warms up (two calls) and times one call; ``blocked_autorange`` then measures for about
    ``calls`` times that long, in blocks it sizes so that the timer's own overhead is negligible (one call per
    block for anything slower than a few milliseconds). ``.median`` is seconds per call, ``.times`` the per-call
    time of every block. Timer synchronises the accelerator before reading the clock and runs with ``threads``
    intra-op threads (default: the current setting, not Timer's own default of 1). ``timer`` replaces the clock,
    e.g. ``time.process_time`` for CPU seconds summed over threads.
    """
    import torch
    from torch.utils import benchmark

    extra = {} if timer is None else {"timer": timer}
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads(), **extra)
    once = t.timeit(1).median
    return t.blocked_autorange(min_run_time=max(1, calls) * once)


def measure_once(fn: Callable[[], object], threads: int | None = None, timer: Callable[[], float] | None = None):
    """One warm-up call and one timed call of a slow ``fn()`` with :class:`torch.utils.benchmark.Timer`
    (``blocked_autorange`` with no minimum run time); returns seconds for the timed call."""
    import torch
    from torch.utils import benchmark

    extra = {} if timer is None else {"timer": timer}
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads(), **extra)
    return t.blocked_autorange(min_run_time=0.0).median


def write_section(name: str, title: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Put ``text`` between ``<!-- bench:NAME -->`` markers; notes outside the markers are kept."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in body and end in body:
        body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    path.write_text(body)
