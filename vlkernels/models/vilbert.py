"""ViLBERT: two Transformer streams of different widths, a BERT text stream and an image-region
stream, exchanging information through co-attention layers; pretrained with masked language
modelling, masked multimodal (region class) modelling and multimodal alignment prediction.

Follows SPEC "ViLBERT co-attention" (facebookresearch/vilbert-multi-task vilbert/vilbert.py):
- Text stream: BERT embeddings and ``num_text_layers`` (12) BERT layers, 768 hidden / FFN 3072 /
  12 heads, post-LN.
- Image stream: LN(Linear(2048 -> 1024)(roi) + Linear(5 -> 1024)(location)), dropout, with
  location (x1, y1, x2, y2, area) normalised by the image size; ``v_num_layers`` (6) BERT layers
  of 1024 hidden / FFN 1024 / 8 heads. Like ViLBERT's data pipeline, the model puts a global
  image token first: the mean of the real regions' features at location (0, 0, 1, 1, 1)
  (``global_image_token``); the image stream is [B, 1 + N, 1024].
- Co-attention: ``vlkernels.nn.ViLBERTCoLayer`` (bi-attention width 1024, 8 heads; each stream's
  queries attend the other stream, masked by its mask; per-stream output + FFN, post-LN; no
  self-attention inside), both directions in one co-attention launch.
- Schedule (configurable, vilbert-multi-task's ``t_biattention_id`` / ``v_biattention_id``):
  co-layer k runs once the text stream has passed its first ``t_biattention_id[k]`` layers and
  the image stream its first ``v_biattention_id[k]``; the remaining layers of each stream run
  after the last co-layer. The base schedule, t = (6..11), v = (0..5), is: text layers 0-5,
  then 6 rounds of (co-layer, text layer, image layer).
- Poolers: ReLU(Linear(768 -> 1024)) on the text [CLS] and ReLU(Linear(1024 -> 1024)) on the
  global image token.

Objectives (weights 1 each, ViLBERT's sum):
- ``mlm``: BERT prediction head on the text stream, decoder tied to the word embeddings;
  cross-entropy over the masked tokens (15% of the word pieces, 80/10/10).
- ``mrm`` (masked multimodal modelling): 15% of the real regions are masked by the data
  pipeline (90% zeroed, 10% kept); a transform (Linear, GeLU, LN) + Linear(1024, 1601) on the
  image stream predicts each masked region's class distribution; loss = KL(target || prediction)
  summed over classes, averaged over the masked regions. The original's target is the
  detector's distribution over its 1601 Visual Genome classes; the synthetic batches use the
  region's synthetic class (the depicted token id mod ``v_target_size``) smoothed to 0.9 on
  that class plus 0.1 spread evenly over all classes.
- ``itm`` (multimodal alignment prediction): dropout(pooled_text * pooled_image) -> Linear(1024, 2)
  (ViLBERT multiplies the two pooled vectors), cross-entropy.

Attention-probability dropout is the original's 0.1 (``attention_dropout``, in the attention
ops in training). Not implemented: masking the regions that overlap a masked one (IoU > 0.4) in the data pipeline, the task heads of the
multi-task fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    BERT_MLM_TIE, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_text, init_bert_weights, mask_tokens,
    masked_lm_loss,
)
from vlkernels.models.synthetic import (
    MASK, PAD, SyntheticPairs, mask_regions, mismatched_pairs, seeded_generator, to_device,
)
from vlkernels.nn import BertLayer, MLMHead, PredictionTransform, TextEmbeddings, ViLBERTCoLayer
from vlkernels.nn.attention import ACTIVATIONS


@dataclass
class ViLBERTConfig:
    """ViLBERT's sizes (names follow vilbert-multi-task's config where it has one: ``v_*`` are the
    image stream's, ``bi_*`` the co-attention's).

    t_biattention_id / v_biattention_id: one entry per co-layer, the number of text / image
    layers that run before it (non-decreasing). max_position_embeddings: the text position
    table; max_text_len / num_regions: sizes of the pretraining batches (36 / 36 in the original).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_text_layers: int = 12
    v_feature_size: int = 2048
    v_hidden_size: int = 1024
    v_num_heads: int = 8
    v_intermediate_size: int = 1024
    v_num_layers: int = 6
    bi_hidden_size: int = 1024
    bi_num_heads: int = 8
    t_biattention_id: tuple = (6, 7, 8, 9, 10, 11)
    v_biattention_id: tuple = (0, 1, 2, 3, 4, 5)
    hidden_act: str = "gelu"  # vlkernels.nn ACTIVATIONS names
    v_hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    max_text_len: int = 36
    num_regions: int = 36
    v_target_size: int = 1601  # classes of the region distribution (the detector's, with background)
    global_image_token: bool = True
    dropout: float = 0.1  # hidden dropout of both streams, and before the alignment classifier
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    mlm_probability: float = 0.15
    region_mask_probability: float = 0.15
    region_target_confidence: float = 0.9  # synthetic targets: mass on the region's class
    mlm_weight: float = 1.0
    mrm_weight: float = 1.0
    itm_weight: float = 1.0

    @classmethod
    def base(cls) -> "ViLBERTConfig":
        """ViLBERT (vilbert-multi-task bert_base_6layer_6conect): 12 text layers, 6 image layers,
        6 co-layers after text layers 0-5."""
        return cls()

    @classmethod
    def tiny(cls) -> "ViLBERTConfig":
        """For tests: text 32 wide (2 heads, FFN 64, 2 layers), image 48 wide (2 heads, FFN 48,
        1 layer), bi-attention 32 wide (2 heads), one co-layer after text layer 0; 5 regions of
        16-d features, 20 region classes."""
        return cls(vocab_size=160, hidden_size=32, num_heads=2, intermediate_size=64, num_text_layers=2,
                   v_feature_size=16, v_hidden_size=48, v_num_heads=2, v_intermediate_size=48, v_num_layers=1,
                   bi_hidden_size=32, bi_num_heads=2, t_biattention_id=(1,), v_biattention_id=(0,),
                   max_position_embeddings=12, max_text_len=12, num_regions=5, v_target_size=20, dropout=0.0,
                   attention_dropout=0.0)


class ImageEmbeddings(nn.Module):
    """ViLBERT's region embedding (its ``BertImageEmbeddings`` keys):

        LayerNorm(image_embeddings(feats) + image_location_embeddings(location)), then dropout

    forward(feats [B, N, feature_dim], location [B, N, 5]) -> [B, N, hidden]
    """

    def __init__(self, feature_dim: int, hidden: int, location_dim: int = 5, *, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.image_embeddings = nn.Linear(feature_dim, hidden)
        self.image_location_embeddings = nn.Linear(location_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(self.image_embeddings(feats) + self.image_location_embeddings(location)))


class ReLUPooler(nn.Module):
    """ViLBERT's text / image pooler: ReLU(dense(x[:, 0])); x [B, S, D] -> [B, out_dim]."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x[:, 0]))


def with_area(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised boxes [..., 4] (x1, y1, x2, y2) -> ViLBERT locations [..., 5] with the area."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area[..., None]], dim=-1)


class ViLBERT(PretrainingModel):
    """ViLBERT (see the module docstring for the architecture, schedule, objectives and SPEC facts).

    forward(input_ids [B, S], image_feat [B, N, v_feature_size], image_loc [B, N, 5] (or [B, N, 4]
            boxes: the area is added), attention_mask [B, S] = None, image_attention_mask [B, N] = None,
            token_type_ids [B, S] = None, *, mlm_labels [B, S] = None, itm_labels [B] = None,
            masked_regions [B, N] = None, region_targets [B, N, v_target_size] = None)
      S <= max_position_embeddings; masks 1 / True = real token (None: all real). Locations are
      normalised by the image size. The N regions are the detector's; with global_image_token
      the model prepends the global one itself.
      mlm_labels: original ids at the masked tokens, -100 elsewhere (input_ids is the masked text).
      itm_labels: 1 = the caption matches the image, 0 = not.
      masked_regions: which regions were masked (bool); region_targets: the class distribution
        of each region (rows sum to 1); the two together give the mrm objective.
    returns ModelOutput with text_hidden_state [B, S, hidden_size], image_hidden_state
      [B, 1 + N, v_hidden_size] (global token first; [B, N, ..] without it), pooled_text,
      pooled_image and pooler_output (their product) [B, bi_hidden_size]; per objective given:
      mlm_logits [B, S, V], itm_logits [B, 2], mrm_logits [B, N, v_target_size] (the given regions);
      losses {"mlm", "mrm", "itm"} (those given) and loss, their weighted sum.
    """

    def __init__(self, config: ViLBERTConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        self._check_config(c)
        self.embeddings = TextEmbeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                                         pad_token_id=PAD, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        self.image_embeddings = ImageEmbeddings(c.v_feature_size, c.v_hidden_size, dropout=c.dropout,
                                                layer_norm_eps=c.layer_norm_eps)
        common = dict(dropout=c.dropout, attention_dropout=c.attention_dropout, layer_norm_eps=c.layer_norm_eps)
        self.text_layers = nn.ModuleList(
            BertLayer(c.hidden_size, c.num_heads, c.intermediate_size, activation=c.hidden_act, **common)
            for _ in range(c.num_text_layers))
        self.image_layers = nn.ModuleList(
            BertLayer(c.v_hidden_size, c.v_num_heads, c.v_intermediate_size, activation=c.v_hidden_act, **common)
            for _ in range(c.v_num_layers))
        self.co_layers = nn.ModuleList(
            ViLBERTCoLayer(c.hidden_size, c.v_hidden_size, c.bi_hidden_size, c.bi_num_heads, c.intermediate_size,
                           c.v_intermediate_size, activation=c.hidden_act, image_activation=c.v_hidden_act, **common)
            for _ in c.t_biattention_id)
        self.text_pooler = ReLUPooler(c.hidden_size, c.bi_hidden_size)
        self.image_pooler = ReLUPooler(c.v_hidden_size, c.bi_hidden_size)
        self.mlm_head = MLMHead(c.hidden_size, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                                word_embeddings=self.embeddings.word_embeddings)
        self.region_head = nn.Module()  # ViLBERT's BertImagePredictionHead: transform + decoder
        self.region_head.transform = PredictionTransform(c.v_hidden_size, activation=c.v_hidden_act,
                                                         layer_norm_eps=c.layer_norm_eps)
        self.region_head.decoder = nn.Linear(c.v_hidden_size, c.v_target_size)
        self.itm_dropout = nn.Dropout(c.dropout)
        self.itm_head = nn.Linear(c.bi_hidden_size, 2)
        init_bert_weights(self, c.initializer_range)

    def tied_weights(self) -> dict:
        return BERT_MLM_TIE

    @staticmethod
    def _check_config(c: ViLBERTConfig) -> None:
        for width, heads in (("hidden_size", "num_heads"), ("v_hidden_size", "v_num_heads"),
                             ("bi_hidden_size", "bi_num_heads")):
            if getattr(c, width) % getattr(c, heads):
                raise ValueError(f"ViLBERT: {width} {getattr(c, width)} is not a multiple of {heads} "
                                 f"{getattr(c, heads)}")
        for name in ("hidden_act", "v_hidden_act"):
            if getattr(c, name) not in ACTIVATIONS:
                raise ValueError(f"ViLBERT: {name} must be one of {sorted(ACTIVATIONS)}, got {getattr(c, name)!r}")
        if len(c.t_biattention_id) != len(c.v_biattention_id):
            raise ValueError(f"ViLBERT: t_biattention_id {tuple(c.t_biattention_id)} and v_biattention_id "
                             f"{tuple(c.v_biattention_id)} must have one entry per co-layer")
        for name, ids, layers in (("t_biattention_id", c.t_biattention_id, c.num_text_layers),
                                  ("v_biattention_id", c.v_biattention_id, c.v_num_layers)):
            ids = list(ids)
            if ids != sorted(ids) or any(not 0 <= i <= layers for i in ids):
                raise ValueError(f"ViLBERT: {name} {tuple(ids)} must be non-decreasing layer counts in [0, {layers}]")
        if c.max_text_len > c.max_position_embeddings:
            raise ValueError(f"ViLBERT: max_text_len {c.max_text_len} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, image_feat, image_loc, attention_mask, image_attention_mask, token_type_ids,
                      labels: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        c = self.config
        check_text("ViLBERT", input_ids, c.max_position_embeddings, c.vocab_size)
        for name, tensor, dims in (("image_feat", image_feat, (c.v_feature_size,)), ("image_loc", image_loc, (4, 5))):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[-1] not in dims \
                    or not tensor.is_floating_point():
                shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"ViLBERT: {name} must be a floating [B, N, {' or '.join(map(str, dims))}] tensor, "
                                 f"got {shape}")
        check_batch("ViLBERT", input_ids=input_ids, image_feat=image_feat, image_loc=image_loc,
                    attention_mask=attention_mask, image_attention_mask=image_attention_mask,
                    token_type_ids=token_type_ids, **labels)
        regions = tuple(image_feat.shape[:2])
        if tuple(image_loc.shape[:2]) != regions:
            raise ValueError(f"ViLBERT: image_loc covers {list(image_loc.shape[:2])} regions, image_feat "
                             f"{list(regions)}")
        if token_type_ids is not None:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"ViLBERT: token_type_ids must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(token_type_ids.shape)}")
            if token_type_ids.numel() and not 0 <= int(token_type_ids.min()) <= int(token_type_ids.max()) \
                    < c.type_vocab_size:
                raise ValueError(f"ViLBERT: token_type_ids must lie in [0, {c.type_vocab_size})")
        shapes = {"mlm_labels": tuple(input_ids.shape), "itm_labels": regions[:1], "masked_regions": regions,
                  "region_targets": (*regions, c.v_target_size)}
        for name, tensor in labels.items():
            if tensor is not None and tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"ViLBERT: {name} must have shape {list(shapes[name])}, got {list(tensor.shape)}")
        if (labels["masked_regions"] is None) != (labels["region_targets"] is None):
            raise ValueError("ViLBERT: the mrm objective needs both masked_regions and region_targets")
        text_mask = as_bool_mask("ViLBERT", "attention_mask", attention_mask, input_ids.shape)
        image_mask = as_bool_mask("ViLBERT", "image_attention_mask", image_attention_mask, regions)
        return text_mask, image_mask

    # -- encoder ---------------------------------------------------------------------------------
    def _embed_image(self, image_feat, image_loc, image_mask):
        """Region embeddings [B, (1 +) N, v_hidden] and their mask (with the global image token)."""
        if image_loc.shape[-1] == 4:
            image_loc = with_area(image_loc)
        if self.config.global_image_token:
            real = image_mask if image_mask is not None else torch.ones(image_feat.shape[:2], dtype=torch.bool,
                                                                        device=image_feat.device)
            weights = real.to(image_feat.dtype)[..., None]
            mean = (image_feat * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
            whole = image_loc.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(image_loc.shape[0], 1, 5)
            image_feat, image_loc = torch.cat([mean, image_feat], 1), torch.cat([whole, image_loc], 1)
            if image_mask is not None:
                image_mask = torch.cat([real.new_ones(real.shape[0], 1), real], 1)
        return self.image_embeddings(image_feat, image_loc), image_mask

    def encode(self, text, image, text_mask, image_mask):
        """The two streams and their co-layers on embedded inputs: text [B, S, hidden_size],
        image [B, N', v_hidden_size] (bool masks or None) -> (text, image) of the same shapes."""
        c = self.config
        t_done = v_done = 0
        for co_layer, t_end, v_end in zip(self.co_layers, c.t_biattention_id, c.v_biattention_id):
            for layer in self.text_layers[t_done:t_end]:
                text = layer(text, text_mask)
            for layer in self.image_layers[v_done:v_end]:
                image = layer(image, image_mask)
            text, image = co_layer(text, image, text_mask=text_mask, image_mask=image_mask)
            t_done, v_done = t_end, v_end
        for layer in self.text_layers[t_done:]:
            text = layer(text, text_mask)
        for layer in self.image_layers[v_done:]:
            image = layer(image, image_mask)
        return text, image

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, image_feat: torch.Tensor, image_loc: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, image_attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, mlm_labels: Optional[torch.Tensor] = None,
                itm_labels: Optional[torch.Tensor] = None, masked_regions: Optional[torch.Tensor] = None,
                region_targets: Optional[torch.Tensor] = None) -> ModelOutput:
        c = self.config
        labels = dict(mlm_labels=mlm_labels, itm_labels=itm_labels, masked_regions=masked_regions,
                      region_targets=region_targets)
        text_mask, image_mask = self._check_inputs(input_ids, image_feat, image_loc, attention_mask,
                                                   image_attention_mask, token_type_ids, labels)
        with self.kernels():
            image, image_mask = self._embed_image(image_feat, image_loc, image_mask)
            text, image = self.encode(self.embeddings(input_ids, token_type_ids), image, text_mask, image_mask)
            pooled_text, pooled_image = self.text_pooler(text), self.image_pooler(image)
            pooled = pooled_text * pooled_image
            out = ModelOutput(text_hidden_state=text, image_hidden_state=image, pooled_text=pooled_text,
                              pooled_image=pooled_image, pooler_output=pooled)
            losses, weights = {}, {}
            if mlm_labels is not None:
                out.mlm_logits = self.mlm_head(text)
                losses["mlm"], weights["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels), c.mlm_weight
            if masked_regions is not None:
                regions = image[:, 1:] if c.global_image_token else image
                out.mrm_logits = self.region_head.decoder(self.region_head.transform(regions))
                log_probs = F.log_softmax(out.mrm_logits.float(), dim=-1)
                divergence = F.kl_div(log_probs, region_targets.float(), reduction="none").sum(-1)  # [B, N]
                chosen = masked_regions.float()
                # Mean over the masked regions (zero, still in the graph, when none is masked).
                losses["mrm"] = (divergence * chosen).sum() / chosen.sum().clamp_min(1)
                weights["mrm"] = c.mrm_weight
            if itm_labels is not None:
                out.itm_logits = self.itm_head(self.itm_dropout(pooled))
                losses["itm"], weights["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels), c.itm_weight
            out.set_losses(losses, weights)
            return out

    # -- synthetic data --------------------------------------------------------------------------
    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective's labels: captions [B, max_text_len] with 15%
        token masking (mlm_labels); num_regions regions whose features show caption words (some
        padded), locations (x1, y1, x2, y2, area); half the pairs get another sample's image
        (itm_labels 0); 15% of the real regions masked (90% zeroed, 10% kept) with
        region_targets = region_target_confidence on the depicted token id mod v_target_size,
        the rest spread evenly over all classes."""
        c = self.config
        generator = seeded_generator(generator)
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], prob=c.mlm_probability,
                                                generator=generator)
        regions = pairs.regions(text["input_ids"], c.num_regions, c.v_feature_size, generator)
        image_index, itm_labels = mismatched_pairs(batch_size, generator)
        regions = {name: value[image_index] for name, value in regions.items()}
        feats, chosen = mask_regions(regions["region_features"], regions["region_mask"],
                                     prob=c.region_mask_probability, zero_prob=0.9, random_prob=0.0,
                                     generator=generator)
        classes = F.one_hot(regions["region_tokens"] % c.v_target_size, c.v_target_size).float()
        confidence = c.region_target_confidence
        region_targets = confidence * classes + (1 - confidence) / c.v_target_size
        batch = {"input_ids": mlm_input_ids, "image_feat": feats, "image_loc": with_area(regions["boxes"]),
                 "attention_mask": text["attention_mask"], "image_attention_mask": regions["region_mask"],
                 "mlm_labels": mlm_labels, "itm_labels": itm_labels, "masked_regions": chosen,
                 "region_targets": region_targets}
        return to_device(batch, device)
