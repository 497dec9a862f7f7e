"""What the single-stream region models (VisualBERT, UNITER, Oscar) share.

All three run ONE BERT encoder over the concatenation [text tokens; region tokens] with a
joint key-padding mask, pool the first ([CLS]) token, and train a masked-LM head tied to the
word embeddings plus a binary head on the pooled output. This module holds that encoder,
BERT's initialisation, the input checks the three models make the same way, box features
and the synthetic-region helper their ``synthetic_batch`` methods use.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlkernels.nn import BertLayer, Pooler


class SingleStreamEncoder(nn.Module):
    """``num_layers`` post-LN BERT layers over [text; regions], then BERT's pooler.

    forward(text [B, S, D], regions [B, N, D] (N may be 0), text_mask [B, S] bool = None,
            region_mask [B, N] bool = None) -> (hidden [B, S + N, D], pooled [B, D])
    Masks are True on real tokens (None: all real); padded tokens are never attended, but
    their own rows are computed like any other (as HF BERT does).
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, num_layers: int, *, dropout: float,
                 attention_dropout: float, activation: str, layer_norm_eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            BertLayer(hidden, heads, intermediate, dropout=dropout, attention_dropout=attention_dropout,
                      activation=activation, layer_norm_eps=layer_norm_eps) for _ in range(num_layers))
        self.pooler = Pooler(hidden)

    def forward(self, text: torch.Tensor, regions: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                region_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([text, regions], dim=1)
        mask = joint_mask(text_mask, region_mask, text.shape[:2], regions.shape[:2], text.device)
        for layer in self.layers:
            x = layer(x, mask)
        return x, self.pooler(x)

    def load_hf(self, hf_layers, hf_pooler: nn.Module) -> None:
        """Copy HF BERT-style encoder layers (``encoder.layer``) and pooler weights."""
        if len(hf_layers) != len(self.layers):
            raise ValueError(f"SingleStreamEncoder.load_hf: {len(hf_layers)} source layers for {len(self.layers)}")
        for ours, theirs in zip(self.layers, hf_layers):
            ours.load_hf_state_dict(theirs.state_dict())
        self.pooler.load_state_dict(hf_pooler.state_dict(), strict=True)


def joint_mask(text_mask: Optional[torch.Tensor], region_mask: Optional[torch.Tensor], text_shape, region_shape,
               device) -> Optional[torch.Tensor]:
    """The [B, S + N] bool mask of the concatenation (None when both parts are all real)."""
    if text_mask is None and region_mask is None:
        return None
    if text_mask is None:
        text_mask = torch.ones(tuple(text_shape), dtype=torch.bool, device=device)
    if region_mask is None:
        region_mask = torch.ones(tuple(region_shape), dtype=torch.bool, device=device)
    return torch.cat([text_mask, region_mask], dim=1)


# -- input checks ---------------------------------------------------------------------------------
def check_shape(model: str, name: str, tensor: Optional[torch.Tensor], shape) -> None:
    """A ValueError unless tensor is None or has exactly ``shape``."""
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{model}: {name} must have shape {list(shape)}, got {list(tensor.shape)}")


def check_regions(model: str, name: str, features: torch.Tensor, dim: int) -> None:
    """features must be a floating [B, N, dim] tensor."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != dim \
            or not features.is_floating_point():
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{model}: {name} must be a floating [B, N, {dim}] tensor, got {shape}")


# -- boxes -----------------------------------------------------------------------------------------
def box_features(boxes: torch.Tensor, *, area: bool) -> torch.Tensor:
    """Normalised boxes [..., 4] (x1, y1, x2, y2) -> [..., 6] (x1, y1, x2, y2, w, h), Oscar's box
    values, or with ``area`` [..., 7] (x1, y1, x2, y2, w, h, w*h), UNITER's location."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    parts = [boxes, width[..., None], height[..., None]]
    if area:
        parts.append((width * height)[..., None])
    return torch.cat(parts, dim=-1)
