"""A loaded 3D volume in canonical (RAS+) orientation that remembers where it came from.

Every reader returns a :class:`Volume`. ``array`` is always in the closest canonical
orientation (RAS+), so that axis 2 is the superior-inferior (axial slice) axis for any
input. ``to_original`` undoes the reorientation exactly (it is a pure axis permutation and
flip, no resampling), and :func:`save_like` writes an array with the source file's
shape, affine and header: predictions land in the geometry of the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from medssl.data.atomic import atomic_path
from medssl.errors import DataError

RAS = nio.axcodes2ornt(("R", "A", "S"))


@dataclass
class Volume:
    """A 3D image (or label map) in RAS+ orientation.

    Attributes:
        array: the voxels, shape (X, Y, Z), canonical orientation.
        affine: 4x4 voxel-to-world (RAS mm) matrix of ``array``.
        original_affine: affine of the file as stored.
        original_shape: shape of the file as stored.
        header: the source NIfTI header (used when writing predictions), or None.
        source: the path the volume was read from (for error messages).
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, ...]
    header: nib.Nifti1Header | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three canonical axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Map an array in this volume's canonical grid back to the stored orientation."""
        if tuple(array.shape[:3]) != self.shape[:3]:
            raise DataError(
                f"{self.source}: array of shape {array.shape} does not match volume shape {self.shape}"
            )
        back = nio.ornt_transform(RAS, nio.io_orientation(self.original_affine))
        out = nio.apply_orientation(array, back)
        assert tuple(out.shape[:3]) == tuple(self.original_shape[:3])
        return out


def from_nifti_image(img: nib.spatialimages.SpatialImage, source: str) -> Volume:
    """Canonicalise a nibabel image (data read eagerly) into a :class:`Volume`."""
    original_affine = np.asarray(img.affine, dtype=np.float64)
    ornt = nio.io_orientation(original_affine)
    to_ras = nio.ornt_transform(ornt, RAS)
    data = np.asanyarray(img.dataobj)
    array = nio.apply_orientation(data, to_ras) if data.ndim >= 3 else data
    affine = original_affine @ nio.inv_ornt_aff(to_ras, data.shape[:3]) if data.ndim >= 3 else original_affine
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None
    return Volume(
        array=np.ascontiguousarray(array),
        affine=affine,
        original_affine=original_affine,
        original_shape=tuple(data.shape),
        header=header,
        source=source,
    )


def save_like(array: np.ndarray, reference: Volume, path: str | os.PathLike, dtype=np.uint8) -> Path:
    """Write ``array`` (canonical grid of ``reference``) as NIfTI in the reference's stored geometry."""
    data = reference.to_original(np.asarray(array)).astype(dtype)
    header = reference.header.copy() if reference.header is not None else None
    img = nib.Nifti1Image(data, reference.original_affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    img.set_qform(reference.original_affine, code=1)
    img.set_sform(reference.original_affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)
