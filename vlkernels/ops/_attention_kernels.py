"""Triton kernels of the attention family (flash-attention style, online softmax).

One tile routine per pass, called by the single-direction kernels and by the co-attention
kernels, whose third program axis picks the direction's pointers, strides and lengths as
scalars before one inlined copy of the tile (both directions in one launch, one code path).
The backward is FA2's: a delta = rowsum(dO * O) pre-pass, a dK/dV launch over key blocks in
the transposed form (S^T = K Q^T) and a dQ launch over query blocks.

Attention dropout: a counter-based RNG (Philox, _keep) on the counter (key, query, batch *
heads, offset) under a seed, both drawn by the launcher from torch's generator; the backward
regenerates the forward's mask, nothing is stored. Additive bias: read by strides (stride 0
along broadcast dimensions) in the loops, register-side only; its gradient dS is stored by the
dK/dV programs into a zero-filled fp32 [B, H, Sq, Sk] buffer, each element by one program,
and reduced over the broadcast dimensions by the launcher. Layouts are given by strides: dense [B, H, S, Dh] tensors
(any batch/head/row strides, unit stride along Dh) or packed varlen [total, H, Dh] tensors
whose sequences start at cu_seqlens[b] (batch stride 0).

Scores are kept in log2 units (scale * log2(e) folded into one multiplier) so the softmax
uses exp2. The saved logsumexp is in the same units; a row that sees no key stores +inf, so
its probabilities recompute to exactly 0 in the backward pass and its output is 0.

Masks by tile class: a program's tiles (key tiles of a query block; query tiles of a dK/dV key
block) are fully visible (inside the sequence, below the key mask's leading run of real keys
from _key_limits, and under causal / PrefixLM seen by every row of the block: no mask work at
all, not even key bounds), partial (the mask is evaluated: the causal diagonal, the last tile
of the keys, key-mask padding and every tile past an arbitrary mask's first hole) or empty
(past the last real key or causally hidden: skipped). The forward runs a hot loop over a query
block's fully visible key tiles and a second loop over its partial ones, through one step
routine whose MASKED constexpr adds the mask work. The backward passes do the same where the
launch's configuration row sets TILE_CLASSES (dQ over a query block's key tiles; dK/dV over a
key block's query tiles, fully visible when every query of the tile sees every key of the
block: _visible_query_begin), and elsewhere evaluate the mask on every tile they visit (where
the split spills in the sm_90a compile: bias / dropout in dQ, fp32 at Dh 128; see the table).

Masked positions are excluded, not multiplied by zero: a padded key (key_mask, or past its
sequence's end) is loaded as k = v = 0, so a NaN stored there reaches no query; a key hidden
by the causal / PrefixLM mask gets probability 0 whatever its score. Whether a row is empty
is decided by the mask alone (``seen``: the batch item's first real key exists and is visible
to the row, from _key_limits), never by the values, so NaN / Inf fed in through q
or a visible k / v propagate as IEEE arithmetic gives them (as in the torch reference).

Launch shape (all kernels): program axis 0 enumerates (batch * heads) x (blocks of one
head), the head's blocks fastest, so that the programs running together share K / V in L2;
axis 1 is 1 and axis 2 is 1 or 2 (the co-attention direction). Axis 0 holds up to 2**31 - 1
programs (the launchers check), axes 1 and 2 stay far below CUDA's 65535.

Concurrency rules (the interpreter runs programs one at a time and cannot show a violation):
- one writer per output element: a forward program owns BLOCK_M query rows of one (batch,
  head) and writes their out and logsumexp; a dK/dV program owns BLOCK_N key rows (dk, dv and
  the bias gradient's dS columns of those keys), a dQ program BLOCK_M query rows (dq) of one
  (batch, head); the delta pre-pass owns BLOCK_R rows of delta.
- no program reads what another program of the same launch writes: the backward reads only
  q, k, v, out, dO, the logsumexp and delta, written by earlier launches (forward, pre-pass);
  dk/dv programs and dq programs recompute P independently and never read each other's results.
- no tile loaded in a pipelined dot loop has a second, non-dot consumer (triton-lang/triton#6691):
  inside the loops, k, v, q and dO tiles feed tl.dot only (q and dO two dots each, which the
  pipeliner sizes for); delta = rowsum(dO * O) is computed by the separate pre-pass kernel
  instead of from the dO tile of the loop; the key-mask bytes, logsumexp and delta vectors
  loaded in the loops are register-side only and feed no dot; so are the bias tiles and the
  Philox keep mask (computed, not loaded).
"""
import triton
import triton.language as tl


LOG2E = tl.constexpr(1.4426950408889634)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _keep(seed, offset, pid_bh, rows, cols, dropout_p):
    """bool, the shape of rows / cols broadcast: is the attention probability of (query row,
    key col) of (batch * heads) pair pid_bh kept by dropout. Philox on the counter (col, row,
    pid_bh, offset) under the 64-bit key seed: every element has its own counter, so no mask
    is stored and the backward regenerates the forward's. The uniform is in [0, 1), so
    dropout_p = 1 keeps nothing."""
    zero = (rows + cols) * 0
    c0 = (cols + zero).to(tl.uint32)
    c1 = (rows + zero).to(tl.uint32)
    c2 = (zero + pid_bh).to(tl.uint32)
    c3 = zero.to(tl.uint32) + offset
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _rng_state(rng, stream):
    # (seed, counter offset) of one launch: two int64 drawn from torch's generator (ops' _rng),
    # the offset's low 32 bits plus the co-attention stream.
    seed = tl.load(rng)
    offset = (tl.load(rng + 1) & 0x7FFFFFFF).to(tl.uint32) + stream
    return seed, offset


