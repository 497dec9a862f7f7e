"""Reference attention: softmax(q k^T * scale + mask) v with VL models' masks (key padding,
causal, PrefixLM); rows with no visible key give zeros."""
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
            prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)
            allowed = allowed | (key[None, None] < prefix)
        visible = visible & allowed
    return visible


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
              causal: bool = False, prefix_len: Union[int, torch.Tensor, None] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q: [B, H, Sq, Dh], k and v: [B, H, Sk, Dh] -> [B, H, Sq, Dh]. Softmax in fp32 (fp64 for fp64);
    dropout_p > 0 drops attention probabilities (training-time attention dropout)."""
    batch, _, seq_q, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    visible = visibility(batch, seq_q, k.shape[2], q.device, key_mask=key_mask, causal=causal, prefix_len=prefix_len)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: all zeros
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return (weights @ v.to(acc)).to(q.dtype)


def co_attention(q_t, k_t, v_t, q_i, k_i, v_i, *, text_mask=None, image_mask=None, scale=None):
    """Both directions of co-attention: text queries over image keys, image queries over text keys."""
    return (attention(q_t, k_i, v_i, key_mask=image_mask, scale=scale),
            attention(q_i, k_t, v_t, key_mask=text_mask, scale=scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None):
    """Packed sequences: q [total_q, H, Dh], k and v [total_k, H, Dh]; sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1]. Each sequence attends within itself; returns [total_q, H, Dh].

    Eager: one attention per sequence. Under torch.compile, whose graphs need shapes that do not
    depend on cu_seqlens' values, the same math as one masked attention over all packed rows."""
    if torch.compiler.is_compiling():
        return _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)
    out = q.new_zeros(q.shape)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        if rows_q.stop > rows_q.start:
            seq = attention(q[None, rows_q].transpose(1, 2), k[None, rows_k].transpose(1, 2),
                            v[None, rows_k].transpose(1, 2), causal=causal, scale=scale)
            out = out.index_copy(0, torch.arange(rows_q.start, rows_q.stop, device=q.device), seq[0].transpose(0, 1))
    return out


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [total], position within it [total]) of each packed row."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:], rows, right=True)  # the sequence ends at or before each row
    return sequence, rows - cu_seqlens[sequence]


def _attention_varlen_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None):
    """attention_varlen as one [H, total_q, total_k] masked attention: a query sees the keys of its own
    sequence (and with causal those at or before its position). Static shapes, for torch.compile."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sequence_q, position_q = _packed_positions(cu_seqlens_q, q.shape[0])
    sequence_k, position_k = _packed_positions(cu_seqlens_k, k.shape[0])
    visible = sequence_q[:, None] == sequence_k[None, :]
    if causal:
        visible = visible & (position_k[None, :] <= position_q[:, None])
    scores = (q.to(acc).transpose(0, 1) @ k.to(acc).permute(1, 2, 0)) * scale  # [H, total_q, total_k]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (weights @ v.to(acc).transpose(0, 1)).transpose(0, 1).to(q.dtype)
