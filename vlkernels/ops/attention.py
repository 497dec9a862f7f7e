"""The attention family of VL transformers: self- and cross-attention with key padding masks,
causal and PrefixLM masks, bidirectional co-attention in one launch, and packed varlen.

Flash-attention style Triton kernels (see _attention_kernels.py): forward with online
softmax saving the logsumexp, backward in FA2's form (a delta = rowsum(dO * O) pre-pass, a
dK/dV launch over key blocks, a dQ launch over query blocks; no atomics, deterministic).
Attention dropout (dropout_p, SDPA's semantics, in-kernel Philox) and an additive bias with
its gradient.

Masked positions, on every backend: a query that sees no key gets zeros and zero gradients
(decided by the masks, not by the values); the k and v of a padded key (key_mask, past a
varlen sequence's end) reach no query, so padding may hold NaN; a key hidden by causal /
prefix_len has its score excluded (its v enters the kernels' and SDPA's products with weight
0, so a non-finite v there is not guaranteed excluded). NaN and Inf in q or in the k and v of
visible keys propagate into the rows that see them; nothing is replaced.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from vlkernels import _backend
from vlkernels._backend import Implementation
from vlkernels.ops._checks import check_value, reads_on_host
from vlkernels.ops import _attention_configs as configs
from vlkernels.ops import _attention_sdpa as sdpa
from vlkernels.ops._attention_configs import AttentionConfig
from vlkernels.ops._variants import KernelVariant

try:
    import triton

    from vlkernels.ops import _attention_kernels as kernels
except ImportError:  # the torch backend still works; the triton backend refuses with the reason
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128


def _config(dtype: torch.dtype, block_d: int, pass_: str, length: int, extras: bool = False) -> AttentionConfig:
    """The launch configuration from the table (vlkernels.ops._attention_configs); pass_: "fwd",
    "dkdv" or "dq"; length: the queries the forward tiles (the longer stream of co-attention);
    extras: bias or dropout on."""
    return configs.config(dtype, block_d, pass_, length, extras)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if configs.precision(dtype) == "ieee" else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels address rows by strides and need unit stride along Dh.
    return t if t.stride(-1) == 1 else t.contiguous()


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory without gaps (any dim order) with unit stride along Dh."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is dense (``_is_dense``), else a contiguous copy. The backward writes
    each gradient with its input's strides; a view with gaps (q of a fused qkv projection)
    would make that gradient as large as the whole projection."""
    return t if _is_dense(t) else t.contiguous()


def _grad_buffer(t: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of input t as the backward launchers allocate it: t's strides when t
    is dense, else contiguous. The fake implementations call it too, so that the strides
    torch.compile plans with are the ones the kernels write."""
    if _is_dense(t):
        return torch.empty_strided(t.shape, t.stride(), device=t.device, dtype=t.dtype)
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


def _key_limits(key_mask: Optional[torch.Tensor], batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask as uint8 [B, Sk], [B, 3] int32 of (1 + index of each row's last real key, index of
    its first real key, length of its leading run of real keys; (0, 0, 0) without any)): the
    kernels skip every key tile after the last real key, decide from the first whether a query
    row sees any key, and read mask bytes only in blocks past the leading run (none for a
    right-padded mask). Computed once per call, by device ops (no host read)."""
    if key_mask is None:
        empty = torch.zeros(1, dtype=torch.int32, device=device)
        return empty, empty
    if key_mask.shape[1] == 0:  # no keys at all (amax has nothing to reduce): every row is empty
        return key_mask.contiguous().view(torch.uint8), torch.zeros(batch, 3, dtype=torch.int32, device=device)
    keys = key_mask.shape[1]
    positions = torch.arange(1, keys + 1, device=device, dtype=torch.int32)
    real = key_mask.to(torch.int32)
    limit = (real * positions).amax(1)
    first = torch.where(key_mask, positions - 1, keys).amin(1)  # keys (= past the end) when none is real
    first = torch.where(limit > 0, first, 0)
    dense = torch.where(key_mask, keys, positions - 1).amin(1)  # the first padded key (keys when none)
    return key_mask.contiguous().view(torch.uint8), torch.stack([limit, first, dense], 1).to(torch.int32).contiguous()


# CUDA caps grid axis 0 at 2**31 - 1 programs and axes 1 and 2 at 65535. Every launch here puts
# (batch * heads) x (blocks of one head) on axis 0, which grows with the data, and keeps axis 1
# at 1 and axis 2 at 1 or 2 (the co-attention direction); B * H on axis 1 would stop at 65535
# (a varlen batch of many sequences).
_MAX_GRID_X = 2 ** 31 - 1


def _grid(op: str, programs_per_head: int, batch_heads: int, directions: int = 1) -> tuple[int, int, int]:
    """Launch shape of a kernel with ``programs_per_head`` programs for each of ``batch_heads``
    (batch, head) pairs: (batch_heads * programs_per_head, 1, directions)."""
    programs = batch_heads * programs_per_head
    if programs > _MAX_GRID_X:
        raise ValueError(f"{op}: {batch_heads} (batch, head) pairs x {programs_per_head} blocks each is "
                         f"{programs} programs, over the {_MAX_GRID_X} a launch can have; split the batch")
    return programs, 1, directions


def _fwd_grid(op: str, seq_q: int, batch_heads: int, dtype: torch.dtype, head_dim: int, directions: int = 1,
              extras: bool = False):
    """(grid, programs_per_head) of a forward launch over query blocks."""
    cfg = _config(dtype, _block_d(head_dim), "fwd", seq_q, extras)
    per_head = triton.cdiv(seq_q, cfg.block_m)
    return _grid(op, per_head, batch_heads, directions), per_head


def _bwd_grid(op: str, seq_q: int, seq_k: int, batch_heads: int, dtype: torch.dtype, head_dim: int,
              directions: int = 1, dq: bool = False, extras: bool = False):
    """(grid, programs_per_head) of a backward launch: over the key blocks (the dK/dV kernel)
    or, with dq, over the query blocks (the dQ kernel)."""
    cfg = _config(dtype, _block_d(head_dim), "dq" if dq else "dkdv", seq_q, extras)
    per_head = triton.cdiv(seq_q, cfg.block_m) if dq else triton.cdiv(seq_k, cfg.block_n)
    return _grid(op, per_head, batch_heads, directions), per_head


_DELTA_BLOCK_ROWS = 64  # rows of the delta pre-pass per program: a [64, <=128] fp32 tile per 4 warps


def _delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) in fp32, one entry per row of the contiguous out (the backward's
    pre-pass): [B, H, Sq] for a dense out, [total, H] for a packed one."""
    head_dim = out.shape[-1]
    rows = out.numel() // head_dim if head_dim else 0
    delta = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)
    if rows:
        kernels._attention_bwd_delta_kernel[(triton.cdiv(rows, _DELTA_BLOCK_ROWS),)](
            out, grad_out, delta, rows, HEAD_DIM=head_dim, BLOCK_R=_DELTA_BLOCK_ROWS, BLOCK_D=_block_d(head_dim),
            num_warps=4)
    return delta


def _dense_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return 0, t.stride(1), t.stride(0)  # [total, H, Dh]: no batch stride, rows by cu_seqlens


# ----------------------------------------------------------------------------------------------
# Launchers: dense [B, H, S, Dh] and packed [total, H, Dh] share one kernel
# ----------------------------------------------------------------------------------------------
def _layout(q, k, v, cu_q, cu_k, max_q, max_k):
    """Batch, heads, sequence bounds and stride function for the dense or packed layout."""
    if cu_q is None:
        return q.shape[0], q.shape[1], q.shape[2], k.shape[2], _dense_strides
    return cu_q.shape[0] - 1, q.shape[1], max_q, max_k, _packed_strides


def _rng(device) -> torch.Tensor:
    """(seed, counter offset) of one dropout call: two int64 drawn on ``device`` from torch's
    default generator of that device, so torch.manual_seed makes runs reproducible. A device
    op (no host read), traced by torch.compile like any random op."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def _keep_scale(dropout_p: float) -> float:
    """The factor of a kept probability, 1 / (1 - p); 0 at p = 1, where every probability is
    dropped (SDPA's zeros): 1 / 0 would put inf beside the zeros of the dropped ones."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _bias_view(bias: torch.Tensor, shape) -> torch.Tensor:
    """bias (broadcastable to shape = [B, H, Sq, Sk]) as a [B, H, Sq, Sk] view: stride 0 along
    the broadcast dimensions, so the kernels read it in place."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(shape)


