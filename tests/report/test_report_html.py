"""report.html of an experiment folder (medssl.report.html): the page, its overlay images, `medssl report`, and the
page rendered by a real headless Chromium (skipped when no chromium binary is installed)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from medssl.errors import ConfigError
from medssl.report.html import overlay_choice, write_report
from medssl.report.overlays import PRED_COLOR, TRUTH_COLOR, mid_slice, overlay_png
from medssl.report.tables import results_table, save_plot

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
METHODS = ("random", "pcl")


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def _volumes(shift: int):
    """A 48x40x12 image with a bright ellipse (the truth) and a prediction shifted by ``shift`` voxels."""
    x, y, z = np.meshgrid(np.arange(48), np.arange(40), np.arange(12), indexing="ij")
    truth = (((x - 24) / 12.0) ** 2 + ((y - 20) / 8.0) ** 2 <= 1) & (z >= 3) & (z <= 9)
    image = np.random.default_rng(0).normal(0, 0.1, truth.shape) + truth.astype(float)
    pred = np.roll(truth, shift, axis=0)
    return image, truth.astype(np.uint8), pred.astype(np.uint8)


def fabricated_run(root: Path) -> Path:
    """An experiment folder as `medssl experiment` leaves it, without training: results.md, the plot, cells with
    overlays (M=1 for both methods, M=2 for one of them only)."""
    out = root / "exp"
    out.mkdir(parents=True)
    rows = [{"method": m, "fold": 0, "seed": s, "M": mm, "budget": mm,
             "dice_mean": 0.5 + 0.05 * mm + 0.03 * (m == "pcl") + 0.01 * s} for m in METHODS for mm in (1, 2)
            for s in range(3)]
    (out / "results.md").write_text(results_table(rows) + "\n")
    save_plot(rows, out / "dice_vs_m.png")
    (out / "experiment.yaml").write_text(yaml.safe_dump({"methods": list(METHODS), "budgets": [1, 2],
                                                         "seeds": [0, 1, 2], "folds": [0], "base": "demo"}))
    for method, m in [(meth, 1) for meth in METHODS] + [("pcl", 2)]:
        folder = out / "cells" / f"{method}-f0-m{m}-s0" / "overlays"
        cases = []
        for i, case in enumerate(("case_000", "case_001")):
            image, truth, pred = _volumes(shift=2 + i + (method == "random"))
            z = mid_slice(truth, 2)
            overlay_png(image, truth, pred, 2, z, folder / f"{case}.png", spacing=(1.0, 1.0, 2.5))
            cases.append({"case": case, "png": f"{case}.png", "axis": 2, "slice": z, "dice": 0.8 - 0.1 * i})
        (folder / "overlays.json").write_text(json.dumps({"method": method, "fold": 0, "budget": m, "M": m,
                                                          "seed": 0, "cases": cases}))
    return out


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        self.scripts += tag == "script"


def test_overlay_png_and_mid_slice(tmp_path):
    import matplotlib.image as mpimg

    image, truth, pred = _volumes(shift=3)
    assert mid_slice(truth, 2) == 6 and mid_slice(np.zeros((4, 4, 10)), 2) == 5
    path = overlay_png(image, truth, pred, 2, 6, tmp_path / "o.png", spacing=(1.0, 1.0, 2.5))
    px = (mpimg.imread(path)[..., :3] * 255).round()
    assert px.shape == (256, 256, 3) and path.stat().st_size < 30_000
    for color in (TRUTH_COLOR, PRED_COLOR):  # both contours are drawn
        assert (np.abs(px - _rgb(color)).sum(axis=-1) < 60).sum() > 50, color


def test_report_page_tables_plot_and_overlays(tmp_path):
    out = fabricated_run(tmp_path)
    m, chosen = overlay_choice(out)
    assert m == 1 and sorted(r["method"] for r in chosen) == sorted(METHODS)  # the budget every method has
    page = write_report(out)
    text = page.read_text()
    parser = _Tags()
    parser.feed(text)
    assert parser.tags.count("table") == 2 and parser.scripts == 0  # means and paired differences; no JavaScript
    srcs = [img["src"] for img in parser.images]
    assert len(srcs) == 1 + 2 * len(METHODS)  # the plot and two cases per method
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in srcs)
    assert "case_001, slice 6, Dice 0.700" in text and "pcl (fold 0, M=1, seed 0)" in text
    assert text.index("random (fold 0") < text.index("pcl (fold 0")  # the experiment's row order
    assert page.stat().st_size < 1_000_000
    with pytest.raises(ConfigError, match="results.md"):
        write_report(tmp_path / "nothing")


def test_report_command(tmp_path, capsys):
    from medssl.cli import main

    out = fabricated_run(tmp_path)
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    rc = main(["report", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip()
    assert rc == ConfigError.exit_code and "results.md" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "empty" / "report.html").exists()


def _close(px: np.ndarray, color, tol: int = 40) -> np.ndarray:
    return np.abs(px.astype(int) - np.asarray(color)).sum(axis=-1) < tol


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install chromium): "
                                              "report.html is not rendered in a browser")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg
    from scipy.ndimage import binary_erosion

    page = write_report(fabricated_run(tmp_path))
    shot = tmp_path / "shot.png"
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                          "--window-size=1280,2600", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert shot.is_file(), res.stderr[-2000:]
    px = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert px.shape[:2] == (2600, 1280)
    assert (~_close(px, (255, 255, 255), 10)).mean() > 0.03  # not a blank page
    header_rows = np.flatnonzero(_close(px, _rgb("#eef2f7"), 6).sum(axis=1) >= 150)  # rows of table headers
    header = (header_rows[0], header_rows[-1]) if header_rows.size else None
    # solid black areas (the overlay images' background; the plot's 1-px black lines vanish under the erosion)
    black = binary_erosion(_close(px, (0, 0, 0), 10), iterations=3)
    rows = np.flatnonzero(black.sum(axis=1) >= 200)  # rows crossed by overlay images (256 px wide)
    assert header is not None and rows.size, "no table header or no overlay image on the screenshot"
    images = black[rows[0]:rows[-1] + 1]
    assert header[1] < rows[0], "the tables come before the test-case images"
    region = px[rows[0]:rows[-1] + 1]
    for color in (TRUTH_COLOR, PRED_COLOR):  # the contours are visible in the image region
        assert _close(region, _rgb(color), 90).sum() > 100, color
    assert images.sum() > 4 * 200 * 20  # four overlay images (2 methods x 2 cases) with black borders
    # the Dice-vs-M plot between the tables and the images: blue of the first curve (matplotlib's C0)
    plot_rows = np.flatnonzero(_close(px, (31, 119, 180), 60).any(axis=1))
    assert plot_rows.size and header[0] < plot_rows[0] < rows[0]