@triton.jit
def _bias_tile(bias_base, offs_m, offs_n, m_ok, real, sb_m, sb_n):
    # [BLOCK_M, BLOCK_N] fp32 additive bias in log2 units; 0 outside the rows / real keys.
    # A finite bias stays finite in log2 units: HF's padding value finfo(fp32).min times log2(e)
    # would overflow to -inf, and a row of -inf gives NaN where the natural-unit softmax is defined.
    # -inf and NaN from the caller pass through unchanged.
    tile = tl.load(bias_base + offs_m[:, None].to(tl.int64) * sb_m + offs_n[None, :].to(tl.int64) * sb_n,
                   mask=m_ok[:, None] & real[None, :], other=0.0).to(tl.float32)
    scaled = tile * LOG2E
    return tl.where((tile > float("-inf")) & (scaled < -FLOAT32_MAX), -FLOAT32_MAX, scaled)


@triton.jit
def _sequence(cu_seqlens, batch, max_len, VARLEN: tl.constexpr):
    # (first row, length) of sequence `batch`: packed by cu_seqlens, or a dense [.., S, ..] slab.
    if VARLEN:
        begin = tl.load(cu_seqlens + batch)
        return begin, tl.load(cu_seqlens + batch + 1) - begin
    return batch * 0, max_len  # a tensor zero (not a Python 0) so callers can widen it to int64


@triton.jit
def _real_keys(offs_n, block_end, key_len, key_mask_row, dense, HAS_KEY_MASK: tl.constexpr):
    # [BLOCK_N] bool: is key offs_n a real key (inside the sequence and not padding). Keys
    # below `dense` (the mask's leading run of real keys, from _key_limits) are real without a
    # look: only a block reaching past it loads mask bytes, so a right-padded mask (dense = its
    # limit, which key_len already is) never does; an arbitrary mask does past its first hole.
    real = offs_n < key_len
    if HAS_KEY_MASK:
        if tl.minimum(block_end, key_len) > dense:  # a key of the block before key_len is past the run
            real = real & (tl.load(key_mask_row + offs_n, mask=real, other=0) != 0)
    return real


@triton.jit
def _visible(offs_m, offs_n, real, prefix, CAUSAL: tl.constexpr):
    # [BLOCK_M, BLOCK_N] bool: may query offs_m see key offs_n (CAUSAL covers PrefixLM: prefix = 0 is plain causal).
    visible = real[None, :]
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
def _query_rows(q_base, do_base, lse_base, delta_base, offs_m, offs_d, q_len, d_ok, sq_s, so_s, delta_ss):
    # One query block's q and dO rows, its delta (from the pre-pass) and saved logsumexp (+inf
    # past the end, so those rows' probabilities recompute to 0), and the rows' load mask.
    m_ok = offs_m < q_len
    row_mask = m_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q_tile = tl.load(q_base + rows * sq_s + offs_d[None, :], mask=row_mask, other=0.0)
    do_tile = tl.load(do_base + rows * so_s + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.load(delta_base + offs_m.to(tl.int64) * delta_ss, mask=m_ok, other=0.0)
    logsumexp = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
    return q_tile, do_tile, delta, logsumexp, row_mask


@triton.jit
def _visible_key_end(start_m, key_len, dense, prefix, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KEY_MASK: tl.constexpr):
    # End of the leading key tiles that every query of the block starting at start_m sees whole:
    # real keys (below key_len and the key mask's leading run) that the causal / PrefixLM mask
    # shows to the block's first row (keys <= start_m, or in the prefix). A multiple of BLOCK_N.
    end = key_len
    if HAS_KEY_MASK:
        end = tl.minimum(end, dense)
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(start_m + 1, prefix))
    return end // BLOCK_N * BLOCK_N


