"""Triton kernels of the attention family (flash-attention style, online softmax).

One tile routine per pass, called by the single-direction kernels and by the co-attention
kernels, whose third program axis picks the direction so that both directions of
co-attention run in one launch. Layouts are given by strides: dense [B, H, S, Dh] tensors
(any batch/head/row strides, unit stride along Dh) or packed varlen [total, H, Dh] tensors
whose sequences start at cu_seqlens[b] (batch stride 0).

Scores are kept in log2 units (scale * log2(e) folded into one multiplier) so the softmax
uses exp2. The saved logsumexp is in the same units; a row that sees no key stores +inf, so
its probabilities recompute to exactly 0 in the backward pass and its output is 0.
"""
import triton
import triton.language as tl


@triton.jit
def _sequence(cu_seqlens, batch, max_len, VARLEN: tl.constexpr):
    # (first row, length) of sequence `batch`: packed by cu_seqlens, or a dense [.., S, ..] slab.
    if VARLEN:
        begin = tl.load(cu_seqlens + batch)
        return begin, tl.load(cu_seqlens + batch + 1) - begin
    return batch * 0, max_len  # a tensor zero (not a Python 0) so callers can widen it to int64


@triton.jit
def _visible(offs_m, offs_n, key_len, key_mask_row, prefix, HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    # [BLOCK_M, BLOCK_N] bool: may query offs_m see key offs_n (CAUSAL covers PrefixLM: prefix = 0 is plain causal).
    visible = (offs_n < key_len)[None, :]
    if HAS_KEY_MASK:
        allowed = tl.load(key_mask_row + offs_n, mask=offs_n < key_len, other=0)
        visible = visible & (allowed != 0)[None, :]
    if CAUSAL:
        visible = visible & ((offs_n[None, :] <= offs_m[:, None]) | (offs_n[None, :] < prefix))
    return visible


@triton.jit
def _key_end(start_m, key_len, prefix, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # One past the last key a query block [start_m, start_m + BLOCK_M) may see.
    if CAUSAL:
        return tl.minimum(key_len, tl.maximum(start_m + BLOCK_M, prefix))
    return key_len


@triton.jit
def _query_rows(q_base, do_base, o_base, lse_base, offs_m, offs_d, q_len, d_ok, sq_s, so_s):
    # One query block's q and dO rows, delta = rowsum(dO * O) and the saved logsumexp (+inf
    # past the end, so those rows' probabilities recompute to 0), and the rows' load mask.
    m_ok = offs_m < q_len
    row_mask = m_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q_tile = tl.load(q_base + rows * sq_s + offs_d[None, :], mask=row_mask, other=0.0)
    do_tile = tl.load(do_base + rows * so_s + offs_d[None, :], mask=row_mask, other=0.0)
    o_tile = tl.load(o_base + rows * so_s + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do_tile.to(tl.float32) * o_tile.to(tl.float32), axis=1)
    logsumexp = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
    return q_tile, do_tile, delta, logsumexp, row_mask


@triton.jit
def _attention_fwd_tile(
    q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    heads, seq_q, seq_k, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(1) // heads
    head = tl.program_id(1) % heads
    q_begin, q_len = _sequence(cu_q, batch, seq_q, VARLEN)
    k_begin, k_len = _sequence(cu_k, batch, seq_k, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m < q_len:
        if HAS_KEY_MASK:
            k_len = tl.minimum(k_len, tl.load(key_limit + batch))  # trailing padding: skip its tiles
        prefix = 0
        if CAUSAL:
            prefix = tl.load(prefix_len + batch)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < q_len
        q_rows = q + batch.to(tl.int64) * sq_b + head * sq_h + (q_begin + offs_m).to(tl.int64)[:, None] * sq_s
        q_tile = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k + batch.to(tl.int64) * sk_b + head * sk_h + k_begin.to(tl.int64) * sk_s
        v_base = v + batch.to(tl.int64) * sv_b + head * sv_h + k_begin.to(tl.int64) * sv_s
        mask_row = key_mask + batch.to(tl.int64) * mask_sb

        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, _key_end(start_m, k_len, prefix, BLOCK_M, CAUSAL), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            k_tile = tl.load(k_base + offs_n[None, :].to(tl.int64) * sk_s + offs_d[:, None],
                             mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION) * scale_log2
            visible = _visible(offs_m, offs_n, k_len, mask_row, prefix, HAS_KEY_MASK, CAUSAL)
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no visible key yet: avoid inf - inf
            p = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            v_tile = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
            row_max = new_max

        empty = row_sum == 0.0
        acc = acc / tl.where(empty, 1.0, row_sum)[:, None]
        out_rows = out + batch.to(tl.int64) * so_b + head * so_h + (q_begin + offs_m).to(tl.int64)[:, None] * so_s
        tl.store(out_rows + offs_d[None, :], acc.to(out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        logsumexp = tl.where(empty, float("inf"), row_max + tl.log2(tl.where(empty, 1.0, row_sum)))
        tl.store(lse + batch.to(tl.int64) * lse_sb + head * lse_sh + q_begin + offs_m, logsumexp, mask=m_ok)


@triton.jit
def _attention_bwd_tile(
    q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len, cu_q, cu_k,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    heads, seq_q, seq_k, scale_log2, scale, role_pid,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Programs [0, cdiv(seq_k, BLOCK_N)) compute dk, dv of one key block; the programs after
    # them compute dq of one query block. Both recompute P from the saved logsumexp and
    # delta = rowsum(dO * O) from the tiles they load, so one launch needs no atomics.
    # grad_q/grad_k/grad_v share the strides of q/k/v; grad_out those of out.
    batch = tl.program_id(1) // heads
    head = tl.program_id(1) % heads
    q_begin, q_len = _sequence(cu_q, batch, seq_q, VARLEN)
    k_begin, k_len = _sequence(cu_k, batch, seq_k, VARLEN)
    key_len = k_len
    if HAS_KEY_MASK:
        key_len = tl.minimum(k_len, tl.load(key_limit + batch))
    prefix = 0
    if CAUSAL:
        prefix = tl.load(prefix_len + batch)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = batch.to(tl.int64)
    q_base = q + b64 * sq_b + head * sq_h + q_begin.to(tl.int64) * sq_s
    dq_base = grad_q + b64 * sq_b + head * sq_h + q_begin.to(tl.int64) * sq_s
    k_base = k + b64 * sk_b + head * sk_h + k_begin.to(tl.int64) * sk_s
    dk_base = grad_k + b64 * sk_b + head * sk_h + k_begin.to(tl.int64) * sk_s
    v_base = v + b64 * sv_b + head * sv_h + k_begin.to(tl.int64) * sv_s
    dv_base = grad_v + b64 * sv_b + head * sv_h + k_begin.to(tl.int64) * sv_s
    o_base = out + b64 * so_b + head * so_h + q_begin.to(tl.int64) * so_s
    do_base = grad_out + b64 * so_b + head * so_h + q_begin.to(tl.int64) * so_s
    lse_base = lse + b64 * lse_sb + head * lse_sh + q_begin
    mask_row = key_mask + b64 * mask_sb
    key_blocks = tl.cdiv(seq_k, BLOCK_N)

    if role_pid < key_blocks:
        start_n = role_pid * BLOCK_N
        if start_n < k_len:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k_tile = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
            v_tile = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
            grad_k_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            grad_v_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            begin_m = 0
            if CAUSAL:
                if start_n >= prefix:  # keys past the prefix are seen by queries at or after them only
                    begin_m = (start_n // BLOCK_M) * BLOCK_M
            if start_n >= key_len:
                begin_m = q_len  # keys in trailing padding: nobody sees them, their gradients are 0
            for start_m in range(begin_m, q_len, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q_tile, do_tile, delta, logsumexp, _ = _query_rows(q_base, do_base, o_base, lse_base, offs_m, offs_d,
                                                                   q_len, d_ok, sq_s, so_s)
                scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * scale_log2
                visible = _visible(offs_m, offs_n, key_len, mask_row, prefix, HAS_KEY_MASK, CAUSAL)
                p = tl.where(visible, tl.exp2(scores - logsumexp[:, None]), 0.0)
                grad_v_acc += tl.dot(tl.trans(p.to(do_tile.dtype)), do_tile, input_precision=DOT_PRECISION)
                grad_p = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
                grad_s = p * (grad_p - delta[:, None])
                grad_k_acc += tl.dot(tl.trans(grad_s.to(q_tile.dtype)), q_tile, input_precision=DOT_PRECISION)
            tl.store(dk_base + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                     (grad_k_acc * scale).to(grad_k.dtype.element_ty), mask=kv_mask)
            tl.store(dv_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                     grad_v_acc.to(grad_v.dtype.element_ty), mask=kv_mask)
    else:
        start_m = (role_pid - key_blocks) * BLOCK_M
        if start_m < q_len:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_tile, do_tile, delta, logsumexp, row_mask = _query_rows(q_base, do_base, o_base, lse_base, offs_m,
                                                                      offs_d, q_len, d_ok, sq_s, so_s)
            grad_q_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for start_n in range(0, _key_end(start_m, key_len, prefix, BLOCK_M, CAUSAL), BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < k_len
                k_tile = tl.load(k_base + offs_n[None, :].to(tl.int64) * sk_s + offs_d[:, None],
                                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                v_tile = tl.load(v_base + offs_n[None, :].to(tl.int64) * sv_s + offs_d[:, None],
                                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION) * scale_log2
                visible = _visible(offs_m, offs_n, key_len, mask_row, prefix, HAS_KEY_MASK, CAUSAL)
                p = tl.where(visible, tl.exp2(scores - logsumexp[:, None]), 0.0)
                grad_p = tl.dot(do_tile, v_tile, input_precision=DOT_PRECISION)
                grad_s = p * (grad_p - delta[:, None])
                grad_q_acc += tl.dot(grad_s.to(k_tile.dtype), tl.trans(k_tile), input_precision=DOT_PRECISION)
            tl.store(dq_base + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :],
                     (grad_q_acc * scale).to(grad_q.dtype.element_ty), mask=row_mask)


@triton.jit
def _attention_fwd_kernel(
    q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    heads, seq_q, seq_k, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _attention_fwd_tile(q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
                        heads, seq_q, seq_k, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                        CAUSAL, HAS_KEY_MASK, VARLEN, DOT_PRECISION)


@triton.jit
def _attention_bwd_kernel(
    q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len, cu_q, cu_k,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    heads, seq_q, seq_k, scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _attention_bwd_tile(q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len,
                        cu_q, cu_k, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
                        lse_sb, lse_sh, mask_sb, heads, seq_q, seq_k, scale_log2, scale, tl.program_id(0),
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_MASK, VARLEN, DOT_PRECISION)


@triton.jit
def _co_attention_fwd_kernel(
    q_a, k_a, v_a, out_a, lse_a, mask_a, limit_a,
    sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a, sv_b_a, sv_h_a, sv_s_a, so_b_a, so_h_a, so_s_a, mask_sb_a,
    seq_q_a, seq_k_a,
    q_b, k_b, v_b, out_b, lse_b, mask_b, limit_b,
    sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b, sv_b_b, sv_h_b, sv_s_b, so_b_b, so_h_b, so_s_b, mask_sb_b,
    seq_q_b, seq_k_b,
    heads, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program axis 2 picks the direction: 0 = queries a over keys b, 1 = queries b over keys a.
    # The saved logsumexp of each direction is [B, H, Sq] contiguous.
    if tl.program_id(2) == 0:
        _attention_fwd_tile(q_a, k_a, v_a, out_a, lse_a, mask_a, limit_a, mask_a, mask_a, mask_a,
                            sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a, sv_b_a, sv_h_a, sv_s_a,
                            so_b_a, so_h_a, so_s_a, heads * seq_q_a, seq_q_a, mask_sb_a,
                            heads, seq_q_a, seq_k_a, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                            False, HAS_MASK_A, False, DOT_PRECISION)
    else:
        _attention_fwd_tile(q_b, k_b, v_b, out_b, lse_b, mask_b, limit_b, mask_b, mask_b, mask_b,
                            sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b, sv_b_b, sv_h_b, sv_s_b,
                            so_b_b, so_h_b, so_s_b, heads * seq_q_b, seq_q_b, mask_sb_b,
                            heads, seq_q_b, seq_k_b, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                            False, HAS_MASK_B, False, DOT_PRECISION)


@triton.jit
def _co_attention_bwd_kernel(
    q_a, k_a, v_a, out_a, grad_out_a, lse_a, grad_q_a, grad_k_a, grad_v_a, mask_a, limit_a,
    sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a, sv_b_a, sv_h_a, sv_s_a, so_b_a, so_h_a, so_s_a, mask_sb_a,
    seq_q_a, seq_k_a,
    q_b, k_b, v_b, out_b, grad_out_b, lse_b, grad_q_b, grad_k_b, grad_v_b, mask_b, limit_b,
    sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b, sv_b_b, sv_h_b, sv_s_b, so_b_b, so_h_b, so_s_b, mask_sb_b,
    seq_q_b, seq_k_b,
    heads, scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    if tl.program_id(2) == 0:
        _attention_bwd_tile(q_a, k_a, v_a, out_a, grad_out_a, lse_a, grad_q_a, grad_k_a, grad_v_a, mask_a, limit_a,
                            mask_a, mask_a, mask_a, sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a,
                            sv_b_a, sv_h_a, sv_s_a, so_b_a, so_h_a, so_s_a, heads * seq_q_a, seq_q_a, mask_sb_a,
                            heads, seq_q_a, seq_k_a, scale_log2, scale, tl.program_id(0),
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_MASK_A, False, DOT_PRECISION)
    else:
        _attention_bwd_tile(q_b, k_b, v_b, out_b, grad_out_b, lse_b, grad_q_b, grad_k_b, grad_v_b, mask_b, limit_b,
                            mask_b, mask_b, mask_b, sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b,
                            sv_b_b, sv_h_b, sv_s_b, so_b_b, so_h_b, so_s_b, heads * seq_q_b, seq_q_b, mask_sb_b,
                            heads, seq_q_b, seq_k_b, scale_log2, scale, tl.program_id(0),
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_MASK_B, False, DOT_PRECISION)
