"""Adapters from HF modules to the vlkernels ops, shared by the model families.

Each adapter either computes exactly what the HF module computes (to fp32 rounding) through
``vlkernels.ops.attention`` / ``vlkernels.ops.patch_embed``, or says that it cannot, and the
kernel forward then runs the HF forward for that call. The ops are looked up on
``vlkernels.ops`` at call time, so the backend choice (``vlkernels.use_backend``) applies.
(The attention modules of transformers 5 take no ``head_mask``, so there is none to refuse.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vlkernels import ops
from vlkernels.integrations._patching import kernel_forward, original_forward
from vlkernels.nn.attention import real_token_mask

# Returned by hf_key_mask for a mask that is not a plain key padding mask.
NOT_PADDING = object()


def hf_key_mask(mask: Optional[torch.Tensor], batch: int, seq_q: int, seq_k: int):
    """An HF attention mask as the ops' key mask, or NOT_PADDING.

    mask: None; HF's additive float mask (0 = attend, finfo.min or -inf = ignore) as
        [B, 1, 1, Sk] (extended) or [B, 1, Sq, Sk] (expanded over the queries); or HF's bool
        mask for SDPA, [B, 1, 1 or Sq, Sk] with True = attend. A batch dim of 1 broadcasts.
    returns: bool [B, Sk], True = real token (``vlkernels.nn.real_token_mask`` semantics), or
        None when every key is real, or NOT_PADDING when the mask is anything else: a bias,
        per-head or per-query (e.g. causal) values, another shape, or a sample without any
        real key (HF's additive mask then spreads attention uniformly over the padding, while
        the kernels return zeros for such a query).
    Costs one device sync (the checks read the mask's values).
    """
    if mask is None:
        return None
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seq_q) or mask.shape[3] != seq_k):
        return NOT_PADDING
    first_row = mask[:, :, :1]  # [B, 1, 1, Sk]
    if mask.shape[2] > 1 and not torch.equal(mask, first_row.expand_as(mask)):
        return NOT_PADDING  # the mask differs between queries: not a key padding mask
    if mask.dtype == torch.bool:
        real = first_row[:, 0, 0]  # HF's bool (SDPA) masks mark the keys to attend with True
    else:
        try:
            real = real_token_mask(first_row)
        except ValueError:  # values other than 0 and -inf / finfo.min: a bias
            return NOT_PADDING
    fewest_real = int(real.sum(dim=-1).min())
    if fewest_real == 0:
        return NOT_PADDING
    if fewest_real == seq_k:
        return None  # no padding at all: the kernel skips the mask
    return real.expand(batch, seq_k)


def attention_dropout_active(module: nn.Module, p: float) -> bool:
    """The kernels have no attention-probability dropout: a module in training with p > 0 runs HF's forward."""
    return module.training and p > 0


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
    out = ops.attention(q, k, v, key_mask=key_mask, scale=1.0 / math.sqrt(head_dim))
    return out.transpose(1, 2).flatten(2)


@kernel_forward
def bert_self_attention_forward(self, hidden_states, attention_mask=None, output_attentions=False):
    """vlkernels forward of HF ``ViltSelfAttention`` / ``VisualBertSelfAttention`` (same
    parameters and returns as theirs).

    hidden_states: [B, S, D]; attention_mask: HF's extended mask ([B, 1, 1, S] or [B, 1, S, S],
    additive float or SDPA bool) or None
    returns (context [B, S, D],), as HF does without output_attentions.

    Runs the HF forward instead, for this call only, when the kernel cannot give HF's result:
    output_attentions (the kernel never forms the attention probabilities), attention dropout
    in training mode (the kernel has none), or a mask that is not a key padding mask.
    """
    if not output_attentions and not attention_dropout_active(self, self.dropout.p):
        batch, seq = hidden_states.shape[:2]
        key_mask = hf_key_mask(attention_mask, batch, seq, seq)
        if key_mask is not NOT_PADDING:
            return (bert_style_attention(self, hidden_states, hidden_states, key_mask),)
    return original_forward(self)(self, hidden_states, attention_mask, output_attentions)


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
