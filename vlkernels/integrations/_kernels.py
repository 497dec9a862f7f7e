"""Adapters from HF modules to the vlkernels ops, shared by the model families.

Each adapter either computes exactly what the HF module computes (to fp32 rounding) through
``vlkernels.ops.attention`` / ``vlkernels.ops.patch_embed``, or says that it cannot, and the
kernel forward then runs the HF forward for that call, with a warning (once per module class
and reason) through :func:`fallback`. The ops are looked up on ``vlkernels.ops`` at call time,
so the backend choice (``vlkernels.use_backend``) applies.

Every choice between kernel and HF forward is made from what needs no data: flags, shapes,
dtypes. HF's attention masks go to the kernel as its additive bias, whatever their values, so no
value is read on the host and a patched forward compiles into as many graphs as the HF one,
and with ``fullgraph=True``.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Optional

import torch
from torch import nn

from vlkernels import ops
from vlkernels.integrations._patching import Patch, kernel_forward, original_forward, output_capture_active
from vlkernels.nn._submodules import is_plain
from vlkernels.ops._checks import compiling

# kernel_coverage() counts the fallbacks, and warns once per reason with the library's FallbackWarning
from vlkernels._coverage import FallbackWarning, record_fallback as _record_fallback

# (module class name, reason) pairs already warned about (reasons name no sizes, so this stays small).
_WARNED: set = set()


def fallback(module: nn.Module, reason: str) -> None:
    """Say that ``module``'s kernel forward runs the HF forward for this call because of
    ``reason``, once per module class and reason: through ``vlkernels._coverage.record_fallback``
    (which ``vlkernels.kernel_coverage()`` counts) where the library has it, else a
    :class:`FallbackWarning`. Nothing while torch.compile traces (a warning would break the graph;
    the eager calls report it)."""
    if compiling():
        return
    name = type(module).__name__
    if _record_fallback is not None:
        _record_fallback(f"integrations.{name}", reason)
        return
    if (name, reason) in _WARNED:
        return
    _WARNED.add((name, reason))
    warnings.warn(f"vlkernels: {name} runs the HuggingFace forward instead of the vlkernels kernel when "
                  f"{reason}", FallbackWarning, stacklevel=3)


def hf_attention_bias(mask: Optional[torch.Tensor], batch: int, heads: int, seq_q: int, seq_k: int,
                      dtype: torch.dtype):
    """An HF attention mask as ``ops.attention``'s additive bias: ``(bias, None)`` or ``(None, reason)``.

    mask: None; HF's additive float mask (0 = attend, finfo.min or -inf = ignore, or any other
        additive values: a bias, causal or per-head masks) or HF's bool mask for SDPA (True =
        attend), 4-D and broadcastable to [B, H, Sq, Sk] ([B, 1, 1, Sk] extended, [B, 1, Sq, Sk]
        expanded over the queries, ...).
    dtype: the queries' dtype (a bool mask becomes a bias of it).
    returns bias: the same mask as a float tensor of the mask's shape (None for no mask), its
        large negatives clamped to finfo.min / 4 so that the kernel's scaled scores stay finite:
        a key HF ignores still gets probability 0, and a sample whose keys are all ignored gets
        HF's uniform attention over them (with -inf or an all-False bool mask, where HF returns
        NaN, the same uniform attention); or reason: why the kernel cannot take the mask (not a
        4-D tensor broadcastable to [B, H, Sq, Sk], or an integer dtype), decided from the shape
        and dtype alone: no value is read, and no value is refused.
    """
    if mask is None:
        return None, None
    target = (batch, heads, seq_q, seq_k)
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 4
            or any(size not in (1, want) for size, want in zip(mask.shape, target))):
        # no sizes in a reason: the warn-once records stay as small as the set of reasons
        return None, "the attention mask is not a 4-D tensor broadcastable to [B, H, Sq, Sk]"
    if mask.dtype == torch.bool:
        floor = torch.finfo(dtype).min / 4
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, floor), None
    if not mask.dtype.is_floating_point:
        return None, f"the attention mask has dtype {mask.dtype} (neither bool nor an additive float mask)"
    return mask.clamp(min=torch.finfo(mask.dtype).min / 4), None


def attention_dropout_p(module: nn.Module, p: float) -> float:
    """The attention-probability dropout of ``module`` now: ``p`` in training mode, else 0."""
    return float(p) if module.training else 0.0


def bert_style_attention(module: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention of HF's BERT-family modules (``query``/``key``/``value`` Linears,
    ``attention_head_size``, ``dropout``) on the vlkernels op.

    hidden_states: [B, Sq, D] (queries), context: [B, Sk, Dc] (keys and values; the hidden
    states themselves for self-attention), bias: from :func:`hf_attention_bias`, or None
    returns the context layer [B, Sq, H*Dh], heads concatenated as HF does. Attention dropout
    runs in the kernel (its own random draws: the same distribution as HF's, not HF's draws).
    """
    head_dim = module.attention_head_size

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, H*Dh] -> [B, H, S, Dh], a view
        return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)

    q = heads(module.query(hidden_states))
    k = heads(module.key(context))
    v = heads(module.value(context))
    # HF divides the scores by sqrt(Dh); the kernel multiplies by this scale (equal to fp32 rounding).
    out = ops.attention(q, k, v, bias=bias, scale=1.0 / math.sqrt(head_dim),
                        dropout_p=attention_dropout_p(module, module.dropout.p))
    return out.transpose(1, 2).flatten(2)


