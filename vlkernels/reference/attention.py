"""Reference attention: softmax(q k^T * scale + mask) v with VL models' masks (key padding,
causal, PrefixLM).

Masked positions are excluded, never computed with: a query that sees no key gives zeros
(and zero gradients), whatever q holds; the k and v of a key that a query cannot see do not
reach it, so padding may hold anything, NaN included (key_mask and sequence ends exclude
k and v exactly; causal / PrefixLM masks exclude k exactly, see ``attention``). NaN and Inf
in q, or in the k and v of visible keys, propagate as IEEE arithmetic gives them: they are
never replaced."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def visibility(batch: int, seq_q: int, seq_k: int, device, *, key_mask: Optional[torch.Tensor] = None,
               causal: bool = False, prefix_len: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """[B, 1, Sq, Sk] bool: may query i see key j. key_mask [B, Sk] (True = real token);
    causal: j <= i; prefix_len (int or [B]): j < prefix_len or j <= i (SimVLM's PrefixLM)."""
    visible = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool, device=device)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :].to(device)
    if causal or prefix_len is not None:
        query = torch.arange(seq_q, device=device)[:, None]
        key = torch.arange(seq_k, device=device)[None, :]
        allowed = (key <= query)[None, None]
        if prefix_len is not None:
            if not isinstance(prefix_len, torch.Tensor):
                prefix_len = min(prefix_len, seq_k)  # a prefix past the end is all keys (and fits any int dtype)
            prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)
            allowed = allowed | (key[None, None] < prefix)
        visible = visible & allowed
    return visible


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of ``scores`` restricted to ``visible`` (broadcastable bool):
    hidden positions get weight 0 and ignore their score; a row with no visible position
    gives all zeros (and zero gradients). NaN / Inf scores at visible positions propagate.

    Unlike ``softmax(...).nan_to_num(0)``, which also erases a NaN that came from the inputs,
    this decides the empty rows by ``visible`` alone."""
    seen = visible.any(-1, keepdim=True)
    # Empty rows get finite stand-in scores (0): softmax over all -inf would be NaN, and a NaN
    # forward value poisons the backward even where a later fill drops it.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0.0)
    # Hidden weights are set to exactly 0 afterwards too: a row whose visible scores give NaN
    # (an Inf score) has NaN everywhere after softmax, and that must not reach hidden keys' dv.
    return torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)


def _drop_masked_keys(t: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # A padded key's k and v become 0, so that 0 * NaN in the products of the masked positions
    # cannot reach any query (their weights are 0 already).
    return t if key_mask is None else t.masked_fill(~key_mask[:, None, :, None].to(t.device), 0.0)


def _dropout(weights: torch.Tensor, dropout_p: float, keep_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention dropout of the probabilities: F.dropout, or with ``keep_mask`` (bool,
    broadcastable to weights; True = kept) the given mask, kept weights scaled by 1 / (1 - p)."""
    if dropout_p <= 0:
        return weights
    if keep_mask is None:
        return F.dropout(weights, p=dropout_p)
    keep_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)  # p = 1 drops every weight, as F.dropout
    return weights * (keep_mask.to(weights.device, weights.dtype) * keep_scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
              causal: bool = False, prefix_len: Union[int, torch.Tensor, None] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None,
              keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [B, H, Sq, Dh], k and v: [B, H, Sk, Dh] -> [B, H, Sq, Dh]. Softmax in fp32 (fp64 for fp64);
    dropout_p > 0 drops attention probabilities (training-time attention dropout, SDPA's
    semantics), with ``keep_mask`` ([B, H, Sq, Sk] bool, True = kept) when given, else F.dropout.
    bias: additive, broadcastable to [B, H, Sq, Sk], added to the scaled scores before the masks.

    Keys hidden by key_mask do not reach any query (their k and v are excluded). Keys hidden
    from query i by causal / prefix_len only have their k excluded: their v enters the
    product with weight 0, so a NaN or Inf there still reaches row i (as in SDPA; excluding it
    per (query, key) pair would cost the kernels an extra product)."""
    batch, _, seq_q, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = _drop_masked_keys(k, key_mask), _drop_masked_keys(v, key_mask)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    visible = visibility(batch, seq_q, k.shape[2], q.device, key_mask=key_mask, causal=causal, prefix_len=prefix_len)
    weights = _dropout(masked_softmax(scores, visible), dropout_p, keep_mask)
    return (weights @ v.to(acc)).to(q.dtype)


def co_attention(q_t, k_t, v_t, q_i, k_i, v_i, *, text_mask=None, image_mask=None, scale=None, dropout_p=0.0,
                 keep_masks=(None, None)):
    """Both directions of co-attention: text queries over image keys, image queries over text keys.
    keep_masks: (text-query mask, image-query mask) for dropout, as ``attention``'s keep_mask."""
    return (attention(q_t, k_i, v_i, key_mask=image_mask, scale=scale, dropout_p=dropout_p, keep_mask=keep_masks[0]),
            attention(q_i, k_t, v_t, key_mask=text_mask, scale=scale, dropout_p=dropout_p, keep_mask=keep_masks[1]))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, max_seqlen_q=None,
                     max_seqlen_k=None, dropout_p=0.0, keep_mask=None):
    """Packed sequences: q [total_q, H, Dh], k and v [total_k, H, Dh]; sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1]. Each sequence attends within itself; returns [total_q, H, Dh].

    With max_seqlen_q / max_seqlen_k (bounds on the lengths, as the op takes them): the
    sequences are scattered into a zero-padded [N, H, max_seqlen, Dh] batch, attended with a
    key padding mask and gathered back (static shapes, no host read; the torch backend runs this
    padding around its SDPA path). Without them: one attention per sequence in eager (the
    test oracle), and under torch.compile one masked attention over all packed rows.
    dropout_p / keep_mask: as ``attention``'s, keep_mask indexed as the padded [N, H, max_q, max_k]
    batch (sequence b's query i and key j at [b, :, i, j]); the compiled masked path takes no keep_mask."""
    if max_seqlen_q is not None and max_seqlen_k is not None:
        return attention_varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                        causal=causal, scale=scale, dropout_p=dropout_p, keep_mask=keep_mask)
    if torch.compiler.is_compiling():
        return _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                        dropout_p=dropout_p)
    out = q.new_zeros(q.shape)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        if rows_q.stop > rows_q.start:
            keep = None if keep_mask is None else keep_mask[b:b + 1, :, :rows_q.stop - rows_q.start,
                                                            :rows_k.stop - rows_k.start]
            seq = attention(q[None, rows_q].transpose(1, 2), k[None, rows_k].transpose(1, 2),
                            v[None, rows_k].transpose(1, 2), causal=causal, scale=scale, dropout_p=dropout_p,
                            keep_mask=keep)
            out = out.index_copy(0, torch.arange(rows_q.start, rows_q.stop, device=q.device), seq[0].transpose(0, 1))
    return out


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [total], position within it [total]) of each packed row."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:], rows, right=True)  # the sequence ends at or before each row
    return sequence, rows - cu_seqlens[sequence]


def attention_varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, *, causal, scale, dropout_p=0.0,
                            keep_mask=None, attend=attention):
    """attention_varlen through a zero-padded batch: keys of other sequences and padding are
    excluded by the key mask (exactly: their values never enter a product). ``attend`` runs
    the padded attention (``attention``'s keywords; the torch backend passes its SDPA path)."""
    if causal:  # causal needs Sq == Sk; the lengths are equal, only the bounds may differ
        max_q = max_k = max(max_q, max_k)
    sequences = cu_seqlens_q.shape[0] - 1
    sequence_q, position_q = _packed_positions(cu_seqlens_q, q.shape[0])
    sequence_k, position_k = _packed_positions(cu_seqlens_k, k.shape[0])

    def pad(t, sequence, position, longest):  # [total, H, Dh] -> [N, H, longest, Dh]
        padded = t.new_zeros(sequences, longest, *t.shape[1:])
        return padded.index_put((sequence.long(), position.long()), t).transpose(1, 2)

    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[:, None]
    key_mask = torch.arange(max_k, device=k.device)[None, :] < lengths_k
    if keep_mask is not None and causal:  # the square padded batch: extend the given mask (padding is hidden)
        keep_mask = F.pad(keep_mask, (0, max_k - keep_mask.shape[-1], 0, max_q - keep_mask.shape[-2]))
    out = attend(pad(q, sequence_q, position_q, max_q), pad(k, sequence_k, position_k, max_k),
                 pad(v, sequence_k, position_k, max_k), key_mask=key_mask, causal=causal, scale=scale,
                 dropout_p=dropout_p, keep_mask=keep_mask)
    return out.transpose(1, 2)[sequence_q.long(), position_q.long()]


def _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, dropout_p=0.0):
    """attention_varlen as one [H, total_q, total_k] masked attention: a query sees the keys of its own
    sequence (and with causal those at or before its position). Static shapes, for torch.compile.
    A non-finite value in one sequence's v reaches the other sequences' rows (weight 0 times NaN):
    pass the max lengths to take the padded path, which excludes it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sequence_q, position_q = _packed_positions(cu_seqlens_q, q.shape[0])
    sequence_k, position_k = _packed_positions(cu_seqlens_k, k.shape[0])
    visible = sequence_q[:, None] == sequence_k[None, :]
    if causal:
        visible = visible & (position_k[None, :] <= position_q[:, None])
    scores = (q.to(acc).transpose(0, 1) @ k.to(acc).permute(1, 2, 0)) * scale  # [H, total_q, total_k]
    weights = _dropout(masked_softmax(scores, visible), dropout_p, None)
    return (weights @ v.to(acc).transpose(0, 1)).transpose(0, 1).to(q.dtype)
