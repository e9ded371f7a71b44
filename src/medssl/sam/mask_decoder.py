"""SAM mask decoder in LiteMedSAM's configuration (docs/sam.md#architecture).

medssl's own implementation of the SAM design (Apache-2.0 upstream); parameter names match the
LiteMedSAM state dict. Output: mask logits at 4× the embedding resolution (256×256 for LiteMedSAM)
and the predicted IoU per mask.
"""

from __future__ import annotations

import torch
from torch import nn

from medssl.sam.common import MLP, LayerNorm2d
from medssl.sam.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Tokens [iou, mask×4, prompts] attend to the image; hyper-MLPs turn mask tokens into masks."""

    def __init__(self, transformer_dim: int = 256, transformer: nn.Module | None = None,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer = transformer if transformer is not None else TwoWayTransformer(2, transformer_dim, 8, 2048)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mask logits B×M×4h×4w, iou B×M); M = 3 with ``multimask_output`` else 1.

        ``image_embeddings`` is 1×C×h×w (shared by all B prompts) or B×C×h×w.
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                        dense_prompt_embeddings)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        bs = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(bs, -1, -1).to(sparse_prompt_embeddings.dtype),
                            sparse_prompt_embeddings], dim=1)
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:  # the broadcast no-mask embedding
            dense = dense[:1]
        src = image_embeddings + dense  # batch 1 when one image and no mask prompts: shared by all prompts
        c, h, w = src.shape[1:]
        hs, src = self.transformer(src, image_pe[:1], tokens)  # keys come back per prompt: B×hw×C
        b = src.shape[0]
        iou_out = hs[:, 0]
        mask_out = hs[:, 1:1 + self.num_mask_tokens]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_out)


__all__ = ["MaskDecoder"]
