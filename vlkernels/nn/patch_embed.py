"""PatchEmbed: a drop-in for timm's ``PatchEmbed`` on the fused patch_embed op.

timm's signature in timm's order, its defaults, attributes (``img_size``, ``patch_size``,
``grid_size``, ``num_patches``, ``flatten``, ``output_fmt``, ``strict_img_size``,
``dynamic_img_pad``) and state-dict keys (``proj.weight``, ``proj.bias``, ``norm.*``), and its
forward: size checks, dynamic padding, Conv2d(kernel = stride = patch), the output format, then
the norm. A cls token and position embedding fused into the same GEMM are
:func:`vlkernels.ops.patch_embed`'s ``cls_token`` / ``pos_embed`` arguments (the models call
the op with this module's ``proj``).
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels._coverage import record_fallback as _record_fallback
from vlkernels.nn._submodules import is_plain
from vlkernels.ops import patch_embed


class Format(str, Enum):
    """Output layouts, as timm's ``Format`` (a str: ``module.output_fmt == "NHWC"`` holds)."""
    NCHW = "NCHW"
    NHWC = "NHWC"
    NCL = "NCL"
    NLC = "NLC"


def _pair(value: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def project_patches(where: str, proj: nn.Module, images: torch.Tensor, *, pos_embed: Optional[torch.Tensor] = None,
                    cls_token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A model's patch tokens through its patch projection ``proj`` (an nn.Conv2d, stride =
    kernel): images [B, C, H, W] -> [B, T, D] as :func:`vlkernels.ops.patch_embed` (cls_token
    [1, 1, D] first when given, T = 1 + N, else T = N; plus pos_embed [1 or B, T, D]). The fused
    op reads proj's weights only while proj is a plain nn.Conv2d without hooks; otherwise proj is
    called (a fallback counted under ``where``), so a LoRA adapter or a hook on it takes effect."""
    if is_plain(proj, nn.Conv2d):
        return patch_embed(images, proj.weight, proj.bias, pos_embed=pos_embed, cls_token=cls_token)
    _record_fallback(where, "the patch projection is wrapped (LoRA, a parametrization) or hooked")
    tokens = proj(images).flatten(2).transpose(1, 2)
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], 1)
    return tokens if pos_embed is None else tokens + pos_embed


class PatchEmbed(nn.Module):
    """Image to patch embedding, as timm's ``PatchEmbed`` (same signature, order, defaults,
    attributes, state dict and forward).

    forward(x [B, C, H, W]) -> [B, N, D] (flatten, N = gh * gw patches in row-major order), or
    with ``flatten=False`` [B, D, gh, gw], or in ``output_fmt`` ('NCHW', 'NHWC', 'NCL', 'NLC';
    setting it turns ``flatten`` off); ``norm`` applies last, to that output.
    img_size: None accepts any image size (grid_size and num_patches are then None); else with
    ``strict_img_size`` H, W must equal it, and without, they must be multiples of the patch
    unless ``dynamic_img_pad`` pads the bottom and right edges with zeros to the next multiple.
    Violations raise a ValueError (timm: AssertionError).

    The fused op runs when ``proj`` is a plain ``nn.Conv2d`` with square patches and no hooks;
    anything else (a wrapped or hooked projection, non-square patches) calls ``proj`` itself
    and says so once.
    """

    def __init__(
        self,
        img_size: Optional[Union[int, tuple[int, int]]] = 224,
        patch_size: Union[int, tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        if output_fmt is not None:
            if output_fmt not in Format.__members__:
                raise ValueError(f"PatchEmbed: output_fmt must be one of {list(Format.__members__)}, "
                                 f"got {output_fmt!r}")
            self.flatten, self.output_fmt = False, Format(output_fmt)
        else:
            self.flatten, self.output_fmt = flatten, Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        factory = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        # A real Conv2d holds the parameters, so checkpoints, initialisers and optimisers see
        # exactly what they see in timm.
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias, **factory)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else nn.Identity()

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = _pair(img_size)
        grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, tuple[int, int]]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an image of size img_size (rounded up with dynamic_img_pad)."""
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def _check_size(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"PatchEmbed: x must be [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        height, width = x.shape[2:]
        if self.img_size is None:
            return
        if self.strict_img_size:
            for name, size, expected in (("height", height, self.img_size[0]), ("width", width, self.img_size[1])):
                if size != expected:
                    raise ValueError(f"PatchEmbed: input {name} ({size}) doesn't match the model's img_size "
                                     f"({expected}); strict_img_size=False accepts other sizes")
        elif not self.dynamic_img_pad:
            for name, size, patch in (("height", height, self.patch_size[0]), ("width", width, self.patch_size[1])):
                if size % patch:
                    raise ValueError(f"PatchEmbed: input {name} ({size}) should be divisible by the patch size "
                                     f"({patch}); dynamic_img_pad=True pads it")

    def _fused_refusal(self) -> Optional[str]:
        proj = self.proj
        if not is_plain(proj, nn.Conv2d):
            return "proj is not a plain nn.Conv2d without hooks"
        if proj.kernel_size[0] != proj.kernel_size[1] or proj.stride != proj.kernel_size or \
                proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
            return "proj is not a square Conv2d with kernel = stride (non-square patches)"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        batch, _, height, width = x.shape
        patch_h, patch_w = self.patch_size
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (patch_w - width % patch_w) % patch_w, 0, (patch_h - height % patch_h) % patch_h))
        refusal = self._fused_refusal()
        if refusal is not None:
            _record_fallback("PatchEmbed", refusal)
            x = self.proj(x)  # [B, D, gh, gw]
            if self.flatten:
                x = x.flatten(2).transpose(1, 2)
            elif self.output_fmt != Format.NCHW:
                x = _from_nchw(x, self.output_fmt)
            return self.norm(x)
        grid_h, grid_w = x.shape[2] // patch_h, x.shape[3] // patch_w
        if grid_h == 0 or grid_w == 0:
            raise ValueError(f"PatchEmbed: the image ({x.shape[2]} x {x.shape[3]}) is smaller than one patch "
                             f"{self.patch_size}")
        # The conv drops pixels past the last whole patch (img_size=None or dynamic sizes); the op
        # takes whole patches only.
        x = x[:, :, :grid_h * patch_h, :grid_w * patch_w]
        tokens = patch_embed(x, self.proj.weight, self.proj.bias)  # [B, N, D]
        if not self.flatten:
            tokens = _from_nlc(tokens, self.output_fmt, grid_h, grid_w)
        return self.norm(tokens)


def _from_nchw(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """[B, D, gh, gw] -> fmt (timm's nchw_to)."""
    if fmt == Format.NHWC:
        return x.permute(0, 2, 3, 1)
    return x.flatten(2) if fmt == Format.NCL else x.flatten(2).transpose(1, 2)


def _from_nlc(tokens: torch.Tensor, fmt: Format, grid_h: int, grid_w: int) -> torch.Tensor:
    """[B, N, D] (row-major patches) -> fmt."""
    if fmt == Format.NLC:
        return tokens
    if fmt == Format.NCL:
        return tokens.transpose(1, 2)
    hwc = tokens.unflatten(1, (grid_h, grid_w))  # [B, gh, gw, D]
    return hwc if fmt == Format.NHWC else hwc.permute(0, 3, 1, 2)
