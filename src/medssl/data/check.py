"""Check a whole dataset and report *every* problem (not just the first).

``run_check`` reads each case's image and label separately (so a corrupt image does
not hide a bad label) and collects missing files, unreadable/corrupt files, wrong
dimensionality, non-finite voxels, shape/affine mismatches, undeclared label values,
duplicate case ids and an empty dataset. Unlabelled cases are fine (they feed pretraining).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medssl.data.cases import Case, DatasetInfo
from medssl.data.layouts import describe_channels, open_dataset
from medssl.data.readers import channel_source, pair_problems, read_image, read_label
from medssl.errors import DataError


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: the file (or folder) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CheckResult:
    """All problems plus counts gathered while checking."""

    problems: list[Problem] = field(default_factory=list)
    n_cases: int = 0
    n_labelled: int = 0
    n_unlabelled: int = 0
    n_read: int = 0
    channels: str = ""  # for multi-channel data: the channels and the one read

    @property
    def ok(self) -> bool:
        return not self.problems


def _problem(path, exc_or_msg, files=()) -> Problem:
    """Build a Problem, dropping a leading "path: " already present in the message.

    A message that starts with one of ``files`` (the per-slice files of a stack) is filed under that file.
    """
    msg = str(exc_or_msg)
    for p in map(str, (path, *files)):
        if msg.startswith(p + ": "):
            return Problem(p, msg[len(p) + 2:])
    return Problem(str(path), msg)


def _check_case(case: Case, info: DatasetInfo, result: CheckResult) -> None:
    files = list(case.images) + ([case.label] if case.label is not None else [])
    missing = [f for f in dict.fromkeys(files) if not Path(f).exists()]
    for f in missing:
        result.problems.append(Problem(str(f), f"file not found (case {case.case_id})"))
    try:
        read, _ = channel_source(case, info.channel)
    except DataError as exc:  # no image file, or fewer channel files than data.channel
        result.problems.append(Problem(str(case.images[0]) if case.images else str(info.root), str(exc)))
        return
    if missing and case.kind == "h5slices":
        return
    image = label = None
    if read not in missing:
        try:
            image = read_image(case, info.channel)
        except DataError as exc:
            result.problems.append(_problem(read, exc, case.images))
    if case.label is not None and case.label not in missing:
        try:
            label = read_label(case)
        except DataError as exc:
            problem = _problem(case.label, exc, case.images)
            if problem not in result.problems:  # a stack's label can fail like its image (same files)
                result.problems.append(problem)
    if image is not None and label is not None:
        for msg in pair_problems(image, label, info):
            result.problems.append(_problem(case.label, msg))
    if image is not None:
        result.n_read += 1


def run_check(path_or_info: str | Path | DatasetInfo, *, modality: str | None = None, channel: int = 0) -> CheckResult:
    """Check every case; return problems and counts (never raises DataError for bad data)."""
    result = CheckResult()
    if isinstance(path_or_info, DatasetInfo):
        info = path_or_info
    else:
        try:
            info = open_dataset(path_or_info, modality=modality, channel=channel)
        except DataError as exc:
            result.problems.append(_problem(path_or_info, exc))
            return result
    if info.n_channels > 1:
        result.channels = f"{describe_channels(info)}; medssl reads channel {info.channel} (data.channel)"
    result.n_cases = len(info.cases)
    result.n_labelled = sum(c.has_label for c in info.cases)
    result.n_unlabelled = result.n_cases - result.n_labelled
    if not info.cases:
        result.problems.append(Problem(str(info.root), "no cases found in the dataset"))
        return result
    for cid, n in sorted(Counter(c.case_id for c in info.cases).items()):
        if n > 1:
            result.problems.append(Problem(str(info.root), f"duplicate case id '{cid}' ({n} cases)"))
    for case in info.cases:
        _check_case(case, info, result)
    return result


def flip_warnings(path_or_info: str | Path | DatasetInfo, *, axis: int = 2, flip_axes=(0, 1),
                  modality: str | None = None, channel: int = 0) -> list[str]:
    """One line per flipped slice axis along which two classes are told apart by side (flips would swap them)."""
    from medssl.data.fingerprint import extract_fingerprint, side_dependent_axes

    try:
        info = path_or_info if isinstance(path_or_info, DatasetInfo) else open_dataset(
            path_or_info, modality=modality, channel=channel)
        fp = extract_fingerprint(info, progress=False)
    except DataError:  # nothing labelled (or unreadable: run_check reports it): no classes to compare
        return []
    unsafe = side_dependent_axes([c for c in fp.cases if c.labelled], fp.labels, axis)
    return [f"flipping slice axis {a} (aug.flip_axes) swaps classes: {reasons[0]}; drop it from aug.flip_axes"
            for a, reasons in sorted(unsafe.items()) if a in set(flip_axes)]
