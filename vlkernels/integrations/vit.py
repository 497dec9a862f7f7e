"""HuggingFace ViT (``transformers`` ``ViTModel`` and the ``ViTFor*`` heads) on vlkernels.

- attention: ``ViTAttention`` (later transformers 5; ``ViTSelfAttention`` in 4.57 and 5.0) runs
  ``vlkernels.ops.attention``, whatever ``config._attn_implementation`` (eager, sdpa, ...) the
  model was built with.
- patch_embed: ``ViTEmbeddings`` runs conv + cls token + position embeddings as one
  ``vlkernels.ops.patch_embed`` call (bias, pos-embed and cls in the GEMM epilogue); when it
  cannot (mask tokens, interpolated position embeddings) the HF embeddings run, and their
  ``ViTPatchEmbeddings`` still computes the conv with ``vlkernels.ops.patch_embed``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

from torch import nn

from vlkernels import ops
from vlkernels.integrations import _patching
from vlkernels.integrations._kernels import attention_dropout_p, fallback, hf_attention_bias, is_patch_conv
from vlkernels.integrations._patching import Patch, kernel_forward, original_forward, output_capture_active


def _attention_weights_requested(kwargs: dict) -> bool:
    """Whether this call must return the attention probabilities (transformers 5):
    ``output_attentions`` passed down, or transformers' output capturing (``output_attentions``
    given to the model or set in its config) recording ``ViTAttention`` outputs."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing passes output_attentions down
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _heads(x, head_dim):  # [B, S, H*Dh] -> [B, H, S, Dh], a view
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


@kernel_forward
def attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """vlkernels forward of HF ``ViTAttention`` (later transformers 5, with ``q_proj`` ...).

    hidden_states: [B, S, D]; attention_mask: HF's mask from ``create_bidirectional_mask``
    ([B, 1, S, S] additive float for eager, bool True = attend for sdpa) or None
    returns (output [B, S, D], None): the same tuple as HF, with no attention weights.
    Attention dropout (training mode) runs in the kernel. Runs the HF forward instead, for this
    call only and with a warning, when the attention weights are requested (output_attentions;
    the kernel never forms them) or with a mask of a shape or dtype the kernel does not take
    (see :func:`~vlkernels.integrations._kernels.hf_attention_bias`).
    """
    if _attention_weights_requested(kwargs):
        reason = "the attention probabilities are requested (output_attentions)"
    else:
        batch, seq = hidden_states.shape[:-1]
        bias, reason = hf_attention_bias(attention_mask, batch, self.num_attention_heads, seq, seq,
                                         hidden_states.dtype)
        if reason is None:
            out = ops.attention(_heads(self.q_proj(hidden_states), self.head_dim),
                                _heads(self.k_proj(hidden_states), self.head_dim),
                                _heads(self.v_proj(hidden_states), self.head_dim), bias=bias, scale=self.scaling,
                                dropout_p=attention_dropout_p(self, self.attention_dropout))
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), None
    fallback(self, reason)
    return original_forward(self)(self, hidden_states, attention_mask, **kwargs)


def _self_attention_or_reason(self, hidden_states, head_mask=None):
    """``ViTSelfAttention``'s (context [B, S, D], None) on the kernel, or why the HF forward must run."""
    if output_capture_active(self):
        return "the attention probabilities are requested (output_attentions)"
    if head_mask is not None:
        return "a head_mask is given"
    head_dim = self.attention_head_size
    out = ops.attention(_heads(self.query(hidden_states), head_dim), _heads(self.key(hidden_states), head_dim),
                        _heads(self.value(hidden_states), head_dim), scale=self.scaling,
                        dropout_p=attention_dropout_p(self, self.dropout_prob))
    return out.transpose(1, 2).flatten(2), None


@kernel_forward
def self_attention_forward_head_mask(self, hidden_states, head_mask=None):
    """vlkernels forward of HF ``ViTSelfAttention`` in transformers 4.57 (ViT there has no
    attention mask). hidden_states: [B, S, D] -> (context [B, S, D], None), HF's tuple without
    the probabilities. Runs the HF forward instead, for this call only and with a warning, when
    the probabilities are recorded (output_attentions) or with a head_mask. Attention dropout
    (training mode) runs in the kernel."""
    result = _self_attention_or_reason(self, hidden_states, head_mask)
    if not isinstance(result, str):
        return result
    fallback(self, result)
    return original_forward(self)(self, hidden_states, head_mask)


@kernel_forward
def self_attention_forward(self, hidden_states):
    """vlkernels forward of HF ``ViTSelfAttention`` in early transformers 5 (no head_mask, no
    attention mask): as :func:`self_attention_forward_head_mask`, hidden_states [B, S, D] ->
    (context [B, S, D], None)."""
    result = _self_attention_or_reason(self, hidden_states)
    if not isinstance(result, str):
        return result
    fallback(self, result)
    return original_forward(self)(self, hidden_states)