def _bias_strides(bias: Optional[torch.Tensor], shape) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if bias is None else _bias_view(bias, shape).stride()


def _reduce_bias_grad(grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fp32 [B, H, Sq, Sk] dS summed over the dimensions bias broadcasts along, in bias's
    shape and dtype (torch's sums: deterministic)."""
    padded = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [d for d in range(4) if padded[d] == 1 and grad.shape[d] != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(bias.shape).to(bias.dtype).contiguous()


def _launch_fwd(q, k, v, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale, bias=None, rng=None,
                dropout_p=0.0):
    q, k, v = (_unit_stride_last(t) for t in (q, k, v))
    batch, heads, seq_q, seq_k, strides = _layout(q, k, v, cu_q, cu_k, max_q, max_k)
    head_dim = q.shape[-1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, seq_q) if cu_q is None else (heads, q.shape[0]), device=q.device,
                      dtype=torch.float32)
    lse_strides = (heads * seq_q, seq_q) if cu_q is None else (0, q.shape[0])
    mask, limit = _key_limits(key_mask, batch, q.device)
    placeholder = limit
    dropout = rng is not None and dropout_p > 0
    extras = dropout or bias is not None
    cfg = _config(q.dtype, _block_d(head_dim), "fwd", seq_q, extras)
    grid, per_head = _fwd_grid("attention", seq_q, batch * heads, q.dtype, head_dim, extras=extras)
    if grid[0] == 0:  # no query rows or no (batch, head): nothing to compute
        return out, lse
    kernels._attention_fwd_kernel[grid](
        q, k, v, out, lse, mask, limit,
        prefix_len if prefix_len is not None else placeholder,
        cu_q if cu_q is not None else placeholder, cu_k if cu_k is not None else placeholder,
        bias if bias is not None else placeholder, rng if dropout else placeholder,
        *strides(q), *strides(k), *strides(v), *strides(out), *lse_strides,
        mask.stride(0) if key_mask is not None else 0, *_bias_strides(bias, (batch, heads, seq_q, seq_k)),
        heads, seq_q, seq_k, scale * math.log2(math.e), float(dropout_p), _keep_scale(dropout_p), per_head,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, VARLEN=cu_q is not None,
        DOT_PRECISION=_dot_precision(q.dtype), HAS_BIAS=bias is not None, DROPOUT=dropout,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _launch_bwd(grad_out, q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale,
                bias=None, rng=None, dropout_p=0.0, bias_grad=False):
    """[grad_q, grad_k, grad_v, grad_bias]; grad_bias is in bias's shape and dtype when
    bias_grad, else an empty placeholder."""
    q, k, v = (_dense(t) for t in (q, k, v))
    grad_out = grad_out.contiguous()  # out is contiguous: both use its strides
    batch, heads, seq_q, seq_k, strides = _layout(q, k, v, cu_q, cu_k, max_q, max_k)
    head_dim = q.shape[-1]
    grads = [_grad_buffer(t) for t in (q, k, v)]
    lse_strides = (heads * seq_q, seq_q) if cu_q is None else (0, q.shape[0])
    # delta has one entry per row of out: [B, H, Sq] (dense) or [total, H] (packed).
    delta_strides = (heads * seq_q, seq_q, 1) if cu_q is None else (0, 1, heads)
    mask, limit = _key_limits(key_mask, batch, q.device)
    placeholder = limit
    dropout = rng is not None and dropout_p > 0
    extras = dropout or bias is not None
    grid, per_head = _bwd_grid("attention", seq_q, seq_k, batch * heads, q.dtype, head_dim, extras=extras)
    grid_dq, per_head_dq = _bwd_grid("attention", seq_q, seq_k, batch * heads, q.dtype, head_dim, dq=True,
                                     extras=extras)
    bias_grad = bias_grad and bias is not None
    # dS of every (query, key) pair for the bias gradient: zeros where the kernel skips a tile
    # (hidden by the masks), written once per element by the key-block programs otherwise.
    full_grad_bias = torch.zeros((batch, heads, seq_q, seq_k) if bias_grad else (1,), device=q.device,
                                 dtype=torch.float32)
    grad_bias = q.new_empty(0)
    if grid[0] == 0 or grid_dq[0] == 0 or q.numel() == 0:  # nothing to differentiate (or no key side)
        return [g.zero_() for g in grads] + [_reduce_bias_grad(full_grad_bias, bias) if bias_grad else grad_bias]
    delta = _delta(out, grad_out)
    # Two launches (FA2's form): dK/dV over key blocks (and dS for the bias), then dQ over query
    # blocks; each writes only its own outputs and reads what earlier launches wrote.
    for dq, launch_grid, programs in ((False, grid, per_head), (True, grid_dq, per_head_dq)):
        cfg = _config(q.dtype, _block_d(head_dim), "dq" if dq else "dkdv", seq_q, extras)
        kernels._attention_bwd_kernel[launch_grid](
            q, k, v, grad_out, lse, delta, *grads, mask, limit,
            prefix_len if prefix_len is not None else placeholder,
            cu_q if cu_q is not None else placeholder, cu_k if cu_k is not None else placeholder,
            bias if bias is not None else placeholder, full_grad_bias, rng if dropout else placeholder,
            *strides(q), *strides(k), *strides(v), *strides(out), *lse_strides,
            mask.stride(0) if key_mask is not None else 0, *delta_strides,
            *_bias_strides(bias, (batch, heads, seq_q, seq_k)),
            heads, seq_q, seq_k, scale * math.log2(math.e), scale, float(dropout_p), _keep_scale(dropout_p), programs,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, VARLEN=cu_q is not None,
            DOT_PRECISION=_dot_precision(q.dtype), HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad and not dq,
            DROPOUT=dropout, DQ=dq, TILE_CLASSES=cfg.tile_classes, PARTIAL_PIPELINED=cfg.partial_pipelined,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if bias_grad:
        grad_bias = _reduce_bias_grad(full_grad_bias, bias)
    return grads + [grad_bias]


def _direction_args(q, k, v, out, lse, key_mask, limit, grads=()):
    """The per-direction arguments of the co-attention forward kernel, in their order; the
    backward's take (q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, mask, limit, ...)."""
    mask_stride = key_mask.stride(0) if key_mask.dim() == 2 else 0
    return [q, k, v, out, *grads, lse, key_mask, limit, *_dense_strides(q), *_dense_strides(k), *_dense_strides(v),
            *_dense_strides(out), mask_stride, q.shape[2], k.shape[2]]


def _co_limits(text_mask, image_mask, batch, seq_t, seq_i, device):
    """(text, image) key limits of co-attention and whether the kernel reads masks. Both
    directions run one code path: when only one stream has a mask, the other gets an all-True
    one, so the two directions' mask pointers have one type."""
    has_mask = text_mask is not None or image_mask is not None
    if has_mask:
        text_mask = torch.ones(batch, seq_t, dtype=torch.bool, device=device) if text_mask is None else text_mask
        image_mask = torch.ones(batch, seq_i, dtype=torch.bool, device=device) if image_mask is None else image_mask
    return _key_limits(text_mask, batch, device), _key_limits(image_mask, batch, device), has_mask


def _launch_co_fwd(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, rng=None, dropout_p=0.0):
    q_t, k_t, v_t, q_i, k_i, v_i = (_unit_stride_last(t) for t in (q_t, k_t, v_t, q_i, k_i, v_i))
    batch, heads, head_dim = q_t.shape[0], q_t.shape[1], q_t.shape[-1]
    outs = [torch.empty(q.shape, device=q.device, dtype=q.dtype) for q in (q_t, q_i)]
    lses = [torch.empty(batch, heads, q.shape[2], device=q.device, dtype=torch.float32) for q in (q_t, q_i)]
    # text queries attend image keys
    text, image, has_mask = _co_limits(text_mask, image_mask, batch, k_t.shape[2], k_i.shape[2], q_t.device)
    dropout = rng is not None and dropout_p > 0
    longer = max(q_t.shape[2], q_i.shape[2])  # both directions run one configuration
    cfg = _config(q_t.dtype, _block_d(head_dim), "fwd", longer, dropout)
    grid, per_head = _fwd_grid("co_attention", longer, batch * heads, q_t.dtype, head_dim, directions=2,
                               extras=dropout)
    if grid[0] == 0:
        return outs[0], lses[0], outs[1], lses[1]
    kernels._co_attention_fwd_kernel[grid](
        *_direction_args(q_t, k_i, v_i, outs[0], lses[0], *image),
        *_direction_args(q_i, k_t, v_t, outs[1], lses[1], *text),
        rng if dropout else image[1], heads, scale * math.log2(math.e), float(dropout_p), _keep_scale(dropout_p),
        per_head,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_KEY_MASK=has_mask, DOT_PRECISION=_dot_precision(q_t.dtype), DROPOUT=dropout,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return outs[0], lses[0], outs[1], lses[1]


def _launch_co_bwd(grad_t, grad_i, q_t, k_t, v_t, q_i, k_i, v_i, out_t, lse_t, out_i, lse_i,
                   text_mask, image_mask, scale, rng=None, dropout_p=0.0):
    q_t, k_t, v_t, q_i, k_i, v_i = (_dense(t) for t in (q_t, k_t, v_t, q_i, k_i, v_i))
    grad_t, grad_i = grad_t.contiguous(), grad_i.contiguous()
    batch, heads, head_dim = q_t.shape[0], q_t.shape[1], q_t.shape[-1]
    grads = {name: _grad_buffer(t) for name, t in dict(q_t=q_t, k_t=k_t, v_t=v_t, q_i=q_i, k_i=k_i, v_i=v_i).items()}
    names = ("q_t", "k_t", "v_t", "q_i", "k_i", "v_i")
    text, image, has_mask = _co_limits(text_mask, image_mask, batch, k_t.shape[2], k_i.shape[2], q_t.device)
    dropout = rng is not None and dropout_p > 0
    grids = [max(_bwd_grid("co_attention", q.shape[2], k.shape[2], batch * heads, q_t.dtype, head_dim,
                           directions=2, dq=dq, extras=dropout) for q, k in ((q_t, k_i), (q_i, k_t)))
             for dq in (False, True)]
    if grids[0][0][0] == 0 or grids[1][0][0] == 0 or q_t.numel() + q_i.numel() == 0:
        return [grads[name].zero_() for name in names]
    # The kernel takes (q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, mask, limit, ...).
    text_args = _direction_args(q_t, k_i, v_i, grad_t, lse_t, *image)
    image_args = _direction_args(q_i, k_t, v_t, grad_i, lse_i, *text)
    text_args[5:5] = [_delta(out_t, grad_t), grads["q_t"], grads["k_i"], grads["v_i"]]
    image_args[5:5] = [_delta(out_i, grad_i), grads["q_i"], grads["k_t"], grads["v_t"]]
    for dq, (grid, per_head) in zip((False, True), grids):  # dK/dV, then dQ (see _launch_bwd)
        # (the backward's rows do not depend on the length: both directions get one configuration)
        cfg = _config(q_t.dtype, _block_d(head_dim), "dq" if dq else "dkdv", q_t.shape[2], dropout)
        kernels._co_attention_bwd_kernel[grid](
            *text_args, *image_args, rng if dropout else image[1], heads, scale * math.log2(math.e), scale,
            float(dropout_p), _keep_scale(dropout_p), per_head,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HAS_KEY_MASK=has_mask, DOT_PRECISION=_dot_precision(q_t.dtype), DROPOUT=dropout, DQ=dq,
            TILE_CLASSES=cfg.tile_classes, PARTIAL_PIPELINED=cfg.partial_pipelined,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return [grads[name] for name in names]


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vlkernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
    prefix_len: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
    max_q: int, max_k: int, causal: bool, scale: float, bias: Optional[torch.Tensor] = None,
    rng: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale, bias, rng, dropout_p)


@_attention_fwd_op.register_fake
def _(q, k, v, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale, bias=None, rng=None, dropout_p=0.0):
    lse_shape = (q.shape[0], q.shape[1], q.shape[2]) if cu_q is None else (q.shape[1], q.shape[0])
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("vlkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_mask: Optional[torch.Tensor], prefix_len: Optional[torch.Tensor],
    cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor], max_q: int, max_k: int, causal: bool, scale: float,
    bias: Optional[torch.Tensor] = None, rng: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_launch_bwd(grad_out, q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, max_q, max_k,
                             causal, scale, bias, rng, dropout_p, bias_grad))


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale, bias=None,
      rng=None, dropout_p=0.0, bias_grad=False):
    grad_bias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    return _grad_buffer(q), _grad_buffer(k), _grad_buffer(v), grad_bias


def _attention_setup(ctx, inputs, output):
    q, k, v, key_mask, prefix_len, cu_q, cu_k, max_q, max_k, causal, scale, bias, rng, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, bias, rng)
    ctx.sizes = (max_q, max_k, causal, scale)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, bias, rng = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[11]
    *grads, grad_bias = _attention_bwd_op(grad_out, q, k, v, out, lse, key_mask, prefix_len, cu_q, cu_k, *ctx.sizes,
                                          bias, rng, ctx.dropout_p, bias_grad)
    return (*grads, None, None, None, None, None, None, None, None, grad_bias if bias_grad else None, None, None)


torch.library.register_autograd("vlkernels::attention_fwd", _attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("vlkernels::co_attention_fwd", mutates_args=())
def _co_attention_fwd_op(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, q_i: torch.Tensor, k_i: torch.Tensor,
    v_i: torch.Tensor, text_mask: Optional[torch.Tensor], image_mask: Optional[torch.Tensor], scale: float,
    rng: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_co_fwd(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, rng, dropout_p)


@_co_attention_fwd_op.register_fake
def _(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, rng=None, dropout_p=0.0):
    def lse(q):
        return q.new_empty(q.shape[:3], dtype=torch.float32)

    return (torch.empty_like(q_t, memory_format=torch.contiguous_format), lse(q_t),
            torch.empty_like(q_i, memory_format=torch.contiguous_format), lse(q_i))


@torch.library.custom_op("vlkernels::co_attention_bwd", mutates_args=())
def _co_attention_bwd_op(
    grad_t: torch.Tensor, grad_i: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
    q_i: torch.Tensor, k_i: torch.Tensor, v_i: torch.Tensor, out_t: torch.Tensor, lse_t: torch.Tensor,
    out_i: torch.Tensor, lse_i: torch.Tensor, text_mask: Optional[torch.Tensor], image_mask: Optional[torch.Tensor],
    scale: float, rng: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_launch_co_bwd(grad_t, grad_i, q_t, k_t, v_t, q_i, k_i, v_i, out_t, lse_t, out_i, lse_i,
                                text_mask, image_mask, scale, rng, dropout_p))


@_co_attention_bwd_op.register_fake
def _(grad_t, grad_i, q_t, k_t, v_t, q_i, k_i, v_i, out_t, lse_t, out_i, lse_i, text_mask, image_mask, scale,
      rng=None, dropout_p=0.0):
    return tuple(_grad_buffer(t) for t in (q_t, k_t, v_t, q_i, k_i, v_i))


def _co_attention_setup(ctx, inputs, output):
    *qkv, text_mask, image_mask, scale, rng, dropout_p = inputs
    out_t, lse_t, out_i, lse_i = output
    ctx.save_for_backward(*qkv, out_t, lse_t, out_i, lse_i, text_mask, image_mask, rng)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse_t, lse_i)


def _co_attention_backward(ctx, grad_t, _grad_lse_t, grad_i, _grad_lse_i):
    *saved, text_mask, image_mask, rng = ctx.saved_tensors
    grads = _co_attention_bwd_op(grad_t, grad_i, *saved, text_mask, image_mask, ctx.scale, rng, ctx.dropout_p)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("vlkernels::co_attention_fwd", _co_attention_backward,
                                setup_context=_co_attention_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _check_qkv(op: str, q, k, v, packed: bool) -> None:
    rank = 3 if packed else 4
    layout = "[total, H, Dh]" if packed else "[B, H, S, Dh]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point or t.dtype != q.dtype:
            raise TypeError(f"{op}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch_dims = slice(1, None, 2) if packed else slice(0, 2)  # packed: H; dense: B, H
    if q.shape[batch_dims] != k.shape[batch_dims] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head dim must be positive")


def _check_key_mask(op: str, name: str, mask: Optional[torch.Tensor], batch: int, keys: int, device) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, keys):
        raise ValueError(f"{op}: {name} must be a bool tensor [{batch}, {keys}] (True = a real token), "
                         f"got {mask.dtype} {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the queries are on {device}")


def _check_value(ok: torch.Tensor, message: str, strict_message=None) -> None:
    """check_value; in strict mode a failure raises ValueError(strict_message()) instead, a message
    naming the bad values (more host reads, made only once the check has failed)."""
    if strict_message is not None and reads_on_host():
        if not bool(ok):
            raise ValueError(strict_message())
        return
    check_value(ok, message)


def _triton_refusal(q: torch.Tensor) -> Optional[str]:
    why = _backend.triton_refusal(q.device)
    if why is None and q.dtype not in _SUPPORTED_DTYPES:
        why = f"dtype {q.dtype} is not one of float32, float16, bfloat16"
    if why is None and q.shape[-1] > _MAX_HEAD_DIM:
        why = f"head dim {q.shape[-1]} is over {_MAX_HEAD_DIM}"
    return why


def _check_dropout(op: str, dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1], got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:  # NaN fails too
        raise ValueError(f"{op}: dropout_p must be in [0, 1] (as in F.scaled_dot_product_attention), "
                         f"got {dropout_p!r}")
    return float(dropout_p)


def _check_bias(op: str, bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> None:
    if bias is None:
        return
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor broadcastable to [B, H, Sq, Sk] = {list(target)}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"{op}: bias must be a floating tensor (an additive bias; use key_mask for a bool mask), "
                        f"got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"{op}: bias is on {bias.device} but the queries are on {q.device}")
    padded = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    if bias.dim() > 4 or any(size not in (1, want) for size, want in zip(padded, target)):
        raise ValueError(f"{op}: bias of shape {list(bias.shape)} does not broadcast to [B, H, Sq, Sk] = "
                         f"{list(target)}")


_KEEP_BLOCK_M, _KEEP_BLOCK_N = 32, 64  # 64 x 64 spills the Philox state at 4 warps (255 registers)


def _dropout_keep_mask(rng: torch.Tensor, batch_heads: int, seq_q: int, seq_k: int, dropout_p: float,
                       stream: int = 0) -> torch.Tensor:
    """Debug / test path: the bool [batch_heads, Sq, Sk] keep mask that the Triton kernels use
    for the (seed, offset) tensor ``rng`` (ops draw it with ``_rng``), from the same RNG code.
    Varlen calls index it as the padded [N * H, max_seqlen_q, max_seqlen_k] batch; stream 1 is
    co-attention's image-query direction."""
    keep = torch.empty((batch_heads, seq_q, seq_k), device=rng.device, dtype=torch.uint8)
    block_m, block_n = _KEEP_BLOCK_M, _KEEP_BLOCK_N
    per_head = triton.cdiv(seq_q, block_m)
    grid = _grid("dropout_keep_mask", per_head, batch_heads)
    if grid[0] and seq_k:
        kernels._dropout_keep_kernel[grid](rng, keep, seq_q, seq_k, float(dropout_p), stream, per_head,
                                           BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()


def _run_attention_triton(q, k, v, key_mask, prefix_len, causal, scale, dropout_p=0.0, bias=None):
    # The kernels take an int32 prefix; any prefix >= Sk means every key is in it, so clamp to Sk
    # before narrowing (2**31 + 5 would otherwise wrap to 5, 2**32 to plain causal).
    seq_k = k.shape[2]
    if prefix_len is not None and not isinstance(prefix_len, torch.Tensor):
        prefix_len = torch.full((q.shape[0],), min(prefix_len, seq_k), dtype=torch.int32, device=q.device)
    elif prefix_len is not None:
        prefix_len = prefix_len.to(q.device).clamp(max=seq_k).to(torch.int32).expand(q.shape[0]).contiguous()
    elif causal:
        prefix_len = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)  # plain causal: an empty prefix
    rng = _rng(q.device) if dropout_p > 0 else None
    out, _ = _attention_fwd_op(q, k, v, key_mask, prefix_len, None, None, q.shape[2], k.shape[2],
                               causal or prefix_len is not None, scale, bias, rng, dropout_p)
    return out


_ATTENTION = [
    Implementation("triton", lambda q, *rest: _triton_refusal(q), _run_attention_triton),
    Implementation("torch", lambda *args: None, sdpa.attention),
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    prefix_len: Union[int, torch.Tensor, None] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scaled dot-product attention with the masks of VL transformers.

    q: [B, H, Sq, Dh], k and v: [B, H, Sk, Dh] (SDPA's layout; Sq != Sk is cross-attention)
    key_mask: [B, Sk] bool, True = a real token that may be attended
    causal: query i sees keys j <= i (needs Sq == Sk)
    prefix_len: int or [B] int tensor, SimVLM's PrefixLM: query i sees key j when j < prefix_len
        or j <= i, so the prefix is bidirectional and every position sees all of it (needs Sq == Sk)
    scale: defaults to Dh ** -0.5
    dropout_p: attention dropout as in F.scaled_dot_product_attention: each probability (after
        the softmax) is dropped with probability dropout_p and the kept ones are scaled by
        1 / (1 - dropout_p); applied whenever dropout_p > 0, so pass 0.0 in eval. In [0, 1]:
        1 drops every probability (zeros out, zero gradients, as SDPA).
        The Triton kernels draw the mask from a counter-based RNG (Philox) seeded by two int64
        drawn from the default torch generator of q's device (torch.manual_seed reproduces a
        run) and regenerate it in the backward; it is never stored.
    bias: additive attention bias broadcastable to [B, H, Sq, Sk] (e.g. a relative position
        bias [1, H, Sq, Sk], or [B, 1, 1, Sk]), any floating dtype, added to the scaled scores
        before the masks and the softmax; its gradient comes back in its own shape and dtype,
        summed over the broadcast dimensions.
    returns [B, H, Sq, Dh]; a query that sees no key gets zeros (and zero gradients), never NaN.
    Triton backend: Dh <= 128; fp32 uses tf32 dots when torch.backends.cuda.matmul.allow_tf32.
    A negative value in a prefix_len tensor is refused without a host read by default (a
    RuntimeError from a device-side assert), or with ValueError before any launch in strict mode
    (VLKERNELS_VALUE_CHECKS / vlkernels.set_value_checks, see vlkernels.ops._checks).
    """
    op = "attention"
    _check_qkv(op, q, k, v, packed=False)
    batch, _, seq_q, head_dim = q.shape
    _check_key_mask(op, "key_mask", key_mask, batch, k.shape[2], q.device)
    if (causal or prefix_len is not None) and seq_q != k.shape[2]:
        raise ValueError(f"{op}: causal and prefix_len masks need Sq == Sk, got {seq_q} and {k.shape[2]}")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype.is_floating_point or prefix_len.dtype.is_complex or prefix_len.dtype == torch.bool or \
                prefix_len.dim() > 1 or prefix_len.numel() not in (1, batch):
            raise ValueError(f"{op}: prefix_len must be an int or an integer tensor of shape [{batch}], got "
                             f"{prefix_len.dtype} {list(prefix_len.shape)}")
        # device mode: checked in place (no host read); strict mode: ValueError here
        check_value((prefix_len >= 0).all(), f"{op}: prefix_len must be non-negative")
    elif prefix_len is not None and (not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 0):
        raise ValueError(f"{op}: prefix_len must be a non-negative int or an integer tensor, got {prefix_len!r}")
    dropout_p = _check_dropout(op, dropout_p)
    _check_bias(op, bias, q, k)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return _backend.dispatch(op, _ATTENTION, q.device, q, k, v, key_mask, prefix_len, causal, scale, dropout_p, bias)


def _run_co_attention_triton(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, dropout_p=0.0):
    rng = _rng(q_t.device) if dropout_p > 0 else None
    out_t, _, out_i, _ = _co_attention_fwd_op(q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask, scale, rng,
                                              dropout_p)
    return out_t, out_i


_CO_ATTENTION = [
    Implementation("triton", lambda q_t, *rest: _triton_refusal(q_t), _run_co_attention_triton),
    Implementation("torch", lambda *args: None, sdpa.co_attention),
]


def co_attention(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
    q_i: torch.Tensor, k_i: torch.Tensor, v_i: torch.Tensor,
    *,
    text_mask: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional co-attention (LXMERT, ViLBERT, METER): text queries attend the image and
    image queries attend the text, both in one kernel launch (forward and backward).

    q_t, k_t, v_t: [B, H, St, Dh]; q_i, k_i, v_i: [B, H, Si, Dh]
    text_mask: [B, St] bool, image_mask: [B, Si] bool (True = a real token)
    dropout_p: attention dropout of both directions (see ``attention``; independent masks)
    returns (out_t [B, H, St, Dh] = attention(q_t, k_i, v_i, key_mask=image_mask),
             out_i [B, H, Si, Dh] = attention(q_i, k_t, v_t, key_mask=text_mask))
    """
    op = "co_attention"
    _check_qkv(op, q_t, k_t, v_t, packed=False)
    _check_qkv(op, q_i, k_i, v_i, packed=False)
    if q_t.shape[:2] != q_i.shape[:2] or q_t.shape[-1] != q_i.shape[-1] or q_t.dtype != q_i.dtype:
        raise ValueError(f"co_attention: text {tuple(q_t.shape)} and image {tuple(q_i.shape)} streams must share "
                         "batch, heads, head dim and dtype")
    if q_t.device != q_i.device:
        raise ValueError(f"co_attention: text is on {q_t.device} but image on {q_i.device}")
    _check_key_mask(op, "text_mask", text_mask, q_t.shape[0], k_t.shape[2], q_t.device)
    _check_key_mask(op, "image_mask", image_mask, q_t.shape[0], k_i.shape[2], q_t.device)
    dropout_p = _check_dropout(op, dropout_p)
    scale = q_t.shape[-1] ** -0.5 if scale is None else float(scale)
    return _backend.dispatch(op, _CO_ATTENTION, q_t.device, q_t, k_t, v_t, q_i, k_i, v_i, text_mask, image_mask,
                             scale, dropout_p)


def _run_varlen_triton(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p=0.0):
    prefix = torch.zeros(cu_q.shape[0] - 1, dtype=torch.int32, device=q.device) if causal else None
    rng = _rng(q.device) if dropout_p > 0 else None
    out, _ = _attention_fwd_op(q, k, v, None, prefix, cu_q, cu_k, max_q, max_k, causal, scale, None, rng, dropout_p)
    return out


_VARLEN = [
    Implementation("triton", lambda q, *rest: _triton_refusal(q), _run_varlen_triton),
    Implementation("torch", lambda *args: None, sdpa.attention_varlen),
]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over packed sequences with no padding (flash-attn's varlen layout).

    q: [total_q, H, Dh], k and v: [total_k, H, Dh]; sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens_q, cu_seqlens_k: [N+1] int32, starting at 0,
    non-decreasing; empty sequences allowed); max_seqlen_*: the longest sequence.
    causal: query i of a sequence sees its keys j <= i (needs equal q and k lengths).
    dropout_p: attention dropout (see ``attention``).
    returns [total_q, H, Dh]. See unpad_input / pad_input to convert from padded batches.
    Value checks of cu_seqlens (0 to total, non-decreasing, no sequence over max_seqlen, equal q
    and k for causal) read nothing on the host by default (a violation is a RuntimeError from a
    device-side assert); strict mode raises ValueError before any launch (VLKERNELS_VALUE_CHECKS /
    vlkernels.set_value_checks). The launch sizes come from max_seqlen_*, never from the data.
    """
    op = "attention_varlen"
    _check_qkv(op, q, k, v, packed=True)
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or cu.device != q.device:
            raise ValueError(f"{op}: {name} must be an int32 [N+1] tensor on {q.device}")
        lengths = cu.diff()
        # One verdict per check, read on the host only in strict mode (see vlkernels.ops._checks).
        check_value((cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all(),
                    f"{op}: {name} must rise from 0 to {total} (the packed rows)")
        bound = name.replace("cu_seqlens", "max_seqlen")
        _check_value((lengths <= longest).all(), f"{op}: a sequence of {name} exceeds {bound}={longest}",
                     lambda: f"{op}: a sequence of {int(lengths.max())} rows exceeds {bound}={longest}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if causal:
        check_value((cu_seqlens_q == cu_seqlens_k).all(),
                    f"{op}: causal attention needs each sequence's q and k lengths equal")
    dropout_p = _check_dropout(op, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _backend.dispatch(op, _VARLEN, q.device, q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                             int(max_seqlen_q), int(max_seqlen_k), causal, scale, dropout_p)


def unpad_input(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """x: [B, S, ...], mask: [B, S] bool (True = a real token) -> (packed [total, ...],
    indices [total] into the flattened B*S rows, cu_seqlens [B+1] int32, max_seqlen).

    Reads the mask on the host by nature: total (the packed shape) and max_seqlen (an int, for
    attention_varlen's launch sizes) depend on the data. Call it once per batch, outside the
    layers; attention_varlen and pad_input then read nothing on the host."""
    if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(f"unpad_input: mask must be a bool tensor of shape {list(x.shape[:2])}")
    lengths = mask.sum(1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: packed [total, ...] -> [batch, seqlen, ...] with zeros at padding.
    indices: [total] integer, distinct, in [0, batch * seqlen) (unpad_input's). The range check
    reads nothing on the host by default (RuntimeError from a device-side assert); strict mode
    raises ValueError before the copy (VLKERNELS_VALUE_CHECKS / vlkernels.set_value_checks)."""
    op = "pad_input"
    if not isinstance(packed, torch.Tensor) or packed.dim() < 1:
        raise ValueError(f"{op}: packed must be a [total, ...] tensor")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point or \
            indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{op}: indices must be a 1-D integer tensor (unpad_input's), got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)} {list(getattr(indices, 'shape', []))}")
    if indices.shape[0] != packed.shape[0]:
        raise ValueError(f"{op}: {indices.shape[0]} indices for {packed.shape[0]} packed rows")
    if indices.device != packed.device:
        raise ValueError(f"{op}: indices are on {indices.device} but packed on {packed.device}")
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")
    rows = batch * seqlen
    in_range = (indices >= 0).all() & (indices < rows).all()  # True when there are no indices
    message = f"{op}: indices must be in [0, batch * seqlen = {rows})"
    _check_value(in_range, message, lambda: f"{message}, got values in [{int(indices.min())}, {int(indices.max())}]")
    out = packed.new_zeros((rows, *packed.shape[1:]))
    return out.index_copy(0, indices.long(), packed).view(batch, seqlen, *packed.shape[1:])


def aot_variants():
    """Every kernel configuration the launchers above can pick (each supported head dim, each
    dtype, every row of the configuration table), all masks on (the forward at Dh 64 also under
    each other mask), with ViLT-B/32's sizes (B=32, H=12, S=185), for the sm_90a report."""
    rows, others = table_variants()
    return others[:-1] + [variant for _, variant in rows] + others[-1:]


# (label suffix, CAUSAL, HAS_KEY_MASK) of the forward variants compiled beside the default one
# (causal and key mask both on) at Dh 64, so the report can compare their hot loops.
_FORWARD_MASKS = (("nomask", False, False), ("keymask", False, True), ("causal", True, False))


def _role(pass_: str, cfg: AttentionConfig) -> dict:
    """A backward launch's role constants (DQ, and its row's tile classes); none for the forward."""
    if pass_ == "fwd":
        return {}
    return dict(DQ=pass_ == "dq", TILE_CLASSES=cfg.tile_classes, PARTIAL_PIPELINED=cfg.partial_pipelined)


def table_variants():
    """([(configuration-table row, variant)] of the attention kernels, [the other variants: the
    delta pre-pass, the keep-mask writer]): every row of _attention_configs.CONFIGS is compiled
    by at least one variant."""
    sizes = dict(heads=12, seq_q=185, seq_k=185, seq_q_a=40, seq_k_a=145, seq_q_b=145, seq_k_b=40,
                 scale_log2=0.18, scale=0.125, programs_per_head=5, rows=32 * 12 * 185,
                 delta_sb=12 * 185, delta_sh=185, delta_ss=1)
    for prefix in ("sq", "sk", "sv", "so"):
        sizes.update({f"{prefix}_b": 12 * 185 * 64, f"{prefix}_h": 64, f"{prefix}_s": 12 * 64})
        sizes.update({f"{prefix}_{axis}_{side}": value for side in "ab"
                      for axis, value in (("b", 12 * 185 * 64), ("h", 64), ("s", 12 * 64))})
    sizes.update(lse_sb=12 * 185, lse_sh=185, mask_sb=185, mask_sb_a=185, mask_sb_b=185)
    # a VLMo-style relative position bias [1, H, S, S]; dropout 0.1 where a variant has it on
    sizes.update(sb_b=0, sb_h=185 * 185, sb_m=185, sb_n=1, dropout_p=0.1, keep_scale=1 / 0.9)
    variants, rows = [], []
    cases = [(torch.bfloat16, d) for d in (32, 64, 80, 96, 128)] + [(t, d) for t in (torch.float16, torch.float32) for d in (64, 128)]
    for dtype, head_dim in cases:
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        pointers = {name: dtype for name in ("q", "k", "v", "out", "grad_out", "grad_q", "grad_k", "grad_v")}
        pointers.update(lse=torch.float32, delta=torch.float32, key_mask=torch.uint8, key_limit=torch.int32,
                        prefix_len=torch.int32, cu_q=torch.int32, cu_k=torch.int32, bias=dtype,
                        grad_bias=torch.float32, rng=torch.int64)
        for side in "ab":
            pointers.update({f"{name}_{side}": dtype for name in ("q", "k", "v", "out", "grad_out", "grad_q",
                                                                 "grad_k", "grad_v")})
            pointers.update({f"lse_{side}": torch.float32, f"delta_{side}": torch.float32,
                             f"mask_{side}": torch.uint8, f"limit_{side}": torch.int32})
        label = f"{str(dtype)[6:]}-D{head_dim}"
        variants.append(KernelVariant(kernels._attention_bwd_delta_kernel, label,
                                      dict(HEAD_DIM=head_dim, BLOCK_R=_DELTA_BLOCK_ROWS, BLOCK_D=block_d),
                                      pointers, sizes, dict(num_warps=4)))
        # the backward is two kernels' worth of launches: dK/dV and dQ (the DQ constexpr), each with its row
        for pass_, single, pair in (("fwd", kernels._attention_fwd_kernel, kernels._co_attention_fwd_kernel),
                                    ("dkdv", kernels._attention_bwd_kernel, kernels._co_attention_bwd_kernel),
                                    ("dq", kernels._attention_bwd_kernel, kernels._co_attention_bwd_kernel)):
            backward = pass_ != "fwd"
            suffix = f"-{pass_}" if backward else ""
            # fp32 runs IEEE dots by default (torch.backends.cuda.matmul.allow_tf32 is False) and tf32 when allowed.
            for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
                # the ViLT length (medium) everywhere; the other length classes at bf16 Dh 64 and 128
                lengths = [185] + ([40, 577] if dtype == torch.bfloat16 and head_dim in (64, 128) else [])
                for length in lengths:
                    key = configs.key_for(dtype, block_d, pass_, length, False, allow_tf32=precision == "tf32")
                    length_label = "" if length == 185 else f"-{key.length}"
                    if length != 185 and key.length == "any":
                        continue  # the row does not depend on the length: compiled once
                    cfg = configs.CONFIGS[key]
                    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                  DOT_PRECISION=precision)
                    name = label + ("-ieee" if precision == "ieee" else "") + length_label + suffix
                    extra = dict(HAS_BIAS=False, DROPOUT=False, **_role(pass_, cfg)) | (
                        dict(BIAS_GRAD=False) if backward else {})
                    rows.append((key, KernelVariant(single, name, dict(common, CAUSAL=True, HAS_KEY_MASK=True,
                                                                       VARLEN=False, **extra),
                                                    pointers, sizes, options, gemm_shaped=True)))
                    if head_dim == 64 and length == 185:
                        rows.append((key, KernelVariant(pair, name, dict(common, HAS_KEY_MASK=True, DROPOUT=False,
                                                                         **_role(pass_, cfg)),
                                                        pointers, sizes, options, gemm_shaped=True)))
                        if not backward and precision == "tf32":
                            # the forward under each other mask, for the report's hot-loop comparison
                            for mask_label, causal, key_mask in _FORWARD_MASKS:
                                rows.append((key, KernelVariant(single, f"{name}-{mask_label}", dict(
                                    common, CAUSAL=causal, HAS_KEY_MASK=key_mask, VARLEN=False, **extra),
                                    pointers, sizes, options, gemm_shaped=True)))
                            rows.append((key, KernelVariant(pair, f"{name}-nomask", dict(
                                common, HAS_KEY_MASK=False, DROPOUT=False), pointers, sizes, options, gemm_shaped=True)))
                # the faithful-pretraining call, bias and dropout on: their rows (or the plain one)
                if precision == "tf32" and (head_dim == 64 or (head_dim == 128 and dtype == torch.bfloat16)):
                    key = configs.key_for(dtype, block_d, pass_, 185, True, allow_tf32=True)
                    cfg = configs.CONFIGS[key]
                    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                  DOT_PRECISION=precision)
                    extra = dict(HAS_BIAS=True, DROPOUT=True, **_role(pass_, cfg)) | (
                        dict(BIAS_GRAD=pass_ == "dkdv") if backward else {})
                    rows.append((key, KernelVariant(single, label + "-bias-dropout" + suffix,
                                                    dict(common, CAUSAL=False, HAS_KEY_MASK=True, VARLEN=False,
                                                         **extra),
                                                    pointers, sizes, options, gemm_shaped=True)))
                    if head_dim == 64:  # co-attention trains with dropout too (LXMERT, ViLBERT: 0.1); no bias
                        rows.append((key, KernelVariant(pair, label + "-dropout" + suffix,
                                                        dict(common, HAS_KEY_MASK=True, DROPOUT=True,
                                                             **_role(pass_, cfg)),
                                                        pointers, sizes, options, gemm_shaped=True)))
    # the debug / test path's keep-mask writer, as _dropout_keep_mask launches it
    variants.append(KernelVariant(kernels._dropout_keep_kernel, "debug",
                                  dict(BLOCK_M=_KEEP_BLOCK_M, BLOCK_N=_KEEP_BLOCK_N),
                                  dict(rng=torch.int64, keep=torch.uint8),
                                  dict(seq_q=185, seq_k=185, dropout_p=0.1, stream=0, programs_per_head=6),
                                  dict(num_warps=4)))
    return rows, variants
