"""Oscar: one BERT over a caption, the detector's object tags and the region features, pretrained
with masked token modelling on caption and tags and a tag-pollution contrastive loss.

Follows SPEC "Oscar" (microsoft/Oscar oscar/modeling/modeling_bert.py, BertImgModel):
- Text: [CLS] caption [SEP] object-tags [SEP], segment (token type) 0 for the caption part and 1
  for the tags; BERT embeddings (word + position + token type, LayerNorm, dropout).
- Regions: img_embedding = Linear(img_feature_dim -> D) of the region feature with its 6 box
  values appended (2048 + 6 = 2054: x1, y1, x2, y2, w, h, see :func:`oscar_region_features`),
  optionally LayerNorm (``use_img_layernorm``, off by default as in BertImgModel), then dropout;
  concatenated AFTER the text with no position or token-type embedding.
- Encoder: 12 post-LN BERT layers (768 hidden, 12 heads, FFN 3072) over [text; regions] with the
  joint padding mask; pooler tanh(Linear) on [CLS]. Oscar's data uses max_seq_length 35 text
  tokens and max_img_seq_length 50 regions (the synthetic batches' sizes here; the model takes
  any S <= max_position_embeddings and any N).

Objectives (one forward pass; ``out.loss`` = mlm + contrastive, weights 1 each):
- ``mlm`` (masked token loss): BERT head tied to the word embeddings over caption AND tag tokens
  (15% of them, 80/10/10); cross-entropy over the masked ones.
- ``contrastive``: with probability 0.5 the tag sequence is replaced by another image's tags
  ("polluted"); Linear(D, num_contrast_classes = 2) on the pooled [CLS], cross-entropy.
  ``contrastive_labels`` use this library's matching convention, 1 = the tags are the image's
  own, 0 = polluted (Oscar's data code marks the unpolluted pair 0).

Synthetic tags: a tag is the caption token a synthetic region depicts (what a detector would
name it), one per real region in region order.

Not implemented: Oscar+'s 3-way contrastive variant (set num_contrast_classes for the head
size only), the discrete-code image feature types. Attention-probability dropout is the
original's 0.1 (``attention_dropout``, in the attention op in training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models._single_stream import SingleStreamEncoder, box_features, check_regions, check_shape
from vlkernels.models.common import (
    BERT_MLM_TIE, IGNORE_INDEX, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_ids, check_text,
    init_bert_weights, mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import (
    FIRST_WORD_ID, MASK, PAD, SEP, SyntheticPairs, mismatched_pairs, seeded_generator, to_device,
)
from vlkernels.nn import MLMHead, TextEmbeddings
from vlkernels.nn.attention import ACTIVATIONS

NAME = "Oscar"
BOX_VALUES = 6  # x1, y1, x2, y2, w, h appended to each region feature


@dataclass
class OscarConfig:
    """Oscar's sizes and pretraining settings (names follow its BERT config and options).

    img_feature_dim: width of the region input, the feature plus its 6 box values (2048 + 6);
    max_seq_length / max_img_seq_length: text tokens and regions of the synthetic batches
    (Oscar's 35 and 50); max_tag_len: tag slots of the synthetic text (the caption gets
    max_seq_length - max_tag_len - 1 tokens incl. [CLS] and [SEP]).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # a vlkernels.nn ACTIVATIONS name
    img_feature_dim: int = 2054
    use_img_layernorm: bool = False
    img_layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    num_contrast_classes: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_seq_length: int = 35
    max_img_seq_length: int = 50
    max_tag_len: int = 12
    mlm_probability: float = 0.15
    tag_pollution_prob: float = 0.5
    mlm_weight: float = 1.0
    contrastive_weight: float = 1.0

    @classmethod
    def base(cls) -> "OscarConfig":
        """Oscar-base: 12 layers, 768 hidden, 12 heads, FFN 3072, 2054-d region inputs."""
        return cls()

    @classmethod
    def tiny(cls) -> "OscarConfig":
        """For tests: 32 hidden, 2 heads, 2 layers, vocab 160, 14 text tokens (up to 4 tags),
        6 regions of 16 + 6 values."""
        return cls(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   img_feature_dim=16 + BOX_VALUES, max_position_embeddings=14, max_seq_length=14,
                   max_img_seq_length=6, max_tag_len=4, dropout=0.0,
                   attention_dropout=0.0)


