"""Reference patch embedding: what ViT/ViLT/VLMo compute with nn.Conv2d(stride=P), flatten, cls and pos."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    cls_token: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """images: [B, C, H, W], weight: [D, C, P, P], bias: [D], pos_embed: [1 or B, T, D], cls_token: [1, 1, D].

    Returns [B, T, D]: the P x P patches in row-major order, projected, with the cls token
    first when given (T = 1 + N, else T = N), plus pos_embed when given.
    """
    patch = weight.shape[-1]
    tokens = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens
