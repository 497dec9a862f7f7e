"""The torch backend of the attention family: torch's fused scaled_dot_product_attention
(SDPA; on CPU its flash kernel, blocked, never [B, H, Sq, Sk] scores) with the library's
mask semantics, which SDPA alone does not give:

- A query that sees no key gets zeros and zero gradients whatever its q holds: its q is
  zeroed and it is given a stand-in view of keys whose k and v are zero (the padded keys it
  may otherwise reach causally), so SDPA returns exactly 0 there with finite gradients, on
  every SDPA backend (some give NaN or a uniform average for a row masked throughout). The
  rows are found from the masks by device ops, no host read.
- The k and v of a padded key are zeroed before SDPA, so a NaN stored there reaches no query
  (SDPA adds its mask to the scores: a NaN or Inf score stays non-finite under -inf).
- A key hidden by the causal mask is excluded exactly by SDPA's is_causal. A key mask beside
  causal, prefix_len or a bias goes in as an extra head-dim column (q gets 1, a padded key's
  k a large negative number, every other key 0), so that SDPA's mask (none with is_causal)
  never grows a batch dimension for it. prefix_len and a bias make one SDPA mask (bool, or the
  bias with -inf at keys the causal / prefix mask hides, in the shape the two broadcast to:
  the bias's for an int prefix_len); there a non-finite k at a key hidden by causal /
  prefix_len may reach the rows it is hidden from, as SDPA's masks give.
- NaN and Inf in q, or in the k and v of visible keys, propagate as SDPA computes them.

Dropout (dropout_p > 0) and a bias that requires grad run on SDPA's math backend on CPU (its
flash kernel takes neither), which forms the probabilities in the inputs' dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from vlkernels.reference import attention as reference


def _sdpa(q, k, v, *, scale, dropout_p, attn_mask=None, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def _zero_padded_keys(t: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if key_mask is None else t.masked_fill(~key_mask[:, None, :, None], 0.0)


def _rows_seeing_a_key(key_mask, seq_q, causal, prefix_len):
    """[B, 1, Sq, 1] bool: does query row i of batch item b see any key (from the masks only)."""
    keys = key_mask.shape[1]
    positions = torch.arange(keys, device=key_mask.device)
    first_real = torch.where(key_mask, positions, keys).amin(1) if keys else positions.new_full((key_mask.shape[0],), 0)
    seen = (first_real < keys)[:, None].expand(-1, seq_q)
    if causal or prefix_len is not None:
        rows = torch.arange(seq_q, device=key_mask.device)
        reach = first_real[:, None] <= rows
        if prefix_len is not None:
            prefix = torch.as_tensor(prefix_len if isinstance(prefix_len, torch.Tensor) else min(prefix_len, keys),
                                     device=key_mask.device).reshape(-1, 1)
            reach = reach | (first_real[:, None] < prefix)
        seen = seen & reach
    return seen[:, None, :, None]


def _key_mask_column(q, k, v, key_mask, seen):
    """q, k, v with the key mask as one extra head-dim column: score(i, j) gains q'[i] * k'[j],
    0 for a real key and about -finfo.max * scale (a weight of exactly 0) for a padded one,
    whose k and v are zeroed. A row that sees no key gets q' = 0 (q and the column): the keys
    its other masks allow are all padded, with zero k and v, so SDPA gives it exactly 0 (for a
    bias, one that is not -inf on all of them)."""
    batch, heads, seq_q, _ = q.shape
    keys = k.shape[2]
    column = seen.to(q.dtype).expand(batch, heads, seq_q, 1)
    q_aug = torch.cat([q.masked_fill(~seen, 0.0), column], -1)
    # Half of finfo.max: the column's product stays finite (0 for a stand-in row's q' = 0).
    low = torch.finfo(q.dtype).max / 2
    penalty = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, -low)
    penalty = penalty[:, None, :, None].expand(batch, heads, keys, 1)
    k_aug = torch.cat([_zero_padded_keys(k, key_mask), penalty], -1)
    v_aug = F.pad(_zero_padded_keys(v, key_mask), (0, 1))  # SDPA's CPU flash kernel wants v's Dh = q's
    return q_aug, k_aug, v_aug


def _score_mask(q, keys, causal, prefix_len, bias):
    """The SDPA mask of prefix_len and / or bias (None for neither: causal is SDPA's is_causal):
    bool, or the bias (in the promoted dtype of bias and q) with -inf where causal / prefix hide
    a key. Its shape is what bias and the masks broadcast to: [B, .] only for a [B] prefix."""
    if bias is None and prefix_len is None:
        return None
    allowed = None
    if causal or prefix_len is not None:
        batch = q.shape[0] if isinstance(prefix_len, torch.Tensor) else 1
        allowed = reference.visibility(batch, q.shape[2], keys, q.device, causal=causal, prefix_len=prefix_len)
    if bias is None:
        return allowed
    bias = bias.to(torch.promote_types(bias.dtype, q.dtype))
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def _key_mask_only(q, k, v, key_mask, scale, dropout_p):
    """A key mask alone: one [B, 1, 1, Sk] SDPA mask; a batch item with no real key sees all
    of its (zeroed) keys instead, with its q zeroed. Returns (out, seen [B, 1, 1, 1])."""
    seen = key_mask.any(1)[:, None, None, None]
    mask = (key_mask[:, None, None, :] | ~seen)
    out = _sdpa(q.masked_fill(~seen, 0.0), _zero_padded_keys(k, key_mask), _zero_padded_keys(v, key_mask),
                scale=scale, dropout_p=dropout_p, attn_mask=mask)
    return out, seen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
              prefix_len: Union[int, torch.Tensor, None], causal: bool, scale: float, dropout_p: float,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """ops.attention's torch backend (arguments checked by ops.attention)."""
    head_dim, keys = q.shape[-1], k.shape[2]
    seen = None
    if key_mask is not None and not causal and prefix_len is None and bias is None:
        out, seen = _key_mask_only(q, k, v, key_mask, scale, dropout_p)
    else:
        mask = _score_mask(q, keys, causal, prefix_len, bias)
        if mask is None and not causal:
            # An all-True mask: without a mask to add, SDPA's CPU kernel returns 0 instead of NaN
            # for a row whose scores are all NaN.
            mask = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=q.device)
        inputs = (q, k, v)
        if key_mask is not None:
            seen = _rows_seeing_a_key(key_mask, q.shape[2], causal, prefix_len)
            inputs = _key_mask_column(q, k, v, key_mask, seen)
        out = _sdpa(*inputs, scale=scale, dropout_p=dropout_p, attn_mask=mask,
                    is_causal=causal and mask is None)[..., :head_dim]
        if mask is None and keys:
            # A non-finite q gives its row NaN in every score, so NaN throughout where the row
            # sees a key (the reference's IEEE result); SDPA's CPU kernel gives 0 for such a row
            # when it has no mask to add (under is_causal).
            nonfinite = ~q.isfinite().all(-1, keepdim=True)
            out = torch.where(nonfinite if seen is None else nonfinite & seen, float("nan"), out)
    return out


def co_attention(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, dropout_p):
    """ops.co_attention's torch backend: the two directions as two SDPA calls."""
    return (attention(q_t, k_i, v_i, image_mask, None, False, scale, dropout_p, None),
            attention(q_i, k_t, v_t, text_mask, None, False, scale, dropout_p, None))


def _padded_attention(q, k, v, *, key_mask, causal, scale, dropout_p, keep_mask=None):
    return attention(q, k, v, key_mask, None, causal, scale, dropout_p, None)


def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p):
    """ops.attention_varlen's torch backend: the padded batch of the reference's padded path
    (static shapes, no host read), attended through ``attention`` above."""
    return reference.attention_varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                             dropout_p=dropout_p, attend=_padded_attention)