def oscar_region_features(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Oscar's region input: features [B, N, F] with the normalised boxes [B, N, 4] (x1, y1, x2, y2)
    appended as (x1, y1, x2, y2, w, h) -> [B, N, F + 6]."""
    return torch.cat([features, box_features(boxes, area=False).to(features.dtype)], dim=-1)


def caption_and_tags(captions: torch.Tensor, caption_mask: torch.Tensor, tags: list, length: int) -> dict:
    """Oscar's text layout [CLS] caption [SEP] tags [SEP] [PAD]... from captions [B, Sc] (with
    their [CLS] / [SEP], caption_mask [B, Sc] 1 = real) and per-sample tag id lists.

    returns input_ids, attention_mask, token_type_ids (0 caption part, 1 tags and the last [SEP])
    [B, length] int64 and maskable [B, length] bool (caption words and tags)."""
    batch = captions.shape[0]
    input_ids = torch.full((batch, length), PAD, dtype=torch.long)
    token_type_ids = torch.zeros((batch, length), dtype=torch.long)
    for b in range(batch):
        caption = captions[b, :int(caption_mask[b].sum())]
        row = torch.cat([caption, torch.as_tensor(tags[b], dtype=torch.long), torch.tensor([SEP])])
        if len(row) > length:
            raise ValueError(f"caption_and_tags: {len(row)} tokens do not fit {length}")
        input_ids[b, :len(row)] = row
        token_type_ids[b, len(caption):len(row)] = 1
    attention_mask = (input_ids != PAD).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "maskable": input_ids >= FIRST_WORD_ID}


class Oscar(PretrainingModel):
    """Oscar (see the module docstring for the architecture, objectives and SPEC facts).

    forward(input_ids [B, S], img_feats [B, N, img_feature_dim], attention_mask [B, S] = None,
            token_type_ids [B, S] = None, img_mask [B, N] = None, *, mlm_labels [B, S] = None,
            contrastive_labels [B] = None)
      input_ids: [CLS] caption [SEP] tags [SEP] (see :func:`caption_and_tags`), S <=
      max_position_embeddings; token_type_ids 0 caption / 1 tags; img_feats: region features
      with their 6 box values (:func:`oscar_region_features`); masks 1 / True = real token
      (None: all real). mlm_labels: original ids at the masked caption / tag tokens, -100
      elsewhere; contrastive_labels: 1 = the tags are the image's, 0 = polluted.
    returns ModelOutput with last_hidden_state [B, S + N, D] (text then regions), pooler_output
      [B, D], and with labels mlm_logits [B, S, V], contrastive_logits [B, num_contrast_classes],
      losses {"mlm", "contrastive"} (those given) and loss, their weighted sum.
    """

    def __init__(self, config: OscarConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"{NAME}: hidden_size {c.hidden_size} is not a multiple of num_attention_heads "
                             f"{c.num_attention_heads}")
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{NAME}: hidden_act must be one of {sorted(ACTIVATIONS)}, got {c.hidden_act!r}")
        if c.max_seq_length > c.max_position_embeddings:
            raise ValueError(f"{NAME}: max_seq_length {c.max_seq_length} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if c.max_seq_length - c.max_tag_len - 1 < 4:
            raise ValueError(f"{NAME}: max_seq_length {c.max_seq_length} leaves the caption fewer than 4 tokens "
                             f"after {c.max_tag_len} tags")
        d = c.hidden_size
        self.embeddings = TextEmbeddings(c.vocab_size, d, c.max_position_embeddings, c.type_vocab_size,
                                         pad_token_id=PAD, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.img_embedding = nn.Linear(c.img_feature_dim, d)
        self.img_layer_norm = nn.LayerNorm(d, eps=c.img_layer_norm_eps) if c.use_img_layernorm else None
        self.img_dropout = nn.Dropout(c.dropout)
        self.encoder = SingleStreamEncoder(d, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers,
                                           dropout=c.dropout, attention_dropout=c.attention_dropout,
                                           activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps)
        self.mlm_head = MLMHead(d, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                                word_embeddings=self.embeddings.word_embeddings)
        self.contrastive_head = nn.Linear(d, c.num_contrast_classes)
        init_bert_weights(self, c.initializer_range)

    def tied_weights(self) -> dict:
        return BERT_MLM_TIE

    def _check_inputs(self, input_ids, img_feats, attention_mask, token_type_ids, img_mask, mlm_labels,
                      contrastive_labels):
        c = self.config
        check_text(NAME, input_ids, c.max_position_embeddings, c.vocab_size)
        check_regions(NAME, "img_feats", img_feats, c.img_feature_dim)
        batch = check_batch(NAME, input_ids=input_ids, img_feats=img_feats, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, img_mask=img_mask, mlm_labels=mlm_labels,
                            contrastive_labels=contrastive_labels)
        text_shape = tuple(input_ids.shape)
        check_shape(NAME, "token_type_ids", token_type_ids, text_shape)
        check_ids(NAME, "token_type_ids", token_type_ids, 0, c.type_vocab_size)
        check_shape(NAME, "mlm_labels", mlm_labels, text_shape)
        check_ids(NAME, "mlm_labels", mlm_labels, 0, c.vocab_size, ignore=IGNORE_INDEX)
        check_shape(NAME, "contrastive_labels", contrastive_labels, (batch,))
        check_ids(NAME, "contrastive_labels", contrastive_labels, 0, c.num_contrast_classes)
        return (as_bool_mask(NAME, "attention_mask", attention_mask, text_shape),
                as_bool_mask(NAME, "img_mask", img_mask, img_feats.shape[:2]))

    def forward(self, input_ids: torch.Tensor, img_feats: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, img_mask: Optional[torch.Tensor] = None, *,
                mlm_labels: Optional[torch.Tensor] = None,
                contrastive_labels: Optional[torch.Tensor] = None) -> ModelOutput:
        c = self.config
        text_mask, region_mask = self._check_inputs(input_ids, img_feats, attention_mask, token_type_ids, img_mask,
                                                    mlm_labels, contrastive_labels)
        with self.kernels():
            text = self.embeddings(input_ids, token_type_ids)
            regions = self.img_embedding(img_feats)
            if self.img_layer_norm is not None:
                regions = self.img_layer_norm(regions)
            hidden, pooled = self.encoder(text, self.img_dropout(regions), text_mask, region_mask)
            out = ModelOutput(last_hidden_state=hidden, pooler_output=pooled)
            losses = {}
            if mlm_labels is not None:
                out.mlm_logits = self.mlm_head(hidden[:, :input_ids.shape[1]])
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if contrastive_labels is not None:
                out.contrastive_logits = self.contrastive_head(pooled)
                losses["contrastive"] = F.cross_entropy(out.contrastive_logits.float(), contrastive_labels)
            out.set_losses(losses, {"mlm": c.mlm_weight, "contrastive": c.contrastive_weight})
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic Oscar triples: captions of up to max_seq_length - max_tag_len - 1 tokens,
        ``max_img_seq_length`` regions showing caption words (some padded, img_mask) as
        img_feats with their box values, the regions' tags (the depicted tokens of the first
        max_tag_len real regions); half the samples get another sample's tags
        (contrastive_labels 0); then 15% of the caption and tag tokens masked (mlm_labels)."""
        c = self.config
        generator = seeded_generator(generator)
        pairs = SyntheticPairs(c.vocab_size)
        caption = pairs.text(batch_size, c.max_seq_length - c.max_tag_len - 1, generator)
        regions = pairs.regions(caption["input_ids"], c.max_img_seq_length,
                                       c.img_feature_dim - BOX_VALUES, generator)
        real = regions["region_mask"].bool()
        own_tags = [regions["region_tokens"][b][real[b]][:c.max_tag_len].tolist() for b in range(batch_size)]
        tag_source, contrastive_labels = mismatched_pairs(batch_size, generator, c.tag_pollution_prob)
        text = caption_and_tags(caption["input_ids"], caption["attention_mask"],
                                [own_tags[int(i)] for i in tag_source], c.max_seq_length)
        input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                            maskable=text["maskable"], prob=c.mlm_probability, generator=generator)
        batch = {"input_ids": input_ids, "attention_mask": text["attention_mask"],
                 "token_type_ids": text["token_type_ids"],
                 "img_feats": oscar_region_features(regions["region_features"], regions["boxes"])
                 * regions["region_mask"][..., None],  # padded regions are all-zero rows, as Oscar pads
                 "img_mask": regions["region_mask"], "mlm_labels": mlm_labels,
                 "contrastive_labels": contrastive_labels}
        return to_device(batch, device)
