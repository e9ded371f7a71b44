"""SAM-family promptable segmentation: medssl's own LiteMedSAM network and backends (docs/sam.md).

Entry point: :func:`medssl.sam.segmenter.build_segmenter` → a :class:`~medssl.sam.segmenter.Segmenter`
(``set_image`` + box ``predict``). Backends load lazily (torch models only when built).
"""

from medssl.sam.segmenter import Segmenter, build_segmenter, expand_box, mask_to_box

__all__ = ["Segmenter", "build_segmenter", "expand_box", "mask_to_box"]
