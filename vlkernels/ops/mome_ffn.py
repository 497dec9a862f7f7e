"""Mixture-of-modality-experts FFN (VLMo): per-token expert FFNs with per-expert pre-LayerNorm,
as grouped GEMMs over expert segments, without gathering, padding or scattering copies.

Routing (glue in torch, all on device, no host sync): order = stable argsort(expert_index)
(int32), offsets[e] = searchsorted(sorted ids, e) for e in 0..E (int32, E+1): static shapes for
torch.compile (a bincount's length depends on the largest id), no atomics. With ``segments``
(VLMo's positional split) order and offsets are built by arithmetic: no sort at all.

Forward (2 launches, 3 with a LayerNorm):
  LN   once per token: rows of x gathered through order, mean/rstd (fp32, saved) and the
       normalised rows in the GEMM dtype, in sorted order (what a separate LayerNorm would
       store; FC1's and dW1's A operand, so no GEMM recomputes statistics per N tile).
  FC1  A = normalised rows (or x gathered through order without a LayerNorm); epilogue + b1[e],
       exact GELU. Writes h = act(z) [T, F] in sorted order, and (when a backward will run) the
       pre-activation z [T, F].
  FC2  A = h rows, epilogue + b2[e], stored straight to the token row order[p].
Backward (up to 7 launches): dz = (dY[order] @ W2[e]^T) * act'(z) (epilogue); dW2 = grouped
h^T @ dY[order] per expert; dW1 = grouped LN(x)^T @ dz per expert (the saved normalised rows);
db2, db1 = per-expert column sums of dY[order] and dz in a kernel of their own
(summing them from the dW GEMMs' operand tiles would give those tiles a second, non-dot
consumer in a pipelined dot loop: triton-lang/triton#6691); d(normalised x) = dz @ W1[e]^T;
LayerNorm backward with d ln weight/bias, grad_x scattered to token rows (without a LayerNorm,
the previous GEMM stores grad_x itself, scattered). Every reduction over each expert's rows
(the weight and bias gradients, the LayerNorm's weight sums) follows one schedule
(_chunk_schedule): all of an expert's rows in one program per tile, stored in the gradient's
dtype, when the batch is small enough for that to fill the device; otherwise fixed-size chunks
of each expert's rows (balanced by tokens however skewed the routing; the grid sized from the
token total, the chunks found on the device) whose fp32 partials one kernel adds per expert in
a fixed order, in the gradient's dtype. All deterministic, no atomics.

Launch grids are 1-D (row tiles and slots flattened into axis 0): CUDA's grid axes 1 and 2
stop at 65535 (see the grid functions and tests/test_mome_ffn.py).

Why z is stored rather than recomputed: act'(z) needs z, and h cannot give it back; recomputing
z costs a whole FC1 GEMM (1/3 of the forward FLOPs) in the backward, whereas storing it costs
one [T, F] write and read, the same memory eager PyTorch keeps (GELU's input and FC2's input).
Recomputing GELU inside FC2's / dW2's A-load instead (keeping z only) would put erf in the
GEMM main loops, D/BLOCK_N times per element; the epilogue-only design keeps main loops pure.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vlkernels import _backend
from vlkernels._backend import Implementation
from vlkernels.ops._checks import check_value, reads_on_host
from vlkernels.ops._gemm import GEMM_CONFIGS, WEIGHT_GRAD_CONFIGS, GemmConfig
from vlkernels.ops._variants import KernelVariant
from vlkernels.reference import mome_ffn as reference

try:
    import triton

    from vlkernels.ops import _mome_kernels as kernels
except ImportError:  # the torch backend still works; the triton backend refuses with the reason
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATION_CODES = {"gelu": 0, "relu": 1}


_LN_BWD_ELEMENTS = 4096  # rows per LayerNorm-backward block: BLOCK_R * BLOCK_D fp32 values in registers
_LAYERNORM_WARPS = 4
# 8 warps for the backward: 110-128 registers, 2 CTAs (16 warps) per SM without a spill, where 4
# warps took 163-214 (8-12 warps per SM) and spilled storing fp16 / bf16 sums at D <= 256.
_LN_BWD_WARPS = 8
# Bias-gradient column sums: 32 rows x 128 columns per step (16 fp32 accumulators per thread at
# 4 warps, 16-byte loads along the contiguous columns).
_COLUMN_SUM_ROWS, _COLUMN_SUM_COLUMNS, _COLUMN_SUM_WARPS = 32, 128, 4
_SLOT_SUM_BLOCK, _SLOT_SUM_WARPS = 1024, 4  # fp32 partial slots added per expert, 8 values a thread
_GROUP_M = 8  # row tiles per group of the rows kernel's L2-friendly program order
# Row GEMMs on 64-column tiles where 128 columns reach 255 registers: dz's epilogue (the erf
# GELU derivative over the loaded pre-activation; fp32 spills there, 16-bit sits at 1 CTA/SM)
# and fp32 IEEE dots (no tensor cores: the operand tiles live in registers, 1 CTA/SM or
# spilled). 128-160 registers, no spill, 2 CTAs/SM for dz.
_NARROW_BLOCK_N = 64
_MAX_TOKENS = 2**31 - 1  # offsets, order and sorted positions are int32
_MAX_PROGRAMS = 2**31 - 1  # CUDA's grid axis 0
_H100_SMS = 132  # the device the report's chunked variants are cut for
# The dtypes whose row GEMMs over sorted A rows (FC1 over the normalised rows, FC2, and the
# backward's d(normalised x)) load their operands through TMA descriptors, decided once per call
# for its forward and backward. Empty until a GPU benchmark (bench provider vlkernels[tma])
# measures it faster: on sm_90a it takes every such HGMMA loop to 84 instructions (from 99-114
# by pointers in 16-bit, 99-136 in tf32) and changes registers by -15 to +2, at the same CTAs per
# SM (vlkernels.report, the "-tma" variants beside the pointer ones).
TMA_ROW_GEMMS: frozenset = frozenset()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows the flag that governs nn.Linear (which this op replaces): ieee unless tf32 is allowed.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a couple of splits, so tests cover the split path


def _row_tiles(tokens: int, experts: int, block_m: int) -> int:
    # Upper bound of sum_e cdiv(count_e, BLOCK_M) over any routing: cdiv(T, BLOCK_M) + E - 1
    # (0 when there are no tokens: each expert has cdiv(0, BLOCK_M) = 0 tiles).
    return triton.cdiv(tokens, block_m) + experts - 1 if tokens else 0


def _rows_config(dtype: torch.dtype, precision: str, epilogue: int) -> GemmConfig:
    if epilogue == kernels.EPILOGUE_ACT_GRAD or (dtype == torch.float32 and precision == "ieee"):
        return dataclasses.replace(GEMM_CONFIGS[dtype], block_n=_NARROW_BLOCK_N)
    return GEMM_CONFIGS[dtype]


# Launch shapes. Pure functions of the sizes (tested at huge sizes without launching): every
# grid that grows with the tokens is 1-D, since CUDA stops grid axes 1 and 2 at 65535.
def _rows_grid(tokens: int, n_size: int, experts: int, cfg) -> tuple[int]:
    return (triton.cdiv(n_size, cfg.block_n) * _row_tiles(tokens, experts, cfg.block_m),)


def _chunk_schedule(tokens: int, experts: int, tiles: int, row_block: int, min_blocks: int,
                    multiprocessors: int) -> tuple[int, int]:
    """(chunk_rows, slots) of a reduction over each expert's rows with `tiles` output tiles per
    slot: the schedule of every such reduction (weight and bias gradients, the LayerNorm's
    weight sums), read on the device by _slot_rows. The rows of each expert are cut into chunks
    of chunk_rows (a multiple of row_block, at least min_blocks of them) until the grid covers
    the device about twice; whatever the routing, the chunks number at most cdiv(T, chunk) + E - 1
    (slots), so the grid is sized from the token total alone (no host read of the counts).
    chunk_rows 0: one slot per expert, each reducing all its rows (the batch is too small to
    split), stored in the gradient's dtype without partials."""
    chunks = triton.cdiv(2 * multiprocessors, tiles)
    chunk_rows = max(min_blocks * row_block, triton.cdiv(triton.cdiv(tokens, chunks), row_block) * row_block)
    if chunks <= experts or chunk_rows >= tokens:
        return 0, experts
    return chunk_rows, triton.cdiv(tokens, chunk_rows) + experts - 1


