"""Multi-head attention modules over the vlkernels attention op.

- :class:`VLMultiheadAttention`: self- or cross-attention in the library's VL form (batch first,
  key_padding_mask True = a real token, causal / prefix_len, returns the output tensor), with
  ``nn.MultiheadAttention``'s parameter names (its state dict loads unchanged); also loads
  HuggingFace BERT ``query`` / ``key`` / ``value`` / ``dense`` weights. The drop-in for
  ``nn.MultiheadAttention`` itself (its signature, mask polarity and (output, weights) return)
  is :class:`vlkernels.nn.MultiheadAttention`.
- :class:`PostLNAttention`: BERT's attention block, LayerNorm(x + Dropout(attention(x, context)))
  (HF ``BertAttention``: ``self`` + ``output``).
- :class:`PostLNFeedForward`: BERT's FFN block, LayerNorm(x + Dropout(W2 act(W1 x)))
  (HF ``BertIntermediate`` + ``BertOutput``).

Masks follow the ops: ``key_padding_mask`` is a bool [B, Sk] tensor with True = a real token
that may be attended. This is the OPPOSITE of ``nn.MultiheadAttention``'s ``key_padding_mask``
(True = ignore): pass ``~torch_mask``, or convert with :func:`real_token_mask` (which also takes
additive float masks, HF's extended [B, 1, 1, S] ones included). A query that sees no key (a fully padded sample) gets a
zero attention output, never NaN.

Attention-probability dropout (``attention_dropout``; ``dropout`` for
:class:`VLMultiheadAttention`, as in torch) runs in the attention op in training mode, as SDPA's
``dropout_p`` (the kernels draw the mask with Philox from torch's generator, so
``torch.manual_seed`` reproduces a run), dropout 1 included (every probability dropped, as
SDPA); eval passes 0.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.ops import attention, co_attention
from vlkernels.ops._checks import check_value

ACTIVATIONS = {
    "gelu": F.gelu,  # BERT / LXMERT / ViLBERT / METER "gelu": the exact erf form
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new"
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's (METER's image tower)
}


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*Dh] -> [B, H, S, Dh] (a view: the kernels read rows by stride)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, Dh] -> [B, S, H*Dh]."""
    return x.transpose(1, 2).flatten(2)


def attention_dropout_p(dropout: float, training: bool) -> float:
    """The op's ``dropout_p`` of a module with attention dropout ``dropout``: 0 in eval."""
    return float(dropout) if training else 0.0


