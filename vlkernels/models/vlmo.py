"""VLMo: a mixture-of-modality-experts Transformer that is both a dual encoder (retrieval) and a
fusion encoder (classification), pretrained with ITC, ITM (hard negatives) and MLM.

Follows SPEC "VLMo mixture-of-modality-experts":
- Embeddings: ViT patch embedding (patch 16, image 224 in base) with [CLS] token and absolute
  position embedding (one fused ``patch_embed`` op); BERT text embeddings (max_text_len 40);
  a token-type (modality) embedding added to both, text 0 / image 1.
- Blocks: ``vlkernels.nn.MoMEBlock`` (pre-LN, shared attention, LayerScale init 0.1, one
  LayerNorm + MLP per modality expert); blocks from ``vlffn_start_layer_index`` on also have
  the vision-language expert (VL-FFN); a final LayerNorm.
- Routing by modality, no learned gate: the image-only pass runs V-FFN in every layer, the
  text-only pass L-FFN in every layer (the dual encoder), the joint pass (fusion) sends the first
  max_text_len tokens to L-FFN and the rest to V-FFN in the lower layers and every token to
  VL-FFN in the top layers. The joint input therefore always puts the text first, padded to
  exactly max_text_len tokens (as VLMo's data pipeline pads), so the positional split of
  ``MoMEBlock`` falls on the text/image boundary whatever the caller's text length; the pad
  tokens are masked out as keys.
- Relative position bias (``relative_position_bias``, on in base, off in tiny): a learned bias
  per layer and head, looked up in one table by the kind of token pair: image patch pairs by
  their 2-D offset (with separate entries for [CLS]->patch, patch->[CLS], [CLS]->[CLS], as in
  BEiT), text pairs by their 1-D offset, and one entry each for text->image and image->text.
  Each layer's [H, S, S] bias goes to the attention op as its additive bias (on the kernels;
  its gradient, summed over the batch, trains the table).

Objectives (weights 1 each, VLMo's loss weights):
- ``itc``: the [CLS] of the image-only and the text-only passes -> Linear(D, D, no bias) -> L2
  norm; symmetric cross-entropy over the batch with temperature exp(logit_scale), logit_scale
  initialised to log(1 / 0.07) (features are not all-gathered across processes here).
- ``itm``: fusion pass, pooled [CLS] (tanh pooler) -> Linear(D, 2). Each image gets one hard
  negative text and each text one hard negative image, drawn from softmax of the ITC
  similarities without the diagonal (``common.hard_negative_indices``, torch's global RNG);
  with the positive pairs that makes 3B pairs, labels [1] * B + [0] * 2B.
- ``mlm``: fusion pass over the masked text (15% whole-word masking, BERT 80/10/10, done by the
  data pipeline: ``synthetic_batch`` uses ``common.mask_tokens``), BERT prediction head (not
  tied to the word embeddings), cross-entropy over the masked tokens.

Not implemented: stochastic depth (drop path), dropout inside the blocks (0 in VLMo's
pretraining configs except drop path), the stage-wise training schedule (vision, then language,
then joint) and the extra VL-FFN contrastive head of VLMo's later stages, all-gather of ITC
features across processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_fixed_size_pixels, check_text, contrastive_loss,
    hard_negative_indices, mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, to_device
from vlkernels.nn import MLMHead, MoMEBlock, Pooler, TextEmbeddings
from vlkernels.nn._submodules import embedding_row
from vlkernels.nn.patch_embed import project_patches


@dataclass
class VLMoConfig:
    """VLMo's sizes. ``vlffn_start_layer_index``: the first layer with the VL expert."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vlffn_start_layer_index: int = 10
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    max_text_len: int = 40
    layer_scale_init: float = 0.1
    layer_norm_eps: float = 1e-6
    use_abs_pos_emb: bool = True
    relative_position_bias: bool = True
    dropout: float = 0.1  # embeddings' dropout (BERT hidden dropout, ViT pos_drop)
    initializer_range: float = 0.02  # std of the weight initialisation (BERT / BEiT: 0.02)
    mlm_probability: float = 0.15
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0

    @classmethod
    def base(cls) -> "VLMoConfig":
        """VLMo-Base: 768 hidden, 12 layers, 12 heads, VL-FFN in the top 2 layers, 224 / 16."""
        return cls()

    @classmethod
    def tiny(cls) -> "VLMoConfig":
        """For tests: 2 layers (the second with VL-FFN), 32 hidden, 32x32 images of 16x16 patches.
        The wider initialisation (0.1) keeps the [CLS] features of different inputs apart at
        initialisation: with 0.02 at this width they are nearly parallel (cosine > 0.9999), which
        makes ITC's gradient a difference of almost equal terms, too ill-conditioned to compare
        two backends' gradients."""
        return cls(vocab_size=160, hidden_size=32, num_layers=2, num_heads=2, vlffn_start_layer_index=1,
                   image_size=32, patch_size=16, max_text_len=12, relative_position_bias=False, dropout=0.0,
                   initializer_range=0.1)


