"""The GEMM tile configurations shared by the GEMM-shaped Triton kernels (patch_embed, mome_ffn)."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# 16-bit operands: 128x128 tiles with 8 warps feed a full Hopper warpgroup MMA; fp32 (tf32 or
# IEEE) operands are twice as wide, so BLOCK_K halves to keep three pipeline stages in shared memory.
GEMM_CONFIGS = {
    torch.float16: GemmConfig(128, 128, 64, 8, 3),
    torch.bfloat16: GemmConfig(128, 128, 64, 8, 3),
    torch.float32: GemmConfig(128, 128, 32, 8, 3),
}

# Weight gradients (A^T @ B, reduced over rows): with 8 warps, two warpgroups splitting the
# 128-row tile, ptxas serializes the wgmma of these products on sm_90a (C7515, whatever the
# operand layouts); one warpgroup of 4 warps over the same 128 x 128 tile issues them
# asynchronously (2 CTAs/SM, as before). IEEE fp32 has no wgmma: its FMA loop keeps 8 warps,
# which hold the operand tiles without spilling.
WEIGHT_GRAD_CONFIGS = {
    (torch.float16, "tf32"): GemmConfig(128, 128, 64, 4, 3),
    (torch.bfloat16, "tf32"): GemmConfig(128, 128, 64, 4, 3),
    (torch.float32, "tf32"): GemmConfig(128, 128, 32, 4, 3),
    (torch.float32, "ieee"): GemmConfig(128, 128, 32, 8, 3),
}