def co_attend(q_t, k_t, v_t, q_i, k_i, v_i, *, text_mask=None, image_mask=None, dropout: float = 0.0,
              training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Both co-attention directions ([B, H, S, Dh] heads): (text queries over image keys masked
    by image_mask, image queries over text keys masked by text_mask), in one ``co_attention``
    launch with attention dropout ``dropout`` in training."""
    return co_attention(q_t, k_t, v_t, q_i, k_i, v_i, text_mask=text_mask, image_mask=image_mask,
                        dropout_p=attention_dropout_p(dropout, training))


def check_stream(module: str, name: str, x: torch.Tensor, dim: int, batch: Optional[int] = None) -> None:
    """Raise a ValueError unless x is [B, S, dim] (with B == batch when given)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{module}: {name} must be [B, S, {dim}], got {shape}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{module}: {name} has batch size {x.shape[0]}, expected {batch} (the other inputs' batch)")


def check_mask(module: str, name: str, mask: Optional[torch.Tensor], batch: int, length: int) -> None:
    """Raise a ValueError unless mask is None or a bool [batch, length] tensor (True = real token)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{module}: {name} must be a bool tensor [{batch}, {length}] with True = a real token "
                         f"(the opposite of nn.MultiheadAttention's key_padding_mask), got {got}")


def real_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """Convert another library's key padding mask to the vlkernels one, bool [B, S] with True =
    a real token: ``nn.MultiheadAttention``'s bool mask (True = ignore) is inverted; an additive
    float mask (0 = attend, -inf or a large negative such as HF's ``finfo.min`` = ignore), also
    in HF's extended [B, 1, 1, S] shape, becomes ``mask == 0``. Other additive values (biases)
    have no bool equivalent and are refused: a ValueError in strict value-check mode, else a
    RuntimeError from a device-side assert (no host read; VLKERNELS_VALUE_CHECKS /
    vlkernels.set_value_checks)."""
    if mask.dtype == torch.bool:
        return ~mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if not mask.dtype.is_floating_point or mask.dim() != 2:
        raise ValueError(f"real_token_mask: expected a bool or float [B, S] (or [B, 1, 1, S]) mask, got "
                         f"{mask.dtype} {list(mask.shape)}")
    real = mask == 0
    ignored = mask <= torch.finfo(mask.dtype).min / 2  # -inf, finfo.min and their halves
    # No host read by default (RuntimeError from a device-side assert); ValueError here in strict
    # mode (VLKERNELS_VALUE_CHECKS / vlkernels.set_value_checks, see vlkernels.ops._checks).
    check_value((real | ignored).all(), "real_token_mask: an additive mask with values other than 0 and -inf "
                "(or finfo.min) is a bias, not a padding mask")
    return real


class VLMultiheadAttention(nn.Module):
    """Multi-head self- or cross-attention on the vlkernels attention op, in the library's VL form.

    Parameters are named as in ``nn.MultiheadAttention``: ``in_proj_weight`` [3D, D] (q, k, v
    rows in that order) and ``in_proj_bias`` [3D] when kdim == vdim == embed_dim, else
    ``q_proj_weight`` [D, D], ``k_proj_weight`` [D, kdim], ``v_proj_weight`` [D, vdim] (and
    ``in_proj_bias``); ``out_proj`` (Linear D -> D). A torch state dict loads unchanged.

    Self-attention (key and value omitted or the query itself) projects q, k and v in one GEMM
    over ``in_proj_weight``; cross-attention projects q with its first D rows and k, v (when
    key is value) in one GEMM over the other 2D rows.

    forward(query [B, Sq, D], key [B, Sk, kdim] = query, value [B, Sk, vdim] = key, *,
            key_padding_mask [B, Sk] bool, causal, prefix_len) -> [B, Sq, D]
    (with ``batch_first=False`` the inputs and output are [S, B, ...]; the mask stays [B, Sk]).

    key_padding_mask: True = a REAL token (the ops' convention), the opposite of
    ``nn.MultiheadAttention``, whose True means "ignore": pass ``~torch_mask`` or
    ``real_token_mask(torch_mask)`` (which also takes additive float masks).
    causal / prefix_len: as in :func:`vlkernels.ops.attention` (self-attention lengths only).
    dropout: attention-probability dropout, in the attention op in training (see the module
    docstring). Unlike ``nn.MultiheadAttention`` this returns only
    the output, never the attention weights; :class:`vlkernels.nn.MultiheadAttention` is the
    drop-in with torch's signature and semantics.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: Optional[int] = None, vdim: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"{type(self).__name__}: embed_dim ({embed_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1], got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform projections, zero biases."""
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        dims = "" if self._qkv_same_embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{dims}, dropout={self.dropout}"

    # -- projections (also used by the co-attention layers) --------------------------------------
    def _bias(self, part: int) -> Optional[torch.Tensor]:
        d = self.embed_dim
        return None if self.in_proj_bias is None else self.in_proj_bias[part * d:(part + 1) * d]

    def _weight(self, part: int) -> torch.Tensor:
        if not self._qkv_same_embed_dim:
            return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[part]
        return self.in_proj_weight[part * self.embed_dim:(part + 1) * self.embed_dim]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections in one GEMM: x [B, S, D] -> q, k, v [B, H, S, Dh]."""
        if not self._qkv_same_embed_dim:
            return self.project_query(x), *self.project_key_value(x, x)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, S, 3D], q | k | v
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def project_query(self, query: torch.Tensor) -> torch.Tensor:
        """query [B, Sq, D] -> [B, H, Sq, Dh]."""
        return split_heads(F.linear(query, self._weight(0), self._bias(0)), self.num_heads)

    def project_key_value(self, key: torch.Tensor, value: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """key [B, Sk, kdim], value [B, Sk, vdim] (default: key) -> k, v [B, H, Sk, Dh]; one GEMM
        over the k and v rows of in_proj_weight when value is key."""
        if value is None or (value is key and self._qkv_same_embed_dim):
            d = self.embed_dim
            bias = None if self.in_proj_bias is None else self.in_proj_bias[d:]
            if self._qkv_same_embed_dim:
                kv = F.linear(key, self.in_proj_weight[d:], bias)  # [B, Sk, 2D], k | v
                k, v = kv.unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2)
                return k.transpose(1, 2), v.transpose(1, 2)
            value = key
        return (split_heads(F.linear(key, self._weight(1), self._bias(1)), self.num_heads),
                split_heads(F.linear(value, self._weight(2), self._bias(2)), self.num_heads))

    def project_output(self, heads: torch.Tensor) -> torch.Tensor:
        """Attention output heads [B, H, Sq, Dh] -> out_proj(merged) [B, Sq, D]."""
        return self.out_proj(merge_heads(heads))

    def attend(self, q, k, v, *, key_padding_mask=None, causal=False, prefix_len=None) -> torch.Tensor:
        """The attention core on [B, H, S, Dh] heads, with this module's dropout in training (in
        the op)."""
        return attention(q, k, v, key_mask=key_padding_mask, causal=causal, prefix_len=prefix_len,
                         dropout_p=attention_dropout_p(self.dropout, self.training))

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                prefix_len: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """query [B, Sq, D], key [B, Sk, kdim] (default query), value [B, Sk, vdim] (default key),
        key_padding_mask [B, Sk] bool True = real token -> [B, Sq, D] ([S, B, ...] when not batch_first)."""
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:  # [S, B, ...] -> [B, S, ...], keeping which inputs are the same tensor
            inputs = {id(t): t.transpose(0, 1) for t in (query, key, value)}
            query, key, value = inputs[id(query)], inputs[id(key)], inputs[id(value)]
        name = type(self).__name__
        check_stream(name, "query", query, self.embed_dim)
        check_stream(name, "key", key, self.kdim, query.shape[0])
        check_stream(name, "value", value, self.vdim, query.shape[0])
        if value.shape[1] != key.shape[1]:
            raise ValueError(f"{name}: key and value must have one length, got {key.shape[1]} and {value.shape[1]}")
        check_mask(name, "key_padding_mask", key_padding_mask, query.shape[0], key.shape[1])
        out = self._forward_batch_first(query, key, value, key_padding_mask, causal, prefix_len)
        return out if self.batch_first else out.transpose(0, 1)

    def _forward_batch_first(self, query, key, value, key_mask, causal, prefix_len) -> torch.Tensor:
        """Projections, attention and out_proj on checked batch-first inputs ([B, S, ...]; key_mask
        True = real token); one fused q|k|v GEMM when query, key and value are one tensor."""
        if key is query and value is query and self._qkv_same_embed_dim:
            q, k, v = self.project_qkv(query)
        else:
            q = self.project_query(query)
            k, v = self.project_key_value(key, value)
        return self.project_output(self.attend(q, k, v, key_padding_mask=key_mask, causal=causal,
                                               prefix_len=prefix_len))

    # -- loading ---------------------------------------------------------------------------------
    def load_torch_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load an ``nn.MultiheadAttention`` state dict (the names are the same; strict)."""
        extra = [name for name in ("bias_k", "bias_v") if state_dict.get(name) is not None]
        if extra:
            raise ValueError(f"VLMultiheadAttention: {', '.join(extra)} (add_bias_kv) is not supported; "
                             "vlkernels.nn.MultiheadAttention takes it")
        return self.load_state_dict(state_dict, strict=True)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "VLMultiheadAttention":
        """A copy of an ``nn.MultiheadAttention`` (same weights, dropout, batch_first, device,
        dtype, train/eval mode). Its key_padding_mask True = ignore; this module's True = real
        token: call the copy with ``key_padding_mask=~mask``."""
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("VLMultiheadAttention.from_torch: add_bias_kv and add_zero_attn are not supported; "
                             "vlkernels.nn.MultiheadAttention.from_torch takes them")
        weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        copy = cls(module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim,
                   bias=module.in_proj_bias is not None, dropout=module.dropout, batch_first=module.batch_first,
                   device=weight.device, dtype=weight.dtype)
        copy.load_torch_state_dict(module.state_dict())
        return copy.train(module.training)

    @classmethod
    def from_hf_bert(cls, self_attention: nn.Module, output_dense: nn.Linear) -> "VLMultiheadAttention":
        """From a HuggingFace BERT-style attention: ``self_attention`` has ``query``, ``key``,
        ``value`` Linears (``BertSelfAttention``, ``LxmertAttention``, ...) and ``output_dense``
        is the following ``BertSelfOutput.dense``. Dropout from ``self_attention.dropout``."""
        query, key, value = self_attention.query, self_attention.key, self_attention.value
        heads = getattr(self_attention, "num_attention_heads")
        dropout = self_attention.dropout.p if isinstance(getattr(self_attention, "dropout", None), nn.Dropout) else 0.0
        if query.out_features != query.in_features or output_dense.in_features != query.out_features or \
                output_dense.out_features != query.in_features:
            raise ValueError(f"{cls.__name__}.from_hf_bert: query must map D -> D and output_dense D -> D")
        copy = cls(query.in_features, heads, kdim=key.in_features, vdim=value.in_features,
                   bias=query.bias is not None, dropout=dropout, device=query.weight.device, dtype=query.weight.dtype)
        state = {f"{name}.{part}": getattr(layer, part) for name, layer in
                 (("query", query), ("key", key), ("value", value)) for part in ("weight", "bias")}
        state.update({"dense.weight": output_dense.weight, "dense.bias": output_dense.bias})
        copy.load_state_dict(convert_hf_attention(state, "", "dense.", ""), strict=True)
        return copy.train(self_attention.training)


class PostLNAttention(nn.Module):
    """BERT's post-LN attention block (HF ``BertAttention``, LXMERT's ``BertAttOutput`` pair):

        out = norm(x + dropout(attention(x, context)))

    forward(x [B, Sq, D], context [B, Sk, D] (default x: self-attention), *,
            key_padding_mask [B, Sk] bool True = real token, causal, prefix_len) -> [B, Sq, D]

    Submodules: ``attention`` (:class:`VLMultiheadAttention`), ``dropout`` (hidden dropout),
    ``norm`` (LayerNorm, eps 1e-12 as BERT). ``attention_dropout`` is applied to the
    probabilities in training (in the attention op, see the module docstring).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, attention_dropout: float = 0.0,
                 layer_norm_eps: float = 1e-12, device=None, dtype=None) -> None:
        super().__init__()
        self.attention = VLMultiheadAttention(embed_dim, num_heads, dropout=attention_dropout, device=device,
                                              dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, device=device, dtype=dtype)

    def residual_output(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """norm(x + dropout(out_proj(heads))): x [B, Sq, D], heads [B, H, Sq, Dh] -> [B, Sq, D]."""
        return self.norm(x + self.dropout(self.attention.project_output(heads)))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *,
                key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                prefix_len: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        return self.norm(x + self.dropout(self.attention(x, context, key_padding_mask=key_padding_mask,
                                                         causal=causal, prefix_len=prefix_len)))

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load the state dict of an HF ``BertAttention`` (``self.query.*`` ... ``output.dense.*``,
        ``output.LayerNorm.*``) or LXMERT's ``LxmertCrossAttentionLayer`` (``att.query.*`` ...)."""
        return self.load_state_dict(convert_strictly(state_dict, lambda sd: convert_hf_attention(
            sd, _inner_prefix(sd, ""), "output.dense.", "attention.", norm_prefix="output.LayerNorm."),
            where="PostLNAttention.load_hf_state_dict"), strict=True)

    @classmethod
    def from_hf_bert(cls, module: nn.Module) -> "PostLNAttention":
        """From an HF ``BertAttention`` / ``LxmertSelfAttentionLayer`` / ``LxmertCrossAttentionLayer``."""
        inner = module.self if hasattr(module, "self") else module.att
        weight = inner.query.weight
        copy = cls(inner.query.in_features, inner.num_attention_heads, dropout=module.output.dropout.p,
                   attention_dropout=inner.dropout.p, layer_norm_eps=module.output.LayerNorm.eps,
                   device=weight.device, dtype=weight.dtype)
        copy.load_hf_state_dict(module.state_dict())
        return copy.train(module.training)


class PostLNFeedForward(nn.Module):
    """BERT's post-LN feed-forward block (HF ``BertIntermediate`` + ``BertOutput``):

        out = norm(x + dropout(output(act(intermediate(x)))))

    forward(x [B, S, D]) -> [B, S, D]; intermediate: Linear D -> F, output: Linear F -> D.
    activation: "gelu" (exact, BERT's), "gelu_tanh" or "relu".
    """

    def __init__(self, embed_dim: int, intermediate_dim: int, *, dropout: float = 0.0, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12, device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"PostLNFeedForward: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        factory = dict(device=device, dtype=dtype)
        self.activation = activation
        self.intermediate = nn.Linear(embed_dim, intermediate_dim, **factory)
        self.output = nn.Linear(intermediate_dim, embed_dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ACTIVATIONS[self.activation](self.intermediate(x))
        return self.norm(x + self.dropout(self.output(hidden)))

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], intermediate_prefix: str = "intermediate.",
                           output_prefix: str = "output."):
        """Load HF ``{intermediate_prefix}dense.*``, ``{output_prefix}dense.*``, ``{output_prefix}LayerNorm.*``."""
        return self.load_state_dict(convert_hf_feed_forward(state_dict, intermediate_prefix, output_prefix, ""),
                                    strict=True)

    @classmethod
    def from_hf_bert(cls, intermediate: nn.Module, output: nn.Module) -> "PostLNFeedForward":
        """From HF ``BertIntermediate`` (``dense``, ``intermediate_act_fn``) and ``BertOutput``
        (``dense``, ``LayerNorm``, ``dropout``)."""
        weight = intermediate.dense.weight
        copy = cls(intermediate.dense.in_features, intermediate.dense.out_features, dropout=output.dropout.p,
                   activation=activation_name(intermediate.intermediate_act_fn), layer_norm_eps=output.LayerNorm.eps,
                   device=weight.device, dtype=weight.dtype)
        state = {**{f"intermediate.{k}": v for k, v in intermediate.state_dict().items()},
                 **{f"output.{k}": v for k, v in output.state_dict().items()}}
        copy.load_hf_state_dict(state)
        return copy.train(output.training)


# -- HuggingFace key mapping ------------------------------------------------------------------------
class _RecordingMapping(Mapping):
    """A read-only view of a state dict that records which keys were read."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict, self.read = state_dict, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.state_dict[key]
        self.read.add(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.state_dict

    def __iter__(self):
        return iter(self.state_dict)

    def __len__(self) -> int:
        return len(self.state_dict)


def convert_strictly(state_dict: Mapping[str, torch.Tensor], convert, *, ignore=(), where: str = "") -> dict:
    """Run ``convert(state_dict)`` and raise a ValueError naming every source key it did not use
    (except those starting with a prefix in ``ignore``): a checkpoint of another layout must
    not load half-way."""
    recording = _RecordingMapping(state_dict)
    out = convert(recording)
    unused = sorted(k for k in state_dict if k not in recording.read and not k.startswith(tuple(ignore)))
    if unused:
        raise ValueError(f"{where}: unexpected keys in the source state dict: {', '.join(unused)}")
    return out


def activation_name(function) -> str:
    """The ACTIVATIONS name of an activation callable/module (HF ACT2FN entries included),
    found by evaluating it on probe points; a ValueError when none matches."""
    probe = torch.linspace(-4, 4, 33, dtype=torch.float64)
    with torch.no_grad():
        result = function(probe)
    for name, candidate in ACTIVATIONS.items():
        if torch.allclose(result, candidate(probe), rtol=1e-9, atol=1e-12):
            return name
    raise ValueError(f"unsupported activation {function!r}: expected one of {sorted(ACTIVATIONS)}")


def _inner_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> str:
    """HF names the q/k/v holder ``self`` (BertAttention) or ``att`` (LXMERT's cross-attention)."""
    for inner in ("self.", "att."):
        if f"{prefix}{inner}query.weight" in state_dict:
            return prefix + inner
    raise KeyError(f"no {prefix}self.query.weight or {prefix}att.query.weight in the state dict")


def convert_hf_attention(state_dict: Mapping[str, torch.Tensor], qkv_prefix: str, dense_prefix: str,
                         target_prefix: str, *, norm_prefix: Optional[str] = None,
                         norm_target: str = "norm.") -> dict[str, torch.Tensor]:
    """Map HF ``{qkv_prefix}{query,key,value}.{weight,bias}`` and ``{dense_prefix}{weight,bias}``
    to :class:`VLMultiheadAttention` keys under ``target_prefix`` (q, k, v weights concatenated
    into ``in_proj_weight`` when they share one input width, else ``{q,k,v}_proj_weight``);
    with ``norm_prefix`` also its LayerNorm to ``{target_prefix minus 'attention.'}{norm_target}``."""
    weights = [state_dict[f"{qkv_prefix}{name}.weight"] for name in ("query", "key", "value")]
    biases = [state_dict.get(f"{qkv_prefix}{name}.bias") for name in ("query", "key", "value")]
    out = {}
    if all(w.shape == weights[0].shape for w in weights) and weights[0].shape[0] == weights[0].shape[1]:
        out[f"{target_prefix}in_proj_weight"] = torch.cat(weights)
    else:
        for name, weight in zip("qkv", weights):
            out[f"{target_prefix}{name}_proj_weight"] = weight
    if biases[0] is not None:
        out[f"{target_prefix}in_proj_bias"] = torch.cat(biases)
    out[f"{target_prefix}out_proj.weight"] = state_dict[f"{dense_prefix}weight"]
    if f"{dense_prefix}bias" in state_dict:
        out[f"{target_prefix}out_proj.bias"] = state_dict[f"{dense_prefix}bias"]
    if norm_prefix is not None:
        block = target_prefix[:-len("attention.")] if target_prefix.endswith("attention.") else target_prefix
        out[f"{block}{norm_target}weight"] = state_dict[f"{norm_prefix}weight"]
        out[f"{block}{norm_target}bias"] = state_dict[f"{norm_prefix}bias"]
    return out


def convert_hf_feed_forward(state_dict: Mapping[str, torch.Tensor], intermediate_prefix: str, output_prefix: str,
                            target_prefix: str) -> dict[str, torch.Tensor]:
    """Map HF ``{intermediate_prefix}dense.*``, ``{output_prefix}dense.*`` and
    ``{output_prefix}LayerNorm.*`` to :class:`PostLNFeedForward` keys under ``target_prefix``."""
    out = {}
    for source, target in ((f"{intermediate_prefix}dense.", "intermediate."), (f"{output_prefix}dense.", "output."),
                           (f"{output_prefix}LayerNorm.", "norm.")):
        for part in ("weight", "bias"):
            out[f"{target_prefix}{target}{part}"] = state_dict[f"{source}{part}"]
    return out