@triton.jit
def _attention_fwd_step(acc, row_max, row_sum, q_tile, k_base, v_base, mask_row, bias_base, start_n, offs_m, offs_d,
                        d_ok, m_ok, k_len, dense, prefix, sk_s, sv_s, sb_m, sb_n, scale_log2, seed, offset, pid_bh,
                        dropout_p, keep_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
                        DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    # One key tile of the forward's online softmax: (acc, row_max, row_sum) updated. MASKED =
    # False for a tile that every row sees whole (_visible_key_end): its keys are real and
    # inside the sequence, so the loads need no key bounds and the scores no mask.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        real = _real_keys(offs_n, start_n + BLOCK_N, k_len, mask_row, dense, HAS_KEY_MASK)
        k_ok = d_ok[:, None] & real[None, :]
        v_ok = real[:, None] & d_ok[None, :]
    else:
        real = offs_n < k_len  # all true here; read by the bias tile's load mask only
        k_ok = d_ok[:, None]
        v_ok = d_ok[None, :]
    # Padded keys load as 0: a NaN stored there must not reach the products.
    k_tile = tl.load(k_base + offs_n[None, :].to(tl.int64) * sk_s + offs_d[:, None], mask=k_ok, other=0.0)
    scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION) * scale_log2
    if HAS_BIAS:
        scores += _bias_tile(bias_base, offs_m, offs_n, m_ok, real, sb_m, sb_n)
    if MASKED:
        scores = tl.where(_visible(offs_m, offs_n, real, prefix, CAUSAL), scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no visible key yet: avoid inf - inf
    p = tl.exp2(scores - shift[:, None])
    rescale = tl.exp2(row_max - shift)
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    if DROPOUT:  # the normaliser sums the kept and the dropped; only kept ones reach v, scaled
        p = p * tl.where(_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p), keep_scale, 0.0)
    v_tile = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=v_ok, other=0.0)
    acc = acc * rescale[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attention_fwd_tile(
    q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k, bias, rng,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    sb_b, sb_h, sb_m, sb_n, heads, seq_q, seq_k, scale_log2, dropout_p, keep_scale, stream, pid_m, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
):
    # Query block pid_m of (batch, head) = divmod(pid_bh, heads): writes its out and logsumexp rows.
    batch = pid_bh // heads
    head = pid_bh % heads
    q_begin, q_len = _sequence(cu_q, batch, seq_q, VARLEN)
    k_begin, k_len = _sequence(cu_k, batch, seq_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < q_len:
        if HAS_KEY_MASK:
            k_len = tl.minimum(k_len, tl.load(key_limit + 3 * batch))  # trailing padding: skip its tiles
        prefix = 0
        if CAUSAL:
            prefix = tl.load(prefix_len + batch)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Does a row see any key? From the mask alone, with no reduction in the loop: the first
        # real key exists (k_len > first) and, under CAUSAL, is at or before the row or in the prefix.
        first = 0
        dense = 0
        if HAS_KEY_MASK:
            first = tl.load(key_limit + 3 * batch + 1)
            dense = tl.load(key_limit + 3 * batch + 2)
        seen = (first < k_len) & (offs_m >= 0)
        if CAUSAL:
            seen = seen & ((first <= offs_m) | (first < prefix))
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < q_len
        q_rows = q + batch.to(tl.int64) * sq_b + head * sq_h + (q_begin + offs_m).to(tl.int64)[:, None] * sq_s
        q_tile = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k + batch.to(tl.int64) * sk_b + head * sk_h + k_begin.to(tl.int64) * sk_s
        v_base = v + batch.to(tl.int64) * sv_b + head * sv_h + k_begin.to(tl.int64) * sv_s
        mask_row = key_mask + batch.to(tl.int64) * mask_sb
        bias_base = bias + batch.to(tl.int64) * sb_b + head.to(tl.int64) * sb_h
        seed, offset = 0, 0
        if DROPOUT:
            seed, offset = _rng_state(rng, stream)

        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # The key tiles every row of the block sees whole, with no mask work, then the tiles that
        # evaluate the mask (causal diagonal, the key length's last tile, key-mask holes); the
        # tiles past _key_end are empty and skipped. Both loops run in key order. The partial
        # loop runs one or two tiles (all past the first hole of a mask with holes) and is not
        # software-pipelined: pipelined, it cost registers (sm_90a, bf16 Dh 64 with a key mask:
        # 162 against 124, 3 CTAs/SM against 4).
        visible_end = _visible_key_end(start_m, k_len, dense, prefix, BLOCK_N, CAUSAL, HAS_KEY_MASK)
        for start_n in range(0, visible_end, BLOCK_N):
            acc, row_max, row_sum = _attention_fwd_step(
                acc, row_max, row_sum, q_tile, k_base, v_base, mask_row, bias_base, start_n, offs_m, offs_d, d_ok,
                m_ok, k_len, dense, prefix, sk_s, sv_s, sb_m, sb_n, scale_log2, seed, offset, pid_bh, dropout_p,
                keep_scale, BLOCK_N, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HAS_BIAS, DROPOUT, False)
        key_end = _key_end(start_m, k_len, prefix, BLOCK_M, CAUSAL)
        # pipelined as the hot loop under IEEE fp32 dots (FMA loops; unpipelined, they spill)
        for start_n in tl.range(visible_end, key_end, BLOCK_N, num_stages=1 if DOT_PRECISION != "ieee" else None):
            acc, row_max, row_sum = _attention_fwd_step(
                acc, row_max, row_sum, q_tile, k_base, v_base, mask_row, bias_base, start_n, offs_m, offs_d, d_ok,
                m_ok, k_len, dense, prefix, sk_s, sv_s, sb_m, sb_n, scale_log2, seed, offset, pid_bh, dropout_p,
                keep_scale, BLOCK_N, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HAS_BIAS, DROPOUT, True)

        empty = ~seen
        # A row with visible keys divides by its sum even when that is 0 or NaN (Inf / NaN inputs:
        # 0 / 0 = NaN, as the reference's softmax gives); an empty row is 0 whatever acc holds.
        acc = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, row_sum)[:, None])
        out_rows = out + batch.to(tl.int64) * so_b + head * so_h + (q_begin + offs_m).to(tl.int64)[:, None] * so_s
        tl.store(out_rows + offs_d[None, :], acc.to(out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        logsumexp = tl.where(empty, float("inf"), row_max + tl.log2(tl.where(empty, 1.0, row_sum)))
        tl.store(lse + batch.to(tl.int64) * lse_sb + head * lse_sh + q_begin + offs_m, logsumexp, mask=m_ok)


@triton.jit
def _attention_dkdv_step(grad_k_acc, grad_v_acc, k_tile, v_tile, real, n_ok, offs_n, start_m, q_base, do_base,
                         lse_base, delta_base, bias_base, dbias_base, offs_d, d_ok, q_len, prefix, sq_s, so_s,
                         delta_ss, sb_m, sb_n, seq_k, scale_log2, seed, offset, pid_bh, dropout_p, keep_scale,
                         BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
                         MASKED: tl.constexpr):
    # One query tile of a dK/dV program: its contributions to the key block's dk, dv (and its
    # bias gradient's dS). MASKED = False for a query tile that sees every key of the block
    # (_visible_query_begin): no mask is evaluated.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_tile, do_tile, delta_rows, logsumexp, _ = _query_rows(q_base, do_base, lse_base, delta_base, offs_m,
                                                            offs_d, q_len, d_ok, sq_s, so_s, delta_ss)
    m_ok = offs_m < q_len
    if q_tile.dtype != tl.float32:
        # [BLOCK_N, BLOCK_M] tiles: key n, query m
        scores_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION) * scale_log2
        if HAS_BIAS:
            scores_t += _bias_tile(bias_base, offs_n, offs_m, real, m_ok, sb_n, sb_m)
        p_t = tl.exp2(scores_t - logsumexp[None, :])
        if MASKED:
            visible_t = real[:, None] & (offs_m >= 0)[None, :]
            if CAUSAL:
                visible_t = visible_t & ((offs_n[:, None] <= offs_m[None, :]) | (offs_n[:, None] < prefix))
            p_t = tl.where(visible_t, p_t, 0.0)
        p_used = p_t
        if DROPOUT:  # the forward's keep mask, regenerated; dP of a dropped weight is 0
            factor = tl.where(_keep(seed, offset, pid_bh, offs_m[None, :], offs_n[:, None], dropout_p),
                              keep_scale, 0.0)
            p_used = p_t * factor
        grad_v_acc += tl.dot(p_used.to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION)
        grad_p_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
        if DROPOUT:
            grad_p_t = grad_p_t * factor
        grad_s_t = p_t * (grad_p_t - delta_rows[None, :])
        if MASKED:
            grad_s_t = tl.where(visible_t, grad_s_t, 0.0)  # hidden: exactly 0 (NaN delta)
        if BIAS_GRAD:
            tl.store(dbias_base + offs_m[None, :].to(tl.int64) * seq_k + offs_n[:, None], grad_s_t,
                     mask=m_ok[None, :] & n_ok[:, None])
        grad_k_acc += tl.dot(grad_s_t.to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION)
    else:
        # fp32 (tf32) operands: Hopper's tf32 wgmma takes no transposed shared-memory
        # operand, so fp32 keeps the [BLOCK_M, BLOCK_N] form S = Q K^T
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * scale_log2
        if HAS_BIAS:
            scores += _bias_tile(bias_base, offs_m, offs_n, m_ok, real, sb_m, sb_n)
        p = tl.exp2(scores - logsumexp[:, None])
        if MASKED:
            visible = _visible(offs_m, offs_n, real, prefix, CAUSAL)
            p = tl.where(visible, p, 0.0)
        p_used = p
        if DROPOUT:
            factor = tl.where(_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p),
                              keep_scale, 0.0)
            p_used = p * factor
        grad_v_acc += tl.dot(tl.trans(p_used), do_tile, input_precision=DOT_PRECISION)
        grad_p = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        if DROPOUT:
            grad_p = grad_p * factor
        grad_s = p * (grad_p - delta_rows[:, None])
        if MASKED:
            grad_s = tl.where(visible, grad_s, 0.0)
        if BIAS_GRAD:
            tl.store(dbias_base + offs_m[:, None].to(tl.int64) * seq_k + offs_n[None, :], grad_s,
                     mask=m_ok[:, None] & n_ok[None, :])
        grad_k_acc += tl.dot(tl.trans(grad_s), q_tile, input_precision=DOT_PRECISION)
    return grad_k_acc, grad_v_acc


@triton.jit
def _attention_dq_step(grad_q_acc, q_tile, do_tile, delta_rows, logsumexp, k_base, v_base, mask_row, bias_base,
                       start_n, offs_m, offs_d, d_ok, q_len, key_len, dense, prefix, sk_s, sv_s, sb_m, sb_n,
                       scale_log2, seed, offset, pid_bh, dropout_p, keep_scale, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    # One key tile of a dQ program: its contribution to the query block's dq. MASKED = False
    # for a tile that every row sees whole (_visible_key_end): no key bounds, no mask.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        real = _real_keys(offs_n, start_n + BLOCK_N, key_len, mask_row, dense, HAS_KEY_MASK)
        load_mask = d_ok[:, None] & real[None, :]
    else:
        real = offs_n < key_len  # all true here; read by the bias tile's load mask only
        load_mask = d_ok[:, None]
    k_tile = tl.load(k_base + offs_n[None, :].to(tl.int64) * sk_s + offs_d[:, None], mask=load_mask,
                     other=0.0)
    v_tile = tl.load(v_base + offs_n[None, :].to(tl.int64) * sv_s + offs_d[:, None], mask=load_mask,
                     other=0.0)
    scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION) * scale_log2
    if HAS_BIAS:
        scores += _bias_tile(bias_base, offs_m, offs_n, offs_m < q_len, real, sb_m, sb_n)
    p = tl.exp2(scores - logsumexp[:, None])
    if MASKED:
        visible = _visible(offs_m, offs_n, real, prefix, CAUSAL)
        p = tl.where(visible, p, 0.0)
    grad_p = tl.dot(do_tile, v_tile, input_precision=DOT_PRECISION)
    if DROPOUT:
        grad_p = grad_p * tl.where(_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :],
                                         dropout_p), keep_scale, 0.0)
    grad_s = p * (grad_p - delta_rows[:, None])
    if MASKED:
        grad_s = tl.where(visible, grad_s, 0.0)  # hidden: exactly 0 (NaN delta)
    grad_q_acc += tl.dot(grad_s.to(k_tile.dtype), tl.trans(k_tile), input_precision=DOT_PRECISION)
    return grad_q_acc


