"""A dataset fingerprint: what ``medssl plan`` derives a configuration from (nnU-Net's idea, for 2D few-label work).

``extract_fingerprint`` reads every case once and keeps, per case, the canonical (RAS) shape and spacing, whether
the spacing is known, the in-plane body bounding box, a seeded sample of foreground intensities (voxels inside the
labels), the intensity range, and each class's voxel count and centroid. Dataset-level problems that make one plan
unsafe are collected as *errors* (mixed modalities, cases sliced along different coarse axes) or *warnings*
(unknown spacing, a wide spacing spread), each naming the cases.

``side_dependent_axes`` is the flip check shared by ``medssl check`` and the planner: a slice axis along which two
classes keep the same order in (almost) every labelled volume tells them apart by side, so flipping it would
swap their labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from medssl.data.cases import DatasetInfo
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case
from medssl.errors import DataError

ANISOTROPY = 3.0  # nnU-Net's threshold: a spacing 3x the finest makes an axis "coarse"
CT_BODY_HU = -500.0  # CT body mask: above this (air and the scanner's padding are below)
SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case (nnU-Net samples 10k too)
SIDE_AGREEMENT = 0.95  # share of volumes in which two classes keep their order along an axis


@dataclass
class CaseFingerprint:
    case_id: str
    shape: list[int]  # canonical (RAS) voxels
    spacing: list[float]  # mm per canonical axis
    spacing_known: bool  # False: the file carries no geometry (1 mm identity assumed by the reader)
    labelled: bool
    body_box: list[list[int]]  # per canonical axis [lo, hi) of the body (CT: > -500 HU; MRI: above the minimum)
    intensity: dict  # min, max of the image
    classes: dict = field(default_factory=dict)  # label -> {"voxels": n, "centroid": [x, y, z] (voxels)}


@dataclass
class Fingerprint:
    name: str
    root: str
    layout: str
    modality: str
    labels: dict[int, str]
    cases: list[CaseFingerprint]
    foreground: dict  # percentiles / mean / sd of the sampled foreground intensities (all labelled cases)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    channel: int = 0  # the image channel read (multi-channel data)
    channel_reason: str = ""  # why the planner chose it (empty for single-channel data)

    def to_dict(self) -> dict:
        return asdict(self)


def _names(ids: list[str], k: int = 5) -> str:
    more = f" and {len(ids) - k} more" if len(ids) > k else ""
    return ", ".join(ids[:k]) + more


def _spacing_known(volume) -> bool:
    if "h5_has_geometry" in volume.meta:
        return bool(volume.meta["h5_has_geometry"])
    hdr = volume.header
    if hdr is not None and int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        return not np.allclose(volume.spacing, 1.0)  # no geometry codes and unit pixdims: never set
    return True


def _box(mask: np.ndarray) -> list[list[int]]:
    if not mask.any():
        return [[0, n] for n in mask.shape]
    out = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        out.append([int(hit[0]), int(hit[-1]) + 1])
    return out


def case_fingerprint(case, info: DatasetInfo, rng: np.random.Generator) -> tuple[CaseFingerprint, np.ndarray]:
    """One case's fingerprint and its sample of foreground intensities."""
    image, label = read_case(case, info)
    arr = image.array
    body = arr > CT_BODY_HU if info.modality == "CT" else arr > arr.min()
    classes, sample = {}, np.zeros(0, np.float32)
    if label is not None:
        lab = label.array
        values = [int(v) for v in np.unique(lab) if v != 0]
        for v in values:
            idx = np.argwhere(lab == v)
            classes[v] = {"voxels": int(len(idx)), "centroid": [round(float(c), 3) for c in idx.mean(0)]}
        fg = arr[lab > 0]
        if fg.size:
            sample = rng.choice(fg, size=min(SAMPLES_PER_CASE, fg.size), replace=False).astype(np.float32)
    fp = CaseFingerprint(case_id=case.case_id, shape=[int(s) for s in arr.shape],
                         spacing=[round(float(s), 5) for s in image.spacing], spacing_known=_spacing_known(image),
                         labelled=label is not None, body_box=_box(body),
                         intensity={"min": float(arr.min()), "max": float(arr.max())}, classes=classes)
    return fp, sample


def coarse_axis(spacing) -> int | None:
    """The axis whose spacing is >= ANISOTROPY x the finest, or None for (near-)isotropic data."""
    sp = np.asarray(spacing, float)
    ax = int(np.argmax(sp))
    return ax if sp[ax] >= ANISOTROPY * sp.min() else None


