"""VisualBERT: one BERT over a caption and detector region features, pretrained with masked
language modelling and sentence-image prediction.

Follows SPEC "HuggingFace ... VisualBertModel" (transformers' ``VisualBertModel``, whose
weights and outputs this model reproduces):
- Embeddings: text = word[input_ids] + token_type[token_type_ids] + position[position_ids]
  (positions 0..S-1 unless given); regions = visual_projection(visual_embeds) +
  visual_position + visual_token_type[visual_token_type_ids] (type 1 unless given). Without
  ``image_text_alignment`` every region's visual position is ``visual_position_embeddings[0]``
  (HF's zero visual position ids); with it, the mean of the text ``position_embeddings`` of
  the aligned word positions (-1 = none; a region with none gets 0) plus
  ``visual_position_embeddings[0]``. ONE LayerNorm (and dropout) over the concatenation
  [text; regions] (a per-token LayerNorm, so it is applied to both parts by the same module).
- Encoder: ``num_hidden_layers`` post-LN BERT layers over [text; regions] with the joint padding
  mask; pooler tanh(Linear) on token 0 ([CLS]).
- ``special_visual_initialize`` (HF's default True): the visual token-type and position tables
  start as copies of the text ones.

Objectives (VisualBERT's pretraining, HF ``VisualBertForPreTraining``; ``out.loss`` = mlm + itm):
- ``mlm``: BERT's prediction head (transform + decoder tied to the word embeddings) on the
  text positions; cross-entropy over the masked tokens (15%, 80/10/10 in the synthetic batches).
- ``itm`` (sentence-image prediction): Linear(D, 2) on the pooled output, cross-entropy.
  ``itm_labels`` use this library's convention, 1 = the caption matches the image; HF's
  ``sentence_image_labels`` use 0 = matching, so ``from_hf`` swaps the two rows of HF's
  ``seq_relationship`` head.

Both objectives run on one forward pass, as in VisualBERT (the masked caption with the
possibly mismatched image). Not implemented: ``inputs_embeds``, returning attentions or
hidden states, HF's ``bypass_transformer`` variant. Attention-probability dropout is the
original's 0.1 (``attention_dropout``, in the attention op in training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models._single_stream import SingleStreamEncoder, check_regions, check_shape
from vlkernels.models.common import (
    BERT_MLM_TIE, IGNORE_INDEX, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_ids, check_text,
    init_bert_weights, mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, mismatched_pairs, seeded_generator, to_device
from vlkernels.nn import MLMHead, TextEmbeddings
from vlkernels.nn.attention import ACTIVATIONS, activation_name

NAME = "VisualBERT"


@dataclass
class VisualBERTConfig:
    """VisualBERT's sizes and pretraining settings (names follow HF ``VisualBertConfig``).

    visual_embedding_dim: the width of the region features (2048 for the released COCO
    checkpoints' detector features); max_text_len and num_regions: caption length and regions
    per image of the synthetic pretraining batches (the model takes any S <=
    max_position_embeddings and any N).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # a vlkernels.nn ACTIVATIONS name
    visual_embedding_dim: int = 2048
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = PAD
    special_visual_initialize: bool = True
    dropout: float = 0.1  # hidden dropout (HF hidden_dropout_prob)
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_text_len: int = 128
    num_regions: int = 36
    mlm_probability: float = 0.15
    itm_negative_prob: float = 0.5
    mlm_weight: float = 1.0
    itm_weight: float = 1.0

    @classmethod
    def base(cls) -> "VisualBERTConfig":
        """VisualBERT (BERT-base): 12 layers, 768 hidden, 12 heads, FFN 3072, 2048-d region features."""
        return cls()

    @classmethod
    def tiny(cls) -> "VisualBERTConfig":
        """For tests: 32 hidden, 2 heads, 2 layers, vocab 160, 12 tokens, 6 regions of 16-d features."""
        return cls(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   visual_embedding_dim=16, max_position_embeddings=12, max_text_len=12, num_regions=6, dropout=0.0,
                   attention_dropout=0.0)


class VisualBertEmbeddings(TextEmbeddings):
    """VisualBERT's embeddings (HF ``VisualBertEmbeddings`` keys: BERT's ``word_embeddings``,
    ``position_embeddings``, ``token_type_embeddings``, ``LayerNorm`` plus
    ``visual_token_type_embeddings``, ``visual_position_embeddings``, ``visual_projection``).

    forward(input_ids [B, S], token_type_ids [B, S] = 0, position_ids [B or 1, S] = 0..S-1,
            visual_embeds [B, N, visual_dim] = None, visual_token_type_ids [B, N] = 1,
            image_text_alignment [B, N, A] = None) -> [B, S (+ N), D]
    """

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, visual_dim: int, *,
                 pad_token_id: int = PAD, layer_norm_eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__(vocab_size, hidden, max_positions, type_vocab_size, pad_token_id=pad_token_id,
                         layer_norm_eps=layer_norm_eps, dropout=dropout)
        self.visual_token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.visual_position_embeddings = nn.Embedding(max_positions, hidden)
        self.visual_projection = nn.Linear(visual_dim, hidden)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, visual_embeds: Optional[torch.Tensor] = None,
                visual_token_type_ids: Optional[torch.Tensor] = None,
                image_text_alignment: Optional[torch.Tensor] = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # HF's order of the sums, so that the result matches it bit for bit where it can.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        if visual_embeds is not None:
            if visual_token_type_ids is None:
                visual_token_type_ids = torch.ones(visual_embeds.shape[:2], dtype=torch.long,
                                                   device=visual_embeds.device)
            projected = self.visual_projection(visual_embeds)
            position = self.visual_position_embeddings.weight[0]  # HF's zero visual position ids
            if image_text_alignment is not None:
                aligned = image_text_alignment[:, :visual_embeds.shape[1]] != -1  # HF drops extra rows
                words = image_text_alignment[:, :visual_embeds.shape[1]].clamp_min(0)
                weight = aligned.to(x.dtype)
                summed = (self.position_embeddings(words) * weight[..., None]).sum(2)
                position = summed / weight.sum(2).clamp_min(1.0)[..., None] + position
            visual = projected + position + self.visual_token_type_embeddings(visual_token_type_ids)
            x = torch.cat([x, visual], dim=1)
        return self.dropout(self.LayerNorm(x))


class VisualBERT(PretrainingModel):
    """VisualBERT (see the module docstring for the architecture, objectives and SPEC facts).

    forward(input_ids [B, S], attention_mask [B, S] = None, token_type_ids [B, S] = None,
            position_ids [B or 1, S] = None, inputs_embeds = None, visual_embeds [B, N, visual_embedding_dim] = None,
            visual_attention_mask [B, N] = None, visual_token_type_ids [B, N] = None,
            image_text_alignment [B, N, A] = None, output_attentions = None, output_hidden_states = None,
            return_dict = None, *, mlm_labels [B, S] = None, itm_labels [B] = None)
      The keyword inputs of HF ``VisualBertModel.forward``: S <= max_position_embeddings; masks
      1 / True = real token (None: all real); visual_embeds None runs the text alone;
      image_text_alignment: per region the text positions it is aligned to, -1 = padding.
      ``inputs_embeds`` and output_attentions / output_hidden_states / return_dict=False are
      rejected (ValueError). mlm_labels: original ids at the masked text tokens, -100 elsewhere
      (input_ids is the masked text); itm_labels: 1 = the caption matches the image, 0 = not.
    returns ModelOutput with last_hidden_state [B, S + N, D] (text then regions) and
      pooler_output [B, D] (HF's), and with labels mlm_logits [B, S, vocab_size], itm_logits
      [B, 2], losses {"mlm", "itm"} (those given) and loss, their weighted sum.
    """

    def __init__(self, config: VisualBERTConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"{NAME}: hidden_size {c.hidden_size} is not a multiple of num_attention_heads "
                             f"{c.num_attention_heads}")
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{NAME}: hidden_act must be one of {sorted(ACTIVATIONS)}, got {c.hidden_act!r}")
        if c.max_text_len > c.max_position_embeddings:
            raise ValueError(f"{NAME}: max_text_len {c.max_text_len} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        d = c.hidden_size
        self.embeddings = VisualBertEmbeddings(c.vocab_size, d, c.max_position_embeddings, c.type_vocab_size,
                                               c.visual_embedding_dim, pad_token_id=c.pad_token_id,
                                               layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.encoder = SingleStreamEncoder(d, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers,
                                           dropout=c.dropout, attention_dropout=c.attention_dropout,
                                           activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps)
        self.mlm_head = MLMHead(d, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                                word_embeddings=self.embeddings.word_embeddings)
        self.itm_head = nn.Linear(d, 2)
        init_bert_weights(self, c.initializer_range)
        if c.special_visual_initialize:
            with torch.no_grad():
                self.embeddings.visual_token_type_embeddings.weight.copy_(self.embeddings.token_type_embeddings.weight)
                self.embeddings.visual_position_embeddings.weight.copy_(self.embeddings.position_embeddings.weight)

    def tied_weights(self) -> dict:
        return BERT_MLM_TIE

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, visual_embeds,
                      visual_attention_mask, visual_token_type_ids, image_text_alignment, mlm_labels, itm_labels):
        c = self.config
        check_text(NAME, input_ids, c.max_position_embeddings, c.vocab_size)
        batch = check_batch(NAME, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            visual_embeds=visual_embeds, visual_attention_mask=visual_attention_mask,
                            visual_token_type_ids=visual_token_type_ids, image_text_alignment=image_text_alignment,
                            mlm_labels=mlm_labels, itm_labels=itm_labels)
        text_shape = tuple(input_ids.shape)
        check_shape(NAME, "token_type_ids", token_type_ids, text_shape)
        check_ids(NAME, "token_type_ids", token_type_ids, 0, c.type_vocab_size)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) \
                    or position_ids.shape[1] != text_shape[1]:
                raise ValueError(f"{NAME}: position_ids must have shape [{batch} or 1, {text_shape[1]}], "
                                 f"got {list(position_ids.shape)}")
            check_ids(NAME, "position_ids", position_ids, 0, c.max_position_embeddings)
        check_shape(NAME, "mlm_labels", mlm_labels, text_shape)
        check_ids(NAME, "mlm_labels", mlm_labels, 0, c.vocab_size, ignore=IGNORE_INDEX)
        check_shape(NAME, "itm_labels", itm_labels, (batch,))
        check_ids(NAME, "itm_labels", itm_labels, 0, 2)
        text_mask = as_bool_mask(NAME, "attention_mask", attention_mask, text_shape)
        if visual_embeds is None:
            given = [name for name, value in (("visual_attention_mask", visual_attention_mask),
                                              ("visual_token_type_ids", visual_token_type_ids),
                                              ("image_text_alignment", image_text_alignment)) if value is not None]
            if given:
                raise ValueError(f"{NAME}: {', '.join(given)} given without visual_embeds")
            return text_mask, None
        check_regions(NAME, "visual_embeds", visual_embeds, c.visual_embedding_dim)
        regions = tuple(visual_embeds.shape[:2])
        check_shape(NAME, "visual_token_type_ids", visual_token_type_ids, regions)
        check_ids(NAME, "visual_token_type_ids", visual_token_type_ids, 0, c.type_vocab_size)
        if image_text_alignment is not None:
            if image_text_alignment.dim() != 3 or image_text_alignment.shape[0] != batch \
                    or image_text_alignment.shape[1] < regions[1]:
                raise ValueError(f"{NAME}: image_text_alignment must be [{batch}, >= {regions[1]}, A] (text positions "
                                 f"per region, -1 = none), got {list(image_text_alignment.shape)}")
            check_ids(NAME, "image_text_alignment", image_text_alignment, 0, c.max_position_embeddings, ignore=-1)
        region_mask = as_bool_mask(NAME, "visual_attention_mask", visual_attention_mask, regions)
        return text_mask, region_mask

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, visual_embeds: Optional[torch.Tensor] = None,
                visual_attention_mask: Optional[torch.Tensor] = None,
                visual_token_type_ids: Optional[torch.Tensor] = None,
                image_text_alignment: Optional[torch.Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, *,
                mlm_labels: Optional[torch.Tensor] = None, itm_labels: Optional[torch.Tensor] = None) -> ModelOutput:
        if inputs_embeds is not None:
            raise ValueError(f"{NAME}: inputs_embeds is not supported; pass input_ids")
        if output_attentions or output_hidden_states:
            raise ValueError(f"{NAME}: output_attentions / output_hidden_states are not supported (the attention "
                             "kernels never form the probabilities)")
        if return_dict is False:
            raise ValueError(f"{NAME}: return_dict=False is not supported; the model returns a ModelOutput")
        text_mask, region_mask = self._check_inputs(input_ids, attention_mask, token_type_ids, position_ids,
                                                    visual_embeds, visual_attention_mask, visual_token_type_ids,
                                                    image_text_alignment, mlm_labels, itm_labels)
        c = self.config
        with self.kernels():
            x = self.embeddings(input_ids, token_type_ids, position_ids, visual_embeds, visual_token_type_ids,
                                image_text_alignment)
            length = input_ids.shape[1]
            hidden, pooled = self.encoder(x[:, :length], x[:, length:], text_mask, region_mask)
            out = ModelOutput(last_hidden_state=hidden, pooler_output=pooled)
            losses = {}
            if mlm_labels is not None:
                out.mlm_logits = self.mlm_head(hidden[:, :length])
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if itm_labels is not None:
                out.itm_logits = self.itm_head(pooled)
                losses["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels)
            out.set_losses(losses, {"mlm": c.mlm_weight, "itm": c.itm_weight})
            return out

    # -- synthetic data --------------------------------------------------------------------------
    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with both objectives: captions [B, max_text_len] with 15% of the word
        pieces masked (mlm_labels), ``num_regions`` region features showing caption words (some
        padded, visual_attention_mask), and for half the pairs another sample's regions
        (itm_labels 0)."""
        c = self.config
        generator = seeded_generator(generator)
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        masked_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                             maskable=text["maskable"], prob=c.mlm_probability, generator=generator)
        regions = pairs.regions(text["input_ids"], c.num_regions, c.visual_embedding_dim, generator)
        image_index, itm_labels = mismatched_pairs(batch_size, generator, c.itm_negative_prob)
        batch = {"input_ids": masked_ids, "attention_mask": text["attention_mask"],
                 "visual_embeds": regions["region_features"][image_index],
                 "visual_attention_mask": regions["region_mask"][image_index],
                 "mlm_labels": mlm_labels, "itm_labels": itm_labels}
        return to_device(batch, device)

    # -- HuggingFace -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, use_kernels: bool = True) -> "VisualBERT":
        """A copy of a transformers ``VisualBertModel`` (embeddings, encoder, pooler; the heads
        keep their initialisation) or ``VisualBertForPreTraining`` (also its MLM and
        sentence-image heads, the latter's rows swapped to this model's label convention):
        config, weights, dtype, device and train/eval mode. Its forward with VisualBertModel's
        keyword inputs returns HF's last_hidden_state and pooler_output."""
        backbone = getattr(hf_model, "visual_bert", hf_model)
        hf = backbone.config
        if getattr(hf, "bypass_transformer", False):
            raise ValueError(f"{NAME}.from_hf: bypass_transformer models are not supported")
        if backbone.pooler is None:
            raise ValueError(f"{NAME}.from_hf: the source model has no pooler (add_pooling_layer=False)")
        act_module = backbone.encoder.layer[0].intermediate.intermediate_act_fn if len(backbone.encoder.layer) \
            else None
        config = VisualBERTConfig(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
            hidden_act=activation_name(act_module) if act_module is not None else "gelu",
            visual_embedding_dim=hf.visual_embedding_dim, max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size, pad_token_id=backbone.embeddings.word_embeddings.padding_idx,
            special_visual_initialize=hf.special_visual_initialize, dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob, layer_norm_eps=hf.layer_norm_eps,
            initializer_range=hf.initializer_range, max_text_len=min(128, hf.max_position_embeddings))
        weight = backbone.embeddings.word_embeddings.weight
        model = cls(config, use_kernels=use_kernels)
        embeddings = {k: v for k, v in backbone.embeddings.state_dict().items() if k != "position_ids"}
        model.embeddings.load_state_dict(embeddings, strict=True)
        model.encoder.load_hf(backbone.encoder.layer, backbone.pooler)
        if hf_model is not backbone:
            model._load_hf_heads(hf_model)
        return model.to(device=weight.device, dtype=weight.dtype).train(hf_model.training)

    def _load_hf_heads(self, hf_model: nn.Module) -> None:
        """The MLM and sentence-image heads of an HF ``VisualBertForPreTraining``."""
        predictions = hf_model.cls.predictions
        if not torch.equal(predictions.decoder.weight, self.embeddings.word_embeddings.weight):
            raise ValueError(f"{NAME}.from_hf: the MLM decoder is not tied to the word embeddings "
                             "(VisualBERT ties them; this model always does)")
        head = {k: v for k, v in predictions.state_dict().items() if not k.startswith("decoder.")}
        head["decoder.weight"] = self.embeddings.word_embeddings.weight
        if predictions.decoder.bias is not None:  # HF adds the decoder's bias (tied to ``bias`` when loaded)
            head["bias"] = predictions.decoder.bias
        self.mlm_head.load_state_dict(head, strict=True)
        # HF class 0 = "matches"; here class 1 does: swap the rows.
        relationship = hf_model.cls.seq_relationship
        self.itm_head.load_state_dict({"weight": relationship.weight.flip(0), "bias": relationship.bias.flip(0)},
                                      strict=True)