@triton.jit
def _visible_query_begin(start_n, begin_m, q_len, key_len, dense, prefix, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    # Start of the trailing query tiles (from begin_m, in BLOCK_M steps) that see every key of the
    # block starting at start_n: its keys are all real (below key_len and the key mask's leading
    # run) and, under CAUSAL, the block lies in the prefix or each row is at or after its last key.
    # q_len when there is none.
    end = key_len
    if HAS_KEY_MASK:
        end = tl.minimum(end, dense)
    begin = begin_m
    if CAUSAL:
        if start_n + BLOCK_N > prefix:
            begin = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > end:
        begin = q_len
    return tl.minimum(begin, q_len)


@triton.jit
def _attention_bwd_tile(
    q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len, cu_q, cu_k,
    bias, grad_bias, rng,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    delta_sb, delta_sh, delta_ss, sb_b, sb_h, sb_m, sb_n, heads, seq_q, seq_k, scale_log2, scale,
    dropout_p, keep_scale, stream, role_pid, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr, DQ: tl.constexpr,
    TILE_CLASSES: tl.constexpr, PARTIAL_PIPELINED: tl.constexpr,
):
    # DQ = False (the dK/dV kernel): program role_pid computes dk, dv of key block role_pid, in
    # the transposed form S^T = K Q^T (P^T and dS^T are computed as they feed the dots, no
    # transpose through shared memory). DQ = True (the dQ kernel, a launch of its own so it
    # gets its own, smaller register allocation): dq of query block role_pid. Both recompute P
    # from the saved logsumexp and read delta = rowsum(dO * O) from the pre-pass: no atomics,
    # no program reads another's output. grad_q/grad_k/grad_v share the strides of q/k/v;
    # grad_out has the strides of out (so_*).
    batch = pid_bh // heads
    head = pid_bh % heads
    q_begin, q_len = _sequence(cu_q, batch, seq_q, VARLEN)
    k_begin, k_len = _sequence(cu_k, batch, seq_k, VARLEN)
    key_len = k_len
    dense = 0
    if HAS_KEY_MASK:
        key_len = tl.minimum(k_len, tl.load(key_limit + 3 * batch))
        dense = tl.load(key_limit + 3 * batch + 2)
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
    do_base = grad_out + b64 * so_b + head * so_h + q_begin.to(tl.int64) * so_s
    lse_base = lse + b64 * lse_sb + head * lse_sh + q_begin
    delta_base = delta + b64 * delta_sb + head * delta_sh + q_begin.to(tl.int64) * delta_ss
    mask_row = key_mask + b64 * mask_sb
    bias_base = bias + b64 * sb_b + head.to(tl.int64) * sb_h
    # grad_bias: a zero-filled fp32 [B * H, Sq, Sk] buffer (dense layout only); dk/dv programs
    # write dS of the tiles they visit, each element once.
    dbias_base = grad_bias + pid_bh.to(tl.int64) * seq_q * seq_k
    seed, offset = 0, 0
    if DROPOUT:
        seed, offset = _rng_state(rng, stream)
    # Stages of the loop over partial tiles: the kernel's (None) in the one-loop form; one beside
    # the hot loop (it runs a tile or two but for masks with holes, and its own pipeline buffers
    # cost registers), unless the row pipelines it (PARTIAL_PIPELINED: where unpipelined it spills).
    partial_stages: tl.constexpr = None if PARTIAL_PIPELINED or not TILE_CLASSES else 1
    if not DQ:
        start_n = role_pid * BLOCK_N
        if start_n < k_len:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            real = _real_keys(offs_n, start_n + BLOCK_N, key_len, mask_row, dense, HAS_KEY_MASK)
            load_mask = real[:, None] & d_ok[None, :]  # padded keys load as 0 (a NaN there reaches nothing)
            k_tile = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=load_mask, other=0.0)
            v_tile = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=load_mask, other=0.0)
            grad_k_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            grad_v_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            begin_m = 0
            if CAUSAL:
                if start_n >= prefix:  # keys past the prefix are seen by queries at or after them only
                    begin_m = (start_n // BLOCK_M) * BLOCK_M
            if start_n >= key_len:
                begin_m = q_len  # keys in trailing padding: nobody sees them, their gradients are 0
            # With TILE_CLASSES, the query tiles that see every key of the block whole run first
            # in a loop with no mask work, then the partial ones (causal diagonal, key-mask padding
            # or holes in the block); without it (the configuration row's choice: where the split
            # spills or gains nothing), one loop evaluates the mask on every tile. Tiles before
            # begin_m are empty.
            masked_end = q_len
            if TILE_CLASSES:
                masked_end = _visible_query_begin(start_n, begin_m, q_len, key_len, dense, prefix, BLOCK_M, BLOCK_N,
                                                  CAUSAL, HAS_KEY_MASK)
                for start_m in range(masked_end, q_len, BLOCK_M):
                    grad_k_acc, grad_v_acc = _attention_dkdv_step(
                        grad_k_acc, grad_v_acc, k_tile, v_tile, real, n_ok, offs_n, start_m, q_base, do_base,
                        lse_base, delta_base, bias_base, dbias_base, offs_d, d_ok, q_len, prefix, sq_s, so_s, delta_ss,
                        sb_m, sb_n, seq_k, scale_log2, seed, offset, pid_bh, dropout_p, keep_scale, BLOCK_M, CAUSAL,
                        DOT_PRECISION, HAS_BIAS, BIAS_GRAD, DROPOUT, False)
            for start_m in tl.range(begin_m, masked_end, BLOCK_M, num_stages=partial_stages):
                grad_k_acc, grad_v_acc = _attention_dkdv_step(
                    grad_k_acc, grad_v_acc, k_tile, v_tile, real, n_ok, offs_n, start_m, q_base, do_base, lse_base,
                    delta_base, bias_base, dbias_base, offs_d, d_ok, q_len, prefix, sq_s, so_s, delta_ss, sb_m, sb_n,
                    seq_k, scale_log2, seed, offset, pid_bh, dropout_p, keep_scale, BLOCK_M, CAUSAL, DOT_PRECISION,
                    HAS_BIAS, BIAS_GRAD, DROPOUT, True)
            # Every key row of the block is stored; a padded key's gradients are exactly 0 (not
            # 0 * Inf = NaN from a row whose delta is infinite), as the reference's masking gives.
            store_mask = n_ok[:, None] & d_ok[None, :]
            grad_k_acc = tl.where(real[:, None], grad_k_acc * scale, 0.0)
            grad_v_acc = tl.where(real[:, None], grad_v_acc, 0.0)
            tl.store(dk_base + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                     grad_k_acc.to(grad_k.dtype.element_ty), mask=store_mask)
            tl.store(dv_base + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                     grad_v_acc.to(grad_v.dtype.element_ty), mask=store_mask)
    else:
        start_m = role_pid * BLOCK_M
        if start_m < q_len:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_tile, do_tile, delta_rows, logsumexp, row_mask = _query_rows(q_base, do_base, lse_base, delta_base,
                                                                           offs_m, offs_d, q_len, d_ok, sq_s, so_s,
                                                                           delta_ss)
            grad_q_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            # With TILE_CLASSES, as in the forward: the key tiles every row sees whole, with no mask
            # work, then those that evaluate the mask; without it, one loop masks every tile.
            masked_begin = 0
            if TILE_CLASSES:
                masked_begin = _visible_key_end(start_m, key_len, dense, prefix, BLOCK_N, CAUSAL, HAS_KEY_MASK)
                for start_n in range(0, masked_begin, BLOCK_N):
                    grad_q_acc = _attention_dq_step(
                        grad_q_acc, q_tile, do_tile, delta_rows, logsumexp, k_base, v_base, mask_row, bias_base,
                        start_n, offs_m, offs_d, d_ok, q_len, key_len, dense, prefix, sk_s, sv_s, sb_m, sb_n,
                        scale_log2, seed, offset, pid_bh, dropout_p, keep_scale, BLOCK_N, CAUSAL, HAS_KEY_MASK,
                        DOT_PRECISION, HAS_BIAS, DROPOUT, False)
            key_end = _key_end(start_m, key_len, prefix, BLOCK_M, CAUSAL)
            for start_n in tl.range(masked_begin, key_end, BLOCK_N, num_stages=partial_stages):
                grad_q_acc = _attention_dq_step(
                    grad_q_acc, q_tile, do_tile, delta_rows, logsumexp, k_base, v_base, mask_row, bias_base, start_n,
                    offs_m, offs_d, d_ok, q_len, key_len, dense, prefix, sk_s, sv_s, sb_m, sb_n, scale_log2, seed,
                    offset, pid_bh, dropout_p, keep_scale, BLOCK_N, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HAS_BIAS,
                    DROPOUT, True)
            tl.store(dq_base + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :],
                     (grad_q_acc * scale).to(grad_q.dtype.element_ty), mask=row_mask)


