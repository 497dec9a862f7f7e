"""METER: a text encoder and an image encoder joined by a stack of co-attention layers, pretrained
with masked language modeling (MLM) and image-text matching (ITM).

Follows SPEC "METER co-attention" (zdou0830/METER, meter/modules/meter_module.py, the CLIP-ViT +
BERT variant):
- Text encoder: BERT (``vlkernels.nn.TextEmbeddings`` + ``BertLayer`` stack; base: 12 layers,
  768 hidden, bert-base-uncased sizes).
- Image encoder: CLIP's vision Transformer: patch projection without bias, class token and
  absolute position embedding (one fused ``patch_embed`` op), ``ln_pre``, pre-LN blocks
  (``vlkernels.nn.PreLNBlock`` with CLIP's QuickGELU MLP, LayerNorm eps 1e-5) and ``ln_post`` on
  every token. METER builds CLIP's tower with one block fewer than the checkpoint has (11 of
  ViT-B/16's 12), so base has ``image_num_layers=11``.
- Each encoder's output -> Linear to the fusion width, + a token-type (modality) embedding
  (text 0, image 1). The image has no padding (every image token is real).
- ``num_cross_layers`` (6) ``vlkernels.nn.METERCrossLayer``: per stream self-attention ->
  cross-attention (query own stream, key/value the other stream's layer input) -> FFN, each
  BERT post-LN, separate weights per stream, both streams updated in parallel.
- Poolers (tanh(Linear) of the first token) on each stream; ``pooler_output`` is the
  concatenation [text pooled ; image pooled] [B, 2D], the input of the ITM (and VQA) heads.

Objectives (METER's pretraining: loss weights 1 and 1):
- ``mlm``: the masked text (15% whole-word masking, BERT 80/10/10: done by the data pipeline,
  ``synthetic_batch`` uses ``common.mask_tokens``) with its own image; BERT's prediction head
  (transform + decoder + bias, not tied to the word embeddings, as METER's) on the text stream.
- ``itm``: a second pass over the unmasked text with the image of ``itm_image_index`` (50% of
  the pairs get another image of the batch: ``synthetic.mismatched_pairs``); Linear(2D, 2) on
  ``pooler_output``; cross-entropy against ``itm_labels`` (1 = matched).

Not implemented: RoBERTa / Swin variants, the VQA / NLVR2 / retrieval heads, attention dropout
inside the CLIP tower (0 in CLIP). Attention-probability dropout in the BERT-style layers is
``attention_dropout``, METER's 0.1 (in the attention ops in training, see vlkernels.nn.attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_fixed_size_pixels, check_text, init_bert_weights,
    mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, mismatched_pairs, to_device
from vlkernels.nn import BertLayer, METERCrossLayer, MLMHead, PatchEmbed, Pooler, PreLNBlock, TextEmbeddings
from vlkernels.nn._submodules import embedding_row
from vlkernels.nn.patch_embed import project_patches


@dataclass
class METERConfig:
    """METER's sizes. ``text_*``: the BERT text encoder; ``image_*``: the CLIP vision tower;
    ``hidden_size`` / ``num_heads`` / ``intermediate_size``: the co-attention fusion layers."""

    vocab_size: int = 30522
    max_text_len: int = 50
    max_position_embeddings: int = 512  # BERT's position table (>= max_text_len)
    text_hidden_size: int = 768
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    image_hidden_size: int = 768
    image_num_layers: int = 11  # CLIP ViT-B/16 minus its last block, as METER builds it
    image_num_heads: int = 12
    image_mlp_ratio: float = 4.0
    image_layer_norm_eps: float = 1e-5  # CLIP's LayerNorm
    hidden_size: int = 768
    num_cross_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm (text encoder and fusion layers)
    dropout: float = 0.1  # BERT hidden dropout (text encoder, fusion layers)
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    initializer_range: float = 0.02
    mlm_probability: float = 0.15
    itm_negative_prob: float = 0.5
    mlm_weight: float = 1.0
    itm_weight: float = 1.0

    @classmethod
    def base(cls) -> "METERConfig":
        """METER-CLIP-ViT-B/16 + BERT-base: 12 text layers, 11 CLIP blocks at 224 / 16, 6 fusion
        layers of 768 hidden, 12 heads, FFN 3072; max_text_len 50."""
        return cls()

    @classmethod
    def tiny(cls) -> "METERConfig":
        """For tests: 1 text layer (32 wide), 1 image block (16 wide, so the projections change
        the width), 2 fusion layers of 32 hidden, 32x32 images of 16x16 patches."""
        return cls(vocab_size=160, max_text_len=12, max_position_embeddings=12, text_hidden_size=32,
                   text_num_layers=1, text_num_heads=2, text_intermediate_size=64, image_size=32, patch_size=16,
                   image_hidden_size=16, image_num_layers=1, image_num_heads=2, hidden_size=32,
                   num_cross_layers=2, num_heads=2, intermediate_size=64, dropout=0.0,
                   attention_dropout=0.0)


class METER(PretrainingModel):
    """METER (see the module docstring for the architecture and the SPEC facts).

    forward(input_ids [B, S], pixel_values [B, C, H, W], attention_mask [B, S] = None, *,
            mlm_input_ids [B, S] = None, mlm_labels [B, S] = None,
            itm_labels [B] = None, itm_image_index [B] = None)
      input_ids: token ids, S <= max_text_len; attention_mask: 1 / True = real token.
      pixel_values: images of exactly image_size x image_size (absolute position embedding).
      mlm_labels: original ids at the masked positions, -100 elsewhere (MLM objective); the MLM
        pass reads mlm_input_ids (the masked text) or, when None, input_ids, with the batch's
        own images.
      itm_labels: 1 = the text matches the image of its ITM pair, 0 = not (ITM objective);
        itm_image_index: the image (index into the batch) each text is paired with in the ITM
        pass over input_ids; None = the images as given.
    returns ModelOutput:
      the pass over (input_ids, pixel_values) — always without objectives, and with them when an
      objective's pass is that pass (no mlm_input_ids, or no itm_image_index):
        text_hidden_state [B, S, D], image_hidden_state [B, 1 + N, D] (class token + N patches),
        text_pooler_output, image_pooler_output [B, D], pooler_output [B, 2D] (their concatenation);
      mlm: mlm_logits [B, S, V]; itm: itm_logits [B, 2];
      losses {"mlm", "itm"} (those whose labels were given) and loss = their weighted sum.
    """

    def __init__(self, config: METERConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"METER: image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        if c.max_text_len > c.max_position_embeddings:
            raise ValueError(f"METER: max_text_len {c.max_text_len} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        num_patches = (c.image_size // c.patch_size) ** 2
        # Text encoder (BERT).
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.text_hidden_size, c.max_position_embeddings,
                                              pad_token_id=PAD, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.text_layers = nn.ModuleList(
            BertLayer(c.text_hidden_size, c.text_num_heads, c.text_intermediate_size, dropout=c.dropout,
                      attention_dropout=c.attention_dropout, layer_norm_eps=c.layer_norm_eps)
            for _ in range(c.text_num_layers))
        # Image encoder (CLIP ViT): conv1 without bias, class_embedding, positional_embedding, ln_pre,
        # blocks, ln_post; the fused patch_embed op reads patch_embed.proj.
        width = c.image_hidden_size
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.num_channels, width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.image_position_embedding = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.image_pre_norm = nn.LayerNorm(width, eps=c.image_layer_norm_eps)
        self.image_blocks = nn.ModuleList()
        for _ in range(c.image_num_layers):
            self.image_blocks.append(PreLNBlock(width, c.image_num_heads, c.image_mlp_ratio,
                                                eps=c.image_layer_norm_eps, activation="quick_gelu"))
        self.image_post_norm = nn.LayerNorm(width, eps=c.image_layer_norm_eps)
        # Into the fusion width, then the modality embedding.
        self.text_transform = nn.Linear(c.text_hidden_size, c.hidden_size)
        self.image_transform = nn.Linear(width, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, c.hidden_size)
        self.cross_layers = nn.ModuleList(
            METERCrossLayer(c.hidden_size, c.num_heads, c.intermediate_size, dropout=c.dropout,
                            attention_dropout=c.attention_dropout, layer_norm_eps=c.layer_norm_eps)
            for _ in range(c.num_cross_layers))
        self.text_pooler = Pooler(c.hidden_size)
        self.image_pooler = Pooler(c.hidden_size)
        self.mlm_head = MLMHead(c.hidden_size, c.vocab_size, layer_norm_eps=c.layer_norm_eps)
        self.itm_head = nn.Linear(2 * c.hidden_size, 2)
        # METER's init_weights (BERT's), which also draws the patch projection from N(0, initializer_range).
        init_bert_weights(self, c.initializer_range)
        nn.init.normal_(self.patch_embed.proj.weight, std=c.initializer_range)
        # CLIP's initialisation scale for the class and position embeddings: width ** -0.5.
        nn.init.normal_(self.class_embedding, std=width ** -0.5)
        nn.init.normal_(self.image_position_embedding, std=width ** -0.5)

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, pixel_values, attention_mask, mlm_input_ids, mlm_labels, itm_labels,
                      itm_image_index) -> Optional[torch.Tensor]:
        c = self.config
        check_text("METER", input_ids, c.max_text_len, c.vocab_size)
        check_fixed_size_pixels("METER", pixel_values, c.num_channels, c.image_size)
        batch = check_batch("METER", input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels, itm_labels=itm_labels,
                            itm_image_index=itm_image_index)
        for name, tensor in (("mlm_input_ids", mlm_input_ids), ("mlm_labels", mlm_labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"METER: {name} must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(tensor.shape)}")
        if mlm_input_ids is not None:
            check_text("METER", mlm_input_ids, c.max_text_len, c.vocab_size)
        if mlm_input_ids is not None and mlm_labels is None:
            raise ValueError("METER: mlm_input_ids without mlm_labels; give the labels to train MLM")
        if itm_image_index is not None and itm_labels is None:
            raise ValueError("METER: itm_image_index without itm_labels; give the labels to train ITM")
        for name, tensor, high in (("itm_labels", itm_labels, 2), ("itm_image_index", itm_image_index, batch)):
            if tensor is None:
                continue
            if tensor.dim() != 1 or tensor.is_floating_point():
                raise ValueError(f"METER: {name} must be an integer [B] tensor, got {tensor.dtype} "
                                 f"{list(tensor.shape)}")
            if tensor.numel() and not torch.compiler.is_compiling():
                low, top = (int(v) for v in torch.aminmax(tensor))
                if low < 0 or top >= high:
                    raise ValueError(f"METER: {name} must lie in [0, {high}), got [{low}, {top}]")
        return as_bool_mask("METER", "attention_mask", attention_mask, input_ids.shape)

    # -- encoders --------------------------------------------------------------------------------
    def _encode_text(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, S] ids -> [B, S, D] fusion-width text tokens (BERT, transform, + token type 0)."""
        x = self.text_embeddings(input_ids)
        for layer in self.text_layers:
            x = layer(x, mask)
        return self.text_transform(x) + embedding_row(self.token_type_embeddings, 0)

    def _encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + N, D] fusion-width image tokens (CLIP ViT, transform, + token type 1)."""
        x = project_patches("METER.patch_embed", self.patch_embed.proj, pixel_values,
                            pos_embed=self.image_position_embedding, cls_token=self.class_embedding)
        x = self.image_pre_norm(x)
        for block in self.image_blocks:
            x = block(x)
        return self.image_transform(self.image_post_norm(x)) + embedding_row(self.token_type_embeddings, 1)

    def _fuse(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], image: torch.Tensor) -> ModelOutput:
        """The co-attention stack and poolers over text [B, S, D] (+ mask) and image [B, 1 + N, D]."""
        for layer in self.cross_layers:
            text, image = layer(text, image, text_mask=text_mask)
        text_pooled, image_pooled = self.text_pooler(text), self.image_pooler(image)
        return ModelOutput(text_hidden_state=text, image_hidden_state=image, text_pooler_output=text_pooled,
                           image_pooler_output=image_pooled,
                           pooler_output=torch.cat([text_pooled, image_pooled], dim=-1))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, *, mlm_input_ids: Optional[torch.Tensor] = None,
                mlm_labels: Optional[torch.Tensor] = None, itm_labels: Optional[torch.Tensor] = None,
                itm_image_index: Optional[torch.Tensor] = None) -> ModelOutput:
        c = self.config
        text_mask = self._check_inputs(input_ids, pixel_values, attention_mask, mlm_input_ids, mlm_labels,
                                       itm_labels, itm_image_index)
        with self.kernels():
            image = self._encode_image(pixel_values)
            text = None  # the encoded input_ids, shared by the passes that read them

            def encoded_text():
                nonlocal text
                if text is None:
                    text = self._encode_text(input_ids, text_mask)
                return text

            out, losses, plain = ModelOutput(), {}, None
            if mlm_labels is not None:
                masked_text = encoded_text() if mlm_input_ids is None else self._encode_text(mlm_input_ids, text_mask)
                fused = self._fuse(masked_text, text_mask, image)
                plain = fused if mlm_input_ids is None else plain
                out.mlm_logits = self.mlm_head(fused.text_hidden_state)
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if itm_labels is not None:
                itm_image = image if itm_image_index is None else image[itm_image_index]
                fused = self._fuse(encoded_text(), text_mask, itm_image)
                plain = fused if itm_image_index is None else plain
                out.itm_logits = self.itm_head(fused.pooler_output)
                losses["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels)
            if not losses:
                plain = self._fuse(encoded_text(), text_mask, image)
            if plain is not None:
                out.update(plain)
            out.set_losses(losses, {"mlm": c.mlm_weight, "itm": c.itm_weight})
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with both objectives: input_ids, attention_mask [B, max_text_len],
        pixel_values [B, C, image_size, image_size] (unpadded: METER resizes), mlm_input_ids /
        mlm_labels (15% whole-word masking), itm_image_index / itm_labels (50% swapped images)."""
        c = self.config
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        images = pairs.images(text["input_ids"], c.image_size, c.image_size, c.patch_size, c.num_channels,
                              generator, pad=False)
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], word_ids=text["word_ids"],
                                                prob=c.mlm_probability, generator=generator)
        itm_image_index, itm_labels = mismatched_pairs(batch_size, generator, c.itm_negative_prob)
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": images["pixel_values"], "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
                 "itm_labels": itm_labels, "itm_image_index": itm_image_index}
        return to_device(batch, device)
