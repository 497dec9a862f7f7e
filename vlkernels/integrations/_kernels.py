"""Adapters from HF modules to the vlkernels ops, shared by the model families.

Each adapter either computes exactly what the HF module computes (to fp32 rounding) through
``vlkernels.ops.attention`` / ``vlkernels.ops.patch_embed``, or says that it cannot, and the
kernel forward then runs the HF forward for that call, with a warning (once per module class
and reason) through :func:`fallback`. The ops are looked up on ``vlkernels.ops`` at call time,
so the backend choice (``vlkernels.use_backend``) applies.

Every choice between kernel and HF forward is made from what needs no data: flags, shapes,
dtypes, the module's training mode. The values of an attention mask are checked without a host
read (``vlkernels.ops._checks.check_value``), so a patched forward compiles into as many graphs
as the HF one, and with ``fullgraph=True``.
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
from vlkernels.ops._checks import check_value, compiling, reads_on_host

try:  # kernel_coverage() counts the fallbacks where the library has it
    from vlkernels._coverage import record_fallback as _record_fallback
except ImportError:
    _record_fallback = None

# (module class name, reason) pairs already warned about.
_WARNED: set = set()


class FallbackWarning(UserWarning):
    """A patched HF forward ran the HF forward for a call (see the message for why)."""


def fallback(module: nn.Module, reason: str) -> None:
    """Note that ``module``'s kernel forward runs the HF forward for this call because of
    ``reason``: recorded for ``vlkernels.kernel_coverage()`` where the library has it, and a
    :class:`FallbackWarning` once per module class and reason (not while torch.compile traces:
    a warning would break the graph)."""
    name = type(module).__name__
    if _record_fallback is not None:
        _record_fallback(f"hf.{name}", reason)
    if compiling() or (name, reason) in _WARNED:
        return
    _WARNED.add((name, reason))
    warnings.warn(f"vlkernels: {name} runs the HuggingFace forward instead of the vlkernels kernel when "
                  f"{reason}", FallbackWarning, stacklevel=3)


def hf_key_mask(mask: Optional[torch.Tensor], batch: int, seq_q: int, seq_k: int):
    """An HF attention mask as the ops' key mask: ``(key_mask, None)`` or ``(None, reason)``.

    mask: None; HF's additive float mask (0 = attend, finfo.min or -inf = ignore) as
        [B, 1, 1, Sk] (extended) or [B, 1, Sq, Sk] (expanded over the queries); or HF's bool
        mask for SDPA, [B, 1, 1 or Sq, Sk] with True = attend. A batch dim of 1 broadcasts.
    returns key_mask: bool [B, Sk], True = real token, or None for no mask; or reason: why the
        kernel cannot take this mask (a shape or dtype that is not a key padding mask), decided
        from the shape and dtype alone.
    The values must be a key padding mask (0 or <= finfo.min / 2 for float masks, the same for
    every query). That is checked without a host read by default: a bias or per-query values
    (e.g. a causal mask) raise a RuntimeError from a device-side assert. In strict value-check
    mode (``VLKERNELS_VALUE_CHECKS=host`` / ``vlkernels.set_value_checks("host")``, eager) the
    check is read on the host instead and such a mask runs the HF forward (with a warning).
    """
    if mask is None:
        return None, None
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seq_q) or mask.shape[3] != seq_k):
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        return None, f"the attention mask is not a key padding mask ([B, 1, 1 or Sq, Sk]), got {shape}"
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return None, f"the attention mask has dtype {mask.dtype} (neither bool nor an additive float mask)"
    first_row = mask[:, 0, 0]  # [B or 1, Sk]
    if mask.dtype == torch.bool:
        real = first_row  # HF's bool (SDPA) masks mark the keys to attend with True
        valid = None
    else:
        real = first_row == 0
        valid = (real | (first_row <= torch.finfo(mask.dtype).min / 2)).all()
    if mask.shape[2] > 1:  # [B, 1, Sq, Sk]: every query must see the keys of the first one
        same = (mask == mask[:, :, :1]).all()
        valid = same if valid is None else valid & same
    if valid is not None:
        message = ("the attention mask is not a key padding mask (a bias, or values that differ between "
                   "queries): the vlkernels kernel cannot compute it; revert the patch for such masks")
        if reads_on_host():
            if not bool(valid):  # strict mode: read on the host, and HF's forward takes the mask
                return None, "the attention mask is a bias or differs between queries"
        else:
            check_value(valid, message)
    return real.expand(batch, seq_k), None


def attention_dropout(module: nn.Module, p: float) -> Optional[str]:
    """Why the kernel cannot run for ``module`` now: attention-probability dropout in training
    mode, which the kernels do not have; None when there is none."""
    if module.training and p > 0:
        return f"attention dropout is active (training mode, p={p})"
    return None


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """``ops.attention`` with HF's result for a sample whose keys are all padding.

    q: [B, H, Sq, Dh], k and v: [B, H, Sk, Dh], key_mask: [B, Sk] bool (True = real) or None
    returns [B, H, Sq, Dh]. HF adds finfo.min to every score of such a sample, so its queries
    attend uniformly to all keys: the mean of v. (HF's -inf or bool masks give NaN there; this
    gives the mean too.) Selected with a tensor op, no host read.
    """
    out = ops.attention(q, k, v, key_mask=key_mask, scale=scale)
    if key_mask is None:
        return out
    empty = ~key_mask.any(dim=-1)  # [B]
    return torch.where(empty[:, None, None, None], v.mean(dim=2, keepdim=True).to(out.dtype), out)


def bert_style_attention(module: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                         key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention of HF's BERT-family modules (``query``/``key``/``value`` Linears,
    ``attention_head_size``) on the vlkernels op.

    hidden_states: [B, Sq, D] (queries), context: [B, Sk, Dc] (keys and values; the hidden
    states themselves for self-attention), key_mask: [B, Sk] bool or None
    returns the context layer [B, Sq, H*Dh], heads concatenated as HF does
    """
    head_dim = module.attention_head_size

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, H*Dh] -> [B, H, S, Dh], a view
        return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)

    q = heads(module.query(hidden_states))
    k = heads(module.key(context))
    v = heads(module.value(context))
    # HF divides the scores by sqrt(Dh); the kernel multiplies by this scale (equal to fp32 rounding).
    out = masked_attention(q, k, v, key_mask, 1.0 / math.sqrt(head_dim))
    return out.transpose(1, 2).flatten(2)