def relative_position_index(max_text_len: int, grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Index of the relative position bias entry of every (query, key) pair of VLMo's joint
    sequence [text (max_text_len), image [CLS], patches (grid rows x cols, row-major)].

    returns (index [S, S] int64 with S = max_text_len + 1 + rows * cols, number of entries).
    The text-only pass uses index[:S_text, :S_text], the image-only pass index[max_text_len:, max_text_len:].
    """
    rows, cols = grid
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :]  # [2, P, P]: (dy, dx) of query minus key
    patch_entries = (2 * rows - 1) * (2 * cols - 1)
    patch_index = (offsets[0] + rows - 1) * (2 * cols - 1) + offsets[1] + cols - 1
    image_len = 1 + rows * cols
    image_index = torch.empty(image_len, image_len, dtype=torch.long)
    image_index[1:, 1:] = patch_index
    image_index[0, :] = patch_entries  # [CLS] -> patch
    image_index[:, 0] = patch_entries + 1  # patch -> [CLS]
    image_index[0, 0] = patch_entries + 2
    text_base = patch_entries + 3
    positions = torch.arange(max_text_len)
    text_index = positions[:, None] - positions[None, :] + max_text_len - 1 + text_base
    cross_base = text_base + 2 * max_text_len - 1
    index = torch.cat([
        torch.cat([text_index, torch.full((max_text_len, image_len), cross_base)], 1),
        torch.cat([torch.full((image_len, max_text_len), cross_base + 1), image_index], 1),
    ], 0)
    return index, cross_base + 2


class VLMo(PretrainingModel):
    """VLMo (see the module docstring for the architecture and the SPEC facts).

    forward(input_ids [B, S] = None, pixel_values [B, C, H, W] = None, attention_mask [B, S] = None, *,
            mlm_input_ids [B, S] = None, mlm_labels [B, S] = None, itc: bool = False, itm: bool = False)
      input_ids: text token ids, S <= max_text_len; attention_mask: 1 / True = real token.
      pixel_values: images of exactly image_size x image_size (absolute position embedding).
      Which encoder runs: both inputs -> the fusion (joint) pass; only input_ids -> the
      text-only pass (L-FFN); only pixel_values -> the image-only pass (V-FFN).
      mlm_labels: original ids at the masked positions, -100 elsewhere (MLM objective); the
        MLM pass reads mlm_input_ids (the masked text) or, when None, input_ids.
      itc / itm: compute the contrastive / the hard-negative matching objective (the pairs of the
        batch are the positives; both need input_ids and pixel_values).
    returns ModelOutput:
      fusion pass (both inputs; of input_ids, not the masked text): last_hidden_state
        [B, max_text_len + 1 + N, D] (text padded to max_text_len, then image [CLS] + N
        patches), text_hidden_state [B, S, D], image_hidden_state [B, 1 + N, D], pooler_output [B, D];
      text-only / image-only pass: last_hidden_state [B, S, D] / [B, 1 + N, D] and
        text_features / image_features [B, D] (the normalised ITC features);
      itc or itm: image_features, text_features [B, D], itc_logits [B, B] (image-to-text,
        scaled by exp(logit_scale));
      itm: itm_logits [3B, 2] (positives, text b with its negative image, image b with its
        negative text), itm_labels [3B], itm_negative_images [B] (index of the negative image
        of text b), itm_negative_texts [B] (negative text of image b);
      mlm: mlm_logits [B, S, V];
      losses {"itc", "itm", "mlm"} (those requested) and loss = their weighted sum.
    """

    def __init__(self, config: VLMoConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if not 0 <= c.vlffn_start_layer_index <= c.num_layers:
            raise ValueError(f"VLMo: vlffn_start_layer_index {c.vlffn_start_layer_index} outside [0, {c.num_layers}]")
        if c.image_size % c.patch_size:
            raise ValueError(f"VLMo: image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        d = c.hidden_size
        self.grid = (c.image_size // c.patch_size, c.image_size // c.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.text_embeddings = TextEmbeddings(c.vocab_size, d, c.max_text_len, pad_token_id=PAD, dropout=c.dropout)
        self.token_type_embeddings = nn.Embedding(2, d)
        # The patch projection lives in a Conv2d (timm's key patch_embed.proj); the fused op reads it.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c.num_channels, d, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, d)) if c.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            MoMEBlock(d, c.num_heads, c.mlp_ratio, with_vlffn=i >= c.vlffn_start_layer_index,
                      layer_scale_init_values=c.layer_scale_init, max_text_len=c.max_text_len, eps=c.layer_norm_eps)
            for i in range(c.num_layers))
        self.norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        if c.relative_position_bias:
            index, entries = relative_position_index(c.max_text_len, self.grid)
            # Not in VLMo's checkpoints: rebuilt by reset_parameters() and after every load (derived_buffers).
            self.register_buffer("relative_position_index", index, persistent=False)
            # [entries, layers * heads]: one bias per layer and head for each kind of token pair.
            self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, c.num_layers * c.num_heads))
        else:
            self.relative_position_index, self.relative_position_bias_table = None, None
        self.itc_image_proj = nn.Linear(d, d, bias=False)
        self.itc_text_proj = nn.Linear(d, d, bias=False)
        # Shape [1], not a scalar: FSDP2 shards no 0-dim parameter (a scalar in an older
        # checkpoint still loads, see _load_from_state_dict).
        self.logit_scale = nn.Parameter(torch.tensor([1 / 0.07]).log())
        self.pooler = Pooler(d)
        self.itm_head = nn.Linear(d, 2)
        self.mlm_head = MLMHead(d, c.vocab_size)
        self.apply(self._init_weights)
        for parameter in (self.cls_token, self.pos_embed, self.relative_position_bias_table):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=c.initializer_range)

    def derived_buffers(self) -> dict:
        if self.relative_position_bias_table is None:
            return {}
        return {"relative_position_index": relative_position_index(self.config.max_text_len, self.grid)[0]}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # checkpoints from before the [1] shape
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # VLMo's initialisation: N(0, initializer_range) weights (timm's trunc_normal_, whose
        # default bounds of +-2 leave it untruncated at this std), zero biases.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    # -- inputs ----------------------------------------------------------------------------------
    def _text_mask(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        mask = as_bool_mask("VLMo", "attention_mask", attention_mask, input_ids.shape)
        return torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask

    # -- embeddings and encoder ------------------------------------------------------------------
    def _embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, D]: BERT embeddings + the text token type (0)."""
        return self.text_embeddings(input_ids) + embedding_row(self.token_type_embeddings, 0)

    def _embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + N, D]: patches, [CLS], position embedding (one op), dropout,
        + the image token type (1)."""
        tokens = project_patches("VLMo.patch_embed", self.patch_embed.proj, pixel_values,
                                 pos_embed=self.pos_embed, cls_token=self.cls_token)
        return self.pos_drop(tokens) + embedding_row(self.token_type_embeddings, 1)

    def _pad_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad [B, S] text to [B, max_text_len] (PAD ids, mask False) for the joint input."""
        missing = self.config.max_text_len - input_ids.shape[1]
        return F.pad(input_ids, (0, missing), value=PAD), F.pad(mask, (0, missing), value=False)

    def _relative_position_biases(self, rows: slice, cols: slice) -> list:
        """Per layer [H, S, S] biases for the sub-sequence index[rows, cols] (Nones without the flag)."""
        if self.relative_position_bias_table is None:
            return [None] * len(self.blocks)
        index = self.relative_position_index[rows, cols]
        bias = self.relative_position_bias_table[index]  # [S, S, layers * heads]
        bias = bias.unflatten(-1, (len(self.blocks), self.config.num_heads)).permute(2, 3, 0, 1)
        return list(bias.unbind(0))

    def _encode(self, x: torch.Tensor, mask: Optional[torch.Tensor], modality: Optional[str]) -> torch.Tensor:
        """The block stack and final norm; modality "text" / "image" (dual encoder) or None (joint)."""
        length, text_len = x.shape[1], self.config.max_text_len
        if modality == "text":
            biases = self._relative_position_biases(slice(0, length), slice(0, length))
        elif modality == "image":
            biases = self._relative_position_biases(slice(text_len, None), slice(text_len, None))
        else:
            biases = self._relative_position_biases(slice(None), slice(None))
        for block, bias in zip(self.blocks, biases):
            x = block(x, mask, modality, bias)
        return self.norm(x)

    def _fuse(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Joint pass over embedded text [B, max_text_len, D] (+ mask) and image [B, 1 + N, D]."""
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        return self._encode(torch.cat([text, image], 1), torch.cat([text_mask, image_mask], 1), None)

    def _image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._encode(image, None, "image")
        return hidden, F.normalize(self.itc_image_proj(hidden[:, 0]), dim=-1)

    def _text_features(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._encode(text, mask, "text")
        return hidden, F.normalize(self.itc_text_proj(hidden[:, 0]), dim=-1)

    # -- public encoders (retrieval) -------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Dual-encoder image features: pixel_values [B, C, H, W] -> normalised ITC features [B, D]."""
        check_fixed_size_pixels("VLMo", pixel_values, self.config.num_channels, self.config.image_size)
        with self.kernels():
            return self._image_features(self._embed_image(pixel_values))[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dual-encoder text features: input_ids [B, S] (+ attention_mask) -> normalised ITC features [B, D]."""
        check_text("VLMo", input_ids, self.config.max_text_len, self.config.vocab_size)
        mask = self._text_mask(input_ids, attention_mask)
        with self.kernels():
            return self._text_features(self._embed_text(input_ids), mask)[1]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, *, mlm_input_ids: Optional[torch.Tensor] = None,
                mlm_labels: Optional[torch.Tensor] = None, itc: bool = False, itm: bool = False) -> ModelOutput:
        c = self.config
        if input_ids is None and pixel_values is None:
            raise ValueError("VLMo: give input_ids, pixel_values or both")
        mlm = mlm_labels is not None
        if (itc or itm or mlm) and (input_ids is None or pixel_values is None):
            raise ValueError("VLMo: the itc, itm and mlm objectives need both input_ids and pixel_values")
        if input_ids is not None:
            check_text("VLMo", input_ids, c.max_text_len, c.vocab_size)
        if pixel_values is not None:
            check_fixed_size_pixels("VLMo", pixel_values, c.num_channels, c.image_size)
        batch = check_batch("VLMo", input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels)
        for name, tensor in (("mlm_input_ids", mlm_input_ids), ("mlm_labels", mlm_labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"VLMo: {name} must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(tensor.shape)}")
        if mlm_input_ids is not None:
            check_text("VLMo", mlm_input_ids, c.max_text_len, c.vocab_size)
        if itm and batch < 2:
            raise ValueError("VLMo: itm draws hard negatives from the batch and needs at least 2 pairs")
        text_mask = self._text_mask(input_ids, attention_mask) if input_ids is not None else None

        with self.kernels():
            out, losses = ModelOutput(), {}
            if pixel_values is None:
                out.last_hidden_state, out.text_features = self._text_features(self._embed_text(input_ids), text_mask)
                return out
            image = self._embed_image(pixel_values)
            if input_ids is None:
                out.last_hidden_state, out.image_features = self._image_features(image)
                return out

            length = input_ids.shape[1]
            padded_ids, padded_mask = self._pad_text(input_ids, text_mask)
            text = self._embed_text(padded_ids)
            if itc or itm:
                _, out.image_features = self._image_features(image)
                # the unpadded text embedded on its own: a slice of the padded one has the padded
                # row stride, which ties the text length to max_text_len under dynamic shapes
                _, out.text_features = self._text_features(self._embed_text(input_ids), text_mask)
                itc_loss, out.itc_logits = contrastive_loss(out.image_features, out.text_features, self.logit_scale)
                if itc:
                    losses["itc"] = itc_loss
            if itm:
                # VLMo's order: a negative image for each text, then a negative text for each image.
                negative_images = hard_negative_indices(out.itc_logits.T)
                negative_texts = hard_negative_indices(out.itc_logits)
                hidden = self._fuse(torch.cat([text, text, text[negative_texts]]),
                                    torch.cat([padded_mask, padded_mask, padded_mask[negative_texts]]),
                                    torch.cat([image, image[negative_images], image]))
                out.itm_logits = self.itm_head(self.pooler(hidden))
                out.itm_labels = torch.cat([torch.ones(batch, dtype=torch.long, device=hidden.device),
                                            torch.zeros(2 * batch, dtype=torch.long, device=hidden.device)])
                out.itm_negative_images, out.itm_negative_texts = negative_images, negative_texts
                losses["itm"] = F.cross_entropy(out.itm_logits.float(), out.itm_labels)
                hidden = hidden[:batch]  # the positive pairs: the fusion pass of the given batch
            else:
                hidden = self._fuse(text, padded_mask, image)
            if mlm:
                mlm_hidden = hidden  # without mlm_input_ids the given text is the masked one
                if mlm_input_ids is not None:
                    masked_ids, _ = self._pad_text(mlm_input_ids, text_mask)
                    mlm_hidden = self._fuse(self._embed_text(masked_ids), padded_mask, image)
                out.mlm_logits = self.mlm_head(mlm_hidden[:, :length])
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            out.last_hidden_state = hidden
            out.text_hidden_state = hidden[:, :length]
            out.image_hidden_state = hidden[:, c.max_text_len:]
            out.pooler_output = self.pooler(hidden)
            out.set_losses(losses, {"itc": c.itc_weight, "itm": c.itm_weight, "mlm": c.mlm_weight})
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective on: input_ids, attention_mask [B, max_text_len],
        pixel_values [B, C, image_size, image_size] (unpadded, as VLMo resizes), mlm_input_ids /
        mlm_labels (15% whole-word masking), itc=True, itm=True."""
        c = self.config
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        images = pairs.images(text["input_ids"], c.image_size, c.image_size, c.patch_size, c.num_channels,
                              generator, pad=False)
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], word_ids=text["word_ids"],
                                                prob=c.mlm_probability, generator=generator)
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": images["pixel_values"], "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
                 "itc": True, "itm": True}
        return to_device(batch, device)
