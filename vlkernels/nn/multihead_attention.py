"""MultiheadAttention: a drop-in for ``torch.nn.MultiheadAttention`` on the vlkernels attention op.

Same signature, defaults, parameters (state-dict keys) and semantics as torch's module: inputs
sequence-first unless ``batch_first``, unbatched 2-D inputs, ``key_padding_mask`` True = ignore
(or an additive float mask), ``attn_mask`` bool (True = not allowed) or float (added), 2-D
[L, S] or 3-D [N * num_heads, L, S], ``is_causal`` as torch's hint that ``attn_mask`` is the
causal mask, and the return value (attn_output, attn_weights or None).

The kernel path (:func:`vlkernels.ops.attention`) runs every call that needs nothing the
kernels lack: ``need_weights=False``, ``key_padding_mask`` None or bool, ``attn_mask`` None or
given with ``is_causal=True`` on equal query and key lengths (and then no ``add_bias_kv`` /
``add_zero_attn``); attention dropout in training runs in the kernels too (its own random
stream: the same probability, not torch's bits). Every other call runs torch's own
``F.multi_head_attention_forward`` (the math of ``nn.MultiheadAttention`` itself) and says so
once per reason (``vlkernels._coverage.record_fallback``: a warning; ``vlkernels.kernel_coverage()``
counts every such call).

A query that sees no key (all its keys padded) gets a zero attention output on the kernel path,
as torch's own ``need_weights=False`` path gives; with ``need_weights=True`` torch (and so this
module) gives NaN there.

The library's own VL form (batch first, True = a real token, causal / prefix_len, a tensor
returned) is :class:`vlkernels.nn.VLMultiheadAttention`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from vlkernels._coverage import record_fallback as _record_fallback
from vlkernels.nn._submodules import is_plain
from vlkernels.nn.attention import VLMultiheadAttention, split_heads
from vlkernels.ops import attention


def _move_once(move, query, key, value):
    """``move`` applied to query, key and value, keeping which of them are one tensor (self-attention:
    one GEMM). By identity, not id(): torch.compile would guard on each tensor's id and recompile
    for every new input."""
    moved_query = move(query)
    moved_key = moved_query if key is query else move(key)
    moved_value = moved_query if value is query else moved_key if value is key else move(value)
    return moved_query, moved_key, moved_value


def _mask_error(name: str, mask: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"MultiheadAttention: {name} must be a bool or floating tensor of shape {expected}, "
                      f"got {mask.dtype} {list(mask.shape)}")


class MultiheadAttention(VLMultiheadAttention):
    """``torch.nn.MultiheadAttention`` on the vlkernels attention op: same signature, defaults,
    parameters and state-dict keys (``in_proj_weight`` or ``q/k/v_proj_weight`` when kdim or
    vdim differ from embed_dim, ``in_proj_bias``, ``out_proj.*``, ``bias_k`` / ``bias_v`` with
    add_bias_kv), so a torch state dict loads unchanged and ``out, weights = mha(q, k, v)``
    behaves as torch's. See the module docstring for which calls run the kernels.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)
    query [L, N, E] ([N, L, E] with batch_first, [L, E] unbatched), key [S, N, kdim],
    value [S, N, vdim]; key_padding_mask [N, S] ([S] unbatched); attn_mask [L, S] or
    [N * num_heads, L, S]. attn_weights: [N, L, S] averaged over heads, [N, num_heads, L, S]
    with average_attn_weights=False (without N when unbatched).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias, dropout=dropout,
                         batch_first=batch_first, device=device, dtype=dtype)
        if add_bias_kv:  # registered after in_proj_bias: the state dict lists keys in torch's order
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, device=device, dtype=dtype))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, device=device, dtype=dtype))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn

    def extra_repr(self) -> str:
        extra = ", add_bias_kv=True" if self.bias_k is not None else ""
        extra += ", add_zero_attn=True" if self.add_zero_attn else ""
        return f"{super().extra_repr()}{extra}, batch_first={self.batch_first}"

    # -- checks ----------------------------------------------------------------------------------
    def _check(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """ValueErrors for the inputs torch's module would refuse; returns whether the call is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"MultiheadAttention: {name} must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"MultiheadAttention: query, key and value must all be 3-D (batched) or all 2-D "
                             f"(unbatched), got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"MultiheadAttention: {name}'s last dim must be {dim}, got shape {tuple(t.shape)}")
        seq_dim = 1 if batched and self.batch_first else 0
        batch = query.shape[1 - seq_dim] if batched else None
        if batched and (key.shape[1 - seq_dim] != batch or value.shape[1 - seq_dim] != batch):
            raise ValueError(f"MultiheadAttention: query, key and value must share the batch size, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"MultiheadAttention: key and value must have one length, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        tgt, src = query.shape[seq_dim], key.shape[seq_dim]
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and (not isinstance(mask, torch.Tensor) or
                                     not (mask.dtype == torch.bool or mask.is_floating_point())):
                raise TypeError(f"MultiheadAttention: {name} must be a bool or floating tensor, got "
                                f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if key_padding_mask is not None:
            expected = (batch, src) if batched else (src,)
            if tuple(key_padding_mask.shape) != expected:
                raise _mask_error("key_padding_mask", key_padding_mask, list(expected))
        if attn_mask is not None:
            stacked = (batch * self.num_heads if batched else self.num_heads, tgt, src)
            if tuple(attn_mask.shape) not in ((tgt, src), stacked):
                raise _mask_error("attn_mask", attn_mask, f"{[tgt, src]} or {list(stacked)}")
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask and "
                             "needs that attn_mask, as in torch (nn.Transformer.generate_square_subsequent_mask)")
        return batched

    def _fallback_reason(self, query, key, key_padding_mask, need_weights, attn_mask, is_causal, batched):
        """Why this call cannot run the kernels (None when it can)."""
        seq_dim = 1 if batched and self.batch_first else 0
        if need_weights:
            return "need_weights=True (the kernels do not return attention weights; pass need_weights=False)"
        if (self.bias_k is not None or self.add_zero_attn) and is_causal:
            return "add_bias_kv / add_zero_attn with is_causal (the extra keys make the mask non-square)"
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            return "a float key_padding_mask"
        if attn_mask is not None and not is_causal:
            return "an attn_mask without the is_causal hint (an arbitrary mask)"
        if is_causal and query.shape[seq_dim] != key.shape[seq_dim]:
            return "is_causal with different query and key lengths"
        if self.training and self.dropout >= 1:
            return "dropout=1 in training (every attention probability dropped)"
        return None

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = self._check(query, key, value, key_padding_mask, attn_mask, is_causal)
        reason = self._fallback_reason(query, key, key_padding_mask, need_weights, attn_mask, is_causal, batched)
        if reason is not None:
            _record_fallback("MultiheadAttention", reason)
            return self._torch_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, batched)
        # To batch-first [N, S, ...], keeping which inputs are one tensor (self-attention: one GEMM).
        if not batched:
            move = lambda t: t.unsqueeze(0)  # noqa: E731
        elif not self.batch_first:
            move = lambda t: t.transpose(0, 1)  # noqa: E731
        else:
            move = lambda t: t  # noqa: E731
        query, key, value = _move_once(move, query, key, value)
        key_mask = None
        if key_padding_mask is not None:  # torch's True = ignore -> the kernels' True = real token
            key_mask = ~(key_padding_mask if batched else key_padding_mask.unsqueeze(0))
        out = self._forward_batch_first(query, key, value, key_mask, bool(is_causal), None)
        if not batched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _forward_batch_first(self, query, key, value, key_mask, causal, prefix_len) -> torch.Tensor:
        """The VL core, with add_bias_kv's learned key/value and add_zero_attn's zero key/value
        appended to every sequence's keys (visible to every query, as in torch)."""
        if self.bias_k is None and not self.add_zero_attn:
            return super()._forward_batch_first(query, key, value, key_mask, causal, prefix_len)
        if key is query and value is query and self._qkv_same_embed_dim:
            q, k, v = self.project_qkv(query)
        else:
            q = self.project_query(query)
            k, v = self.project_key_value(key, value)
        batch = q.shape[0]
        extra_k, extra_v = [], []
        if self.bias_k is not None:  # [1, 1, E] -> [B, H, 1, Dh]
            extra_k.append(split_heads(self.bias_k.expand(batch, 1, -1), self.num_heads))
            extra_v.append(split_heads(self.bias_v.expand(batch, 1, -1), self.num_heads))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(batch, self.num_heads, 1, self.head_dim))
            extra_v.append(v.new_zeros(batch, self.num_heads, 1, self.head_dim))
        k, v = torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2)
        if key_mask is not None:
            key_mask = F.pad(key_mask, (0, len(extra_k)), value=True)
        return self.project_output(self.attend(q, k, v, key_padding_mask=key_mask, causal=causal,
                                               prefix_len=prefix_len))

    def attend(self, q, k, v, *, key_padding_mask=None, causal=False, prefix_len=None) -> torch.Tensor:
        """The attention core on [B, H, S, Dh] heads; attention dropout in training in the kernels."""
        dropout_p = float(self.dropout) if self.training else 0.0
        return attention(q, k, v, key_mask=key_padding_mask, causal=causal, prefix_len=prefix_len, dropout_p=dropout_p)

    def _torch_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                       is_causal, batched):
        """torch's own math: F.multi_head_attention_forward on sequence-first inputs. The
        in-projection is read through ``self.in_proj_weight`` (a parametrization, such as peft's
        ``target_parameters`` LoRA, applies); ``out_proj`` is read only while it is a plain Linear
        without hooks, else torch's out-projection is the identity and ``out_proj`` is called."""
        if self.batch_first and batched:
            query, key, value = _move_once(lambda t: t.transpose(0, 1), query, key, value)
        read_out_proj = is_plain(self.out_proj, nn.Linear, NonDynamicallyQuantizableLinear)
        if read_out_proj:
            out_weight, out_bias = self.out_proj.weight, self.out_proj.bias
        else:  # x @ I is exact for finite x: the heads reach out_proj unchanged
            out_weight, out_bias = torch.eye(self.embed_dim, device=query.device, dtype=query.dtype), None
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, out_weight, out_bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not read_out_proj:
            out = self.out_proj(out)
        return (out.transpose(0, 1) if self.batch_first and batched else out), weights

    # -- loading ---------------------------------------------------------------------------------
    def load_torch_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load an ``nn.MultiheadAttention`` state dict (the keys are the same; strict)."""
        return self.load_state_dict(state_dict, strict=True)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A copy of an ``nn.MultiheadAttention``: same arguments, weights, device, dtype and
        train/eval mode; it is called exactly as the original."""
        weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        copy = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                   module.bias_k is not None, module.add_zero_attn, module.kdim, module.vdim, module.batch_first,
                   device=weight.device, dtype=weight.dtype)
        copy.load_torch_state_dict(module.state_dict())
        return copy.train(module.training)