def bert_attention_or_reason(module: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                             attention_mask, output_attentions: bool, head_mask=None):
    """The kernel result ``(context layer,)`` of a BERT-family attention call, or the reason
    (a str) why the HF forward must run it."""
    if output_attentions or output_capture_active(module):
        return "the attention probabilities are requested (output_attentions)"
    if head_mask is not None:
        return "a head_mask is given"
    reason = attention_dropout(module, module.dropout.p)
    if reason is None:
        key_mask, reason = hf_key_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1],
                                       context.shape[1])
        if reason is None:
            return (bert_style_attention(module, hidden_states, context, key_mask),)
    return reason


@kernel_forward
def bert_self_attention_forward(self, hidden_states, attention_mask=None, output_attentions=False):
    """vlkernels forward of HF ``ViltSelfAttention`` / ``VisualBertSelfAttention`` in
    transformers 5 (same parameters and returns as theirs).

    hidden_states: [B, S, D]; attention_mask: HF's extended mask ([B, 1, 1, S] or [B, 1, S, S],
    additive float or SDPA bool) or None
    returns (context [B, S, D],), as HF does without output_attentions.

    Runs the HF forward instead, for this call only and with a warning, when the kernel cannot
    give HF's result: output_attentions (the kernel never forms the attention probabilities),
    attention dropout in training mode (the kernel has none), or a mask whose shape or dtype is
    not a key padding mask's (see :func:`hf_key_mask`).
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
    if type(conv) is not nn.Conv2d:  # a subclass (LoRA, quantised, ...) may compute something else
        return False
    patch = conv.kernel_size[0]
    return (conv.kernel_size[1] == patch and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding in ((0, 0), "valid") and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and not (conv._forward_hooks or conv._forward_pre_hooks)
            and pixel_values.dim() == 4 and pixel_values.shape[0] > 0 and pixel_values.shape[1] == conv.in_channels
            and pixel_values.shape[2] > 0 and pixel_values.shape[2] % patch == 0
            and pixel_values.shape[3] > 0 and pixel_values.shape[3] % patch == 0
            and pixel_values.dtype == conv.weight.dtype)
