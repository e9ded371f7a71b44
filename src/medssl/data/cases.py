"""Plain records describing a dataset on disk (no voxels are read here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One case (patient volume or time frame).

    Attributes:
        case_id: identifier (MSD: file name without ``.nii.gz``; nnU-Net v2: without ``_XXXX.nii.gz``).
        images: one path per channel: NIfTI files, a DICOM series folder, or an HDF5 file; for kind
            ``"h5slices"`` the SSL4MIS per-slice files of the one volume, in slice order.
        label: label file, or None for an unlabelled case (valid: it feeds pretraining); an HDF5 case's
            label lives in its image file(s).
        kind: ``"nifti"``, ``"dicom"``, ``"h5"`` or ``"h5slices"``.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    kind: str = "nifti"

    @property
    def has_label(self) -> bool:
        return self.label is not None

    @property
    def n_channels(self) -> int:
        return 1 if self.kind == "h5slices" else len(self.images)


@dataclass
class DatasetInfo:
    """A dataset folder after its layout was recognised.

    Attributes:
        root: the folder.
        layout: ``"msd"``, ``"nnunetv2"``, ``"dicom"``, ``"h5"`` or ``"phantom"``.
        modality: ``"CT"`` or ``"MRI"`` (or another name from dataset.json, upper-cased).
        labels: ``{index: name}``, background included as 0.
        cases: every case, labelled or not, sorted by case id.
        name: the dataset's name (dataset.json ``name`` or the folder name).
        channel_names: ``{index: name}`` of the image channels declared in dataset.json (MSD ``modality``,
            nnU-Net v2 ``channel_names``); empty where the layout declares none.
        channel: the one channel medssl reads from every case (``data.channel``); ``modality`` is its modality.
    """

    root: Path
    layout: str
    modality: str
    labels: dict[int, str]
    cases: list[Case] = field(default_factory=list)
    name: str = ""
    channel_names: dict[int, str] = field(default_factory=dict)
    channel: int = 0

    @property
    def n_classes(self) -> int:
        """Number of output channels (background included)."""
        return max(self.labels) + 1 if self.labels else 2

    @property
    def n_channels(self) -> int:
        """Image channels: as many as dataset.json names, else the most files a case has (1 for most data)."""
        return len(self.channel_names) or max((c.n_channels for c in self.cases), default=1)

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.has_label]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)
