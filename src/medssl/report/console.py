"""Console output shared by the command line, the demo and the experiment grid (rich tables, plain lines)."""

from __future__ import annotations


def print_metrics(summary: dict) -> None:
    """The evaluation summary as a table: per class 3D Dice, HD95, micro Dice and slice-mean Dice."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.get('part', 'test')} set: {summary['n_cases']} volumes")
    for col in ("class", "3D Dice (mean ± sd)", "HD95 mm (mean ± sd)", "micro Dice", "slice-mean Dice"):
        table.add_column(col)

    def fmt(m, s):
        return "–" if m is None else f"{m:.3f} ± {s or 0:.3f}"

    for name, d in summary["dice"].items():
        h = summary["hd95"].get(name, {})
        table.add_row(name, fmt(d["mean"], d["sd"]), fmt(h.get("mean"), h.get("sd")),
                      f"{summary['micro_dice'][name]:.3f}", f"{summary['slice_mean_dice'][name]:.3f}")
    table.add_row("mean", fmt(summary["dice_mean"], summary["dice_sd"]),
                  fmt(summary["hd95_mean"], summary["hd95_sd"]), f"{summary['micro_dice']['mean']:.3f}",
                  f"{summary['slice_mean_dice']['mean']:.3f}")
    Console().print(table)


def print_refine(result: dict, output) -> None:
    """``medssl refine``'s result: with labels a table of 3D Dice / HD95 before -> after per class, the policy
    chosen per class (``sam.policy=auto``), and what was written."""
    if "per_class" in result:
        from rich.console import Console
        from rich.table import Table

        def f(v, d=3):
            return "–" if v is None else f"{v:.{d}f}"

        table = Table(title=f"refinement: {len(result['cases'])} volume(s), 3D Dice / HD95 (mm) before -> after")
        for col in ("class", "Dice before", "Dice after", "Δ Dice", "HD95 before", "HD95 after"):
            table.add_column(col)
        for name, d in result["per_class"].items():
            table.add_row(name, f(d["dice_before"]), f(d["dice_after"]), f(d["dice_delta"]),
                          f(d["hd95_before"], 2), f(d["hd95_after"], 2))
        Console().print(table)
    for name, d in result.get("policy", {}).get("classes", {}).items():
        print(f"{name}: {d['choice']} (validation Dice keep {d['val_dice_keep']:.3f}, "
              f"{d['best_candidate']} {d['val_dice_best']:.3f})")
    n_boxes = sum(s["boxes"] for s in result["stats"].values())
    print(f"refined {len(result['cases'])} volume(s) ({n_boxes} boxes) -> {output}")


def print_propagation(info: dict, output) -> None:
    """``medssl propagate``'s result: 3D Dice per scored prediction, why each class stopped, what was written."""
    for name, m in info.get("metrics", {}).items():
        dice = ", ".join(f"{c}: {v:.3f}" for c, v in m["dice"].items())
        print(f"{name:>11}: 3D Dice mean {m['dice_mean']:.3f} ({dice})")
    for c, by_dir in info.get("stops", {}).items():
        print(f"class {c} stopped: " + "; ".join(f"{d} {v['reason']}" + (f" at slice {v['slice']}" if
                                                 v["slice"] is not None else "") for d, v in by_dir.items()))
    print(f"key slices {info['key_slices']}; wrote {output}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class GridProgress:
    """The outer progress of an experiment grid (``medssl experiment``).

    Before each piece of work of a cell (pretraining, fine-tuning, evaluating, +SAM) one line::

        cell 3 of 24: simclr fold 0 M=2 seed 1 (fine-tuning) | elapsed 0:12:05 | about 1:10:00 left

    The time left is the mean time of the cells finished in this run times the cells still to do; cells taken
    from an earlier results.csv (``done``) and cells whose run folders were already complete count as done but
    not in that mean. On a terminal a rich progress bar stays below the lines; elsewhere (a log file under
    ``nohup``, a pipe) there are only the lines, never wrapped.
    """

    def __init__(self, total: int, done: int = 0, console=None, clock=None):
        import time

        from rich.console import Console

        self.console = console if console is not None else Console()
        self.clock = clock or time.monotonic
        self.total, self.done = total, done
        self.t0 = self.clock()
        self.durations: list[float] = []
        self.index, self.label, self.cell_t0, self.worked = 0, "", self.t0, False
        self._bar = self._task = None

    def __enter__(self):
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[left]}"), console=self.console,
                                 refresh_per_second=1)
            self._bar.start()
            self._task = self._bar.add_task("cells", total=self.total, completed=self.done, left=self.left())
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def left(self) -> str:
        """``about H:MM:SS left`` from the cells finished in this run, or why it is not known yet."""
        remaining = self.total - self.done
        if remaining <= 0:
            return "nothing left"
        if not self.durations:
            return "time left unknown until a cell finishes"
        return f"about {_duration(remaining * sum(self.durations) / len(self.durations))} left"

    def start(self, index: int, label: str) -> None:
        """Cell ``index`` (1-based, of ``total``), e.g. ``simclr fold 0 M=2 seed 1``, begins."""
        self.index, self.label, self.cell_t0, self.worked = index, label, self.clock(), False

    def step(self, what: str) -> None:
        """The current cell starts ``what`` (pretraining, fine-tuning, evaluating, +SAM)."""
        self.worked = True
        line = (f"cell {self.index} of {self.total}: {self.label} ({what}) | elapsed "
                f"{_duration(self.clock() - self.t0)} | {self.left()}")
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label} ({what})")

    def finish(self) -> None:
        """The current cell is done (timed only if it did some work)."""
        self.done += 1
        if self.worked:
            self.durations.append(self.clock() - self.cell_t0)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, left=self.left())
