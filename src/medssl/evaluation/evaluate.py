"""``medssl evaluate`` and ``medssl predict``: whole volumes, original resolution, original geometry.

Evaluation predicts every case of a split part (the test fold by default), at each volume's own
resolution (the fit to the network size is undone before the argmax), and scores it against the
label as stored, with spacing-aware HD95 in mm. The test fold is never used for model selection:
the checkpoint evaluated is the one chosen on the validation cases during fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medssl.data.atomic import write_csv, write_json, write_text
from medssl.data.discover import find_volumes, read_item
from medssl.data.layouts import open_data
from medssl.data.readers import read_case
from medssl.data.splits import PARTS, load_split
from medssl.data.volume import save_like
from medssl.engine.inference import Predictor, load_predictor
from medssl.engine.runs import RunDir
from medssl.errors import ConfigError, DataError
from medssl.evaluation.metrics import aggregate, per_case_rows, volume_scores


def run_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    run = RunDir(run_dir)
    path = {"best": run.best, "last": run.last}.get(which, Path(which))
    if not path.is_file():
        raise ConfigError(f"{run.path}: checkpoint '{which}' not found ({path})")
    return path


def evaluate_run(run_dir: str | Path, *, part: str = "test", checkpoint: str = "best",
                 save_predictions: bool = False, progress: bool = True, batch_size: int = 32,
                 save_cases: Sequence[str] = ()) -> dict:
    """Evaluate a fine-tuning run on one part of its split; writes metrics files into the run folder.

    ``save_predictions`` writes every case's prediction to ``<run>/predictions/{CASE}.nii.gz``, ``save_cases``
    only those cases' (e.g. the few an experiment report draws)."""
    from tqdm.auto import tqdm

    if part not in PARTS:
        raise ConfigError(f"--part must be one of {PARTS}, got {part!r}")
    run = RunDir(run_dir)
    cfg = run.saved_config()
    split = load_split(run.path / "splits.json")
    ckpt = run_checkpoint(run_dir, checkpoint)
    predictor = load_predictor(ckpt, batch_size=batch_size, amp=cfg.train.amp)
    info = open_data(cfg.data)
    case_ids = getattr(split, part)
    if not case_ids:
        raise DataError(f"{run.path}: split part '{part}' is empty")
    n_classes = max(predictor.class_names) + 1
    per_case, rows = [], []
    pred_dir = run.path / "predictions"
    for case_id in tqdm(case_ids, desc=f"evaluate {part}", unit="case", disable=None if progress else True):
        image, label = read_case(info.case(case_id), info)
        if label is None:
            raise DataError(f"{case_id}: no label file, cannot evaluate")
        pred = predictor.predict_volume(image)
        scores = volume_scores(pred, label.array, n_classes, image.spacing, axis=predictor.data.axis)
        per_case.append(scores)
        rows.append(per_case_rows(case_id, scores, predictor.class_names))
        if save_predictions or case_id in save_cases:
            save_like(pred, image, pred_dir / f"{case_id}.nii.gz")
    summary = aggregate(per_case, predictor.class_names)
    summary.update({"part": part, "checkpoint": str(ckpt), "cases": list(case_ids),
                    "metric_notes": {
                        "dice_mean": "per-volume 3D Dice, mean over cases of the mean foreground Dice",
                        "micro_dice": "dataset-level Dice over all slices of the part (KAF/PCL)",
                        "slice_mean_dice": "per-slice +1-smoothed Dice averaged over slices (PolyCL legacy)",
                        "hd95_mean": "symmetric 95th-percentile Hausdorff distance in mm"}})
    suffix = "" if part == "test" else f"_{part}"
    write_json(run.path / f"metrics{suffix}.json", summary)
    write_csv(run.path / f"per_case{suffix}.csv", rows)
    _append_summary(run.path, summary, checkpoint)
    return summary


def _fmt(mean, sd) -> str:
    return "n/a" if mean is None else f"{mean:.4f} ± {sd or 0:.4f}"


def _append_summary(run_path: Path, summary: dict, checkpoint: str) -> None:
    """Add (or replace) the evaluation section of the run's summary.md."""
    path = run_path / "summary.md"
    head = path.read_text().split("\n## Evaluation")[0].rstrip() + "\n" if path.exists() else ""
    part = summary["part"]
    lines = [f"\n## Evaluation ({part}, {summary['n_cases']} volumes, checkpoint {checkpoint})", "",
             f"- per-volume 3D Dice: {_fmt(summary['dice_mean'], summary['dice_sd'])}",
             f"- HD95 (mm): {_fmt(summary['hd95_mean'], summary['hd95_sd'])}",
             f"- dataset-level micro Dice: {summary['micro_dice']['mean']:.4f}",
             f"- slice-mean Dice (PolyCL legacy): {summary['slice_mean_dice']['mean']:.4f}"]
    for name, d in summary["dice"].items():
        lines.append(f"- {name}: Dice {_fmt(d['mean'], d['sd'])} (n={d['n']}, both empty {d['n_both_empty']})")
    write_text(path, head + "\n".join(lines) + "\n")


def predict_files(checkpoint: str | Path, inputs: str | Path, output_dir: str | Path, *,
                  cases: list[str] | None = None, progress: bool = True, batch_size: int = 32,
                  predictor: Predictor | None = None) -> list[Path]:
    """Write ``{CASE}.nii.gz`` label maps with each input's original shape, affine and orientation."""
    from tqdm.auto import tqdm

    predictor = predictor or load_predictor(checkpoint, batch_size=batch_size)
    # a file, a dataset or a folder of NIfTI files; images: the channel the model was trained on
    items = list(find_volumes(inputs, "image", predictor.data.channel).values())
    if cases:
        unknown = sorted(set(cases) - {it.case_id for it in items})
        if unknown:
            raise DataError(f"{inputs}: cases not found: {', '.join(unknown[:5])}")
        items = [it for it in items if it.case_id in set(cases)]
    if not items:
        raise DataError(f"{inputs}: no images to predict")
    out_dir = Path(output_dir).expanduser()
    written = []
    for item in tqdm(items, desc="predict", unit="case", disable=None if progress else True):
        image = read_item(item, "image")
        pred = predictor.predict_volume(image)
        written.append(save_like(pred, image, out_dir / f"{item.case_id}.nii.gz"))
    manifest = {"checkpoint": str(checkpoint), "labels": predictor.class_names,
                "cases": [p.name for p in written]}
    write_json(out_dir / "predictions.json", manifest)
    return written
