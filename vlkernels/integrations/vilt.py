"""HuggingFace ViLT (``transformers`` ``ViltModel`` and the ``ViltFor*`` heads) on vlkernels.

- attention: ``ViltSelfAttention`` (each layer's ``attention.attention``) runs ``vlkernels.ops.attention``.
- patch_embed: ``ViltPatchEmbeddings`` runs its ``projection`` Conv2d as ``vlkernels.ops.patch_embed``.
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from vlkernels import ops
from vlkernels.integrations import _patching
from vlkernels.integrations._kernels import bert_self_attention_patch, fallback, is_patch_conv
from vlkernels.integrations._patching import Patch, kernel_forward, original_forward


@kernel_forward
def patch_embeddings_forward(self, pixel_values):
    """vlkernels forward of HF ``ViltPatchEmbeddings``.

    pixel_values: [B, C, H, W] -> [B, D, H/P, W/P], as the HF Conv2d returns it (a view of the
    kernel's [B, N, D] tokens, so its strides are channels-last; ViLT flattens it right away).
    Runs the HF forward instead, for this call only and with a warning, when the conv is not a plain patch conv the
    kernel computes exactly (see ``is_patch_conv``), or the input has the wrong channel count
    (HF then raises its own error).
    """
    projection = self.projection
    pixels = pixel_values.to(dtype=projection.weight.dtype)  # HF casts the pixels to the conv's dtype
    if not is_patch_conv(projection, pixels) or pixels.shape[1] != self.num_channels:
        fallback(self, "the patch conv or the pixels are not a plain patch embedding (see is_patch_conv)")
        return original_forward(self)(self, pixel_values)
    patch = projection.kernel_size[0]
    tokens = ops.patch_embed(pixels, projection.weight, projection.bias)  # [B, N, D], N row-major
    return tokens.transpose(1, 2).unflatten(2, (pixels.shape[2] // patch, pixels.shape[3] // patch))


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    from transformers.models.vilt import modeling_vilt as hf

    return {
        "attention": (bert_self_attention_patch(hf.ViltSelfAttention),),
        "patch_embed": (Patch(hf.ViltPatchEmbeddings, patch_embeddings_forward),),
    }


FAMILY = _patching.Family("ViLT", "apply_vlkernels_to_vilt",
                          "a transformers ViLT model (ViltModel, a ViltFor* model, or a module containing one)", _load)


def apply_vlkernels_to_vilt(model: Optional[nn.Module] = None, *, patch_embed: bool = True,
                            attention: bool = True) -> Optional[nn.Module]:
    """Run HF ViLT's patch embedding and self-attention on the vlkernels ops.

    model: a loaded ViLT model (``ViltModel``, ``ViltForQuestionAnswering``, ... or any module
        containing ViLT layers): its modules get kernel forwards bound on the instance, leaving
        parameters, state dict and outputs (to fp32 rounding) unchanged; returns the model.
        None: patch the transformers classes, so every ViLT model (also those created later)
        uses the kernels; returns None. Undo with :func:`revert_vlkernels_to_vilt`.
    patch_embed: ``ViltPatchEmbeddings.projection`` (Conv2d, [B, C, H, W] -> [B, D, H/P, W/P]) through
        ``vlkernels.ops.patch_embed``.
    attention: ``ViltSelfAttention`` ([B, S, D], extended padding mask) through ``vlkernels.ops.attention``.
    A False flag leaves that kernel as it is (it does not revert an earlier patch).

    A patched forward keeps HF's signature and return tuple; attention masks and attention
    dropout (training mode; the kernel's own random draws) run in the kernel. It runs the HF forward for a call, with a
    ``FallbackWarning`` once per module class and reason, when the kernel cannot compute it
    exactly: 
    ``output_attentions=True`` (the kernel never forms the probabilities), a head_mask
    (transformers 4.57), or a conv the kernel does not cover.
    Patching twice is the same as once. Raises TypeError when the model has no ViLT modules.
    """
    return _patching.apply(FAMILY, model, {"attention": attention, "patch_embed": patch_embed})


def revert_vlkernels_to_vilt(model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Undo :func:`apply_vlkernels_to_vilt`: remove the kernel forwards bound on ``model``'s
    modules (they use their class forward again), or with model None restore the transformers
    classes' forwards. Reverting what is not patched is a no-op. Returns the model (None for classes)."""
    return _patching.revert(FAMILY, model, "revert_vlkernels_to_vilt")
