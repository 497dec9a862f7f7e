"""HuggingFace VisualBERT (``transformers`` ``VisualBertModel`` and its heads) on vlkernels.

- attention: ``VisualBertSelfAttention`` (each layer's ``attention.self``, over the
  concatenated text and visual tokens) runs ``vlkernels.ops.attention``.
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from vlkernels.integrations import _patching
from vlkernels.integrations._kernels import bert_self_attention_patch


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    from transformers.models.visual_bert import modeling_visual_bert as hf

    return {"attention": (bert_self_attention_patch(hf.VisualBertSelfAttention),)}


FAMILY = _patching.Family("VisualBERT", "apply_vlkernels_to_visual_bert",
                          "a transformers VisualBERT model (VisualBertModel, a VisualBertFor* model, "
                          "or a module containing one)", _load)


def apply_vlkernels_to_visual_bert(model: Optional[nn.Module] = None, *,
                                   attention: bool = True) -> Optional[nn.Module]:
    """Run HF VisualBERT's self-attention on ``vlkernels.ops.attention``.

    model: a loaded VisualBERT model (or any module containing VisualBERT layers): its
        ``VisualBertSelfAttention`` modules get a kernel forward bound on the instance, leaving
        parameters, state dict and outputs (to fp32 rounding) unchanged; returns the model.
        None: patch the transformers class, so every VisualBERT model (also those created
        later) uses the kernel; returns None. Undo with :func:`revert_vlkernels_to_visual_bert`.
    attention: ``VisualBertSelfAttention`` ([B, S, D] text + visual tokens, the concatenated
        padding mask) through ``vlkernels.ops.attention``. False patches nothing.

    A patched forward keeps HF's signature and return tuple; attention masks and attention
    dropout (training mode; the kernel's own random draws) run in the kernel. It runs the HF forward for a call, with a
    ``FallbackWarning`` once per module class and reason, when the kernel cannot compute it
    exactly: 
    ``output_attentions=True`` (the kernel never forms the probabilities) or a head_mask
    (transformers 4.57). Patching twice is the same as once. Raises
    TypeError when the model has no VisualBERT attention modules.
    """
    return _patching.apply(FAMILY, model, {"attention": attention})


def revert_vlkernels_to_visual_bert(model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Undo :func:`apply_vlkernels_to_visual_bert`: remove the kernel forwards bound on
    ``model``'s modules, or with model None restore the transformers class's forward. Reverting
    what is not patched is a no-op. Returns the model (None for classes)."""
    return _patching.revert(FAMILY, model, "revert_vlkernels_to_visual_bert")