def _weight_grad_launch(tokens: int, m_size: int, n_size: int, experts: int, cfg, multiprocessors: int):
    """(chunk_rows, slots, grid) of a weight gradient: chunks of BLOCK_K row blocks, at least four."""
    tiles = triton.cdiv(m_size, cfg.block_m) * triton.cdiv(n_size, cfg.block_n)
    chunk_rows, slots = _chunk_schedule(tokens, experts, tiles, cfg.block_k, 4, multiprocessors)
    return chunk_rows, slots, (slots * tiles,)


def _slot_sum_grid(numel: int, experts: int) -> tuple[int]:
    return (experts * triton.cdiv(numel, _SLOT_SUM_BLOCK),)


def _column_sum_launch(tokens: int, n_size: int, experts: int, multiprocessors: int):
    """(chunk_rows, slots, grid) of the bias-gradient column sums: chunks of at least two row blocks."""
    tiles = triton.cdiv(n_size, _COLUMN_SUM_COLUMNS)
    chunk_rows, slots = _chunk_schedule(tokens, experts, tiles, _COLUMN_SUM_ROWS, 2, multiprocessors)
    return chunk_rows, slots, (slots * tiles,)


def _ln_bwd_launch(tokens: int, dim: int, experts: int, multiprocessors: int):
    """(block_r, block_d, chunk_rows, slots, grid) of the LayerNorm backward: one program per
    slot, chunks of at least four row blocks."""
    block_r, block_d = _ln_blocks(dim)
    chunk_rows, slots = _chunk_schedule(tokens, experts, 1, block_r, 4, multiprocessors)
    return block_r, block_d, chunk_rows, slots, (slots,)


def _reduce_slots(parts: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, chunk_rows: int) -> None:
    """out[e] = the sum of expert e's fp32 partial slots parts[s] (added in order), in out's dtype."""
    numel = out[0].numel()
    kernels._mome_slot_sum_kernel[_slot_sum_grid(numel, out.shape[0])](
        parts, offsets, out, numel, chunk_rows, NUM_EXPERTS=out.shape[0], BLOCK=_SLOT_SUM_BLOCK,
        num_warps=_SLOT_SUM_WARPS,
    )


def _slot_targets(out: torch.Tensor, chunk_rows: int, slots: int) -> torch.Tensor:
    # One slot per expert: the kernel stores into the gradient itself; else fp32 partials per slot.
    return out if not chunk_rows else torch.empty(slots, *out.shape[1:], device=out.device, dtype=torch.float32)


def _launch_layernorm(x, order, offsets, ln_weight, ln_bias, eps):
    """(normed [T, D] in x's dtype, mean [T], rstd [T] fp32), all in sorted order."""
    tokens, dim = x.shape
    block_r, block_d = _ln_blocks(dim)
    normed = torch.empty_like(x)
    mean = torch.empty(tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    kernels._mome_layernorm_kernel[(triton.cdiv(tokens, block_r),)](
        x, order, offsets, ln_weight, ln_bias, mean, rstd, normed, tokens, dim, eps,
        NUM_EXPERTS=offsets.shape[0] - 1, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_LAYERNORM_WARPS,
    )
    return normed, mean, rstd


def _tma_descriptors(a, weight, k_size: int, n_size: int, cfg, precision: str, *, tma: bool, gather_a: bool,
                     weight_kn_strides) -> tuple:
    """(the kernel's TMA mode, A's descriptor, the weight's descriptor): descriptors when ``tma``
    and the GEMM allows them, else (TMA_NONE, None, None), loads by pointers: on a GPU before
    sm_90 or not NVIDIA's, for gathered A rows (TMA on sm_90 has no row gather), for a weight
    with no unit stride along K or N or with a zero stride (expanded), IEEE fp32 dots (no tensor
    cores: the TMA tiles spill 464-536 B on their way to registers), an fp32 weight stored
    [K, N] (tf32 tensor cores read B K-major and TMA cannot transpose: Triton would copy each
    tile through registers and wait on every dot), and where TMA's 16-byte rule fails (base
    addresses, row strides)."""
    none = (kernels.TMA_NONE, None, None)
    stride_k, stride_n = weight_kn_strides
    if not tma or precision == "ieee" or gather_a or a.stride(1) != 1 or 1 not in (stride_k, stride_n):
        return none
    if a.device.type == "cuda" and (torch.version.hip is not None or torch.cuda.get_device_capability(a.device)[0] < 9):
        return none
    kn = stride_n == 1
    if kn and weight.dtype == torch.float32:
        return none
    size = a.element_size()
    strides = (a.stride(0), weight.stride(0), stride_k if kn else stride_n)
    if any(address % 16 for address in (a.data_ptr(), weight.data_ptr())) or \
            any(stride <= 0 or stride * size % 16 for stride in strides):
        return none
    from triton.tools.tensor_descriptor import TensorDescriptor

    a_desc = TensorDescriptor(a, [a.shape[0], k_size], [a.stride(0), 1], [cfg.block_m, cfg.block_k])
    if kn:
        return kernels.TMA_WEIGHT_KN, a_desc, TensorDescriptor(
            weight, [weight.shape[0], k_size, n_size], [weight.stride(0), stride_k, 1], [1, cfg.block_k, cfg.block_n])
    return kernels.TMA_WEIGHT_NK, a_desc, TensorDescriptor(
        weight, [weight.shape[0], n_size, k_size], [weight.stride(0), stride_n, 1], [1, cfg.block_n, cfg.block_k])


def _launch_rows(a, order, offsets, weight, out, *, bias=None, pre=None, gather_a, scatter_out, epilogue,
                 activation=0, store_pre=False, weight_kn_strides, tma):
    """out = epilogue(A rows @ weight[e]) over the grouped row tiles; weight[e] is read as
    [K, N] with strides weight_kn_strides = (stride_k, stride_n); tma: through TMA descriptors
    where the GEMM allows them."""
    tokens, k_size = a.shape
    n_size = out.shape[1]
    experts = offsets.shape[0] - 1
    precision = _dot_precision(weight.dtype)
    cfg = _rows_config(weight.dtype, precision, epilogue)
    grid = _rows_grid(tokens, n_size, experts, cfg)
    if grid[0] == 0:  # no tokens: nothing to compute (a 0-program launch is not valid on every driver)
        return
    mode, a_desc, weight_desc = _tma_descriptors(a, weight, k_size, n_size, cfg, precision, tma=tma,
                                                 gather_a=gather_a, weight_kn_strides=weight_kn_strides)
    placeholder = weight  # unread when the term is absent
    kernels._mome_rows_kernel[grid](
        a, order, offsets, weight, placeholder if bias is None else bias, placeholder if pre is None else pre, out,
        a_desc, weight_desc,
        k_size, n_size, _row_tiles(tokens, experts, cfg.block_m), weight.stride(0), *weight_kn_strides,
        NUM_EXPERTS=experts, GATHER_A=gather_a, SCATTER_OUT=scatter_out, EPILOGUE=epilogue,
        ACTIVATION=activation, STORE_PRE=store_pre, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M, DOT_PRECISION=precision, TMA=mode,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_weight_grad(a, b, order, offsets, *, gather_a, gather_b) -> torch.Tensor:
    """Per expert e: A[rows_e]^T @ B[rows_e], [E, M, N] in B's dtype (zeros for an expert without rows)."""
    tokens, m_size = a.shape
    n_size = b.shape[1]
    experts = offsets.shape[0] - 1
    precision = _dot_precision(b.dtype)
    cfg = WEIGHT_GRAD_CONFIGS[b.dtype, precision]
    chunk_rows, slots, grid = _weight_grad_launch(tokens, m_size, n_size, experts, cfg, _multiprocessors(a.device))
    grad_weight = torch.empty(experts, m_size, n_size, device=a.device, dtype=b.dtype)
    target = _slot_targets(grad_weight, chunk_rows, slots)
    kernels._mome_weight_grad_kernel[grid](
        a, b, order, offsets, target, m_size, n_size, chunk_rows,
        NUM_EXPERTS=experts, GATHER_A=gather_a, GATHER_B=gather_b, ONE_SLOT_PER_EXPERT=not chunk_rows,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if chunk_rows:
        _reduce_slots(target, offsets, grad_weight, chunk_rows)
    return grad_weight


def _launch_column_sum(b, order, offsets, *, gather) -> torch.Tensor:
    """Per expert e: column sums of B[rows_e] (rows order[p] when ``gather``), [E, N] in B's dtype."""
    tokens, n_size = b.shape
    experts = offsets.shape[0] - 1
    chunk_rows, slots, grid = _column_sum_launch(tokens, n_size, experts, _multiprocessors(b.device))
    grad_bias = torch.empty(experts, n_size, device=b.device, dtype=b.dtype)
    target = _slot_targets(grad_bias, chunk_rows, slots)
    kernels._mome_column_sum_kernel[grid](
        b, order, offsets, target, n_size, chunk_rows, NUM_EXPERTS=experts, ONE_SLOT_PER_EXPERT=not chunk_rows,
        GATHER=gather, BLOCK_R=_COLUMN_SUM_ROWS, BLOCK_N=_COLUMN_SUM_COLUMNS, num_warps=_COLUMN_SUM_WARPS,
    )
    if chunk_rows:
        _reduce_slots(target, offsets, grad_bias, chunk_rows)
    return grad_bias


def _ln_blocks(dim: int) -> tuple[int, int]:
    # (rows, columns) of a LayerNorm block: whole rows (BLOCK_D >= D) of _LN_BWD_ELEMENTS values.
    block_d = triton.next_power_of_2(dim)
    return max(1, _LN_BWD_ELEMENTS // block_d), block_d


def _launch_ln_bwd(x, order, offsets, mean, rstd, grad_normed, ln_weight):
    """(grad_x [T, D], grad ln_weight [E, D], grad ln_bias [E, D]), all in x's dtype."""
    tokens, dim = x.shape
    experts = offsets.shape[0] - 1
    block_r, block_d, chunk_rows, slots, grid = _ln_bwd_launch(tokens, dim, experts, _multiprocessors(x.device))
    grad_x = torch.empty_like(x)
    # two tensors: each gradient owns its storage
    grad_weight, grad_bias = (torch.empty(experts, dim, device=x.device, dtype=x.dtype) for _ in range(2))
    weight_target, bias_target = (_slot_targets(t, chunk_rows, slots) for t in (grad_weight, grad_bias))
    kernels._mome_ln_bwd_kernel[grid](
        x, order, offsets, mean, rstd, grad_normed, ln_weight, grad_x, weight_target, bias_target, dim, chunk_rows,
        NUM_EXPERTS=experts, ONE_SLOT_PER_EXPERT=not chunk_rows, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=_LN_BWD_WARPS,
    )
    if chunk_rows:
        _reduce_slots(weight_target, offsets, grad_weight, chunk_rows)
        _reduce_slots(bias_target, offsets, grad_bias, chunk_rows)
    return grad_x, grad_weight, grad_bias


def _launch_fwd(x, order, offsets, w1, b1, w2, b2, ln_weight, ln_bias, eps, activation, need_backward, tma):
    tokens, dim = x.shape
    hidden = w1.shape[2]
    ln = ln_weight is not None
    h = torch.empty(tokens, hidden, device=x.device, dtype=x.dtype)
    pre = torch.empty(tokens if need_backward else 0, hidden, device=x.device, dtype=x.dtype)
    out = torch.empty(tokens, dim, device=x.device, dtype=x.dtype)
    if ln and tokens:
        normed, mean, rstd = _launch_layernorm(x, order, offsets, ln_weight, ln_bias, eps)
    else:
        normed = x.new_empty(tokens if ln else 0, dim)
        mean = torch.empty(tokens if ln else 0, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
    if tokens == 0:
        return out, h, pre, mean, rstd, normed
    _launch_rows(normed if ln else x, order, offsets, w1, h, bias=b1, pre=pre, gather_a=not ln, scatter_out=False,
                 epilogue=kernels.EPILOGUE_BIAS_ACT, activation=_ACTIVATION_CODES[activation],
                 store_pre=need_backward, weight_kn_strides=(w1.stride(1), w1.stride(2)), tma=tma)
    _launch_rows(h, order, offsets, w2, out, bias=b2, gather_a=False, scatter_out=True,
                 epilogue=kernels.EPILOGUE_BIAS, weight_kn_strides=(w2.stride(1), w2.stride(2)), tma=tma)
    return out, h, pre, mean, rstd, normed


def _launch_bwd(grad_out, x, order, offsets, w1, w2, h, pre, mean, rstd, normed, ln_weight, activation,
                need_x, need_weights, tma):
    tokens, dim = x.shape
    experts, _, hidden = w1.shape
    ln = ln_weight is not None
    # Distinct empty tensors for the gradients not computed (custom-op outputs may not alias).
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_lnw, grad_lnb = (x.new_empty(0) for _ in range(7))
    grad_pre = torch.empty(tokens, hidden, device=x.device, dtype=x.dtype)
    # dz = (dY[order] @ W2[e]^T) * act'(z): W2[e] [F, D] read as [D, F] by swapping its strides.
    _launch_rows(grad_out, order, offsets, w2, grad_pre, pre=pre, gather_a=True, scatter_out=False,
                 epilogue=kernels.EPILOGUE_ACT_GRAD, activation=_ACTIVATION_CODES[activation],
                 weight_kn_strides=(w2.stride(2), w2.stride(1)), tma=tma)
    if need_weights:
        # Each gradient is a tensor of its own (none is a view of another).
        grad_w2 = _launch_weight_grad(h, grad_out, order, offsets, gather_a=False, gather_b=True)
        grad_b2 = _launch_column_sum(grad_out, order, offsets, gather=True)
        grad_w1 = _launch_weight_grad(normed if ln else x, grad_pre, order, offsets, gather_a=not ln,
                                      gather_b=False)
        grad_b1 = _launch_column_sum(grad_pre, order, offsets, gather=False)
    if need_x or (need_weights and ln):
        # d(LN output) = dz @ W1[e]^T (W1[e] [D, F] read as [F, D]); without a LayerNorm it is grad_x.
        grad_normed = torch.empty(tokens, dim, device=x.device, dtype=torch.float32 if ln else x.dtype)
        _launch_rows(grad_pre, order, offsets, w1, grad_normed, gather_a=False, scatter_out=not ln,
                     epilogue=kernels.EPILOGUE_NONE, weight_kn_strides=(w1.stride(2), w1.stride(1)), tma=tma)
        if ln:
            grad_x, ln_weight_grad, ln_bias_grad = _launch_ln_bwd(x, order, offsets, mean, rstd, grad_normed,
                                                                  ln_weight)
            if need_weights:  # the LayerNorm's weight gradients come with the others (the fake's contract)
                grad_lnw, grad_lnb = ln_weight_grad, ln_bias_grad
        else:
            grad_x = grad_normed
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_lnw, grad_lnb


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (with fake implementations) and autograd-aware
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vlkernels::mome_ffn_fwd", mutates_args=())
def _mome_ffn_fwd_op(
    x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    eps: float, activation: str, need_backward: bool, tma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(x, order, offsets, w1, b1, w2, b2, ln_weight, ln_bias, eps, activation, need_backward, tma)


@_mome_ffn_fwd_op.register_fake
def _(x, order, offsets, w1, b1, w2, b2, ln_weight, ln_bias, eps, activation, need_backward, tma):
    tokens, hidden = x.shape[0], w1.shape[2]
    stats = tokens if ln_weight is not None else 0
    return (x.new_empty(tokens, x.shape[1]), x.new_empty(tokens, hidden),
            x.new_empty(tokens if need_backward else 0, hidden),
            x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, x.shape[1]))


@torch.library.custom_op("vlkernels::mome_ffn_bwd", mutates_args=())
def _mome_ffn_bwd_op(
    grad_out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor,
    w2: torch.Tensor, h: torch.Tensor, pre: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    normed: torch.Tensor, ln_weight: Optional[torch.Tensor], activation: str, need_x: bool, need_weights: bool,
    tma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad_out, x, order, offsets, w1, w2, h, pre, mean, rstd, normed, ln_weight, activation,
                       need_x, need_weights, tma)


@_mome_ffn_bwd_op.register_fake
def _(grad_out, x, order, offsets, w1, w2, h, pre, mean, rstd, normed, ln_weight, activation, need_x, need_weights,
      tma):
    ln = ln_weight is not None
    grad_x = torch.empty_like(x) if need_x or (need_weights and ln) else x.new_empty(0)
    if not need_weights:
        return (grad_x, *(x.new_empty(0) for _ in range(6)))
    experts, dim, hidden = w1.shape
    lnw, lnb = (x.new_empty(experts, dim) if ln else x.new_empty(0) for _ in range(2))
    return (grad_x, x.new_empty(experts, dim, hidden), x.new_empty(experts, hidden),
            x.new_empty(experts, hidden, dim), x.new_empty(experts, dim), lnw, lnb)


def _setup_context(ctx, inputs, output):
    x, order, offsets, w1, b1, w2, b2, ln_weight, ln_bias, eps, activation, need_backward, tma = inputs
    _, h, pre, mean, rstd, normed = output
    ctx.save_for_backward(x, order, offsets, w1, w2, h, pre, mean, rstd, normed, ln_weight)
    ctx.activation, ctx.tma = activation, tma
    # h, pre, mean, rstd and the normalised rows are saved for the backward, not results: no
    # gradient flows through them.
    ctx.mark_non_differentiable(h, pre, mean, rstd, normed)


def _backward(ctx, grad_out, _grad_h, _grad_pre, _grad_mean, _grad_rstd, _grad_normed):
    x, order, offsets, w1, w2, h, pre, mean, rstd, normed, ln_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x = need[0]
    need_weights = any(need[3:9])
    if pre.shape[0] != x.shape[0]:
        raise RuntimeError("mome_ffn: the forward ran without saving for backward (grad mode was off)")
    grads = _mome_ffn_bwd_op(grad_out.contiguous(), x, order, offsets, w1, w2, h, pre, mean, rstd, normed,
                             ln_weight, ctx.activation, need_x, need_weights, ctx.tma)
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_lnw, grad_lnb = grads
    keep = lambda flag, t: t if flag else None  # noqa: E731
    return (keep(need_x, grad_x), None, None, keep(need[3], grad_w1), keep(need[4], grad_b1),
            keep(need[5], grad_w2), keep(need[6], grad_b2), keep(need[7], grad_lnw), keep(need[8], grad_lnb),
            None, None, None, None)


torch.library.register_autograd("vlkernels::mome_ffn_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Routing glue (torch, on device, no host sync)
# ----------------------------------------------------------------------------------------------
def expert_order(expert_index: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_index [T] int in [0, E) -> (order [T] int32: token rows sorted by expert, stable;
    offsets [E+1] int32: expert e owns sorted positions [offsets[e], offsets[e+1]))."""
    sorted_ids, order = torch.sort(expert_index, stable=True)
    bounds = torch.arange(experts + 1, device=expert_index.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)  # expert e starts after the ids below e
    return order.to(torch.int32), offsets


def segments_order(batch: int, seq_len: int, segments: tuple, experts: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """VLMo's positional routing (first text_len tokens of each sample to first_expert, the rest to
    rest_expert) as (order, offsets) by arithmetic on device: no sort, no host sync, static shapes
    (each entry of ``segments`` an int, a SymInt or a 0-dim integer tensor).

    A token's sorted position is offsets[its expert] + the tokens of that expert before it:
    text tokens before (b, s) are b * L + min(s, L), image tokens b * (S - L) + max(s - L, 0)
    (both count when first_expert == rest_expert); order is the inverse permutation (a scatter
    of distinct positions: deterministic)."""
    text_len, first, rest = segments
    position = torch.arange(seq_len, device=device)
    sample = torch.arange(batch, device=device)[:, None]
    is_text = position < text_len
    ids = torch.where(is_text, first, rest).long()  # [S]
    bounds = torch.arange(experts + 1, device=device)
    # offsets[e] = tokens of the experts below e
    offsets = (batch * text_len) * (bounds > first) + (batch * (seq_len - text_len)) * (bounds > rest)
    text_before = sample * text_len + torch.where(is_text, position, text_len)  # [B, S]
    image_before = sample * (seq_len - text_len) + torch.where(is_text, 0, position - text_len)
    sorted_position = (offsets[ids] + text_before * (ids == first) + image_before * (ids == rest)).reshape(-1)
    tokens = torch.arange(batch * seq_len, device=device)
    order = torch.empty_like(sorted_position).scatter_(0, sorted_position, tokens)
    return order.to(torch.int32), offsets.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _validate(x, expert_index, w1, b1, w2, b2, activation, ln_weight, ln_bias, eps, segments) -> None:
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"mome_ffn: activation must be one of {tuple(_ACTIVATION_CODES)}, got {activation!r}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"mome_ffn: x must be floating point, got {x.dtype}")
    if w1.dim() != 3:
        raise ValueError(f"mome_ffn: w1 must be [E, D, F], got shape {tuple(w1.shape)}")
    experts, dim, hidden = w1.shape
    if experts == 0 or dim == 0 or hidden == 0:
        raise ValueError(f"mome_ffn: empty w1 {tuple(w1.shape)}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"mome_ffn: x must be [..., D] with D = {dim} (w1 is [E, D, F]), got {tuple(x.shape)}")
    expected = {"b1": (b1, (experts, hidden)), "w2": (w2, (experts, hidden, dim)), "b2": (b2, (experts, dim)),
                "ln_weight": (ln_weight, (experts, dim)), "ln_bias": (ln_bias, (experts, dim))}
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            if name in ("b1", "w2", "b2"):
                raise ValueError(f"mome_ffn: {name} is required")
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"mome_ffn: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.dtype != x.dtype:
            raise TypeError(f"mome_ffn: {name} is {tensor.dtype} but x is {x.dtype}; use one dtype (or torch.autocast)")
        if tensor.device != x.device:
            raise ValueError(f"mome_ffn: {name} is on {tensor.device} but x is on {x.device}")
    if w1.dtype != x.dtype or w1.device != x.device:
        raise TypeError(f"mome_ffn: w1 is {w1.dtype} on {w1.device} but x is {x.dtype} on {x.device}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("mome_ffn: ln_bias needs ln_weight")
    if not eps > 0:
        raise ValueError(f"mome_ffn: eps must be positive, got {eps}")
    if segments is not None:
        if expert_index is not None:
            raise ValueError("mome_ffn: give expert_index or segments, not both")
        if x.dim() != 3:
            raise ValueError(f"mome_ffn: segments routing needs x as [B, S, D], got {tuple(x.shape)}")
        _validate_segments(reference.segment_values(segments), x, experts)
        return
    if expert_index is None:
        raise ValueError("mome_ffn: expert_index is required (or segments)")
    if expert_index.dtype in (torch.bool,) or expert_index.dtype.is_floating_point or expert_index.is_complex():
        raise TypeError(f"mome_ffn: expert_index must be an integer tensor, got {expert_index.dtype}")
    if tuple(expert_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mome_ffn: expert_index must have shape {list(x.shape[:-1])} (x without D), "
                         f"got {list(expert_index.shape)}")
    if expert_index.device != x.device:
        raise ValueError(f"mome_ffn: expert_index is on {expert_index.device} but x is on {x.device}")
    if expert_index.numel():
        ok = ((expert_index >= 0) & (expert_index < experts)).all()
        if reads_on_host() and not bool(ok):  # strict mode: one sync, and on failure the range seen
            low, high = (v.item() for v in torch.aminmax(expert_index))
            raise ValueError(f"mome_ffn: expert ids must be in [0, {experts}), got values in [{low}, {high}]")
        check_value(ok, f"mome_ffn: expert ids must be in [0, {experts})")  # the default: no host read


def _validate_segments(values, x, experts: int) -> None:
    # Integers only (segment_values raised TypeError otherwise); a tensor entry is checked in
    # place by default and read on the host only in the strict mode (plain ints need neither).
    # While compiling, the sequence length is named, not formatted: formatting a symbolic length
    # (torch.compile(dynamic=True)) would specialise the graph on it.
    seq_len = x.shape[1]
    length = "S = x.shape[1]" if torch.compiler.is_compiling() else seq_len
    ranges = (("text_len", 0, seq_len, f"[0, {length}]"), ("expert id", 0, experts - 1, f"[0, {experts})"),
              ("expert id", 0, experts - 1, f"[0, {experts})"))
    for value, (what, low, high, shown) in zip(values, ranges):
        if isinstance(value, torch.Tensor):
            if value.device != x.device and value.device.type != "cpu":
                raise ValueError(f"mome_ffn: segments {what} is on {value.device} but x is on {x.device}")
            if not reads_on_host():  # the default: checked in place, no host read
                check_value((value >= low) & (value <= high), f"mome_ffn: segments {what} outside {shown}")
                continue
            value = value.item()
        if not low <= value <= high:
            raise ValueError(f"mome_ffn: segments {what} {value} outside {shown}")


def _triton_refusal(x, expert_index, w1, *args) -> Optional[str]:
    why = _backend.triton_refusal(x.device)
    if why is None and x.dtype not in _SUPPORTED_DTYPES:
        why = f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    tokens = x.numel() // x.shape[-1]
    if why is None and tokens > _MAX_TOKENS:
        why = f"more than {_MAX_TOKENS} tokens (the routing tables are int32)"
    # The widest GEMM's 1-D grid (N tiles x row tiles); only a many-terabyte x comes near it.
    if why is None and _rows_grid(tokens, max(w1.shape[1:]), w1.shape[0],
                                  dataclasses.replace(GEMM_CONFIGS[x.dtype], block_n=_NARROW_BLOCK_N))[0] > _MAX_PROGRAMS:
        why = f"{tokens} tokens x {max(w1.shape[1:])} features need more than {_MAX_PROGRAMS} programs"
    return why


def _run_triton(x, expert_index, w1, b1, w2, b2, activation, ln_weight, ln_bias, eps, segments):
    shape = x.shape
    tokens = x.reshape(-1, shape[-1]).contiguous()
    experts = w1.shape[0]
    if segments is not None:
        order, offsets = segments_order(shape[0], shape[1], reference.segment_values(segments), experts, x.device)
    else:
        order, offsets = expert_order(expert_index.reshape(-1).long(), experts)
    if ln_weight is not None:
        ln_weight = ln_weight.contiguous()
        ln_bias = torch.zeros_like(ln_weight) if ln_bias is None else ln_bias.contiguous()
    tensors = (x, w1, b1, w2, b2, ln_weight, ln_bias)
    need_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out = _mome_ffn_fwd_op(tokens, order, offsets, w1, b1.contiguous(), w2, b2.contiguous(), ln_weight, ln_bias,
                           float(eps), activation, need_backward, x.dtype in TMA_ROW_GEMMS)[0]
    return out.reshape(shape)


def _run_torch(x, expert_index, w1, b1, w2, b2, activation, ln_weight, ln_bias, eps, segments):
    return reference.mome_ffn(x, expert_index, w1, b1, w2, b2, activation=activation, ln_weight=ln_weight,
                              ln_bias=ln_bias, eps=eps, segments=segments)


_IMPLEMENTATIONS = [
    Implementation("triton", _triton_refusal, _run_triton),
    Implementation("torch", lambda *args: None, _run_torch),
]


def mome_ffn(
    x: torch.Tensor,
    expert_index: Optional[torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    activation: str = "gelu",
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    segments: Optional[tuple] = None,
) -> torch.Tensor:
    """VLMo's mixture-of-modality-experts FFN: each token through its own expert's
    LayerNorm (optional) -> Linear(D, F) -> activation -> Linear(F, D).

    x: [T, D] (or any [..., D]); expert_index: int tensor of x's leading shape, ids in [0, E)
      (any order, any counts, experts may get no token); None when ``segments`` is given.
    w1: [E, D, F], b1: [E, F], w2: [E, F, D], b2: [E, D] (any strides: nn.Linear weights stacked
      as [E, F, D] and viewed with .transpose(1, 2) are read in place).
    ln_weight, ln_bias: [E, D], expert e's pre-LayerNorm (VLMo's norm2_*), eps as LayerNorm's.
    activation: "gelu" (exact erf, VLMo) or "relu".
    segments: (text_len, first_expert, rest_expert) with x [B, S, D]: tokens [0, text_len) of each
      sample go to first_expert, the rest to rest_expert (VLMo's joint input) - no sort at all.
      Each entry an integer: an int (a SymInt under torch.compile) or a 0-dim integer tensor;
      floats and bools raise TypeError (a tensor entry is range-checked with one host read in eager).
    returns: x's shape, tokens in their original order.

    Bad expert ids (and out-of-range tensor segments) are checked where the data lives, without a
    host read: RuntimeError with the message (VLKERNELS_VALUE_CHECKS / vlkernels.set_value_checks
    "host" makes it a ValueError before any launch, at one sync; see vlkernels.ops._checks).
    Under torch.autocast every float input is cast to the autocast dtype, as nn.Linear's are.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w1, b1, w2, b2, ln_weight, ln_bias = (
            t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, w1, b1, w2, b2, ln_weight, ln_bias)
        )
    _validate(x, expert_index, w1, b1, w2, b2, activation, ln_weight, ln_bias, eps, segments)
    return _backend.dispatch("mome_ffn", _IMPLEMENTATIONS, x.device, x, expert_index, w1, b1, w2, b2, activation,
                             ln_weight, ln_bias, eps, segments)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants for the sm_90a report (python -m vlkernels.report)
# ----------------------------------------------------------------------------------------------
def aot_variants():
    """Every kernel configuration the launchers above can pick, as report.KernelVariant entries,
    with the runtime integers of VLMo-B (D 768, F 3072, 3 experts; 8192 tokens)."""
    dim, hidden, experts, tokens = 768, 3072, 3, 8192
    i32, fp32 = torch.int32, torch.float32
    variants = []
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        label = f"{str(dtype)[6:]}-{precision}"
        rows_pointers = {"a": dtype, "order": i32, "offsets": i32, "weight": dtype, "bias": dtype, "pre": dtype,
                         "out": dtype}
        # (what, K, N, weight strides e/k/n as the op's stacked weights give them, as MoMEFFN's
        # stacked nn.Linear weights give them, flags): FC1 (normalised rows or x gathered), FC2,
        # dz, d(normalised x)
        d_f, f_d = (dim * hidden, hidden, 1), (dim * hidden, 1, dim)  # [K=D, N=F] stored [D, F] / [F, D]
        f_d_kn, f_d_nk = (dim * hidden, dim, 1), (dim * hidden, 1, hidden)  # [K=F, N=D] stored [F, D] / [D, F]
        uses = [
            ("fc1", dim, hidden, d_f, f_d,
             dict(GATHER_A=False, SCATTER_OUT=False, EPILOGUE=kernels.EPILOGUE_BIAS_ACT, STORE_PRE=True)),
            ("fc1-gather", dim, hidden, d_f, f_d,
             dict(GATHER_A=True, SCATTER_OUT=False, EPILOGUE=kernels.EPILOGUE_BIAS_ACT, STORE_PRE=True)),
            ("fc2", hidden, dim, f_d_kn, f_d_nk,
             dict(GATHER_A=False, SCATTER_OUT=True, EPILOGUE=kernels.EPILOGUE_BIAS, STORE_PRE=False)),
            ("dz", dim, hidden, f_d, d_f,
             dict(GATHER_A=True, SCATTER_OUT=False, EPILOGUE=kernels.EPILOGUE_ACT_GRAD, STORE_PRE=False)),
            ("dxn", hidden, dim, f_d_nk, f_d_kn,
             dict(GATHER_A=False, SCATTER_OUT=False, EPILOGUE=kernels.EPILOGUE_NONE, STORE_PRE=False)),
        ]
        for what, k_size, n_size, stacked, linear, flags in uses:
            cfg = _rows_config(dtype, precision, flags["EPILOGUE"])
            pointers = dict(rows_pointers, out=fp32 if what == "dxn" else dtype)
            for layout, (se, sk, sn) in (("", stacked), ("-linear", linear)):
                scalars = dict(K=k_size, N=n_size, row_tiles=_row_tiles(tokens, experts, cfg.block_m), stride_we=se,
                               stride_wk=sk, stride_wn=sn)
                weight = torch.empty_strided((experts, k_size, n_size), (se, sk, sn), dtype=dtype)
                # by pointers, and through TMA where TMA_ROW_GEMMS can pick it
                tma = _tma_descriptors(torch.empty(tokens, k_size, dtype=dtype), weight, k_size, n_size, cfg,
                                       precision, tma=True, gather_a=flags["GATHER_A"], weight_kn_strides=(sk, sn))
                loads = [(kernels.TMA_NONE, None, None)] + ([tma] if tma[0] != kernels.TMA_NONE else [])
                for mode, a_desc, weight_desc in loads:
                    constexprs = dict(flags, NUM_EXPERTS=experts, ACTIVATION=0, BLOCK_M=cfg.block_m,
                                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M,
                                      DOT_PRECISION=precision, TMA=mode)
                    variants.append(KernelVariant(
                        kernels._mome_rows_kernel, f"{label}-{what}{layout}" + ("-tma" if mode else ""), constexprs,
                        pointers, dict(scalars, a_desc=a_desc, weight_desc=weight_desc),
                        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), gemm_shaped=True))
        cfg = WEIGHT_GRAD_CONFIGS[dtype, precision]
        blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=precision,
                      NUM_EXPERTS=experts)
        # dW1 = normalised rows^T @ dz (x gathered without a LayerNorm), dW2 = h^T @ dY gathered;
        # one slot per expert (small batches, the gradient's dtype) or chunks (fp32 partials).
        for what, m_size, n_size, gather_a, gather_b in (("dw1", dim, hidden, False, False),
                                                         ("dw1-gather", dim, hidden, True, False),
                                                         ("dw2", hidden, dim, False, True)):
            for one_slot in (False, True):
                variants.append(KernelVariant(
                    kernels._mome_weight_grad_kernel, f"{label}-{what}" + ("-one-slot" if one_slot else ""),
                    dict(blocks, GATHER_A=gather_a, GATHER_B=gather_b, ONE_SLOT_PER_EXPERT=one_slot),
                    {"a": dtype, "b": dtype, "order": i32, "offsets": i32, "grad_weight": dtype if one_slot else fp32},
                    dict(M=m_size, N=n_size, chunk_rows=0 if one_slot else 16 * cfg.block_k), dict(num_warps=cfg.num_warps,
                                                                          num_stages=cfg.num_stages),
                    gemm_shaped=True))
    for dtype in _SUPPORTED_DTYPES:
        variants.append(KernelVariant(
            kernels._mome_slot_sum_kernel, str(dtype)[6:], dict(NUM_EXPERTS=experts, BLOCK=_SLOT_SUM_BLOCK),
            {"parts": fp32, "offsets": i32, "out": dtype}, dict(numel=dim * hidden, chunk_rows=512),
            dict(num_warps=_SLOT_SUM_WARPS)))
        # db2 (grad_out rows gathered, N = D) and db1 (dz rows in sorted order, N = F); one slot
        # per expert (the gradient's dtype) or the chunks of an H100 at this batch (fp32 partials)
        for what, n_size, gather in (("db2", dim, True), ("db1", hidden, False)):
            for one_slot in (False, True):
                chunk_rows = 0 if one_slot else _column_sum_launch(tokens, n_size, experts, _H100_SMS)[0]
                variants.append(KernelVariant(
                    kernels._mome_column_sum_kernel, f"{str(dtype)[6:]}-{what}" + ("-one-slot" if one_slot else ""),
                    dict(NUM_EXPERTS=experts, ONE_SLOT_PER_EXPERT=one_slot, GATHER=gather, BLOCK_R=_COLUMN_SUM_ROWS,
                         BLOCK_N=_COLUMN_SUM_COLUMNS),
                    {"b": dtype, "order": i32, "offsets": i32, "grad_bias": dtype if one_slot else fp32},
                    dict(N=n_size, chunk_rows=chunk_rows), dict(num_warps=_COLUMN_SUM_WARPS)))
    for dtype in _SUPPORTED_DTYPES:
        for dim in (256, 544, 768, 1024):  # 256: the tiny configs' row block; the others VLMo's
            block_r, block_d = _ln_blocks(dim)
            variants.append(KernelVariant(
                kernels._mome_layernorm_kernel, f"{str(dtype)[6:]}-D{dim}",
                dict(NUM_EXPERTS=experts, BLOCK_R=block_r, BLOCK_D=block_d),
                {"x": dtype, "order": i32, "offsets": i32, "ln_weight": dtype, "ln_bias": dtype, "mean": fp32,
                 "rstd": fp32, "normed": dtype}, dict(tokens=tokens, D=dim, eps=1e-6),
                dict(num_warps=_LAYERNORM_WARPS)))
            for one_slot in (False, True):
                chunk_rows = 0 if one_slot else _ln_bwd_launch(tokens, dim, experts, _H100_SMS)[2]
                sums = dtype if one_slot else fp32
                variants.append(KernelVariant(
                    kernels._mome_ln_bwd_kernel, f"{str(dtype)[6:]}-D{dim}" + ("-one-slot" if one_slot else ""),
                    dict(NUM_EXPERTS=experts, ONE_SLOT_PER_EXPERT=one_slot, BLOCK_R=block_r, BLOCK_D=block_d),
                    {"x": dtype, "order": i32, "offsets": i32, "mean": fp32, "rstd": fp32, "grad_normed": fp32,
                     "ln_weight": dtype, "grad_x": dtype, "grad_ln_weight": sums, "grad_ln_bias": sums},
                    dict(D=dim, chunk_rows=chunk_rows), dict(num_warps=_LN_BWD_WARPS)))
    return variants
