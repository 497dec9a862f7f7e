"""PatchEmbed: timm/ViT-compatible image-to-patch embedding on the fused patch_embed op."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from vlkernels.ops import patch_embed


def _pair(value: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class PatchEmbed(nn.Module):
    """Image to patch embedding, as timm's ``PatchEmbed``; its state dict (``proj.weight``,
    ``proj.bias``, ``norm.*``) loads timm and ViT checkpoints unchanged.

    forward(x: [B, C, H, W]) -> [B, N, D] with N = (H/P)*(W/P) patches in row-major order, or
    [B, D, H/P, W/P] with ``flatten=False``. H and W may differ from ``img_size`` (any multiple
    of the patch size); ``img_size`` sets ``grid_size`` and ``num_patches`` only.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int):
            height, width = _pair(patch_size)
            if height != width:
                raise ValueError(f"PatchEmbed: only square patches are supported, got {patch_size}")
            patch_size = height
        self.img_size = _pair(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        # A real Conv2d holds the parameters, so checkpoints, initialisers and optimisers see
        # exactly what they see in timm; its forward is never called.
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(patch_embed(x, self.proj.weight, self.proj.bias))
        if self.flatten:
            return tokens
        grid_h, grid_w = x.shape[2] // self.patch_size[0], x.shape[3] // self.patch_size[1]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w)
