"""Training augmentation: medssl's batched grid_sample warp vs MONAI's per-sample dictionary transforms.

    python benchmarks/bench_augment.py --size 64 --batch 16 --repeats 20 [--write]

Both apply the same kinds of operation with the same probabilities (flips, rotation ±15°, isotropic
zoom, elastic deformation, intensity scale/shift, Gaussian noise) to a batch of (image, label)
slices. MONAI's pipeline is the natural alternative (RandFlipd, RandAffined, RandZoomd,
Rand2DElasticd, RandScaleIntensityd, RandShiftIntensityd, RandGaussianNoised), run per sample as a
DataLoader would, with a per-sample seed as medssl needs for resumable runs.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from monai import transforms as T

from bench_md import measure, write_section
from medssl.config import AugConfig
from medssl.data.augment import build_augmentation, make_generator

KEYS = ("image", "label")


def monai_pipeline(c: AugConfig) -> T.Compose:
    r = math.radians(c.rotate_deg)
    return T.Compose([
        T.RandFlipd(KEYS, prob=c.flip_prob, spatial_axis=0),
        T.RandFlipd(KEYS, prob=c.flip_prob, spatial_axis=1),
        T.RandAffined(KEYS, prob=c.rotate_prob, rotate_range=(r,), mode=("bilinear", "nearest"), padding_mode="border"),
        T.RandZoomd(KEYS, prob=c.scale_prob, min_zoom=c.scale_range[0], max_zoom=c.scale_range[1],
                    mode=("bilinear", "nearest"), padding_mode="edge", keep_size=True),
        T.Rand2DElasticd(KEYS, spacing=c.elastic_spacing, magnitude_range=tuple(c.elastic_magnitude),
                         prob=c.elastic_prob, mode=("bilinear", "nearest"), padding_mode="border"),
        T.RandScaleIntensityd("image", factors=c.intensity_scale, prob=c.intensity_prob),
        T.RandShiftIntensityd("image", offsets=c.intensity_shift, prob=c.intensity_prob),
        T.RandGaussianNoised("image", prob=c.noise_prob, std=c.noise_std),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = ap.parse_args()
    cfg = AugConfig()
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(args.batch, args.size, args.size)).astype(np.float32)
    labs = (imgs > 0.5).astype(np.float32)
    pipe = monai_pipeline(cfg)

    def monai_batch():
        for i in range(args.batch):
            pipe.set_random_state(seed=i)
            pipe({"image": imgs[i][None], "label": labs[i][None]})

    batched = build_augmentation(cfg)
    x, y = torch.from_numpy(imgs)[:, None], torch.from_numpy(labs).long()
    step = {"n": 0}

    def medssl_batch():
        step["n"] += 1
        batched(x, y, make_generator(step["n"]))

    t_monai, t_ours = measure(monai_batch, args.repeats).median, measure(medssl_batch, args.repeats).median
    rows = [("MONAI dictionary transforms, per sample", t_monai), ("medssl BatchAugment (one grid_sample)", t_ours)]
    table = ["| augmentation | ms per batch | ms per slice | slices/s |", "|---|---:|---:|---:|"]
    for name, t in rows:
        table.append(f"| {name} | {t * 1e3:.1f} | {t * 1e3 / args.batch:.2f} | {args.batch / t:.0f} |")
    text = "\n".join([
        f"Command: `python benchmarks/bench_augment.py --size {args.size} --batch {args.batch} "
        f"--repeats {args.repeats} --write`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"batch {args.batch} of {args.size}×{args.size} slices, default `aug` settings, median per batch "
        f"(`torch.utils.benchmark.Timer`, about {args.repeats} timed batches after its warm-up).",
        "", *table, "", f"Speed-up: {t_monai / t_ours:.0f}×."])
    print(text)
    if args.write:
        write_section("augment", "Training augmentation", text)

if __name__ == "__main__":
    main()
