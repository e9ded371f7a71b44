"""Console output shared by the command line and the demo (rich tables)."""

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
