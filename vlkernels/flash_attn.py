"""flash-attn's functional interface on the vlkernels attention ops: ``from vlkernels import
flash_attn_func`` replaces ``from flash_attn import flash_attn_func`` (same argument names, order
and defaults, same [batch, seqlen, nheads, headdim] / [total, nheads, headdim] layouts).

What differs from flash-attn, argument by argument:
- dtypes: fp16 and bf16 as flash-attn, and also fp32 / fp64 (torch backend).
- nheads_k < nheads (GQA / MQA): supported by repeating each k/v head for its group of query
  heads (query head h reads k/v head h // (nheads // nheads_k), flash-attn's grouping).
- causal with seqlen_q != seqlen_k: flash-attn's bottom-right alignment (query i sees key j
  when j <= i + seqlen_k - seqlen_q; a query that sees no key gets zeros), in flash_attn_func;
  flash_attn_varlen_func takes causal only with each sequence's q and k lengths equal.
- dropout_p: in the kernels (its own random stream: the same probability, not flash-attn's
  bits); dropout_p is applied whenever it is > 0, as in flash-attn (pass 0.0 in eval).
- deterministic: accepted; the backward is deterministic either way (no atomics).
- window_size other than (-1, -1), softcap != 0, alibi_slopes, return_attn_probs=True and
  block_table: refused with NotImplementedError naming the argument.
"""
from __future__ import annotations

from typing import Optional

import torch

from vlkernels.ops import attention, attention_varlen


def _refuse_unsupported(op: str, window_size, softcap, alibi_slopes, return_attn_probs, block_table=None) -> None:
    unsupported = [
        ("window_size", tuple(window_size) != (-1, -1), "local (sliding-window) attention"),
        ("softcap", softcap != 0.0, "score soft-capping"),
        ("alibi_slopes", alibi_slopes is not None, "ALiBi biases"),
        ("return_attn_probs", bool(return_attn_probs), "returning the softmax statistics and probabilities"),
        ("block_table", block_table is not None, "a paged KV cache"),
    ]
    for name, requested, what in unsupported:
        if requested:
            raise NotImplementedError(f"vlkernels.{op}: {name} ({what}) is not supported; leave it at "
                                      "flash-attn's default")


def _check(op: str, q, k, v, rank: int, layout: str, dropout_p) -> int:
    """ValueError / TypeError for bad inputs; returns the GQA group size nheads // nheads_k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"vlkernels.{op}: {name} must be {layout}, got {shape}")
        if not t.is_floating_point() or t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"vlkernels.{op}: q, k, v must share one floating dtype and device, got "
                            f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if k.shape != v.shape:
        raise ValueError(f"vlkernels.{op}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"vlkernels.{op}: q and k must have one head dim, got {q.shape[-1]} and {k.shape[-1]}")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads % heads_k:
        raise ValueError(f"vlkernels.{op}: nheads ({heads}) must be a multiple of nheads_k ({heads_k})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"vlkernels.{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return heads // heads_k


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> torch.Tensor:
    """flash-attn's ``flash_attn_func``: q [batch, seqlen_q, nheads, headdim], k and v
    [batch, seqlen_k, nheads_k, headdim] -> out [batch, seqlen_q, nheads, headdim].
    softmax_scale defaults to headdim ** -0.5; causal aligns to the bottom right (see the module
    docstring for what differs from flash-attn)."""
    op = "flash_attn_func"
    _refuse_unsupported(op, window_size, softcap, alibi_slopes, return_attn_probs)
    group = _check(op, q, k, v, 4, "[batch, seqlen, nheads, headdim]", dropout_p)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"vlkernels.{op}: q and k must have one batch size, got {q.shape[0]} and {k.shape[0]}")
    if group > 1:  # GQA / MQA: each k/v head serves `group` consecutive query heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D] views
    seq_q, seq_k = q.shape[2], k.shape[2]
    key_mask, offset = None, 0
    if causal and seq_q != seq_k:
        # Bottom-right alignment as a square causal mask: Sk > Sq prepends Sk - Sq dummy queries
        # (dropped afterwards); Sq > Sk prepends Sq - Sk keys that key_mask hides, so the first
        # Sq - Sk queries see no key (zeros, as flash-attn).
        if seq_k > seq_q:
            offset = seq_k - seq_q
            q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], offset, q.shape[3]), q], dim=2)
        else:
            extra = seq_q - seq_k
            pad = k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])
            k, v = torch.cat([pad, k], dim=2), torch.cat([pad, v], dim=2)
            key_mask = (torch.arange(seq_q, device=q.device) >= extra).expand(q.shape[0], seq_q)
    out = attention(q, k, v, key_mask=key_mask, causal=causal, scale=softmax_scale, dropout_p=float(dropout_p))
    return out[:, :, offset:].transpose(1, 2).contiguous()


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func``: q [total_q, nheads, headdim], k and v
    [total_k, nheads_k, headdim], cu_seqlens_q / cu_seqlens_k int32 [batch + 1] -> out
    [total_q, nheads, headdim]. causal needs each sequence's q and k lengths equal (checked on
    the device by default, ValueError in strict mode; see :func:`vlkernels.ops.attention_varlen`)."""
    op = "flash_attn_varlen_func"
    _refuse_unsupported(op, window_size, softcap, alibi_slopes, return_attn_probs, block_table)
    group = _check(op, q, k, v, 3, "[total, nheads, headdim]", dropout_p)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            scale=softmax_scale, dropout_p=float(dropout_p))
