"""MoMEFFN: VLMo's mixture-of-modality-experts feed-forward (per-expert pre-LayerNorm + MLP) on
the fused mome_ffn op, with VLMo's parameter names so its checkpoints load unchanged.

State-dict mapping (VLMo multiway_transformer.Block -> this module, same keys):
  norm2_text.{weight,bias}, norm2_imag.*, norm2_vl.*          nn.LayerNorm(D, eps=1e-6)
  mlp_text.fc1.{weight [F, D], bias [F]}, mlp_text.fc2.{weight [D, F], bias [D]}, mlp_imag.*, mlp_vl.*
Expert names -> key suffixes: "text" -> text, "image" -> imag, "vl" -> vl (others: the name).
The op's w1 [E, D, F] is torch.stack([mlp.fc1.weight, ...]).transpose(1, 2): a strided view the
kernels read in place (one stack copy per forward, through which autograd reaches the
nn.Linear parameters); w2 [E, F, D] likewise from fc2.weight. The stacks' backward gives each
parameter a gradient of its own storage (torch.stack's backward hands out views of one tensor,
which would leave the experts' .grad sharing storage). Dropout in VLMo's Mlp is 0 in
its configs and is not implemented here.

Wrapped submodules: the fused op reads the experts' weights only while every fc1/fc2 is a
plain nn.Linear or peft's LoRA Linear over one (``lora_weight``: base weight + B @ A * scaling,
one small GEMM per expert beside the fused ones, so a LoRA fine-tune keeps the kernel; LoRA
dropout, DoRA and LoRA biases excepted), every norm a plain nn.LayerNorm and every Mlp a plain
Mlp, all without hooks (``is_plain``); otherwise MoMEFFN calls the experts' submodules
(``record_fallback`` says so once), so an adapter's update is never skipped. VLMoAttention calls a wrapped ``qkv`` and adds q_bias / v_bias beside it: the
attention kernel still runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels._coverage import record_fallback
from vlkernels.nn._submodules import is_plain
from vlkernels.nn.transformer import Mlp
from vlkernels.ops._checks import check_value
from vlkernels.ops.attention import attention
from vlkernels.ops.mome_ffn import mome_ffn

_SUFFIX = {"text": "text", "image": "imag", "vl": "vl"}


class _StackOwnGrads(torch.autograd.Function):
    """torch.stack(tensors) whose backward gives every input a gradient that owns its storage.

    torch.stack's backward is grad.unbind(0): views of one tensor, which AccumulateGrad keeps
    as they are, so the experts' parameters would end up with .grad sharing one storage. One
    clone per parameter gradient (small next to the GEMMs) keeps every .grad independent."""

    @staticmethod
    def forward(*tensors):
        return torch.stack(tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return tuple(g.clone() if need else None for g, need in zip(grad.unbind(0), ctx.needs_input_grad))


def _stack(tensors) -> torch.Tensor:
    return _StackOwnGrads.apply(*tensors)


def lora_weight(linear: nn.Module) -> Optional[torch.Tensor]:
    """The effective weight of ``linear`` for a fused kernel: its own weight when it is a plain
    nn.Linear; base weight + each active adapter's delta (B @ A * scaling, one small GEMM that
    autograd follows back to the adapter) when it is peft's LoRA ``Linear`` over a plain
    nn.Linear, unmerged, without dropout, DoRA or a LoRA bias; None for anything else (the
    caller then calls the module)."""
    if is_plain(linear, nn.Linear):
        return linear.weight
    kind = type(linear)
    if not (kind.__name__ == "Linear" and kind.__module__.startswith("peft.tuners.lora") and is_plain(linear, kind)):
        return None
    base = getattr(linear, "base_layer", None)
    adapters = list(getattr(linear, "active_adapters", ()))
    if base is None or not is_plain(base, nn.Linear) or linear.merged or linear.disable_adapters:
        return None
    weight = base.weight
    for name in adapters:
        if name not in linear.lora_A:
            continue
        if (linear.use_dora.get(name) or linear.lora_bias.get(name)
                or not isinstance(linear.lora_dropout[name], nn.Identity)):
            return None
        weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


def _linear_bias(linear: nn.Module) -> Optional[torch.Tensor]:
    return getattr(linear, "base_layer", linear).bias


class MoMEFFN(nn.Module):
    """Per-token expert FFN of VLMo: out[t] = mlp_e(norm2_e(x[t])) for the expert e of token t
    (the residual and LayerScale stay outside, as in VLMo's Block).

    forward(x [B, S, D], expert_index [B, S] int = None, *, modality_type=None, text_len=None) -> [B, S, D]
      expert_index: per-token positions in ``experts``; or
      modality_type: an expert name ("text", "image", "vl"): every token to it (VLMo's
        text-only / image-only passes); or None (VLMo's joint input): every token to "vl" when
        this module has a "vl" expert (VLMo's top layers), else tokens [0, text_len) to "text"
        and the rest to "image" (the segments fast path: no sort).
    """

    def __init__(self, dim: int, hidden_dim: int, experts: Sequence[str] = ("text", "image", "vl"), *,
                 eps: float = 1e-6, activation: str = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        if len(set(experts)) != len(experts) or not experts:
            raise ValueError(f"MoMEFFN: experts must be distinct names, got {experts}")
        self.dim, self.hidden_dim, self.experts = dim, hidden_dim, tuple(experts)
        self.eps, self.activation = eps, activation
        for name in self.experts:
            suffix = _SUFFIX.get(name, name)
            self.add_module(f"norm2_{suffix}", nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype))
            self.add_module(f"mlp_{suffix}", Mlp(dim, hidden_dim, device=device, dtype=dtype))

    def norm(self, name: str) -> nn.LayerNorm:
        return getattr(self, f"norm2_{_SUFFIX.get(name, name)}")

    def mlp(self, name: str) -> Mlp:
        return getattr(self, f"mlp_{_SUFFIX.get(name, name)}")

    def _expert(self, name: str) -> int:
        if name not in self.experts:
            raise ValueError(f"MoMEFFN: no expert {name!r}; this module has {self.experts}")
        return self.experts.index(name)

    def _wrapped(self, mlps, norms) -> Optional[str]:
        """Why the fused op cannot run these experts (a wrapped or hooked submodule), or None."""
        for mlp, norm in zip(mlps, norms):
            if not is_plain(norm, nn.LayerNorm):
                return "a LayerNorm expert is wrapped or hooked"
            if not (is_plain(mlp, Mlp) and mlp.activation == self.activation and mlp.dropout.p == 0):
                return "an expert's Mlp is wrapped or hooked"
        return None

    def _call_experts(self, x, expert_index, mlps, norms, segments):
        """What the op computes, by calling each expert's norm and Mlp (every expert over every
        token, the token's own expert's output kept): the path for wrapped submodules."""
        if expert_index is None:
            if segments == (0, 0, 0):
                return mlps[0](norms[0](x))
            text_len = segments[0]
            if isinstance(text_len, bool) or not isinstance(text_len, (int, torch.SymInt)):
                raise ValueError(f"MoMEFFN: text_len must be an int, got {type(text_len).__name__}")
            expert_index = (torch.arange(x.shape[1], device=x.device) >= text_len).long().expand(x.shape[:2])
        elif expert_index.shape != x.shape[:2] or expert_index.is_floating_point():
            raise ValueError(f"MoMEFFN: expert_index must be an integer [B, S] = {list(x.shape[:2])} tensor, "
                             f"got {expert_index.dtype} {list(expert_index.shape)}")
        else:
            check_value(((expert_index >= 0) & (expert_index < len(mlps))).all(),
                        f"MoMEFFN: expert_index must lie in [0, {len(mlps)})", IndexError)
        out = None
        for e, (mlp, norm) in enumerate(zip(mlps, norms)):
            y = mlp(norm(x))
            out = y if out is None else torch.where((expert_index == e)[..., None], y, out)
        return out

    def _run(self, x, expert_index, names, segments=None):
        """The op over the experts ``names`` only (a single-expert pass stacks one expert's weights)."""
        mlps, norms = [self.mlp(n) for n in names], [self.norm(n) for n in names]
        why = self._wrapped(mlps, norms)
        fc1, fc2 = [lora_weight(m.fc1) for m in mlps], [lora_weight(m.fc2) for m in mlps]
        if why is None and any(w is None for w in fc1 + fc2):
            why = "an expert's fc1/fc2 is wrapped (other than a plain LoRA) or hooked"
        if why is not None:
            record_fallback("MoMEFFN", why)
            return self._call_experts(x, expert_index, mlps, norms, segments)
        w1 = _stack(fc1).transpose(1, 2)
        w2 = _stack(fc2).transpose(1, 2)
        b1 = _stack([_linear_bias(m.fc1) for m in mlps])
        b2 = _stack([_linear_bias(m.fc2) for m in mlps])
        ln_weight = _stack([n.weight for n in norms])
        ln_bias = _stack([n.bias for n in norms])
        return mome_ffn(x, expert_index, w1, b1, w2, b2, activation=self.activation, ln_weight=ln_weight,
                        ln_bias=ln_bias, eps=self.eps, segments=segments)

    def forward(self, x: torch.Tensor, expert_index: Optional[torch.Tensor] = None, *,
                modality_type: Optional[str] = None, text_len: Optional[int] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoMEFFN: x must be [B, S, {self.dim}], got {tuple(x.shape)}")
        if expert_index is not None:
            if modality_type is not None or text_len is not None:
                raise ValueError("MoMEFFN: give expert_index or modality_type/text_len, not both")
            return self._run(x, expert_index, self.experts)
        if modality_type is None and "vl" in self.experts:
            modality_type = "vl"
        if modality_type is not None:
            self._expert(modality_type)
            return self._run(x, None, (modality_type,), segments=(0, 0, 0))
        if text_len is None:
            raise ValueError("MoMEFFN: a joint input without a 'vl' expert needs text_len (VLMo's max_text_len)")
        self._expert("text"), self._expert("image")
        # text_len goes to the op as given: it refuses a float or a bool rather than truncating it.
        return self._run(x, None, ("text", "image"), segments=(text_len, 0, 1))


class VLMoAttention(nn.Module):
    """VLMo's shared self-attention: one bias-free qkv Linear plus ``q_bias`` and ``v_bias`` (k has
    none), then ``proj`` (keys ``qkv.weight``, ``q_bias``, ``v_bias``, ``proj.*`` as in VLMo).

    forward(x [B, S, D], mask [B, S] bool (True = real token) = None,
            relative_position_bias [H, S, S] = None) -> [B, S, D]
    The relative position bias is the attention op's additive bias (on the kernels either way).
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"VLMoAttention: dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.q_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                relative_position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        if is_plain(self.qkv, nn.Linear):
            qkv = F.linear(x, self.qkv.weight, bias)
        else:  # a wrapped qkv (LoRA, say) is called, so its update reaches the attention kernel
            qkv = self.qkv(x) if bias is None else self.qkv(x) + bias
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        # The relative position bias [H, S, S] is the op's additive bias (broadcast over the
        # batch; its gradient comes back summed over it, so the bias table trains).
        out = attention(q, k, v, key_mask=mask, bias=relative_position_bias)
        return self.proj(out.transpose(1, 2).flatten(2))


class MoMEBlock(nn.Module):
    """VLMo's Transformer block: pre-LN shared attention and per-modality expert FFNs, each
    branch scaled by LayerScale (gamma init 0.1):

        x = x + gamma_1 * attn(norm1(x), mask)
        x = x + gamma_2 * MoMEFFN(x, modality_type / text_len)

    State dict: VLMo's Block keys (norm1.*, attn.qkv.weight, attn.q_bias, attn.v_bias,
    attn.proj.*, gamma_1, gamma_2, norm2_{text,imag[,vl]}.*, mlp_{text,imag[,vl]}.fc{1,2}.*).
    ``with_vlffn`` adds the vision-language expert (VLMo's top layers).

    forward(x [B, S, D], mask [B, S] bool = None, modality_type "text" | "image" | None,
            relative_position_bias [H, S, S] = None) -> [B, S, D]; modality_type None is the
    joint input: the first ``max_text_len`` tokens go to the text expert and the rest to the
    image expert, or all to the vl expert when the block has one.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 with_vlffn: bool = False, layer_scale_init_values: float = 0.1, max_text_len: int = 40,
                 eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.max_text_len = max_text_len
        self.norm1 = nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
        self.attn = VLMoAttention(dim, heads, qkv_bias=qkv_bias, device=device, dtype=dtype)
        self.gamma_1 = nn.Parameter(layer_scale_init_values * torch.ones(dim, device=device, dtype=dtype))
        self.gamma_2 = nn.Parameter(layer_scale_init_values * torch.ones(dim, device=device, dtype=dtype))
        experts = ("text", "image", "vl") if with_vlffn else ("text", "image")
        self.ffn = MoMEFFN(dim, int(dim * mlp_ratio), experts, eps=eps, device=device, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # VLMo keeps the experts' norm2_* / mlp_* at the block's top level: read them into ffn.
        for key in [k for k in state_dict if k.startswith((prefix + "norm2_", prefix + "mlp_"))]:
            state_dict[prefix + "ffn." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, modality_type: Optional[str] = None,
                relative_position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), mask, relative_position_bias)
        return x + self.gamma_2 * self.ffn(x, modality_type=modality_type,
                                           text_len=None if modality_type else self.max_text_len)