def bert_attention_or_reason(module: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                             attention_mask, output_attentions: bool, head_mask=None):
    """The kernel result ``(context layer,)`` of a BERT-family attention call, or the reason
    (a str) why the HF forward must run it."""
    if output_attentions or output_capture_active(module):
        return "the attention probabilities are requested (output_attentions)"
    if head_mask is not None:
        return "a head_mask is given"
    bias, reason = hf_attention_bias(attention_mask, hidden_states.shape[0], module.num_attention_heads,
                                     hidden_states.shape[1], context.shape[1], hidden_states.dtype)
    if reason is None:
        return (bert_style_attention(module, hidden_states, context, bias),)
    return reason


@kernel_forward
def bert_self_attention_forward(self, hidden_states, attention_mask=None, output_attentions=False):
    """vlkernels forward of HF ``ViltSelfAttention`` / ``VisualBertSelfAttention`` in
    transformers 5 (same parameters and returns as theirs).

    hidden_states: [B, S, D]; attention_mask: HF's extended mask ([B, 1, 1, S] or [B, 1, S, S],
    additive float or SDPA bool) or None
    returns (context [B, S, D],), as HF does without output_attentions.

    Runs the HF forward instead, for this call only and with a warning, when the kernel cannot
    give HF's result: output_attentions (the kernel never forms the attention probabilities) or
    a mask of a shape or dtype the kernel does not take (see :func:`hf_attention_bias`).
    """
    result = bert_attention_or_reason(self, hidden_states, hidden_states, attention_mask, output_attentions)
    if not isinstance(result, str):
        return result
    fallback(self, result)
    return original_forward(self)(self, hidden_states, attention_mask, output_attentions)


@kernel_forward
def bert_self_attention_forward_head_mask(self, hidden_states, attention_mask=None, head_mask=None,
                                          output_attentions=False):
    """vlkernels forward of HF ``ViltSelfAttention`` / ``VisualBertSelfAttention`` in
    transformers 4.57 (which also take ``head_mask``); otherwise as
    :func:`bert_self_attention_forward`: hidden_states [B, S, D] -> (context [B, S, D],).
    A head_mask runs the HF forward (the kernel does not scale heads' probabilities)."""
    result = bert_attention_or_reason(self, hidden_states, hidden_states, attention_mask, output_attentions,
                                      head_mask)
    if not isinstance(result, str):
        return result
    fallback(self, result)
    return original_forward(self)(self, hidden_states, attention_mask, head_mask, output_attentions)


def bert_self_attention_patch(cls: type) -> Patch:
    """The patch of a BERT-style self-attention class (``ViltSelfAttention``,
    ``VisualBertSelfAttention``) with the kernel forward of the installed transformers' signature:
    with head_mask (4.57) or without (5)."""
    takes_head_mask = "head_mask" in inspect.signature(original_forward(cls)).parameters
    return Patch(cls, bert_self_attention_forward_head_mask if takes_head_mask else bert_self_attention_forward)


def is_patch_conv(conv: nn.Module, pixel_values: torch.Tensor) -> bool:
    """True when ``conv`` is a plain non-overlapping patch nn.Conv2d that ``ops.patch_embed``
    computes exactly on ``pixel_values`` [B, C, H, W]: square kernel P = stride, no padding,
    dilation or groups, H and W multiples of P, one dtype, and no hooks on the conv (a hook
    would be skipped by calling the op directly)."""
    if not is_plain(conv, nn.Conv2d):  # a subclass (LoRA, quantised, ...) or a hook computes something else
        return False
    patch = conv.kernel_size[0]
    return (conv.kernel_size[1] == patch and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding in ((0, 0), "valid") and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and pixel_values.dim() == 4 and pixel_values.shape[0] > 0 and pixel_values.shape[1] == conv.in_channels
            and pixel_values.shape[2] > 0 and pixel_values.shape[2] % patch == 0
            and pixel_values.shape[3] > 0 and pixel_values.shape[3] % patch == 0
            and pixel_values.dtype == conv.weight.dtype)
