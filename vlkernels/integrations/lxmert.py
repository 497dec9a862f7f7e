"""HuggingFace LXMERT (``transformers`` ``LxmertModel`` and its heads) on vlkernels.

- attention: every ``LxmertAttention`` runs ``vlkernels.ops.attention``: the language and
  object-relationship self-attention layers, the cross-modality layers' self-attention, and
  their shared cross-attention module (``visual_attention.att``, called in both directions,
  language -> vision and vision -> language, with the other stream's padding mask).
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from vlkernels.integrations import _patching
from vlkernels.integrations._kernels import bert_attention_or_reason, fallback
from vlkernels.integrations._patching import Patch, kernel_forward, original_forward


@kernel_forward
def attention_forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
    """vlkernels forward of HF ``LxmertAttention`` (self- or cross-attention; the same signature
    in transformers 4.57 and 5).

    hidden_states: [B, Sq, D] (queries), context: [B, Sk, Dc] (keys and values),
    attention_mask: HF's extended additive mask of the context, [B, 1, 1, Sk] (or any mask
    broadcastable to [B, H, Sq, Sk]), or None
    returns (context layer [B, Sq, D],), as HF does without output_attentions.
    Attention dropout (training mode) runs in the kernel. Runs the HF forward instead, for this
    call only and with a warning, with output_attentions (the kernel never forms the
    probabilities) or a mask of a shape or dtype the kernel does not take.
    """
    result = bert_attention_or_reason(self, hidden_states, context, attention_mask, output_attentions)
    if not isinstance(result, str):
        return result
    fallback(self, result)
    return original_forward(self)(self, hidden_states, context, attention_mask, output_attentions)


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    from transformers.models.lxmert import modeling_lxmert as hf

    return {"attention": (Patch(hf.LxmertAttention, attention_forward),)}


FAMILY = _patching.Family("LXMERT", "apply_vlkernels_to_lxmert",
                          "a transformers LXMERT model (LxmertModel, LxmertForPreTraining, "
                          "LxmertForQuestionAnswering, or a module containing one)", _load)


def apply_vlkernels_to_lxmert(model: Optional[nn.Module] = None, *, attention: bool = True) -> Optional[nn.Module]:
    """Run HF LXMERT's self- and cross-attention on ``vlkernels.ops.attention``.

    model: a loaded LXMERT model (or any module containing LXMERT layers): its
        ``LxmertAttention`` modules get a kernel forward bound on the instance, leaving
        parameters, state dict and outputs (to fp32 rounding) unchanged; returns the model.
        None: patch the transformers class, so every LXMERT model (also those created later)
        uses the kernel; returns None. Undo with :func:`revert_vlkernels_to_lxmert`.
    attention: ``LxmertAttention`` (queries [B, Sq, D], context [B, Sk, D], extended padding
        mask of the context) through ``vlkernels.ops.attention``. False patches nothing.

    A patched forward keeps HF's signature and return tuple; attention masks and attention
    dropout (training mode; the kernel's own random draws) run in the kernel. It runs the HF forward for a call, with a
    ``FallbackWarning`` once per module class and reason, when the kernel cannot compute it
    exactly: 
    ``output_attentions=True`` (the kernel never forms the probabilities). Patching twice is the same as once. Raises
    TypeError when the model has no LXMERT attention modules.
    """
    return _patching.apply(FAMILY, model, {"attention": attention})


def revert_vlkernels_to_lxmert(model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Undo :func:`apply_vlkernels_to_lxmert`: remove the kernel forwards bound on ``model``'s
    modules, or with model None restore the transformers class's forward. Reverting what is not
    patched is a no-op. Returns the model (None for classes)."""
    return _patching.revert(FAMILY, model, "revert_vlkernels_to_lxmert")
