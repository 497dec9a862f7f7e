"""The launch configurations of the attention kernels: one table, by pass, dot precision, head
dim and sequence-length class. The launchers pick from it and the sm_90a report compiles every
row of it (vlkernels.ops.attention.aot_variants); autotuning on a GPU may refine the values, the
table stays the default.

Length classes, by the length a program's block tiles (the queries of the forward): up to 64
(UNITER's ~60 tokens, LXMERT's 20 text x 36 regions: one 64-row block holds a sequence), up to
256 (ViLT / VLMo, 185-240 tokens: three 64-row blocks fill 96% of the rows at 185 where two of
128 fill 72%), and longer (SimVLM 512, METER 577: 128-row blocks). The backward's tiles do not
depend on the length (two [64, Dh] fp32 accumulators); its dK/dV and dQ launches share a row or
have one each. The figures in the comments are the sm_90a report's (vlkernels.report).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionConfig:
    """A launch's tiles, warps and pipeline stages. Backward launches only (the forward always
    splits): tile_classes runs the fully visible tiles in a loop of their own with no mask work,
    beside the loop over the partial ones (off where the second loop spills or gains nothing);
    partial_pipelined pipelines that second loop too (where unpipelined it spills)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tile_classes: bool = False
    partial_pipelined: bool = False


@dataclass(frozen=True)
class ConfigKey:
    """pass_: "fwd", "bwd" (both backward launches) or one of them, "dkdv" or "dq" (a row of
    its own where the two launches want different tiles); precision: "16bit", "tf32" or "ieee"
    (fp32's dots); head_dims: "d64" (Dh <= 64) or "d128" (Dh <= 128); length: a LENGTH_CLASSES
    name or "any"; extras: bias and / or dropout on (their tiles and the Philox state take
    registers: rows of their own where the plain row would spill)."""

    pass_: str
    precision: str
    head_dims: str
    length: str = "any"
    extras: bool = False


LENGTH_CLASSES = (("short", 64), ("medium", 256), ("long", None))

