"""A multi-scanner variant of the CT phantom: what a new dataset looks like before anyone tuned for it.

Each volume comes from another "scanner": its own in-plane matrix (160-320 voxels, so 1.2-2.4 mm over a fixed
380 mm field of view) and its own table position, with the body filling about 60 % of the field of view and
air around it. The anatomy is the phantom's (``generate_case``), drawn at the body's size and padded with air,
so every case shows the same organs at another spacing. ``medssl plan`` should resample it to one spacing,
crop the air, and train on patches; fitting every whole slice into one square canvas (what the hand-written
presets do) changes the organs' size in pixels from case to case.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medssl.data.atomic import write_json
from medssl.data.phantom import LABELS, _save, generate_case

NAME = "medssl-scanner-phantom"
FOV_MM = 380.0
MATRICES = (160, 192, 224, 256, 288, 320)
BODY_FRACTION = 0.62
SLICES, THICKNESS = 24, 3.0


def write_scanner_phantom(root: str | Path, *, n_cases: int = 16, seed: int = 0, matrices=MATRICES,
                          slices: int = SLICES) -> Path:
    """Write (or reuse, when complete with the same parameters) the multi-scanner phantom in MSD layout.

    ``matrices`` are the in-plane sizes drawn from (smaller ones make a quick test dataset).
    """
    root = Path(root)
    params = {"generator": "medssl.data.phantom_scanners", "n_cases": int(n_cases), "seed": int(seed),
              "fov_mm": FOV_MM, "matrices": [int(m) for m in matrices], "body_fraction": BODY_FRACTION,
              "slices": int(slices)}
    js = root / "dataset.json"
    if js.is_file() and json.loads(js.read_text()).get("phantom") == params:
        return root
    rng = np.random.default_rng([seed, 7])
    training = []
    for i in range(n_cases):
        n = int(rng.choice(list(matrices)))
        g = int(round(BODY_FRACTION * n))
        image, label = generate_case(i, shape=(g, g, slices), seed=seed)
        off = [int(rng.integers(max(1, (n - g) // 4), 3 * (n - g) // 4 + 1)) for _ in range(2)]
        img = np.full((n, n, slices), -1024, np.int16)
        lab = np.zeros((n, n, slices), np.uint8)
        img[off[0]:off[0] + g, off[1]:off[1] + g] = image
        lab[off[0]:off[0] + g, off[1]:off[1] + g] = label
        sp = FOV_MM / n
        affine = np.diag([sp, sp, THICKNESS, 1.0])
        affine[:3, 3] = [-FOV_MM / 2, -FOV_MM / 2, -slices * THICKNESS / 2]
        name = f"scanner_{i:03d}.nii.gz"
        _save(img, affine, root / "imagesTr" / name)
        _save(lab, affine, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": NAME, "description": "medssl phantom CT, one scanner (matrix, table position) per case",
            "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": n_cases, "numTest": 0, "training": training, "test": [], "phantom": params}
    write_json(js, meta, indent=2)
    return root
