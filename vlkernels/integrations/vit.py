"""HuggingFace ViT (``transformers`` ``ViTModel`` and the ``ViTFor*`` heads) on vlkernels.

- attention: ``ViTAttention`` (each layer's ``attention``) runs ``vlkernels.ops.attention``,
  whatever ``config._attn_implementation`` (eager, sdpa, ...) the model was built with.
- patch_embed: ``ViTEmbeddings`` runs conv + cls token + position embeddings as one
  ``vlkernels.ops.patch_embed`` call (bias, pos-embed and cls in the GEMM epilogue); when it
  cannot (mask tokens, interpolated position embeddings) the HF embeddings run, and their
  ``ViTPatchEmbeddings`` still computes the conv with ``vlkernels.ops.patch_embed``.
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from vlkernels import ops
from vlkernels.integrations import _patching
from vlkernels.integrations._kernels import NOT_PADDING, attention_dropout_active, hf_key_mask, is_patch_conv
from vlkernels.integrations._patching import Patch, kernel_forward, original_forward


def _attention_weights_requested(kwargs: dict) -> bool:
    """Whether this call must return the attention probabilities: ``output_attentions`` passed
    down, or transformers' output capturing (``output_attentions`` given to the model or set in
    its config) recording ``ViTAttention`` outputs."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing passes output_attentions down
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


@kernel_forward
def attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """vlkernels forward of HF ``ViTAttention``.

    hidden_states: [B, S, D]; attention_mask: HF's mask from ``create_bidirectional_mask``
    ([B, 1, S, S] additive float for eager, bool True = attend for sdpa) or None
    returns (output [B, S, D], None): the same tuple as HF, with no attention weights.
    Runs the HF forward instead, for this call only, when the attention weights are requested
    (output_attentions; the kernel never forms them), with attention dropout in training mode
    (the kernel has none), or with a mask that is not a key padding mask.
    """
    if not _attention_weights_requested(kwargs) and not attention_dropout_active(self, self.attention_dropout):
        input_shape = hidden_states.shape[:-1]
        key_mask = hf_key_mask(attention_mask, input_shape[0], input_shape[1], input_shape[1])
        if key_mask is not NOT_PADDING:
            def heads(x):  # [B, S, H*Dh] -> [B, H, S, Dh], a view
                return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

            out = ops.attention(heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)),
                                heads(self.v_proj(hidden_states)), key_mask=key_mask, scale=self.scaling)
            return self.o_proj(out.transpose(1, 2).reshape(*input_shape, -1)), None
    return original_forward(self)(self, hidden_states, attention_mask, **kwargs)


@kernel_forward
def patch_embeddings_forward(self, pixel_values):
    """vlkernels forward of HF ``ViTPatchEmbeddings``: pixel_values [B, C, H, W] -> [B, N, D].
    Runs the HF forward instead (which raises HF's errors) when the conv is not a plain patch
    conv the kernel computes exactly (see ``is_patch_conv``) or the channel count is wrong."""
    projection = self.projection
    if not is_patch_conv(projection, pixel_values) or pixel_values.shape[1] != self.num_channels:
        return original_forward(self)(self, pixel_values)
    return ops.patch_embed(pixel_values, projection.weight, projection.bias)


@kernel_forward
def embeddings_forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
    """vlkernels forward of HF ``ViTEmbeddings``: pixel_values [B, C, H, W] -> [B, 1+N, D]
    (cls token first, position embeddings added, then HF's dropout), in one ``patch_embed`` call.
    Runs the HF forward instead with mask tokens (bool_masked_pos), interpolated position
    embeddings, another image size than the config's (HF raises then), or patch embeddings the
    fused call does not cover (hooks, a conv ``is_patch_conv`` refuses, mixed dtypes)."""
    from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

    patches = self.patch_embeddings
    projection = getattr(patches, "projection", None)
    if (bool_masked_pos is None and not interpolate_pos_encoding
            and type(patches) is ViTPatchEmbeddings and not (patches._forward_hooks or patches._forward_pre_hooks)
            and is_patch_conv(projection, pixel_values) and pixel_values.shape[1] == patches.num_channels
            and tuple(pixel_values.shape[2:]) == tuple(self.image_size)
            and self.cls_token.dtype == self.position_embeddings.dtype == pixel_values.dtype):
        tokens = ops.patch_embed(pixel_values, projection.weight, projection.bias,
                                 pos_embed=self.position_embeddings, cls_token=self.cls_token)
        return self.dropout(tokens)
    return original_forward(self)(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    from transformers.models.vit import modeling_vit as hf

    return {
        "attention": (Patch(hf.ViTAttention, attention_forward),),
        "patch_embed": (Patch(hf.ViTEmbeddings, embeddings_forward),
                        Patch(hf.ViTPatchEmbeddings, patch_embeddings_forward)),
    }


FAMILY = _patching.Family("ViT", "apply_vlkernels_to_vit",
                          "a transformers ViT model (ViTModel, a ViTFor* model, or a module containing one)", _load)


def apply_vlkernels_to_vit(model: Optional[nn.Module] = None, *, patch_embed: bool = True,
                           attention: bool = True) -> Optional[nn.Module]:
    """Run HF ViT's patch embedding and self-attention on the vlkernels ops.

    model: a loaded ViT model (``ViTModel``, ``ViTForImageClassification``, ... or any module
        containing ViT layers): its modules get kernel forwards bound on the instance, leaving
        parameters, state dict and outputs (to fp32 rounding) unchanged; returns the model.
        None: patch the transformers classes, so every ViT model (also those created later)
        uses the kernels; returns None. Undo with :func:`revert_vlkernels_to_vit`.
    patch_embed: ``ViTEmbeddings`` (pixels [B, C, H, W] -> [B, 1+N, D], conv + cls + pos fused)
        and ``ViTPatchEmbeddings`` ([B, C, H, W] -> [B, N, D]) through ``vlkernels.ops.patch_embed``.
    attention: ``ViTAttention`` ([B, S, D], optional padding mask) through ``vlkernels.ops.attention``.
    A False flag leaves that kernel as it is (it does not revert an earlier patch).

    A patched forward keeps HF's signature and return tuple. It runs the HF forward for a call
    the kernel cannot compute exactly: requested attention weights (``output_attentions``; the
    kernel never forms the probabilities), attention-probability dropout in training mode (the
    kernels have none), a mask that is not a key padding mask, mask tokens or interpolated
    position embeddings (the conv alone then still runs on the kernel). Patching twice is the
    same as once. Only transformers' ViT is covered (timm's is not). Raises TypeError when the
    model has no ViT modules.
    """
    return _patching.apply(FAMILY, model, {"attention": attention, "patch_embed": patch_embed})


def revert_vlkernels_to_vit(model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Undo :func:`apply_vlkernels_to_vit`: remove the kernel forwards bound on ``model``'s
    modules, or with model None restore the transformers classes' forwards. Reverting what is
    not patched is a no-op. Returns the model (None for classes)."""
    return _patching.revert(FAMILY, model, "revert_vlkernels_to_vit")