_F, _B, _KV, _Q = "fwd", "bwd", "dkdv", "dq"
CONFIGS: dict[ConfigKey, AttentionConfig] = {
    # 16-bit forward, per length class; 8 warps for the [128, 128] accumulator of long Dh 128
    ConfigKey(_F, "16bit", "d64", "short"): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d64", "medium"): AttentionConfig(64, 64, 4, 3),
    ConfigKey(_F, "16bit", "d64", "long"): AttentionConfig(128, 64, 4, 3),
    ConfigKey(_F, "16bit", "d128", "short"): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d128", "medium"): AttentionConfig(64, 64, 4, 3),
    ConfigKey(_F, "16bit", "d128", "long"): AttentionConfig(128, 64, 8, 3),
    # bias / dropout: 64-row blocks in two stages (at 128 rows the Philox state and the bias
    # tile spilled: 255 registers, 1 KB); at Dh 128 32 keys per step in 8 warps, unpipelined
    # (254 registers; 64 keys spilled 208 B, and two stages serialized the wgmma: ptxas C7515,
    # also with one Philox call per two keys split / joined in the accumulator's layout, which
    # took 242 registers to the plain draw's 209)
    ConfigKey(_F, "16bit", "d64", extras=True): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_F, "16bit", "d128", extras=True): AttentionConfig(64, 32, 8, 1),
    # the backward: 64 x 64 tiles (the dK/dV form's MMA takes 64 keys: 32 would leave it
    # without warpgroup MMA; dQ's, 64 queries), by tile class: Dh 64 dQ 197 -> 167 registers,
    # 2 -> 3 CTAs/SM (co-attention 164 -> 146), its hot loop 734 -> 253 instructions; dK/dV 228
    # -> 231 registers, 1033 -> 554. Dh 80-128: dQ 216-217 -> 209, 806-811 -> 340-343; dK/dV
    # with its partial loop pipelined (unpipelined it spilled 48 B at Dh 80 / 96) 233-234 ->
    # 243-245, 1128-1132 -> 655-661
    ConfigKey(_B, "16bit", "d64"): AttentionConfig(64, 64, 4, 2, tile_classes=True),
    ConfigKey(_Q, "16bit", "d128"): AttentionConfig(64, 64, 8, 2, tile_classes=True),
    ConfigKey(_KV, "16bit", "d128"): AttentionConfig(64, 64, 8, 2, tile_classes=True, partial_pipelined=True),
    # bias / dropout: dK/dV steps over 16 queries (the bias tile, its gradient's addresses and
    # the Philox state beside the two accumulators: 64 queries spilled 308 B at Dh 64, 184 B at
    # 128; Dh 64 237 registers, Dh 128 255 in one stage, two serialized the wgmma); dQ keeps 64
    # query rows (Dh 64: 231 registers, 2 CTAs/SM), at Dh 128 32 keys per step unpipelined
    # (221 registers; 64 keys spilled 20 B, two stages serialized)
    # (by tile class, Dh 64 dK/dV: co-attention's 170 -> 168 registers, 2 -> 3 CTAs/SM; not
    # dQ: 231 -> 255 registers, up to 52 B spilled at Dh 64, 221 -> 255 at Dh 128; nor dK/dV at
    # Dh 128: 140 B)
    ConfigKey(_KV, "16bit", "d64", extras=True): AttentionConfig(16, 64, 4, 2, tile_classes=True),
    ConfigKey(_Q, "16bit", "d64", extras=True): AttentionConfig(64, 64, 4, 2),
    ConfigKey(_KV, "16bit", "d128", extras=True): AttentionConfig(16, 64, 8, 1),
    ConfigKey(_Q, "16bit", "d128", extras=True): AttentionConfig(64, 32, 8, 1),
    # tf32: fp32 operands are twice as large: 64 x 32 tiles (64 rows is the least a warpgroup
    # MMA takes); 8 warps for the two [64, 128] fp32 accumulators of the Dh 128 backward, whose
    # dK/dV runs three stages (234 registers; two spilled 128 B at 255)
    ConfigKey(_F, "tf32", "d64"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_F, "tf32", "d128"): AttentionConfig(64, 32, 4, 2),
    # (by tile class, the Dh 64 dQ: 197 -> 175 registers, its hot loop 568 -> 278 instructions;
    # not dK/dV, where co-attention went 168 -> 208 registers, 3 -> 2 CTAs/SM, nor Dh 128, where
    # dQ spilled 28 B and dK/dV 300 B)
    ConfigKey(_B, "tf32", "d64"): AttentionConfig(64, 32, 4, 2),
    ConfigKey(_Q, "tf32", "d64"): AttentionConfig(64, 32, 4, 2, tile_classes=True),
    ConfigKey(_B, "tf32", "d128"): AttentionConfig(64, 32, 8, 2),
    ConfigKey(_KV, "tf32", "d128"): AttentionConfig(64, 32, 8, 3),
    # tf32 bias / dropout dK/dV: 16 keys per program in 8 warps (220 registers; 64 x 32 in 4
    # spilled 296 B); dQ keeps the plain row's tiles (2 CTAs/SM) in one loop (by tile class it
    # spilled 48 B)
    ConfigKey(_KV, "tf32", "d64", extras=True): AttentionConfig(64, 16, 8, 2),
    ConfigKey(_Q, "tf32", "d64", extras=True): AttentionConfig(64, 32, 4, 2),
    # IEEE fp32 (torch's default matmul precision): no MMA, each product an FMA loop over
    # register-held operands, so 16 keys per step in 8 warps (64 x 32 in 4 spilled 0.4-0.8 KB);
    # the Dh 64 backward in 8 warps: dK/dV 32 x 32 (207 registers; 64 x 32 spilled 13 KB),
    # dQ 64 x 32 (97 registers, 2 CTAs/SM; in 4 warps it spilled 1 KB)
    ConfigKey(_F, "ieee", "d64"): AttentionConfig(64, 16, 8, 2),
    ConfigKey(_F, "ieee", "d128"): AttentionConfig(32, 16, 8, 2),
    ConfigKey(_KV, "ieee", "d64"): AttentionConfig(32, 32, 8, 2),
    ConfigKey(_Q, "ieee", "d64"): AttentionConfig(64, 32, 8, 2),
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


PASSES = ("fwd", "dkdv", "dq")  # the launches: the forward, the backward's dK/dV and dQ


def key_for(dtype: torch.dtype, block_d: int, pass_: str, length: int, extras: bool,
            allow_tf32: Optional[bool] = None) -> ConfigKey:
    """The table row a launch (pass_: one of PASSES) uses: the most specific row present (with
    extras, their row before the plain one; a backward launch's own row before "bwd"; the
    length class before "any")."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    prec, head_dims = precision(dtype, allow_tf32), ("d64" if block_d <= 64 else "d128")
    for with_extras in ((True, False) if extras else (False,)):
        for row_pass in ((pass_,) if pass_ == "fwd" else (pass_, "bwd")):
            for length_name in (length_class(length), "any"):
                key = ConfigKey(row_pass, prec, head_dims, length_name, with_extras)
                if key in CONFIGS:
                    return key
    raise KeyError(f"no attention configuration for {pass_} {prec} {head_dims}")


def config(dtype: torch.dtype, block_d: int, pass_: str, length: int, extras: bool = False,
           allow_tf32: Optional[bool] = None) -> AttentionConfig:
    return CONFIGS[key_for(dtype, block_d, pass_, length, extras, allow_tf32)]