def extract_fingerprint(path_or_info: str | Path | DatasetInfo, *, modality: str | None = None,
                        progress: bool = True, seed: int = 0) -> Fingerprint:
    """Read every case once; DataError for a dataset without cases (or labelled cases)."""
    from tqdm.auto import tqdm

    info = path_or_info if isinstance(path_or_info, DatasetInfo) else open_dataset(path_or_info, modality=modality)
    if not info.cases:
        raise DataError(f"{info.root}: no cases found")
    rng = np.random.default_rng(seed)
    cases, samples = [], []
    for case in tqdm(info.cases, desc="fingerprint", unit="case", disable=None if progress else True):
        fp, sample = case_fingerprint(case, info, rng)
        cases.append(fp)
        samples.append(sample)
    if not any(c.labelled for c in cases):
        raise DataError(f"{info.root}: no labelled cases: a plan needs labels to size the structures")
    fg = np.concatenate(samples)
    foreground = {}
    if fg.size:
        foreground = {"n": int(fg.size), "mean": float(fg.mean()), "sd": float(fg.std()),
                      **{f"p{q:g}": float(np.percentile(fg, q)) for q in (0.5, 1, 5, 50, 95, 99, 99.5)}}
    fp = Fingerprint(name=info.name or Path(info.root).name, root=str(Path(info.root).resolve()),
                     layout=info.layout, modality=info.modality, labels=dict(info.labels), cases=cases,
                     foreground=foreground, channel=info.channel)
    _dataset_problems(fp)
    return fp


def _dataset_problems(fp: Fingerprint) -> None:
    """Mixed modalities, disagreeing slicing axes, unknown spacing, a spacing spread that one grid cannot serve."""
    looks_ct = [c.case_id for c in fp.cases if c.intensity["min"] < CT_BODY_HU]
    if fp.modality == "CT":
        odd = [c.case_id for c in fp.cases if c.case_id not in set(looks_ct)]
        if odd and looks_ct:
            fp.errors.append(f"mixed modalities: dataset.json says CT but {len(odd)} case(s) have no voxel below "
                             f"{CT_BODY_HU:g} HU (MRI-like): {_names(odd)}")
    elif looks_ct:
        fp.errors.append(f"mixed modalities: dataset.json says {fp.modality} but {len(looks_ct)} case(s) have "
                         f"values below {CT_BODY_HU:g} (CT-like HU): {_names(looks_ct)}")
    unknown = [c.case_id for c in fp.cases if not c.spacing_known]
    if unknown and len(unknown) < len(fp.cases):
        fp.errors.append(f"missing spacing: {len(unknown)} case(s) carry no geometry while the others do, so one "
                         f"target spacing cannot serve both: {_names(unknown)}")
    elif unknown:
        fp.warnings.append("missing spacing: no case carries geometry; 1 mm is assumed and nothing is resampled")
    axes = {c.case_id: coarse_axis(c.spacing) for c in fp.cases}
    kinds = sorted({a for a in axes.values() if a is not None})  # (near-)isotropic cases fit any axis
    if len(kinds) > 1:
        groups = {k: [cid for cid, a in axes.items() if a == k] for k in kinds}
        desc = "; ".join(f"axis {k}: {_names(v, 3)}" for k, v in groups.items())
        fp.errors.append(f"spacing spread: the cases' coarse (thick-slice) axes disagree, so no single slicing axis "
                         f"fits ({desc})")
    sp = np.array([c.spacing for c in fp.cases], float)
    med = np.median(sp, axis=0)
    ratio = np.max(np.maximum(sp / med, med / sp), axis=1)
    far = [fp.cases[i].case_id for i in np.argsort(-ratio) if ratio[i] > 2.0]
    if far:
        fp.warnings.append(f"spacing spread: {len(far)} case(s) differ from the median spacing "
                           f"{[round(float(v), 3) for v in med]} mm by more than 2x and are resampled strongly: "
                           f"{_names(far)}")


def side_dependent_axes(cases: list[CaseFingerprint], labels: dict[int, str], axis: int,
                        agreement: float = SIDE_AGREEMENT) -> dict[int, list[str]]:
    """Slice axes (0 = rows, 1 = columns of a slice cut along ``axis``) that flips must not touch, with reasons.

    An axis is side-dependent when two classes present together keep the same order of their centroids along it
    in at least ``agreement`` of the labelled volumes (and in at least 5 of them): flipping it turns one class's
    position into the other's.
    """
    in_plane = [a for a in range(3) if a != axis]
    out: dict[int, list[str]] = {}
    fg = sorted(k for k in labels if k != 0)
    for a, b in combinations(fg, 2):
        both = [c for c in cases if a in c.classes and b in c.classes]
        if len(both) < 5:
            continue
        for slice_ax, canon in enumerate(in_plane):
            diff = np.array([c.classes[a]["centroid"][canon] - c.classes[b]["centroid"][canon] for c in both])
            share = max((diff > 0).mean(), (diff < 0).mean())
            if share >= agreement:
                side = "after" if np.median(diff) > 0 else "before"
                out.setdefault(slice_ax, []).append(
                    f"'{labels[a]}' lies {side} '{labels[b]}' along it in {share:.0%} of {len(both)} volumes "
                    f"(median gap {abs(float(np.median(diff))):.1f} voxels)")
    return out
