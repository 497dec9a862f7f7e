"""The launch configurations of the attention kernels: one table, by pass, dot precision, head
dim and sequence-length class. The launchers pick from it and the sm_90a report compiles every
row of it (vlkernels.ops.attention.aot_variants); autotuning on a GPU may refine the values, the
table stays the default.

Length classes, by the length a program's block tiles (the queries of the forward): up to 64
(UNITER's ~60 tokens, LXMERT's 20 text x 36 regions: one 64-row block holds a sequence), up to
256 (ViLT / VLMo, 185-240 tokens: three 64-row blocks fill 96% of the rows at 185 where two of
128 fill 72%), and longer (SimVLM 512, METER 577: 128-row blocks). The backward's tiles are
64 x 64 at every length (two [64, Dh] fp32 accumulators).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ConfigKey:
    """pass_: "fwd" or "bwd" (both backward launches); precision: "16bit", "tf32" or "ieee"
    (fp32's dots); head_dims: "d64" (Dh <= 64) or "d128" (Dh <= 128); length: a LENGTH_CLASSES
    name or "any"; extras: bias and / or dropout on (their tiles and the Philox state take
    registers: rows of their own where the plain row would spill)."""

    pass_: str
    precision: str
    head_dims: str
    length: str = "any"
    extras: bool = False


LENGTH_CLASSES = (("short", 64), ("medium", 256), ("long", None))

_F, _B = "fwd", "bwd"
CONFIGS: dict[ConfigKey, AttentionConfig] = {
    # 16-bit forward, per length class; 8 warps for the [128, 128] accumulator of long Dh 128
    ConfigKey(_F, "16bit", "d64", "short"): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d64", "medium"): AttentionConfig(64, 64, 4, 3),
    ConfigKey(_F, "16bit", "d64", "long"): AttentionConfig(128, 64, 4, 3),
    ConfigKey(_F, "16bit", "d128", "short"): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d128", "medium"): AttentionConfig(64, 64, 4, 3),
    ConfigKey(_F, "16bit", "d128", "long"): AttentionConfig(128, 64, 8, 3),
    # bias / dropout: 64-row blocks in two stages (at 128 rows the Philox state and the bias
    # tile spilled: 255 registers, 1 KB); at Dh 128 32 keys per step in 8 warps (64 spilled)
    ConfigKey(_F, "16bit", "d64", extras=True): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d128", extras=True): AttentionConfig(64, 32, 8, 2),
    # the backward: 64 x 64 tiles, bias / dropout included (the dK/dV form's MMA takes 64 keys:
    # 32 would leave it without warpgroup MMA)
    ConfigKey(_B, "16bit", "d64"): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_B, "16bit", "d128"): AttentionConfig(64, 64, 8, 2),
    # tf32: fp32 operands are twice as large: 64 x 32 tiles (64 rows is the least a warpgroup
    # MMA takes); 8 warps for the two [64, 128] fp32 accumulators of the Dh 128 backward
    ConfigKey(_F, "tf32", "d64"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_F, "tf32", "d128"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_B, "tf32", "d64"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_B, "tf32", "d128"): AttentionConfig(64, 32, 8, 2),
    # IEEE fp32 (torch's default matmul precision): no MMA, each product an FMA loop over
    # register-held operands, so 16 keys per step in 8 warps (64 x 32 in 4 spilled 0.4-0.8 KB)
    ConfigKey(_F, "ieee", "d64"): AttentionConfig(64, 16, 8, 2),
    ConfigKey(_F, "ieee", "d128"): AttentionConfig(32, 16, 8, 2),
    ConfigKey(_B, "ieee", "d64"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_B, "ieee", "d128"): AttentionConfig(32, 16, 8, 1),
}


def length_class(length: int) -> str:
    for name, bound in LENGTH_CLASSES:
        if bound is None or length <= bound:
            return name
    raise AssertionError("the last class has no bound")


def precision(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> str:
    """The dots' precision class: fp32 follows torch's matmul flag (IEEE by default, tf32 when
    allowed); 16-bit ignores it."""
    if dtype != torch.float32:
        return "16bit"
    allow = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    return "tf32" if allow else "ieee"


def key_for(dtype: torch.dtype, block_d: int, backward: bool, length: int, extras: bool,
            allow_tf32: Optional[bool] = None) -> ConfigKey:
    """The table row a launch uses: the most specific row present (length class, then "any";
    with extras, their row, else the plain one)."""
    pass_, prec = ("bwd" if backward else "fwd"), precision(dtype, allow_tf32)
    head_dims = "d64" if block_d <= 64 else "d128"
    for with_extras in ((True, False) if extras else (False,)):
        for length_name in (length_class(length), "any"):
            key = ConfigKey(pass_, prec, head_dims, length_name, with_extras)
            if key in CONFIGS:
                return key
    raise KeyError(f"no attention configuration for {pass_} {prec} {head_dims}")


def config(dtype: torch.dtype, block_d: int, backward: bool, length: int, extras: bool = False,
           allow_tf32: Optional[bool] = None) -> AttentionConfig:
    return CONFIGS[key_for(dtype, block_d, backward, length, extras, allow_tf32)]
