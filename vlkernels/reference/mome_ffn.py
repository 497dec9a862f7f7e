"""Reference mixture-of-modality-experts FFN (VLMo): gather each expert's tokens, run its
pre-LayerNorm + MLP, scatter the results back. Short, float64-capable: the spec, the CPU
fallback and the tests' oracle (and the benchmarks' "eager gather/loop/scatter" provider)."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "relu")


def segment_value(value, what: str):
    """One entry of ``segments`` as an integer: a Python int (or a numpy integer; a SymInt under
    torch.compile) or a 0-dim integer tensor, returned as it is. Floats (even 2.0) and bools are
    refused with a TypeError: ``position < 2.5`` would route 3 tokens where an int cast routes 2."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_floating_point or value.is_complex():
            raise TypeError(f"mome_ffn: segments {what} must be an integer (int or 0-dim integer tensor), got a "
                            f"{value.dtype} tensor of shape {list(value.shape)}")
        return value
    if isinstance(value, (bool, torch.SymBool)):
        raise TypeError(f"mome_ffn: segments {what} must be an integer, got the bool {value!r}")
    if isinstance(value, (int, torch.SymInt)):  # (torch.compile traces a SymInt as an int)
        return value
    if str(getattr(value, "dtype", "")) == "bool":  # a numpy bool, which operator.index would take as 0 / 1
        raise TypeError(f"mome_ffn: segments {what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"mome_ffn: segments {what} must be an integer (int or 0-dim integer tensor), "
                        f"got {type(value).__name__} {value!r}") from None


def segment_values(segments) -> tuple:
    """(text_len, first_expert, rest_expert), each checked by :func:`segment_value`."""
    if not isinstance(segments, (tuple, list)) or len(segments) != 3:
        raise ValueError(f"mome_ffn: segments must be (text_len, first_expert, rest_expert), got {segments!r}")
    return tuple(segment_value(v, what) for v, what in zip(segments, ("text_len", "first_expert", "rest_expert")))


def segments_expert_index(batch: int, seq_len: int, segments: tuple[int, int, int], device=None) -> torch.Tensor:
    """VLMo's positional routing as per-token ids: segments = (text_len, first_expert, rest_expert)
    sends tokens [0, text_len) of every sample to first_expert and the rest to rest_expert.
    Returns [batch * seq_len] int64 (sample-major, as x.reshape(-1, D))."""
    text_len, first, rest = segment_values(segments)
    position = torch.arange(seq_len, device=device)
    per_sample = torch.where(position < text_len, first, rest)
    return per_sample.repeat(batch)


def _activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)  # exact erf GELU, as VLMo's nn.GELU()
    if activation == "relu":
        return F.relu(z)
    raise ValueError(f"mome_ffn: activation must be one of {ACTIVATIONS}, got {activation!r}")


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
    segments: Optional[tuple[int, int, int]] = None,
) -> torch.Tensor:
    """x: [T, D] (or [B, S, D]), expert_index: [T] (or [B, S]) int in [0, E), or None with
    segments = (text_len, first_expert, rest_expert) and x [B, S, D];
    w1: [E, D, F], b1: [E, F], w2: [E, F, D], b2: [E, D]; ln_weight, ln_bias: [E, D] or None.

    out[t] = act(LN_e(x[t]) @ w1[e] + b1[e]) @ w2[e] + b2[e] with e = expert of token t,
    LN_e = LayerNorm(D, eps) with weight ln_weight[e] and bias ln_bias[e] (when given).
    Returns the shape of x, tokens in their original order.

    Eager: each expert runs on its own tokens (gathered by index). Under torch.compile, whose
    graphs need shapes that do not depend on the ids, each expert runs on every token and keeps
    the rows routed to it (E times the FLOPs, the same result).
    """
    shape, dim = x.shape, x.shape[-1]
    if segments is not None:
        expert_index = segments_expert_index(shape[0], shape[1], segments, x.device)
    tokens = x.reshape(-1, dim)
    expert_index = expert_index.reshape(-1)
    out = tokens.new_zeros(tokens.shape[0], w2.shape[-1])

    def expert(e: int, h: torch.Tensor) -> torch.Tensor:
        if ln_weight is not None:
            h = F.layer_norm(h, (dim,), ln_weight[e], None if ln_bias is None else ln_bias[e], eps)
        return _activation(h @ w1[e] + b1[e], activation) @ w2[e] + b2[e]

    for e in range(w1.shape[0]):
        if torch.compiler.is_compiling():
            out = torch.where((expert_index == e)[:, None], expert(e, tokens), out)
            continue
        rows = (expert_index == e).nonzero().squeeze(1)
        if rows.numel() == 0 and (e > 0 or tokens.shape[0] > 0):
            continue  # with T = 0, expert 0 still runs (on no rows): the output stays in the graph
        out = out.index_copy(0, rows, expert(e, tokens.index_select(0, rows)))
    return out.reshape(shape)
