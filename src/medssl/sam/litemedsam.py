"""The LiteMedSAM network (docs/sam.md#architecture): TinyViT encoder + SAM prompt encoder + SAM mask decoder.

``build_litemedsam()`` gives the architecture; ``load_litemedsam()`` loads the published weights
with ``strict=True`` (keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). The
predictor (pre/post-processing, the :class:`~medssl.sam.segmenter.Segmenter`) lives in
:mod:`medssl.sam.predictor`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medssl.errors import DataError
from medssl.sam.image_encoder import TinyViT
from medssl.sam.mask_decoder import MaskDecoder
from medssl.sam.prompt_encoder import PromptEncoder
from medssl.sam.transformer import TwoWayTransformer
from medssl.sam.weights import load_state_dict

IMAGE_SIZE = 256  # model input (longest side after resize, padded to square)
EMBED_SIZE = 64  # image embedding grid


class LiteMedSAM(nn.Module):
    """``MedSAM_Lite(image_encoder, mask_decoder, prompt_encoder)``."""

    def __init__(self, image_encoder: TinyViT, mask_decoder: MaskDecoder, prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.mask_decoder = mask_decoder
        self.prompt_encoder = prompt_encoder
        self._dense_pe: torch.Tensor | None = None

    def dense_pe(self) -> torch.Tensor:
        """1×256×64×64 positional encoding of the embedding grid (cached; it depends only on weights)."""
        if self._dense_pe is None or self._dense_pe.device != self.prompt_encoder.no_mask_embed.weight.device:
            self._dense_pe = self.prompt_encoder.get_dense_pe()
        return self._dense_pe

    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor, multimask: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box prompts (K×4, model 256 frame) on one 1×256×64×64 embedding → (logits K×M×256×256, iou K×M)."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(embedding, self.dense_pe(), sparse.to(embedding.dtype),
                                 dense.to(embedding.dtype), multimask_output=multimask)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Upstream-style forward: B×3×256×256 images and B×4 boxes (256 frame) → B×1×256×256 logits."""
        emb = self.image_encoder(image)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, _ = self.mask_decoder(emb, self.dense_pe(), sparse, dense, multimask_output=False)
        return logits

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        self._dense_pe = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_litemedsam() -> LiteMedSAM:
    """LiteMedSAM architecture with random weights (9,791,556 parameters)."""
    encoder = TinyViT(img_size=IMAGE_SIZE, in_chans=3, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                      num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio=4.0,
                      mbconv_expand_ratio=4.0, local_conv_size=3)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
                           input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
                          num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256)
    return LiteMedSAM(encoder, decoder, prompt)


def load_litemedsam(checkpoint: str | Path | None = None, *, verify: bool = True,
                    device: str | torch.device = "cpu") -> LiteMedSAM:
    """Build LiteMedSAM and load the (verified) checkpoint with ``strict=True``; eval mode."""
    state = load_state_dict(checkpoint, verify=verify)
    model = build_litemedsam()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise DataError(f"{checkpoint or 'lite_medsam.pth'}: not a LiteMedSAM state dict ({first[:200]})") from None
    return model.to(device).eval()