def _plain_patches(self, pixel_values) -> bool:
    """Whether ``ops.patch_embed`` computes this ``ViTPatchEmbeddings``' conv on ``pixel_values``."""
    return is_patch_conv(self.projection, pixel_values) and pixel_values.shape[1] == self.num_channels


@kernel_forward
def patch_embeddings_forward(self, pixel_values):
    """vlkernels forward of HF ``ViTPatchEmbeddings`` (later transformers 5): pixel_values
    [B, C, H, W] -> [B, N, D]. Runs the HF forward instead (which raises HF's errors), with a
    warning, when the conv is not a plain patch conv the kernel computes exactly (see
    ``is_patch_conv``) or the channel count is wrong."""
    if not _plain_patches(self, pixel_values):
        fallback(self, "the patch conv or the pixels are not a plain patch embedding (see is_patch_conv)")
        return original_forward(self)(self, pixel_values)
    return ops.patch_embed(pixel_values, self.projection.weight, self.projection.bias)


@kernel_forward
def patch_embeddings_forward_interpolate(self, pixel_values, interpolate_pos_encoding=False):
    """vlkernels forward of HF ``ViTPatchEmbeddings`` (transformers 4.57 and early 5, which check the image
    size unless interpolate_pos_encoding): pixel_values [B, C, H, W] -> [B, N, D]. Runs the HF
    forward instead (which raises HF's errors) as :func:`patch_embeddings_forward` says, and for
    another image size than the config's without interpolate_pos_encoding."""
    if not _plain_patches(self, pixel_values) or not (
            interpolate_pos_encoding or tuple(pixel_values.shape[2:]) == tuple(self.image_size)):
        fallback(self, "the patch conv or the pixels are not a plain patch embedding (see is_patch_conv)")
        return original_forward(self)(self, pixel_values, interpolate_pos_encoding)
    return ops.patch_embed(pixel_values, self.projection.weight, self.projection.bias)


@kernel_forward
def embeddings_forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
    """vlkernels forward of HF ``ViTEmbeddings``: pixel_values [B, C, H, W] -> [B, 1+N, D]
    (cls token first, position embeddings added, then HF's dropout), in one ``patch_embed`` call.
    Runs the HF forward instead with mask tokens (bool_masked_pos), interpolated position
    embeddings, another image size than the config's (HF raises then), or patch embeddings the
    fused call does not cover (hooks, a conv ``is_patch_conv`` refuses, mixed dtypes); the HF
    embeddings' own patch embeddings then still run on the kernel where they are patched."""
    from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

    patches = self.patch_embeddings
    if bool_masked_pos is not None:
        reason = "mask tokens are given (bool_masked_pos)"
    elif interpolate_pos_encoding:
        reason = "the position embeddings are interpolated (interpolate_pos_encoding)"
    elif (type(patches) is not ViTPatchEmbeddings or patches._forward_hooks or patches._forward_pre_hooks
          or not _plain_patches(patches, pixel_values)
          or tuple(pixel_values.shape[2:]) != tuple(patches.image_size)
          or not self.cls_token.dtype == self.position_embeddings.dtype == pixel_values.dtype):
        reason = "the patch embeddings or the pixels are not a plain patch embedding of the config's image size"
    else:
        tokens = ops.patch_embed(pixel_values, patches.projection.weight, patches.projection.bias,
                                 pos_embed=self.position_embeddings, cls_token=self.cls_token)
        return self.dropout(tokens)
    fallback(self, reason)
    return original_forward(self)(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    from transformers.models.vit import modeling_vit as hf

    if hasattr(hf, "ViTSelfAttention"):  # up to early 5.x: the attention is computed there
        takes_head_mask = "head_mask" in inspect.signature(original_forward(hf.ViTSelfAttention)).parameters
        attention = Patch(hf.ViTSelfAttention,
                          self_attention_forward_head_mask if takes_head_mask else self_attention_forward)
    else:
        attention = Patch(hf.ViTAttention, attention_forward)
    interpolates = "interpolate_pos_encoding" in inspect.signature(original_forward(hf.ViTPatchEmbeddings)).parameters
    patches = Patch(hf.ViTPatchEmbeddings,
                    patch_embeddings_forward_interpolate if interpolates else patch_embeddings_forward)
    return {"attention": (attention,), "patch_embed": (Patch(hf.ViTEmbeddings, embeddings_forward), patches)}


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

    A patched forward keeps HF's signature and return tuple; attention masks (any additive or
    bool mask) and attention dropout (training mode; the kernel's own random draws) run in the
    kernel. It runs the HF forward for a call, with a
    ``FallbackWarning`` once per module class and reason, when the kernel cannot compute it
    exactly: requested attention weights (``output_attentions``; the kernel
    never forms the probabilities), a head_mask (transformers 4.57), mask tokens or interpolated
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
