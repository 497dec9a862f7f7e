"""Reference patch embedding: what ViT/ViLT/VLMo compute with nn.Conv2d(stride=P), flatten, cls and pos."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vlkernels._deterministic import is_deterministic


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

    The projection is conv2d, or in vlkernels' deterministic mode the same product as a GEMM
    over the patches (cuDNN's conv weight gradient may use an algorithm that sums with atomics).
    """
    patch = weight.shape[-1]
    if is_deterministic():
        batch, channels, height, width = images.shape
        # Patches do not overlap (stride = kernel): im2col is a reshape; rows are (c, i, j) like weight's.
        patches = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * patch * patch)
        tokens = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    else:
        tokens = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens
