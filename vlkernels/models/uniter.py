"""UNITER: one BERT over a caption and detector regions, pretrained with masked language
modelling, three forms of masked region modelling, image-text matching and word-region
alignment by optimal transport.

Follows SPEC "UNITER word-region alignment" and ChenRocks/UNITER model/model.py, pretrain.py:
- Text: BERT embeddings (word + position + token type 0, LayerNorm, dropout); UNITER uses the
  cased BERT vocabulary (28996 ids).
- Regions: LN(img_linear(feat)) + LN(pos_linear(location)) + token_type[1] (the text's token-type
  table, type 1), then LayerNorm and dropout. The location is UNITER's 7-d (x1, y1, x2, y2, w, h,
  w*h), built here from normalised (x1, y1, x2, y2) boxes (a 7-d input is taken as is). A masked
  region's feature is replaced by a learned ``mask_embedding`` (UNITER zeroes it in the data and
  adds the embedding in the model).
- Encoder: 12 post-LN BERT layers (768 hidden, 12 heads, FFN 3072) over [text; regions] with the
  joint padding mask; pooler tanh(Linear) on [CLS].

Objectives, each on its own forward pass like UNITER's per-task batches (``out.losses`` names;
``out.loss`` = their sum with the config's weights, 1 each and 0.1 for ``wra``; UNITER samples
one task per step instead of summing):
- ``mlm``: the masked caption (``mlm_input_ids``) with the clean regions; BERT head tied to the
  word embeddings; cross-entropy over the masked tokens (15% of the tokens, 80/10/10).
- masked region modelling on one pass: the clean caption with the ``masked_regions`` (15% of the
  real regions, at least one per image) replaced by the mask embedding:
  - ``mrfr`` (feature regression): Linear + GELU + LN, then a linear map to the feature width
    whose weight is TIED to ``img_linear`` (transposed; own bias), as UNITER's
    RegionFeatureRegression; mean squared error against the unmasked features, averaged over
    the masked regions' feature values (UNITER's ``loss.mean()``). Computed whenever
    ``masked_regions`` is given (its target is the ``region_features`` input).
  - ``mrc`` (region classification): Linear + GELU + LN + Linear(D, 1601) (shared with mrc_kl);
    cross-entropy against ``region_labels``, averaged over the masked regions; class 0 is the
    detector's background and never a target (UNITER's ignore_index 0; -100 is ignored too).
    UNITER derives the label as 1 + argmax of the soft label over classes 1.. (see
    :func:`region_class_targets`).
  - ``mrc_kl``: KL(region_soft_labels || softmax(logits)) averaged over the masked regions AND
    the classes, as UNITER's training loop does (``kl_div(reduction='none').mean()``).
- ``itm``: the clean caption with the regions of ``itm_image_index`` (negatives with p = 0.5),
  Linear(D, 2) on the pooled output, cross-entropy; and on the same pass
- ``wra`` (word-region alignment, ``vlkernels.nn.WRALoss``): the IPOT distance (beta 0.5, 50
  iterations, k 1) between the text and region outputs, split at the caption length; the text
  keeps [CLS] and [SEP] (UNITER's txt_lens count every real token) and pads are masked on both
  sides; (sum of the positive pairs' distances - sum of the negatives') / B, weight 0.1
  (``itm_ot_lambda``): total = itm_ce + 0.1 * ot_loss.

Attention-probability dropout is the original's 0.1 (``attention_dropout``, in the attention
op in training). Not implemented: UNITER's hard-negative ITM fine-tuning, conditional masking
schedules.
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
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, mismatched_pairs, seeded_generator, to_device
from vlkernels.nn import MLMHead, TextEmbeddings, WRALoss
from vlkernels.nn._submodules import embedding_row
from vlkernels.nn.attention import ACTIVATIONS

NAME = "UNITER"
LOCATION_DIM = 7  # UNITER's region location: x1, y1, x2, y2, w, h, w*h


@dataclass
class UNITERConfig:
    """UNITER's sizes and pretraining settings (UNITER-base; names follow its config / options).

    img_dim: region feature width (2048); num_region_classes: the detector's classes incl.
    background (1601, UNITER's IMG_LABEL_DIM); max_text_len / num_regions: caption length and
    regions per image of the synthetic batches (UNITER: max_txt_len 60, 10-100 boxes).
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # a vlkernels.nn ACTIVATIONS name
    img_dim: int = 2048
    num_region_classes: int = 1601
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_text_len: int = 60
    num_regions: int = 36
    mlm_probability: float = 0.15
    mrm_probability: float = 0.15
    itm_negative_prob: float = 0.5
    itm_ot_lambda: float = 0.1  # weight of the WRA loss
    ot_beta: float = 0.5
    ot_iterations: int = 50
    ot_inner_k: int = 1
    mlm_weight: float = 1.0
    mrfr_weight: float = 1.0
    mrc_weight: float = 1.0
    mrc_kl_weight: float = 1.0
    itm_weight: float = 1.0

    @classmethod
    def base(cls) -> "UNITERConfig":
        """UNITER-base: 12 layers, 768 hidden, 12 heads, FFN 3072, 2048-d regions, 1601 classes."""
        return cls()

    @classmethod
    def tiny(cls) -> "UNITERConfig":
        """For tests: 32 hidden, 2 heads, 2 layers, vocab 160, 12 tokens, 6 regions of 16-d
        features, 12 region classes."""
        return cls(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   img_dim=16, num_region_classes=12, max_position_embeddings=12, max_text_len=12, num_regions=6,
                   dropout=0.0, attention_dropout=0.0)


class RegionEmbeddings(nn.Module):
    """UNITER's region embeddings (its ``img_embeddings`` keys):

        LayerNorm(LN(img_linear(feat)) + LN(pos_linear(location)) + type_embedding), dropout

    forward(feats [B, N, img_dim], location [B, N, 7], type_embedding [D] or [B, N, D],
            masked [B, N] bool = None: regions whose feature becomes ``mask_embedding``) -> [B, N, D]
    """

    def __init__(self, img_dim: int, hidden: int, *, layer_norm_eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        self.img_linear = nn.Linear(img_dim, hidden)
        self.img_layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.pos_linear = nn.Linear(LOCATION_DIM, hidden)
        self.pos_layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(img_dim))
        self.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, location: torch.Tensor, type_embedding: torch.Tensor,
                masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        if masked is not None:
            feats = torch.where(masked[..., None], self.mask_embedding.to(feats.dtype), feats)
        x = self.img_layer_norm(self.img_linear(feats)) + self.pos_layer_norm(self.pos_linear(location))
        return self.dropout(self.LayerNorm(x + type_embedding))


class RegionFeatureRegression(nn.Module):
    """MRFR head: Linear + GELU + LN, then ``x @ weight + bias`` where ``weight`` IS the region
    embedding's ``img_linear.weight`` [D, img_dim] (one shared parameter, as UNITER ties them;
    the bias is the head's own). [.., D] -> [.., img_dim]."""

    def __init__(self, hidden: int, tied_linear: nn.Linear, *, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=layer_norm_eps))
        self.weight = tied_linear.weight
        self.bias = nn.Parameter(torch.zeros(tied_linear.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.weight.t(), self.bias)


def region_classifier(hidden: int, num_classes: int, layer_norm_eps: float = 1e-12) -> nn.Sequential:
    """MRC head (UNITER's RegionClassification): Linear + GELU + LN + Linear(D, num_classes)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=layer_norm_eps),
                         nn.Linear(hidden, num_classes))


def region_class_targets(soft_labels: torch.Tensor) -> torch.Tensor:
    """UNITER's MRC target from the detector's soft labels [..., C]: 1 + argmax over classes 1..
    (the background class 0 is never the target). -> [...] int64."""
    return soft_labels[..., 1:].argmax(-1) + 1


def synthetic_soft_labels(region_tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A stand-in for the detector's class distribution of synthetic regions [B, N] (the
    caption token each depicts): class 1 + token mod (C - 1) gets 0.7, background 0.1, and
    0.2 is spread evenly over all C classes. -> [B, N, C] float32, rows summing to 1."""
    classes = 1 + region_tokens % (num_classes - 1)
    soft = torch.full((*region_tokens.shape, num_classes), 0.2 / num_classes)
    soft[..., 0] += 0.1
    soft.scatter_add_(-1, classes[..., None], torch.full((*region_tokens.shape, 1), 0.7))
    return soft


def mask_real_regions(region_mask: torch.Tensor, prob: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """UNITER's MRM draw: each real region (region_mask [B, N]) masked with ``prob``, and one
    random real region when a sample drew none. -> [B, N] bool."""
    real = region_mask.bool()
    masked = (torch.rand(real.shape, generator=generator) < prob) & real
    fallback = torch.multinomial(real.float(), 1, generator=generator)  # every sample has a real region
    none = ~masked.any(1)
    masked[none, fallback[none, 0]] = True
    return masked


class UNITER(PretrainingModel):
    """UNITER (see the module docstring for the architecture, objectives and SPEC facts).

    forward(input_ids [B, S], region_features [B, N, img_dim], boxes [B, N, 4] (or the 7-d
            location), attention_mask [B, S] = None, region_mask [B, N] = None, token_type_ids [B, S] = None,
            *, mlm_input_ids [B, S] = None, mlm_labels [B, S] = None, masked_regions [B, N] = None,
            region_labels [B, N] = None, region_soft_labels [B, N, num_region_classes] = None,
            itm_labels [B] = None, itm_image_index [B] = None)
      input_ids: the clean caption; S <= max_position_embeddings; boxes normalised (x1, y1, x2, y2);
      masks 1 / True = real token (None: all real).
      mlm_input_ids / mlm_labels: the masked caption (default input_ids) and the original ids at
        its masked tokens (-100 elsewhere) -> ``mlm``.
      masked_regions: bool, which real regions the MRM pass masks -> ``mrfr`` (target: region_features);
        with region_labels (class ids, 0 / -100 ignored) -> ``mrc``; with region_soft_labels
        (distributions over the classes) -> ``mrc_kl``.
      itm_labels: 1 = matched, 0 = not; itm_image_index: which sample's regions each caption is
        paired with (default: its own) -> ``itm`` and ``wra`` (when itm_ot_lambda > 0).
    returns ModelOutput: without labels last_hidden_state [B, S + N, D] (text then regions) and
      pooler_output [B, D]; with labels, per pass, mlm_logits [B, S, V], mrfr_logits [B, N, img_dim]
      (the regressed features), mrc_logits [B, N, num_region_classes], itm_logits [B, 2], and
      losses {"mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra"} (those given) with loss, their weighted sum.
    """

    def __init__(self, config: UNITERConfig, use_kernels: bool = True) -> None:
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
        if c.type_vocab_size < 2 or c.num_region_classes < 2:
            raise ValueError(f"{NAME}: type_vocab_size and num_region_classes must be at least 2")
        d = c.hidden_size
        self.embeddings = TextEmbeddings(c.vocab_size, d, c.max_position_embeddings, c.type_vocab_size,
                                         pad_token_id=PAD, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.img_embeddings = RegionEmbeddings(c.img_dim, d, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.encoder = SingleStreamEncoder(d, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers,
                                           dropout=c.dropout, attention_dropout=c.attention_dropout,
                                           activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps)
        self.mlm_head = MLMHead(d, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                                word_embeddings=self.embeddings.word_embeddings)
        self.feat_regress = RegionFeatureRegression(d, self.img_embeddings.img_linear, layer_norm_eps=c.layer_norm_eps)
        self.region_classifier = region_classifier(d, c.num_region_classes, c.layer_norm_eps)
        self.itm_head = nn.Linear(d, 2)
        self.wra_loss = WRALoss(weight=1.0, beta=c.ot_beta, iters=c.ot_iterations, k=c.ot_inner_k)
        init_bert_weights(self, c.initializer_range)
        nn.init.normal_(self.img_embeddings.mask_embedding, std=c.initializer_range)

    def tied_weights(self) -> dict:
        return {**BERT_MLM_TIE, "feat_regress.weight": "img_embeddings.img_linear.weight"}

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, region_features, boxes, attention_mask, region_mask, token_type_ids,
                      labels: dict):
        c = self.config
        check_text(NAME, input_ids, c.max_position_embeddings, c.vocab_size)
        check_regions(NAME, "region_features", region_features, c.img_dim)
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] not in (4, LOCATION_DIM) \
                or not boxes.is_floating_point():
            shape = list(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise ValueError(f"{NAME}: boxes must be a floating [B, N, 4] (x1, y1, x2, y2) or [B, N, 7] tensor, "
                             f"got {shape}")
        batch = check_batch(NAME, input_ids=input_ids, region_features=region_features, boxes=boxes,
                            attention_mask=attention_mask, region_mask=region_mask, token_type_ids=token_type_ids,
                            **labels)
        text_shape, regions = tuple(input_ids.shape), tuple(region_features.shape[:2])
        if tuple(boxes.shape[:2]) != regions:
            raise ValueError(f"{NAME}: boxes cover {list(boxes.shape[:2])} regions, region_features {list(regions)}")
        check_shape(NAME, "token_type_ids", token_type_ids, text_shape)
        check_ids(NAME, "token_type_ids", token_type_ids, 0, c.type_vocab_size)
        shapes = {"mlm_input_ids": text_shape, "mlm_labels": text_shape, "masked_regions": regions,
                  "region_labels": regions, "region_soft_labels": (*regions, c.num_region_classes),
                  "itm_labels": (batch,), "itm_image_index": (batch,)}
        for name, tensor in labels.items():
            check_shape(NAME, name, tensor, shapes[name])
        if labels["mlm_input_ids"] is not None:
            check_text(NAME, labels["mlm_input_ids"], c.max_position_embeddings, c.vocab_size)
        check_ids(NAME, "mlm_labels", labels["mlm_labels"], 0, c.vocab_size, ignore=IGNORE_INDEX)
        check_ids(NAME, "region_labels", labels["region_labels"], 0, c.num_region_classes, ignore=IGNORE_INDEX)
        check_ids(NAME, "itm_labels", labels["itm_labels"], 0, 2)
        check_ids(NAME, "itm_image_index", labels["itm_image_index"], 0, batch)
        for needs, name in (("mlm_labels", "mlm_input_ids"), ("masked_regions", "region_labels"),
                            ("masked_regions", "region_soft_labels"), ("itm_labels", "itm_image_index")):
            if labels[name] is not None and labels[needs] is None:
                raise ValueError(f"{NAME}: {name} needs {needs}")
        soft = labels["region_soft_labels"]
        if soft is not None and not soft.is_floating_point():
            raise ValueError(f"{NAME}: region_soft_labels must be floating class distributions, got {soft.dtype}")
        text_mask = as_bool_mask(NAME, "attention_mask", attention_mask, text_shape)
        real_regions = as_bool_mask(NAME, "region_mask", region_mask, regions)
        masked = as_bool_mask(NAME, "masked_regions", labels["masked_regions"], regions)
        if (masked is not None and real_regions is not None and not torch.compiler.is_compiling()
                and bool((masked & ~real_regions).any())):
            raise ValueError(f"{NAME}: masked_regions marks padded regions (region_mask 0)")
        return text_mask, real_regions, masked

    # -- encoder ---------------------------------------------------------------------------------
    def encode(self, input_ids, region_features, location, text_mask, region_mask, token_type_ids=None,
               masked_regions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass on checked inputs: (hidden [B, S + N, D], pooled [B, D])."""
        text = self.embeddings(input_ids, token_type_ids)
        region_type = embedding_row(self.embeddings.token_type_embeddings, 1)  # UNITER's image type id 1
        regions = self.img_embeddings(region_features, location, region_type, masked_regions)
        return self.encoder(text, regions, text_mask, region_mask)

    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, boxes: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, region_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, mlm_input_ids: Optional[torch.Tensor] = None,
                mlm_labels: Optional[torch.Tensor] = None, masked_regions: Optional[torch.Tensor] = None,
                region_labels: Optional[torch.Tensor] = None, region_soft_labels: Optional[torch.Tensor] = None,
                itm_labels: Optional[torch.Tensor] = None, itm_image_index: Optional[torch.Tensor] = None
                ) -> ModelOutput:
        c = self.config
        labels = dict(mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels, masked_regions=masked_regions,
                      region_labels=region_labels, region_soft_labels=region_soft_labels, itm_labels=itm_labels,
                      itm_image_index=itm_image_index)
        text_mask, real_regions, masked = self._check_inputs(input_ids, region_features, boxes, attention_mask,
                                                             region_mask, token_type_ids, labels)
        location = boxes if boxes.shape[-1] == LOCATION_DIM else box_features(boxes, area=True)
        length = input_ids.shape[1]
        with self.kernels():
            out, losses = ModelOutput(), {}
            if mlm_labels is not None:
                text = input_ids if mlm_input_ids is None else mlm_input_ids
                hidden, _ = self.encode(text, region_features, location, text_mask, real_regions, token_type_ids)
                out.mlm_logits = self.mlm_head(hidden[:, :length])
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if masked is not None:
                hidden, _ = self.encode(input_ids, region_features, location, text_mask, real_regions,
                                        token_type_ids, masked)
                losses.update(self._region_losses(out, hidden[:, length:], masked, region_features, region_labels,
                                                  region_soft_labels))
            if itm_labels is not None:
                losses.update(self._matching_losses(out, input_ids, region_features, location, text_mask,
                                                    real_regions, token_type_ids, itm_labels, itm_image_index))
            if not losses:
                out.last_hidden_state, out.pooler_output = self.encode(input_ids, region_features, location,
                                                                       text_mask, real_regions, token_type_ids)
            out.set_losses(losses, {"mlm": c.mlm_weight, "mrfr": c.mrfr_weight, "mrc": c.mrc_weight,
                                    "mrc_kl": c.mrc_kl_weight, "itm": c.itm_weight, "wra": c.itm_ot_lambda})
            return out

    def _region_losses(self, out, region_hidden, masked, targets, region_labels, region_soft_labels) -> dict:
        """MRFR always, MRC / MRC-kl when their labels are given, over the masked regions."""
        losses = {}
        out.mrfr_logits = self.feat_regress(region_hidden)

        def over_masked(per_element: torch.Tensor) -> torch.Tensor:
            # Mean over the masked regions' elements, as weighted sums (no data-dependent shape,
            # so torch.compile traces it); 0, still in the graph, when no region is masked.
            weight = masked.to(per_element.dtype).view(*masked.shape, *[1] * (per_element.dim() - 2))
            count = weight.sum() * per_element[0, 0].numel()
            return (per_element * weight).sum() / count.clamp_min(1)

        prediction = out.mrfr_logits.float()
        losses["mrfr"] = over_masked(F.mse_loss(prediction, targets.float(), reduction="none"))
        if region_labels is not None or region_soft_labels is not None:
            out.mrc_logits = self.region_classifier(region_hidden)
            logits = out.mrc_logits.float()
            if region_labels is not None:
                # background (0), unlabelled (-100) and unmasked regions are no targets
                target = region_labels.masked_fill(~masked | (region_labels == 0), IGNORE_INDEX)
                losses["mrc"] = masked_lm_loss(logits, target)
            if region_soft_labels is not None:
                log_probs = F.log_softmax(logits, dim=-1)
                losses["mrc_kl"] = over_masked(F.kl_div(log_probs, region_soft_labels.float(), reduction="none"))
        return losses

    def _matching_losses(self, out, input_ids, region_features, location, text_mask, real_regions, token_type_ids,
                         itm_labels, itm_image_index) -> dict:
        """The ITM pass (captions with the regions of itm_image_index): ITM cross-entropy and WRA."""
        if itm_image_index is not None:
            region_features, location = region_features[itm_image_index], location[itm_image_index]
            real_regions = None if real_regions is None else real_regions[itm_image_index]
        hidden, pooled = self.encode(input_ids, region_features, location, text_mask, real_regions, token_type_ids)
        out.itm_logits = self.itm_head(pooled)
        losses = {"itm": F.cross_entropy(out.itm_logits.float(), itm_labels)}
        if self.config.itm_ot_lambda > 0:
            length = input_ids.shape[1]
            # in fp32, as UNITER runs its optimal transport ("for stability")
            losses["wra"] = self.wra_loss(hidden[:, :length].float(), hidden[:, length:].float(), text_mask,
                                          real_regions, itm_labels)
        return losses

    # -- synthetic data --------------------------------------------------------------------------
    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective: clean captions [B, max_text_len] and
        ``num_regions`` regions showing their words (padded regions via region_mask); 15% token
        masking (mlm_input_ids, mlm_labels); 15% of the real regions masked, at least one per
        image (masked_regions), with soft labels from :func:`synthetic_soft_labels` of the token
        each region depicts and the hard labels UNITER derives from them; and half the
        captions paired with another sample's regions (itm_image_index, itm_labels)."""
        c = self.config
        generator = seeded_generator(generator)
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], prob=c.mlm_probability,
                                                generator=generator)
        regions = pairs.regions(text["input_ids"], c.num_regions, c.img_dim, generator)
        masked_regions = mask_real_regions(regions["region_mask"], c.mrm_probability, generator)
        soft_labels = synthetic_soft_labels(regions["region_tokens"], c.num_region_classes)
        itm_image_index, itm_labels = mismatched_pairs(batch_size, generator, c.itm_negative_prob)
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "region_features": regions["region_features"], "boxes": regions["boxes"],
                 "region_mask": regions["region_mask"], "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
                 "masked_regions": masked_regions, "region_labels": region_class_targets(soft_labels),
                 "region_soft_labels": soft_labels, "itm_labels": itm_labels, "itm_image_index": itm_image_index}
        return to_device(batch, device)