@triton.jit
def _attention_bwd_delta_kernel(out, grad_out, delta, rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] in fp32 over the contiguous [rows, HEAD_DIM] out and dO.

    The backward pre-pass, so the backward's dot loops need not reduce their dO tiles (#6691).
    Grid (cdiv(rows, BLOCK_R),) on axis 0; each program writes its BLOCK_R entries of delta
    (one writer) and reads only out and dO (written by earlier launches). No dot."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r < rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    offsets = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(out + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(grad_out + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + offs_r, tl.sum(o * do, axis=1), mask=offs_r < rows)


@triton.jit
def _attention_fwd_kernel(
    q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k, bias, rng,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    sb_b, sb_h, sb_m, sb_n, heads, seq_q, seq_k, scale_log2, dropout_p, keep_scale, programs_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Forward of attention / attention_varlen. Grid (B * H * programs_per_head,): program
    (bh, m) = divmod(pid, programs_per_head) writes query rows [m * BLOCK_M, +BLOCK_M) of
    (batch, head) = divmod(bh, H): out and logsumexp, one writer each; it reads only inputs.
    Its dot loop loads k and v tiles, each consumed by one tl.dot (see the module docstring)."""
    pid = tl.program_id(0)
    _attention_fwd_tile(q, k, v, out, lse, key_mask, key_limit, prefix_len, cu_q, cu_k, bias, rng,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
                        sb_b, sb_h, sb_m, sb_n, heads, seq_q, seq_k, scale_log2, dropout_p, keep_scale, 0,
                        pid % programs_per_head, pid // programs_per_head,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_MASK, VARLEN, DOT_PRECISION,
                        HAS_BIAS, DROPOUT)


@triton.jit
def _attention_bwd_kernel(
    q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len, cu_q, cu_k,
    bias, grad_bias, rng,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, lse_sb, lse_sh, mask_sb,
    delta_sb, delta_sh, delta_ss, sb_b, sb_h, sb_m, sb_n, heads, seq_q, seq_k, scale_log2, scale,
    dropout_p, keep_scale, programs_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr, DQ: tl.constexpr,
    TILE_CLASSES: tl.constexpr, PARTIAL_PIPELINED: tl.constexpr,
):
    """Backward of attention / attention_varlen after the delta pre-pass, in two launches (FA2's
    form): DQ = False, grid (B * H * cdiv(Sk, BLOCK_N),): program (bh, n) writes dk, dv (and the
    bias gradient's dS) of key block n; DQ = True, grid (B * H * cdiv(Sq, BLOCK_M),): program
    (bh, m) writes dq of query block m; (batch, head) = divmod(bh, H), bh = pid // programs_per_head.
    TILE_CLASSES / PARTIAL_PIPELINED: the launch's configuration row (the loops by tile class).
    One writer per element, no atomics; programs read only forward outputs, delta and inputs."""
    pid = tl.program_id(0)
    _attention_bwd_tile(q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, key_mask, key_limit, prefix_len,
                        cu_q, cu_k, bias, grad_bias, rng, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                        so_b, so_h, so_s, lse_sb, lse_sh, mask_sb, delta_sb, delta_sh, delta_ss, sb_b, sb_h, sb_m, sb_n,
                        heads, seq_q, seq_k, scale_log2, scale, dropout_p, keep_scale, 0,
                        pid % programs_per_head, pid // programs_per_head,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_MASK, VARLEN, DOT_PRECISION,
                        HAS_BIAS, BIAS_GRAD, DROPOUT, DQ, TILE_CLASSES, PARTIAL_PIPELINED)


@triton.jit
def _co_attention_fwd_kernel(
    q_a, k_a, v_a, out_a, lse_a, mask_a, limit_a,
    sq_b_a: tl.int64, sq_h_a: tl.int64, sq_s_a: tl.int64, sk_b_a: tl.int64, sk_h_a: tl.int64, sk_s_a: tl.int64,
    sv_b_a: tl.int64, sv_h_a: tl.int64, sv_s_a: tl.int64, so_b_a: tl.int64, so_h_a: tl.int64, so_s_a: tl.int64,
    mask_sb_a: tl.int32, seq_q_a: tl.int32, seq_k_a: tl.int32,
    q_b, k_b, v_b, out_b, lse_b, mask_b, limit_b,
    sq_b_b: tl.int64, sq_h_b: tl.int64, sq_s_b: tl.int64, sk_b_b: tl.int64, sk_h_b: tl.int64, sk_s_b: tl.int64,
    sv_b_b: tl.int64, sv_h_b: tl.int64, sv_s_b: tl.int64, so_b_b: tl.int64, so_h_b: tl.int64, so_s_b: tl.int64,
    mask_sb_b: tl.int32, seq_q_b: tl.int32, seq_k_b: tl.int32,
    rng, heads, scale_log2, dropout_p, keep_scale, programs_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Both directions of co-attention's forward in one launch, through one code path: axis 2
    (0 = queries a over keys b, 1 = queries b over keys a) picks the pointers, strides and
    lengths as scalars, then a single inlined _attention_fwd_tile runs (one copy of the loop,
    one direction's shared memory). Grid (B * H * programs_per_head, 1, 2); axis 0 the (batch,
    head) and query block as in _attention_fwd_kernel (programs_per_head covers the longer
    query stream; the other direction's extra programs exit). The two directions write
    disjoint outputs; the saved logsumexp of each is [B, H, Sq] contiguous. Strides are typed
    (annotated) so that both directions' values share one type."""
    pid = tl.program_id(0)
    stream = tl.program_id(2)
    if stream == 0:
        q, k, v, out, lse, mask, limit = q_a, k_a, v_a, out_a, lse_a, mask_a, limit_a
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s = sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a
        sv_b, sv_h, sv_s, so_b, so_h, so_s = sv_b_a, sv_h_a, sv_s_a, so_b_a, so_h_a, so_s_a
        mask_sb, seq_q, seq_k = mask_sb_a, seq_q_a, seq_k_a
    else:
        q, k, v, out, lse, mask, limit = q_b, k_b, v_b, out_b, lse_b, mask_b, limit_b
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s = sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b
        sv_b, sv_h, sv_s, so_b, so_h, so_s = sv_b_b, sv_h_b, sv_s_b, so_b_b, so_h_b, so_s_b
        mask_sb, seq_q, seq_k = mask_sb_b, seq_q_b, seq_k_b
    _attention_fwd_tile(q, k, v, out, lse, mask, limit, limit, limit, limit, limit, rng,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, heads * seq_q, seq_q,
                        mask_sb, 0, 0, 0, 0, heads, seq_q, seq_k, scale_log2, dropout_p, keep_scale, stream,
                        pid % programs_per_head, pid // programs_per_head,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_KEY_MASK, False, DOT_PRECISION, False, DROPOUT)


@triton.jit
def _co_attention_bwd_kernel(
    q_a, k_a, v_a, grad_out_a, lse_a, delta_a, grad_q_a, grad_k_a, grad_v_a, mask_a, limit_a,
    sq_b_a: tl.int64, sq_h_a: tl.int64, sq_s_a: tl.int64, sk_b_a: tl.int64, sk_h_a: tl.int64, sk_s_a: tl.int64,
    sv_b_a: tl.int64, sv_h_a: tl.int64, sv_s_a: tl.int64, so_b_a: tl.int64, so_h_a: tl.int64, so_s_a: tl.int64,
    mask_sb_a: tl.int32, seq_q_a: tl.int32, seq_k_a: tl.int32,
    q_b, k_b, v_b, grad_out_b, lse_b, delta_b, grad_q_b, grad_k_b, grad_v_b, mask_b, limit_b,
    sq_b_b: tl.int64, sq_h_b: tl.int64, sq_s_b: tl.int64, sk_b_b: tl.int64, sk_h_b: tl.int64, sk_s_b: tl.int64,
    sv_b_b: tl.int64, sv_h_b: tl.int64, sv_s_b: tl.int64, so_b_b: tl.int64, so_h_b: tl.int64, so_s_b: tl.int64,
    mask_sb_b: tl.int32, seq_q_b: tl.int32, seq_k_b: tl.int32,
    rng, heads, scale_log2, scale, dropout_p, keep_scale, programs_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, DQ: tl.constexpr,
    TILE_CLASSES: tl.constexpr, PARTIAL_PIPELINED: tl.constexpr,
):
    """Both directions of co-attention's backward, after the delta pre-pass: one launch per
    role (DQ as in _attention_bwd_kernel), both directions in it through one code path (axis 2
    picks pointers, strides and lengths as scalars, as in _co_attention_fwd_kernel). Grid
    (B * H * programs_per_head, 1, 2). Direction 0 writes dq_a, dk_b, dv_b (gradients of q_t,
    k_i, v_i) and direction 1 writes dq_b, dk_a, dv_a: distinct buffers, one writer per
    element; delta and lse of each direction are [B, H, Sq] contiguous, written by earlier
    launches."""
    pid = tl.program_id(0)
    stream = tl.program_id(2)
    if stream == 0:
        q, k, v, grad_out, lse, delta, mask, limit = q_a, k_a, v_a, grad_out_a, lse_a, delta_a, mask_a, limit_a
        grad_q, grad_k, grad_v = grad_q_a, grad_k_a, grad_v_a
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s = sq_b_a, sq_h_a, sq_s_a, sk_b_a, sk_h_a, sk_s_a
        sv_b, sv_h, sv_s, so_b, so_h, so_s = sv_b_a, sv_h_a, sv_s_a, so_b_a, so_h_a, so_s_a
        mask_sb, seq_q, seq_k = mask_sb_a, seq_q_a, seq_k_a
    else:
        q, k, v, grad_out, lse, delta, mask, limit = q_b, k_b, v_b, grad_out_b, lse_b, delta_b, mask_b, limit_b
        grad_q, grad_k, grad_v = grad_q_b, grad_k_b, grad_v_b
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s = sq_b_b, sq_h_b, sq_s_b, sk_b_b, sk_h_b, sk_s_b
        sv_b, sv_h, sv_s, so_b, so_h, so_s = sv_b_b, sv_h_b, sv_s_b, so_b_b, so_h_b, so_s_b
        mask_sb, seq_q, seq_k = mask_sb_b, seq_q_b, seq_k_b
    _attention_bwd_tile(q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, mask, limit,
                        limit, limit, limit, delta, delta, rng,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, heads * seq_q, seq_q,
                        mask_sb, heads * seq_q, seq_q, 1, 0, 0, 0, 0, heads, seq_q, seq_k, scale_log2, scale,
                        dropout_p, keep_scale, stream, pid % programs_per_head, pid // programs_per_head,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_KEY_MASK, False, DOT_PRECISION,
                        False, False, DROPOUT, DQ, TILE_CLASSES, PARTIAL_PIPELINED)


@triton.jit
def _dropout_keep_kernel(rng, keep, seq_q, seq_k, dropout_p, stream, programs_per_head,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug / test path: the keep mask the attention kernels use, written out as uint8
    [B * H, Sq, Sk] (the kernels themselves never store it). Grid (B * H * programs_per_head,):
    program (bh, m) writes rows [m * BLOCK_M, +BLOCK_M) of pair bh, one writer per element; no dot."""
    pid = tl.program_id(0)
    pid_bh = pid // programs_per_head
    offs_m = (pid % programs_per_head) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed, offset = _rng_state(rng, stream)
    base = keep + pid_bh.to(tl.int64) * seq_q * seq_k
    for start_n in range(0, seq_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kept = _keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p)
        tl.store(base + offs_m[:, None].to(tl.int64) * seq_k + offs_n[None, :], kept.to(tl.uint8),
                 mask=(offs_m < seq_q)[:, None] & (offs_n < seq_k)[None, :])
