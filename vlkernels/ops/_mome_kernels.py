"""Triton kernels of vlkernels.ops.mome_ffn (split out of mome_ffn.py for length).

Token rows are processed in *sorted order*: position p of the expert-sorted sequence holds
token order[p]; expert e owns positions [offsets[e], offsets[e+1]). The permutation is never
materialised: kernels that read token-order tensors (x, grad_out) gather rows through `order`
in their loads, and kernels that write token-order tensors (out, grad_x) scatter through it in
their stores. Intermediate [T, F] tensors (h, pre-activation, dz) live in sorted order.

Row tiles never straddle two experts: the row tiles of expert e are the cdiv(count_e, BLOCK_M)
tiles starting at offsets[e]. Each program finds its (expert, first row) by scanning the E+1
offsets on device (no host sync); the launch grid is an upper bound on the tile count and
programs past the last real tile exit at once.

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
- every launch grid is 1-D (axis 0 allows 2**31 - 1 programs), or its axis 1 is bounded by the
  device size: nothing that grows with the tokens is on axis 1 or 2 (CUDA stops those at 65535).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Epilogues of the row-tile GEMM
EPILOGUE_NONE = 0  # store the product (grad of the normalised input)
EPILOGUE_BIAS = 1  # + bias[e] (FC2)
EPILOGUE_BIAS_ACT = 2  # + bias[e], store the pre-activation when asked, apply the activation (FC1)
EPILOGUE_ACT_GRAD = 3  # * act'(pre) (grad of FC1's output -> grad of its pre-activation)

ACTIVATION_GELU = 0  # exact erf GELU, as VLMo's nn.GELU()
ACTIVATION_RELU = 1


@triton.jit
def _expert_tile(offsets, tile, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    # Which expert owns row tile `tile`, and its rows [row_begin, row_end); expert -1 past the last tile.
    # Unrolled over the (few) experts: E loads of int32 offsets, no schedule tensor to build.
    expert = tl.program_id(0) * 0 - 1
    row_begin = expert * 0
    row_end = expert * 0
    seen = expert * 0
    begin = tl.load(offsets)
    for e in tl.static_range(NUM_EXPERTS):
        end = tl.load(offsets + e + 1)
        tiles = (end - begin + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= seen) & (tile < seen + tiles)
        expert = tl.where(hit, e, expert)
        row_begin = tl.where(hit, begin + (tile - seen) * BLOCK_M, row_begin)
        row_end = tl.where(hit, end, row_end)
        seen += tiles
        begin = end
    return expert, row_begin, row_end


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
    a, order, offsets, weight, bias, ln_weight, ln_bias, mean, rstd, pre, out,
    K, N,
    stride_we, stride_wk, stride_wn,  # weight[e] read as a [K, N] matrix through these strides (any layout)
    eps,
    NUM_EXPERTS: tl.constexpr,  # constexpr: the tile scan unrolls over the experts
    GATHER_A: tl.constexpr,  # A rows are token rows order[p] (x, grad_out), else sorted rows p
    LN_A: tl.constexpr,  # LayerNorm A's rows in the prologue (statistics over K) and store mean/rstd
    SCATTER_OUT: tl.constexpr,  # store row p at token row order[p], else at p
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[rows of expert e] = epilogue(prologue(A[rows]) @ weight[e]), one [BLOCK_M, BLOCK_N] tile.

    Grid (n_tiles * row_tiles,), 1-D: program pid is N tile pid % n_tiles of row tile
    pid // n_tiles, so consecutive programs walk the N tiles of one row tile and read its A rows
    from L2. Rules: the program owning (row tile, N tile) is the only writer of those elements
    of out (and of pre); mean/rstd of a row are written by the N-tile-0 program of its row tile
    only, while the other N tiles recompute the same statistics rather than read them. The
    main loop's loaded tiles have one consumer each: w and (without a LayerNorm) xa feed the dot
    only; with a LayerNorm xa feeds only the normalisation whose result is the dot operand.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile = pid // n_tiles
    pid_n = pid - tile * n_tiles  # not pid % n_tiles: that one costs the fp32-ieee dxn variant a 12-byte spill
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

    if LN_A:
        # Prologue: two passes over the row strip (mean, then centred variance) in fp32; the
        # strip is re-read from L2. Two passes keep fp32 exact for rows with a large mean.
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xa = tl.load(a + a_row[:, None] * K + k[None, :], mask=p_ok[:, None] & (k < K)[None, :], other=0.0)
            total += tl.sum(xa.to(tl.float32), axis=1)
        row_mean = total / K
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = p_ok[:, None] & (k < K)[None, :]
            xa = tl.load(a + a_row[:, None] * K + k[None, :], mask=ok, other=0.0)
            centred = tl.where(ok, xa.to(tl.float32) - row_mean[:, None], 0.0)
            total += tl.sum(centred * centred, axis=1)
        row_rstd = 1.0 / tl.sqrt(total / K + eps)
        tl.store(mean + p, row_mean, mask=p_ok & (pid_n == 0))  # saved for the backward, one writer per row
        tl.store(rstd + p, row_rstd, mask=p_ok & (pid_n == 0))

    weight_base = weight + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xa = tl.load(a + a_row[:, None] * K + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        if LN_A:
            gamma = tl.load(ln_weight + expert * K + k, mask=k_ok, other=0.0).to(tl.float32)
            beta = tl.load(ln_bias + expert * K + k, mask=k_ok, other=0.0).to(tl.float32)
            # Normalised in fp32, rounded to the GEMM's input dtype (what a separate LayerNorm would store).
            xa = ((xa.to(tl.float32) - row_mean[:, None]) * row_rstd[:, None] * gamma[None, :]
                  + beta[None, :]).to(weight.dtype.element_ty)
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
    a, b, order, offsets, mean, rstd, ln_weight, ln_bias, grad_weight_parts,
    M, N, experts, splits,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,  # rows of A / B are token rows order[p], else sorted rows p
    LN_A: tl.constexpr,  # A = LayerNorm(x) rebuilt from the saved mean/rstd
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Split s of grad_weight[e][M, N] = A[rows_e]^T @ B[rows_e] over its share of expert e's rows
    (a grouped GEMM reducing over each expert's rows; an empty expert gets zeros), in fp32
    partials grad_weight_parts[s, e] that torch sums afterwards (deterministic, no atomics).

    Grid (experts * splits * m_tiles * n_tiles,), 1-D: pid -> (expert, split) slot
    pid // (m_tiles * n_tiles), then M tile, then N tile (fastest; tiles of one slot read the
    same rows from L2). Rules: each program stores only its own [M tile, N tile] of its own
    [split, expert] slot; it reads only inputs. In the pipelined dot loop each loaded tile has
    one consumer: bt feeds the dot only (the bias gradient, once summed from bt here, is
    _mome_column_sum_kernel's: triton-lang/triton#6691); at feeds the dot, or with a LayerNorm
    only the normalisation whose result is the dot operand.
    """
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_tiles
    pid_m = (pid // n_tiles) % m_tiles
    slot = pid // (n_tiles * m_tiles)
    expert = slot // splits
    split = slot % splits
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    begin = tl.load(offsets + expert)
    end = tl.load(offsets + expert + 1)
    per_split = tl.cdiv(tl.cdiv(end - begin, splits), BLOCK_K) * BLOCK_K
    row_begin = begin + split * per_split
    row_end = tl.minimum(row_begin + per_split, end)
    if LN_A:
        gamma = tl.load(ln_weight + expert * M + m, mask=m_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_bias + expert * M + m, mask=m_ok, other=0.0).to(tl.float32)

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
        a_ok = m_ok[:, None] & p_ok[None, :]
        at = tl.load(a + a_row[None, :] * M + m[:, None], mask=a_ok, other=0.0)  # [BLOCK_M, BLOCK_K] = A^T tile
        if LN_A:
            row_mean = tl.load(mean + p, mask=p_ok, other=0.0)
            row_rstd = tl.load(rstd + p, mask=p_ok, other=0.0)
            normed = (at.to(tl.float32) - row_mean[None, :]) * row_rstd[None, :] * gamma[:, None] + beta[:, None]
            at = tl.where(a_ok, normed, 0.0).to(b.dtype.element_ty)  # rounded as the forward's A operand
        bt = tl.load(b + b_row[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=DOT_PRECISION)

    part = (split * experts + expert).to(tl.int64)  # slot [split, expert]
    tl.store(grad_weight_parts + part * M * N + m[:, None] * N + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _mome_column_sum_kernel(
    b, order, offsets, grad_bias_parts,
    N, experts, splits,
    GATHER: tl.constexpr,  # rows of B are token rows order[p] (grad_out), else sorted rows p (dz)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split s of grad_bias[e][N] = column sums of B over expert e's rows, as fp32 partials
    grad_bias_parts[s, e] that torch sums afterwards (deterministic, no atomics).

    Grid (experts * splits * n_tiles,), 1-D: pid -> (expert, split) slot pid // n_tiles, N tile
    pid % n_tiles. Rules: each program stores only its own N tile of its own slot and reads only
    inputs; there is no dot, so nothing here is a pipelined dot operand. The [BLOCK_R, BLOCK_N]
    accumulator is summed over rows once at the end (a fixed order: the same bits every run).
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_tiles
    slot = pid // n_tiles
    expert = slot // splits
    split = slot % splits
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    begin = tl.load(offsets + expert)
    end = tl.load(offsets + expert + 1)
    per_split = tl.cdiv(tl.cdiv(end - begin, splits), BLOCK_R) * BLOCK_R
    row_begin = begin + split * per_split
    row_end = tl.minimum(row_begin + per_split, end)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        p = r0 + tl.arange(0, BLOCK_R)
        p_ok = p < row_end
        if GATHER:
            row = tl.load(order + p, mask=p_ok, other=0).to(tl.int64)
        else:
            row = p.to(tl.int64)
        acc += tl.load(b + row[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    part = (split * experts + expert).to(tl.int64)  # slot [split, expert]
    tl.store(grad_bias_parts + part * N + n, tl.sum(acc, axis=0), mask=n_ok)


@triton.jit
def _mome_ln_bwd_kernel(
    x, order, offsets, mean, rstd, grad_normed, ln_weight, grad_x, grad_ln_weight_parts, grad_ln_bias_parts,
    D, chunks,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D >= D: a row's reductions stay in registers
):
    """LayerNorm backward of chunk c of expert e's rows: grad_x (scattered to the token rows) and
    fp32 partial sums of grad ln_weight / ln_bias for slot [c, e], summed by torch afterwards.

    Grid (experts, chunks): chunks <= cdiv(2 * multiprocessors, experts) (see the launcher), so
    axis 1 stays far below 65535 whatever the token count. Rules: expert e's chunks own disjoint
    sorted positions, and order is a permutation, so each grad_x row has one writer; each program
    stores its own partial slot and reads only inputs. No dot: no pipelined dot operand here.
    """
    expert = tl.program_id(0)
    chunk = tl.program_id(1)
    experts = tl.num_programs(0)
    begin = tl.load(offsets + expert)
    end = tl.load(offsets + expert + 1)
    per_chunk = tl.cdiv(tl.cdiv(end - begin, chunks), BLOCK_R) * BLOCK_R
    row_begin = begin + chunk * per_chunk
    row_end = tl.minimum(row_begin + per_chunk, end)
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
    part = (chunk * experts + expert).to(tl.int64) * D
    tl.store(grad_ln_weight_parts + part + d, acc_weight, mask=d_ok)
    tl.store(grad_ln_bias_parts + part + d, acc_bias, mask=d_ok)
