"""Triton kernels of vlkernels.ops.mome_ffn (split out of mome_ffn.py for length).

Token rows are processed in *sorted order*: position p of the expert-sorted sequence holds
token order[p]; expert e owns positions [offsets[e], offsets[e+1]). The permutation is never
materialised: kernels that read token-order tensors (x, grad_out) gather rows through `order`
in their loads, and kernels that write token-order tensors (out, grad_x) scatter through it in
their stores. Intermediate [T, F] tensors (h, pre-activation, dz) live in sorted order.

Row tiles never straddle two experts: the row tiles of expert e are the cdiv(count_e, BLOCK_M)
tiles starting at offsets[e]. Each program finds its (expert, first row) by scanning the E+1
offsets on device (no host sync); the launch grid is an upper bound on the tile count and
programs past the last real tile exit at once. Every reduction over each expert's rows (the
weight and bias gradients, the LayerNorm's weight sums) is scheduled the same way (_slot_rows:
fixed-size chunks of each expert's rows), so the work follows the tokens of each expert however
skewed the routing is.

Concurrency rules, kept by every kernel below (the interpreter runs programs one after another
and cannot show a violation; each kernel's docstring says how it keeps them):
- one writer per output element: `order` is a permutation (a stable sort, or the segments
  arithmetic), so distinct sorted positions p scatter to distinct token rows, and each program
  owns a disjoint (rows, columns) tile or a partial-sum slot of its own;
- no program reads what another program of the same launch writes (outputs are only read by
  later launches);
- no tile loaded in a pipelined dot loop has a second, non-dot consumer (triton-lang/triton#6691:
  the pipeliner may under-allocate its buffers and overwrite a tile the tensor core still
  reads): bias gradients are column sums in their own kernel, not summed from a dot operand;
- every launch grid is 1-D (axis 0 allows 2**31 - 1 programs): nothing is on axes 1 or 2
  (CUDA stops those at 65535).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Epilogues of the row-tile GEMM
EPILOGUE_NONE = 0  # store the product (grad of the normalised input)
EPILOGUE_BIAS = 1  # + bias[e] (FC2)
EPILOGUE_BIAS_ACT = 2  # + bias[e], store the pre-activation when asked, apply the activation (FC1)
EPILOGUE_ACT_GRAD = 3  # * act'(pre) (grad of FC1's output -> grad of its pre-activation)

# How the row GEMM loads its operands
TMA_NONE = 0  # by pointers (gathered A rows, any weight strides)
TMA_WEIGHT_KN = 1  # TMA; weight[e] stored [K, N] (unit stride along N)
TMA_WEIGHT_NK = 2  # TMA; weight[e] stored [N, K] (unit stride along K: nn.Linear's [out, in])

ACTIVATION_GELU = 0  # exact erf GELU, as VLMo's nn.GELU()
ACTIVATION_RELU = 1


@triton.jit
def _expert_tile(offsets, tile, NUM_EXPERTS: tl.constexpr, rows_per_tile):
    # Which expert owns row tile `tile` (tiles of rows_per_tile rows, never straddling two
    # experts), and its rows [row_begin, row_end); expert -1 past the last tile.
    # Unrolled over the (few) experts: E loads of int32 offsets, no schedule tensor to build.
    expert = tl.program_id(0) * 0 - 1
    row_begin = expert * 0
    row_end = expert * 0
    seen = expert * 0
    begin = tl.load(offsets)
    for e in tl.static_range(NUM_EXPERTS):
        end = tl.load(offsets + e + 1)
        tiles = (end - begin + rows_per_tile - 1) // rows_per_tile
        hit = (tile >= seen) & (tile < seen + tiles)
        expert = tl.where(hit, e, expert)
        row_begin = tl.where(hit, begin + (tile - seen) * rows_per_tile, row_begin)
        row_end = tl.where(hit, tl.minimum(end, begin + (tile - seen + 1) * rows_per_tile), row_end)
        seen += tiles
        begin = end
    return expert, row_begin, row_end


@triton.jit
def _slot_rows(offsets, slot, chunk_rows, NUM_EXPERTS: tl.constexpr, ONE_SLOT_PER_EXPERT: tl.constexpr):
    # The schedule of every reduction over each expert's rows (weight and bias gradients, the
    # LayerNorm's): slot s is expert s with all its rows (ONE_SLOT_PER_EXPERT, possibly none),
    # else chunk s of the token-balanced cut of each expert's rows into chunk_rows (expert -1
    # past the last chunk). Returns (expert, row_begin, row_end).
    if ONE_SLOT_PER_EXPERT:
        return slot, tl.load(offsets + slot), tl.load(offsets + slot + 1)
    else:
        return _expert_tile(offsets, slot, NUM_EXPERTS, chunk_rows)


@triton.jit
def _mome_layernorm_kernel(
    x, order, offsets, ln_weight, ln_bias, mean, rstd, normed,
    tokens, D, eps,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the per-row expert lookup unrolls over the experts
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D >= D: a row's statistics stay in registers
):
    """The pre-LayerNorm of FC1, once per token: rows p of the sorted order (token order[p] of
    x) -> mean[p], rstd[p] (fp32, saved for the backward) and normed[p] = LN_e(x row), rounded to
    the GEMM dtype (what a separate LayerNorm would store, and FC1's and dW1's A operand).

    Grid (cdiv(tokens, BLOCK_R),), 1-D. Rules: program i alone writes sorted rows
    [i*BLOCK_R, (i+1)*BLOCK_R) of mean, rstd and normed, and reads only inputs. No dot here.
    Statistics in two passes over the row held in registers (mean, then the centred variance):
    exact in fp32 for rows with a large mean.
    """
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_ok = p < tokens
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    ok = p_ok[:, None] & d_ok[None, :]
    expert = p * 0  # expert of sorted row p: the number of expert starts offsets[1..E-1] at or before p
    for e in tl.static_range(1, NUM_EXPERTS):
        expert += (p >= tl.load(offsets + e)).to(tl.int32)
    row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
    xv = tl.load(x + row[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    row_mean = tl.sum(xv, axis=1) / D
    centred = tl.where(ok, xv - row_mean[:, None], 0.0)
    row_rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    affine = expert[:, None] * D + d[None, :]
    gamma = tl.load(ln_weight + affine, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_bias + affine, mask=ok, other=0.0).to(tl.float32)
    tl.store(mean + p, row_mean, mask=p_ok)
    tl.store(rstd + p, row_rstd, mask=p_ok)
    tl.store(normed + p.to(tl.int64)[:, None] * D + d[None, :],
             (centred * row_rstd[:, None] * gamma + beta).to(normed.dtype.element_ty), mask=ok)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2)
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        # d/dz [z * Phi(z)] = Phi(z) + z * phi(z); 0.3989... = 1/sqrt(2*pi)
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        return tl.where(z > 0.0, 1.0, 0.0)


@triton.jit
def _mome_rows_kernel(
    a, order, offsets, weight, bias, pre, out,
    a_desc, weight_desc,  # TMA descriptors of A [T, K] and weight [E, K, N] or [E, N, K] (TMA), else None
    K, N, row_tiles,
    stride_we, stride_wk, stride_wn,  # weight[e] read as a [K, N] matrix through these strides (any layout)
    NUM_EXPERTS: tl.constexpr,  # constexpr: the tile scan unrolls over the experts
    GATHER_A: tl.constexpr,  # A rows are token rows order[p] (x, grad_out), else sorted rows p
    SCATTER_OUT: tl.constexpr,  # store row p at token row order[p], else at p
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group of the L2-friendly program order
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # TMA_NONE, or the dot operands through a_desc / weight_desc (sorted A rows only)
):
    """out[rows of expert e] = epilogue(A[rows] @ weight[e]), one [BLOCK_M, BLOCK_N] tile.

    Grid (n_tiles * row_tiles,), 1-D, in grouped order: GROUP_M consecutive row tiles walk the
    N tiles together (row tile fastest), so the programs running at once share A rows and
    weight columns in L2. Rules: the program owning (row tile, N tile) is the only writer of
    those elements of out (and of pre), and reads only inputs. The main loop's two loaded tiles
    (A rows, weight) feed the dot only; everything else is read in the epilogue. Through TMA,
    the A tile holds BLOCK_M rows from row_begin whatever the expert's end: rows past row_end
    (the next expert's, or zeros past T) make only output rows that the store masks, and the
    weight descriptor's own K and N bounds give zeros past each expert's matrix.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_tiles)
    first_tile = group * GROUP_M
    group_rows = tl.minimum(row_tiles - first_tile, GROUP_M)
    within = pid - group * (GROUP_M * n_tiles)
    pid_n = within // group_rows
    tile = first_tile + within - pid_n * group_rows  # not within % group_rows: that one spills fp32-ieee dxn
    expert, row_begin, row_end = _expert_tile(offsets, tile, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    p = row_begin + tl.arange(0, BLOCK_M)
    p_ok = p < row_end
    if GATHER_A:
        a_row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
    else:
        a_row = p.to(tl.int64)
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < N

    weight_base = weight + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TMA:
            xa = a_desc.load([row_begin, k0])
            if TMA == 1:  # TMA_WEIGHT_KN
                w = weight_desc.load([expert, k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:  # TMA_WEIGHT_NK
                w = weight_desc.load([expert, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xa = tl.load(a + a_row[:, None] * K + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight_base + k[:, None] * stride_wk + col[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xa, w, acc, input_precision=DOT_PRECISION)

    ok = p_ok[:, None] & col_ok[None, :]
    sorted_offset = p.to(tl.int64)[:, None] * N + col[None, :]
    if EPILOGUE == 1 or EPILOGUE == 2:
        acc += tl.load(bias + expert * N + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 2:
        if STORE_PRE:
            tl.store(pre + sorted_offset, acc.to(pre.dtype.element_ty), mask=ok)
        acc = _activate(acc, ACTIVATION)
    if EPILOGUE == 3:
        z = tl.load(pre + sorted_offset, mask=ok, other=0.0).to(tl.float32)
        acc = acc * _activate_grad(z, ACTIVATION)
    if SCATTER_OUT:
        out_row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
    else:
        out_row = p.to(tl.int64)
    tl.store(out + out_row[:, None] * N + col[None, :], acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _mome_weight_grad_kernel(
    a, b, order, offsets, grad_weight, M, N, chunk_rows,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the chunk scan unrolls over the experts
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,  # rows of A / B are token rows order[p], else sorted rows p
    ONE_SLOT_PER_EXPERT: tl.constexpr,  # slot = expert, all its rows, stored in grad_weight's dtype
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Slot s of the grouped GEMM grad_weight[e][M, N] = A[rows_e]^T @ B[rows_e].

    ONE_SLOT_PER_EXPERT: slot s is expert s with all its rows, stored straight into
    grad_weight[s] (the gradient's dtype; zeros for an expert without rows). Otherwise slot s is
    chunk s of the schedule that cuts each expert's rows into chunks of chunk_rows (a multiple
    of BLOCK_K; slots past the last chunk exit), stored as fp32 partial sums grad_weight[s] that
    _mome_slot_sum_kernel adds up per expert: the work per program follows the tokens, however
    skewed the routing.

    Grid (slots * m_tiles * n_tiles,), 1-D: pid -> slot pid // (m_tiles * n_tiles), then M tile,
    then N tile (fastest; tiles of one slot read the same rows from L2). Rules: each program
    stores only its own [M tile, N tile] of its own slot; it reads only inputs. In the pipelined
    dot loop each loaded tile has one consumer, the dot (the bias gradients are
    _mome_column_sum_kernel's: triton-lang/triton#6691).
    """
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_tiles
    pid_m = (pid // n_tiles) % m_tiles
    slot = pid // (n_tiles * m_tiles)
    expert, row_begin, row_end = _slot_rows(offsets, slot, chunk_rows, NUM_EXPERTS, ONE_SLOT_PER_EXPERT)
    if not ONE_SLOT_PER_EXPERT:
        if expert < 0:  # past the last chunk
            return
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_K):
        p = r0 + tl.arange(0, BLOCK_K)
        p_ok = p < row_end
        if GATHER_A:
            a_row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
        else:
            a_row = p.to(tl.int64)
        if GATHER_B:
            b_row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
        else:
            b_row = p.to(tl.int64)
        at = tl.load(a + a_row[None, :] * M + m[:, None], mask=m_ok[:, None] & p_ok[None, :], other=0.0)  # A^T tile
        bt = tl.load(b + b_row[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=DOT_PRECISION)

    tl.store(grad_weight + slot.to(tl.int64) * M * N + m[:, None] * N + n[None, :],
             acc.to(grad_weight.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _mome_slot_sum_kernel(
    parts, offsets, out, numel, chunk_rows,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the chunk count scan unrolls over the experts
    BLOCK: tl.constexpr,
):
    """out[e] = sum of the fp32 partial slots of expert e's chunks (cut as in _slot_rows), in
    out's dtype; zeros for an expert without rows.

    Grid (experts * cdiv(numel, BLOCK),), 1-D. Rules: program (e, block) alone writes its block
    of out[e] and reads only parts (written by an earlier launch). The slots are added in order:
    the same bits every run.
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(numel, BLOCK)
    expert = pid // blocks
    i = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    first_slot = pid * 0
    slots = pid * 0
    begin = tl.load(offsets)
    for e in tl.static_range(NUM_EXPERTS):
        end = tl.load(offsets + e + 1)
        chunks = (end - begin + chunk_rows - 1) // chunk_rows
        first_slot += tl.where(e < expert, chunks, 0)
        slots = tl.where(e == expert, chunks, slots)
        begin = end
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    slot = parts + first_slot.to(tl.int64) * numel + i
    for _ in range(slots):
        acc += tl.load(slot, mask=ok, other=0.0)
        slot += numel  # pointer arithmetic is 64-bit: no int32 overflow over the slots
    tl.store(out + expert.to(tl.int64) * numel + i, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _mome_column_sum_kernel(
    b, order, offsets, grad_bias,
    N, chunk_rows,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the chunk scan unrolls over the experts
    ONE_SLOT_PER_EXPERT: tl.constexpr,  # slot = expert, all its rows, stored in grad_bias's dtype
    GATHER: tl.constexpr,  # rows of B are token rows order[p] (grad_out), else sorted rows p (dz)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Slot s of grad_bias[e][N] = column sums of B over expert e's rows, in the slots of
    _slot_rows: straight into grad_bias[e] (ONE_SLOT_PER_EXPERT, the gradient's dtype; zeros for
    an expert without rows), else fp32 partial sums grad_bias[s] of each chunk that
    _mome_slot_sum_kernel adds per expert in a fixed order (deterministic, no atomics): the work
    per program follows the tokens, however skewed the routing.

    Grid (slots * n_tiles,), 1-D: pid -> slot pid // n_tiles, N tile pid % n_tiles. Rules: each
    program stores only its own N tile of its own slot and reads only inputs; there is no dot,
    so nothing here is a pipelined dot operand. The [BLOCK_R, BLOCK_N] accumulator is summed
    over rows once at the end (a fixed order: the same bits every run).
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_tiles
    slot = pid // n_tiles
    expert, row_begin, row_end = _slot_rows(offsets, slot, chunk_rows, NUM_EXPERTS, ONE_SLOT_PER_EXPERT)
    if not ONE_SLOT_PER_EXPERT:
        if expert < 0:  # past the last chunk
            return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        p = r0 + tl.arange(0, BLOCK_R)
        p_ok = p < row_end
        if GATHER:
            row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
        else:
            row = p.to(tl.int64)
        acc += tl.load(b + row[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(grad_bias + slot.to(tl.int64) * N + n, tl.sum(acc, axis=0).to(grad_bias.dtype.element_ty), mask=n_ok)


@triton.jit
def _mome_ln_bwd_kernel(
    x, order, offsets, mean, rstd, grad_normed, ln_weight, grad_x, grad_ln_weight, grad_ln_bias,
    D, chunk_rows,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the chunk scan unrolls over the experts
    ONE_SLOT_PER_EXPERT: tl.constexpr,  # slot = expert, all its rows, stored in the gradients' dtype
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D >= D: a row's reductions stay in registers
):
    """LayerNorm backward of slot s (_slot_rows: an expert, or a chunk of an expert's rows):
    grad_x (scattered to the token rows) and the sums of grad ln_weight / ln_bias over its rows,
    straight into grad_ln_weight[e] / grad_ln_bias[e] (ONE_SLOT_PER_EXPERT, their dtype), else
    as fp32 partials [s] that _mome_slot_sum_kernel adds per expert in a fixed order.

    Grid (slots,), 1-D. Rules: slots own disjoint sorted positions and order is a permutation,
    so each grad_x row has one writer; each program stores its own slot of the weight sums and
    reads only inputs. No dot: no pipelined dot operand here.
    """
    slot = tl.program_id(0)
    expert, row_begin, row_end = _slot_rows(offsets, slot, chunk_rows, NUM_EXPERTS, ONE_SLOT_PER_EXPERT)
    if not ONE_SLOT_PER_EXPERT:
        if expert < 0:  # past the last chunk
            return
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    gamma = tl.load(ln_weight + expert * D + d, mask=d_ok, other=0.0).to(tl.float32)
    acc_weight = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        p = r0 + tl.arange(0, BLOCK_R)
        p_ok = p < row_end
        ok = p_ok[:, None] & d_ok[None, :]
        row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
        xv = tl.load(x + row[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        row_mean = tl.load(mean + p, mask=p_ok, other=0.0)
        row_rstd = tl.load(rstd + p, mask=p_ok, other=0.0)
        xhat = tl.where(ok, (xv - row_mean[:, None]) * row_rstd[:, None], 0.0)
        g = tl.load(grad_normed + p.to(tl.int64)[:, None] * D + d[None, :], mask=ok, other=0.0)
        gw = g * gamma[None, :]
        c1 = tl.sum(xhat * gw, axis=1) / D
        c2 = tl.sum(gw, axis=1) / D
        dx = (gw - xhat * c1[:, None] - c2[:, None]) * row_rstd[:, None]
        tl.store(grad_x + row[:, None] * D + d[None, :], dx.to(grad_x.dtype.element_ty), mask=ok)
        acc_weight += tl.sum(g * xhat, axis=0)
        acc_bias += tl.sum(g, axis=0)
    part = slot.to(tl.int64) * D
    tl.store(grad_ln_weight + part + d, acc_weight.to(grad_ln_weight.dtype.element_ty), mask=d_ok)
    tl.store(grad_ln_bias + part + d, acc_bias.to(grad_ln_bias.dtype.element_ty), mask=d_ok)
