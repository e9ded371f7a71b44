"""``report.html`` of an experiment folder: one self-contained page to look at a grid's results.

    write_report("runs/exp")          # -> runs/exp/report.html (also: ``medssl report runs/exp``)

The page holds the tables of ``results.md`` (and ``results_sam.md``), the Dice-vs-M plot and, per method, the
overlay images its cells drew of the first test cases (``cells/*/overlays/overlays.json``, written by
:func:`medssl.pipeline.cells.save_overlays`): at most :data:`CASES_PER_METHOD` cases per method, all at one
label budget (the smallest M that the most methods have) and the first fold and seed. Images are embedded as
base64 PNG: no server, no JavaScript, no other file needed. Only files of the folder are read (no training,
no data set), so the page can be rebuilt from a finished run folder at any time.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import yaml

from medssl.errors import ConfigError

CASES_PER_METHOD = 3

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; padding: 0 24px; max-width: 1200px; color: #222;
       background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: left; }
th { background: #eef2f7; } tr:nth-child(even) td { background: #f8f8f8; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure img { width: 256px; height: 256px; display: block; background: #000; }
figcaption { font-size: 0.85em; color: #444; max-width: 256px; }
.legend-truth { color: #00a000; font-weight: bold; } .legend-pred { color: #e00000; font-weight: bold; }
"""


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def overlay_choice(out: Path) -> tuple[object, list[dict]]:
    """(the label budget M shown, one overlays.json record per method) from ``out/cells/*/overlays``."""
    records = []
    for path in sorted((out / "cells").glob("*/overlays/overlays.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("cases"):
            records.append({**rec, "folder": path.parent})
    if not records:
        return None, []
    methods = list(dict.fromkeys(r["method"] for r in records))
    def rank(m):  # the most methods first, then the smallest M
        return -len({r["method"] for r in records if r["M"] == m}), m if isinstance(m, (int, float)) else float("inf")

    m = min({r["M"] for r in records}, key=rank)
    chosen = []
    for method in methods:
        mine = sorted((r for r in records if r["method"] == method and r["M"] == m),
                      key=lambda r: (r["fold"], r["seed"]))
        if mine:
            chosen.append(mine[0])
    return m, chosen


def _method_order(out: Path, chosen: list[dict]) -> list[dict]:
    """Records in the row order of the experiment file (its methods list), others after."""
    yml = out / "experiment.yaml"
    names = []
    if yml.is_file():
        for item in (yaml.safe_load(yml.read_text()) or {}).get("methods", []):
            names.append(item if isinstance(item, str) else (item or {}).get("name"))
    rank = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=lambda r: rank.get(r["method"], len(rank)))


def _summary(out: Path) -> str:
    yml = out / "experiment.yaml"
    if not yml.is_file():
        return ""
    exp = yaml.safe_load(yml.read_text()) or {}
    methods = [m if isinstance(m, str) else (m or {}).get("name", "?") for m in exp.get("methods", [])]
    parts = [f"methods: {', '.join(methods)}", f"budgets: {exp.get('budgets')}", f"seeds: {exp.get('seeds')}",
             f"folds: {exp.get('folds')}", f"base: {exp.get('base')}"]
    if exp.get("data"):
        parts.append(f"data: {exp['data']}")
    return "; ".join(html.escape(str(p)) for p in parts)


def report_html(out: str | Path) -> str:
    """The page for experiment folder ``out`` (see the module docstring); raises ConfigError without results.md."""
    out = Path(out).expanduser()
    results = out / "results.md"
    if not results.is_file():
        raise ConfigError(f"{out}: no results.md: not the output_dir of a finished `medssl experiment`")
    title = f"medssl experiment: {out.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=\"meta\">{_summary(out)}<br>page written {time.strftime('%Y-%m-%d %H:%M')} from "
            f"{html.escape(str(out))}</p>", "<h2>Results</h2>", _markdown(results.read_text())]
    plot = out / "dice_vs_m.png"
    if plot.is_file():
        body += ["<h2>Dice vs M</h2>", f"<img class=\"plot\" alt=\"Dice vs M\" src=\"{_png(plot)}\">"]
    sam = out / "results_sam.md"
    if sam.is_file():
        body += ["<h2>SAM refinement (+SAM)</h2>", _markdown(sam.read_text())]
    m, chosen = overlay_choice(out)
    body.append("<h2>Test cases</h2>")
    if not chosen:
        body.append("<p>No overlay images in this folder (cells draw them when they are evaluated).</p>")
    else:
        body.append(f"<p>The first test cases of each method's cell at M={html.escape(str(m))} (first fold and "
                    "seed), on the slice in the middle of the structure: "
                    "<span class=\"legend-truth\">green</span> = ground truth, "
                    "<span class=\"legend-pred\">red</span> = prediction.</p>")
    for rec in _method_order(out, chosen):
        figs = []
        for case in rec["cases"][:CASES_PER_METHOD]:
            png = rec["folder"] / case["png"]
            if not png.is_file():
                continue
            dice = "" if case.get("dice") is None else f", Dice {case['dice']:.3f}"
            cap = f"{case['case']}, slice {case['slice']}{dice}"
            figs.append(f"<figure><img alt=\"{html.escape(rec['method'])}: {html.escape(case['case'])}\" "
                        f"src=\"{_png(png)}\"><figcaption>{html.escape(cap)}</figcaption></figure>")
        if figs:
            head = f"{rec['method']} (fold {rec['fold']}, M={rec['M']}, seed {rec['seed']})"
            body += [f"<h3>{html.escape(head)}</h3>", "<div class=\"cases\">", *figs, "</div>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(out: str | Path) -> Path:
    """Write ``out/report.html`` (atomically) and return its path."""
    from medssl.data.atomic import write_text

    out = Path(out).expanduser()
    return write_text(out / "report.html", report_html(out))
