"""LXMERT: a two-stream encoder of a caption and detector regions (a language stream, an
object-relationship stream, then cross-modality layers), pretrained with masked LM, cross-modality
matching, masked object prediction and image question answering.

Follows SPEC "LXMERT" (airsplay/lxmert src/lxrt/modeling.py; HF ``LxmertModel``):
- Text: BERT embeddings (word + position + token type, LayerNorm, dropout). As in the original
  (and HF), the position and token-type tables have padding_idx 0: their row 0 starts at zero
  and receives no gradient.
- Regions: (LN(W_f roi_feat) + LN(W_b box)) / 2, dropout; roi_feat [.., 2048] in base, box the
  normalised (x1, y1, x2, y2) [.., 4].
- Encoders: ``l_layers`` (9) BERT layers on the text, ``r_layers`` (5) BERT layers on the regions,
  then ``x_layers`` (5) ``vlkernels.nn.LXMERTCrossLayer``: ONE shared cross-attention used in both
  directions (one co-attention launch), then a self-attention and an FFN per stream; all post-LN,
  768 hidden, 12 heads, FFN 3072.
- Pooler: tanh(Linear) on the language [CLS].

Objectives (``out.losses`` names; ``out.loss`` = mlm + itm + 6.67 * (obj + attr + feat) + qa, the
original's weights, 6.67 = ``visual_loss_normalizer`` ~ 1 / 0.15):
- ``mlm``: BERT prediction head, decoder tied to the word embeddings; cross-entropy over the
  masked tokens (the original masks word pieces, 15%, 80/10/10).
- ``itm`` (cross-modality matching): Linear(768, 2) on the pooled output, cross-entropy.
- masked object prediction on the masked RoIs (15% of the real regions; the data pipeline zeroes
  80% of them, puts another RoI's feature in 10%, keeps 10%): a shared transform
  (Linear, GeLU, LN) then ``obj`` label cross-entropy (1600 classes), ``attr`` attribute
  cross-entropy (400) and ``feat`` SmoothL1 regression of the original 2048-d feature (mean over
  the feature dims). Each is ``(per-RoI loss * masked_regions).mean()`` over ALL B x N RoIs, as
  the original computes it (the normaliser 6.67 rescales that to about a mean over masked RoIs).
  The original also multiplies the obj / attr terms by the detector's confidence: pass it inside
  ``masked_regions`` (a float weight) if you have it.
- ``qa``: 768 -> 1536 -> GeLU -> LN -> num_qa_labels on the pooled output, cross-entropy over the
  samples with an answer (label -100 for mismatched pairs or samples without a question, as
  the original's -1).

``LXMERT.from_hf`` copies a transformers ``LxmertModel`` (encoder) or ``LxmertForPreTraining``
(encoder and heads); the outputs then equal HF's to fp32 rounding.

Attention-probability dropout is the original's 0.1 (``attention_dropout``, in the attention
ops in training). Not implemented: the staged pretraining schedule (QA loss only in later epochs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    BERT_MLM_TIE, IGNORE_INDEX, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_features, check_text,
    init_bert_weights, mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import (
    MASK, PAD, SyntheticPairs, mask_regions, mismatched_pairs, seeded_generator, to_device,
)
from vlkernels.nn import BertLayer, LXMERTCrossLayer, MLMHead, Pooler, PredictionTransform, TextEmbeddings
from vlkernels.nn.attention import ACTIVATIONS, activation_name


@dataclass
class LXMERTConfig:
    """LXMERT's sizes and pretraining settings (names follow HF ``LxmertConfig`` where it has one).

    max_position_embeddings: the text position table (the longest text the model takes);
    max_text_len: caption length of the pretraining batches (20 in the original);
    num_regions: RoIs per image in the pretraining batches (36).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    hidden_act: str = "gelu"  # a vlkernels.nn ACTIVATIONS name
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    max_text_len: int = 20
    num_regions: int = 36
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    num_qa_labels: int = 9500
    dropout: float = 0.1  # hidden dropout (embeddings, visual encoder, after each dense)
    attention_dropout: float = 0.1  # on the attention probabilities, as the original (in the attention op)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    mlm_probability: float = 0.15
    obj_mask_rate: float = 0.15
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    visual_loss_normalizer: float = 6.67  # weight of each of obj, attr, feat
    qa_weight: float = 1.0

    @classmethod
    def base(cls) -> "LXMERTConfig":
        """LXMERT: 9 language, 5 object-relationship, 5 cross-modality layers; 768 hidden, 12 heads."""
        return cls()

    @classmethod
    def tiny(cls) -> "LXMERTConfig":
        """For tests: 32 hidden, 2 heads, 1 language + 1 relationship + 2 cross layers, 6 regions of
        16-d features, 20 object / 8 attribute classes, 6 answers."""
        return cls(vocab_size=160, hidden_size=32, num_heads=2, intermediate_size=64, l_layers=1, r_layers=1,
                   x_layers=2, visual_feat_dim=16, max_position_embeddings=12, max_text_len=12, num_regions=6,
                   num_object_labels=20, num_attr_labels=8, num_qa_labels=6, dropout=0.0,
                   attention_dropout=0.0)


class VisualFeatureEncoder(nn.Module):
    """LXMERT's region embedding (HF ``LxmertVisualFeatureEncoder`` keys):

        (LN(visn_fc(feats)) + LN(box_fc(boxes))) / 2, then dropout

    forward(feats [B, N, feat_dim], boxes [B, N, pos_dim]) -> [B, N, hidden]
    """

    def __init__(self, feat_dim: int, pos_dim: int, hidden: int, *, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.visn_fc = nn.Linear(feat_dim, hidden)
        self.visn_layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.box_fc = nn.Linear(pos_dim, hidden)
        self.box_layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        features = self.visn_layer_norm(self.visn_fc(feats))
        positions = self.box_layer_norm(self.box_fc(boxes))
        return self.dropout((features + positions) / 2)


class ObjectPredictionHead(nn.Module):
    """LXMERT's masked-object head (HF ``LxmertVisualObjHead`` keys): one shared transform, then a
    decoder per target: ``obj`` [.., num_object_labels], ``attr`` [.., num_attr_labels] logits and
    ``feat`` [.., feat_dim] regressed features. forward(x [B, N, D]) -> dict of those."""

    def __init__(self, hidden: int, num_object_labels: int, num_attr_labels: int, feat_dim: int, *,
                 activation: str = "gelu", layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = PredictionTransform(hidden, activation=activation, layer_norm_eps=layer_norm_eps)
        self.decoder_dict = nn.ModuleDict({"obj": nn.Linear(hidden, num_object_labels),
                                           "attr": nn.Linear(hidden, num_attr_labels),
                                           "feat": nn.Linear(hidden, feat_dim)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.transform(x)
        return {name: decoder(hidden) for name, decoder in self.decoder_dict.items()}


def answer_head(hidden: int, num_answers: int, layer_norm_eps: float = 1e-12) -> nn.Sequential:
    """LXMERT's QA head: Linear(D, 2D) -> GeLU (exact) -> LN -> Linear(2D, num_answers)
    (indices 0..3 match HF ``LxmertVisualAnswerHead.logit_fc``)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=layer_norm_eps),
                         nn.Linear(2 * hidden, num_answers))


# -- synthetic data helpers (shared with ViLBERT) ---------------------------------------------------
class LXMERT(PretrainingModel):
    """LXMERT (see the module docstring for the architecture, objectives and SPEC facts).

    forward(input_ids [B, S], visual_feats [B, N, visual_feat_dim], visual_pos [B, N, visual_pos_dim],
            attention_mask [B, S] = None, visual_attention_mask [B, N] = None, token_type_ids [B, S] = None,
            *, mlm_labels [B, S] = None, itm_labels [B] = None, masked_regions [B, N] = None,
            obj_labels [B, N] = None, attr_labels [B, N] = None, feat_labels [B, N, visual_feat_dim] = None,
            qa_labels [B] = None)
      The inputs are LxmertModel's: S <= max_position_embeddings; masks 1 / True = real token
      (None: all real); visual_pos normalised boxes (x1, y1, x2, y2).
      mlm_labels: original ids at the masked tokens, -100 elsewhere (input_ids is the masked text).
      itm_labels: 1 = the caption matches the image, 0 = not.
      masked_regions: which RoIs were masked (bool) or per-RoI weights (float); needed with
        obj_labels (object class ids), attr_labels (attribute ids) and feat_labels (the RoI
        features before masking; visual_feats is the masked input).
      qa_labels: answer id, -100 where there is none.
    returns ModelOutput with language_output [B, S, D], vision_output [B, N, D], pooled_output
      [B, D] (HF's names), and per objective given: mlm_logits [B, S, V], itm_logits [B, 2],
      obj_logits [B, N, num_object_labels], attr_logits [B, N, num_attr_labels], feat_logits
      [B, N, visual_feat_dim] (the regressed features), qa_logits [B, num_qa_labels]; losses
      {"mlm", "itm", "obj", "attr", "feat", "qa"} (those given) and loss, their weighted sum.
    """

    def __init__(self, config: LXMERTConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"LXMERT: hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LXMERT: hidden_act must be one of {sorted(ACTIVATIONS)}, got {c.hidden_act!r}")
        if c.max_text_len > c.max_position_embeddings:
            raise ValueError(f"LXMERT: max_text_len {c.max_text_len} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        d = c.hidden_size
        layer = dict(dropout=c.dropout, attention_dropout=c.attention_dropout, activation=c.hidden_act,
                     layer_norm_eps=c.layer_norm_eps)
        self.embeddings = TextEmbeddings(c.vocab_size, d, c.max_position_embeddings, c.type_vocab_size,
                                         pad_token_id=PAD, layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        # LXMERT builds these two tables with padding_idx 0 too (row 0 zero, never updated).
        self.embeddings.position_embeddings.padding_idx = 0
        self.embeddings.token_type_embeddings.padding_idx = 0
        self.visual_encoder = VisualFeatureEncoder(c.visual_feat_dim, c.visual_pos_dim, d, dropout=c.dropout,
                                                   layer_norm_eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(d, c.num_heads, c.intermediate_size, **layer) for _ in range(c.l_layers))
        self.r_layers = nn.ModuleList(BertLayer(d, c.num_heads, c.intermediate_size, **layer)
                                      for _ in range(c.r_layers))
        self.x_layers = nn.ModuleList(LXMERTCrossLayer(d, c.num_heads, c.intermediate_size, **layer)
                                      for _ in range(c.x_layers))
        self.pooler = Pooler(d)
        self.mlm_head = MLMHead(d, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                                word_embeddings=self.embeddings.word_embeddings)
        self.itm_head = nn.Linear(d, 2)
        self.obj_head = ObjectPredictionHead(d, c.num_object_labels, c.num_attr_labels, c.visual_feat_dim,
                                             activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps)
        self.qa_head = answer_head(d, c.num_qa_labels, c.layer_norm_eps)
        init_bert_weights(self, c.initializer_range)

    def tied_weights(self) -> dict:
        return BERT_MLM_TIE

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                      token_type_ids, labels: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        c = self.config
        check_text("LXMERT", input_ids, c.max_position_embeddings, c.vocab_size)
        check_features("LXMERT", "visual_feats", visual_feats, c.visual_feat_dim)
        check_features("LXMERT", "visual_pos", visual_pos, c.visual_pos_dim)
        check_batch("LXMERT", input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos,
                    attention_mask=attention_mask, visual_attention_mask=visual_attention_mask,
                    token_type_ids=token_type_ids, **labels)
        regions = visual_feats.shape[:2]
        if visual_pos.shape[:2] != regions:
            raise ValueError(f"LXMERT: visual_pos covers {list(visual_pos.shape[:2])} regions, visual_feats "
                             f"{list(regions)}")
        if token_type_ids is not None:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"LXMERT: token_type_ids must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(token_type_ids.shape)}")
            if token_type_ids.numel() and not 0 <= int(token_type_ids.min()) <= int(token_type_ids.max()) \
                    < c.type_vocab_size:
                raise ValueError(f"LXMERT: token_type_ids must lie in [0, {c.type_vocab_size})")
        shapes = {"mlm_labels": tuple(input_ids.shape), "itm_labels": regions[:1], "qa_labels": regions[:1],
                  "masked_regions": tuple(regions), "obj_labels": tuple(regions), "attr_labels": tuple(regions),
                  "feat_labels": (*regions, c.visual_feat_dim)}
        for name, tensor in labels.items():
            if tensor is not None and tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"LXMERT: {name} must have shape {list(shapes[name])}, got {list(tensor.shape)}")
        given = [name for name in ("obj_labels", "attr_labels", "feat_labels") if labels[name] is not None]
        if given and labels["masked_regions"] is None:
            raise ValueError(f"LXMERT: {', '.join(given)} need masked_regions (which RoIs were masked)")
        text_mask = as_bool_mask("LXMERT", "attention_mask", attention_mask, input_ids.shape)
        visn_mask = as_bool_mask("LXMERT", "visual_attention_mask", visual_attention_mask, regions)
        return text_mask, visn_mask

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, input_ids, visual_feats, visual_pos, text_mask, visn_mask, token_type_ids=None):
        """The encoders on checked inputs (bool masks or None): returns (language [B, S, D],
        vision [B, N, D])."""
        lang = self.embeddings(input_ids, token_type_ids)
        visn = self.visual_encoder(visual_feats, visual_pos)
        for layer in self.layers:
            lang = layer(lang, text_mask)
        for layer in self.r_layers:
            visn = layer(visn, visn_mask)
        for layer in self.x_layers:
            lang, visn = layer(lang, visn, lang_mask=text_mask, visn_mask=visn_mask)
        return lang, visn

    def forward(self, input_ids: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, visual_attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, mlm_labels: Optional[torch.Tensor] = None,
                itm_labels: Optional[torch.Tensor] = None, masked_regions: Optional[torch.Tensor] = None,
                obj_labels: Optional[torch.Tensor] = None, attr_labels: Optional[torch.Tensor] = None,
                feat_labels: Optional[torch.Tensor] = None, qa_labels: Optional[torch.Tensor] = None) -> ModelOutput:
        c = self.config
        labels = dict(mlm_labels=mlm_labels, itm_labels=itm_labels, masked_regions=masked_regions,
                      obj_labels=obj_labels, attr_labels=attr_labels, feat_labels=feat_labels, qa_labels=qa_labels)
        text_mask, visn_mask = self._check_inputs(input_ids, visual_feats, visual_pos, attention_mask,
                                                  visual_attention_mask, token_type_ids, labels)
        with self.kernels():
            lang, visn = self.encode(input_ids, visual_feats, visual_pos, text_mask, visn_mask, token_type_ids)
            pooled = self.pooler(lang)
            out = ModelOutput(language_output=lang, vision_output=visn, pooled_output=pooled)
            losses, weights = {}, {}
            if mlm_labels is not None:
                out.mlm_logits = self.mlm_head(lang)
                losses["mlm"], weights["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels), c.mlm_weight
            if itm_labels is not None:
                out.itm_logits = self.itm_head(pooled)
                losses["itm"], weights["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels), c.itm_weight
            if any(t is not None for t in (obj_labels, attr_labels, feat_labels)):
                predictions = self.obj_head(visn)
                roi_weight = masked_regions.float().flatten()
                for name, target in (("obj", obj_labels), ("attr", attr_labels)):
                    if target is not None:
                        logits = out[f"{name}_logits"] = predictions[name]
                        per_roi = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                  ignore_index=IGNORE_INDEX, reduction="none")
                        losses[name], weights[name] = (per_roi * roi_weight).mean(), c.visual_loss_normalizer
                if feat_labels is not None:
                    out.feat_logits = predictions["feat"]
                    per_roi = F.smooth_l1_loss(out.feat_logits.float(), feat_labels.float(), reduction="none")
                    losses["feat"] = (per_roi.mean(-1).flatten() * roi_weight).mean()
                    weights["feat"] = c.visual_loss_normalizer
            if qa_labels is not None:
                out.qa_logits = self.qa_head(pooled)
                losses["qa"], weights["qa"] = masked_lm_loss(out.qa_logits, qa_labels), c.qa_weight
            out.set_losses(losses, weights)
            return out

    # -- synthetic data --------------------------------------------------------------------------
    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective's labels: captions [B, max_text_len] with 15%
        token masking (mlm_labels); num_regions RoIs whose features show caption words (with
        padded regions); half the pairs get another sample's image (itm_labels 0); 15% of the
        real RoIs masked (80% zeroed, 10% another RoI's feature, 10% kept) with obj_labels /
        attr_labels = the depicted token id mod num_object_labels / num_attr_labels and
        feat_labels the unmasked features; qa_labels = the caption's first word id mod
        num_qa_labels for matched pairs, -100 for mismatched ones (LXMERT answers only those)."""
        c = self.config
        generator = seeded_generator(generator)
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        input_ids = text["input_ids"]
        mlm_input_ids, mlm_labels = mask_tokens(input_ids, vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], prob=c.mlm_probability,
                                                generator=generator)
        regions = pairs.regions(input_ids, c.num_regions, c.visual_feat_dim, generator)
        image_index, itm_labels = mismatched_pairs(batch_size, generator)
        regions = {name: value[image_index] for name, value in regions.items()}
        boxes = regions["boxes"]
        if c.visual_pos_dim != boxes.shape[-1]:
            raise ValueError(f"LXMERT.synthetic_batch: synthetic boxes are 4-d, visual_pos_dim is {c.visual_pos_dim}")
        feats, chosen = mask_regions(regions["region_features"], regions["region_mask"], prob=c.obj_mask_rate,
                                     zero_prob=0.8, random_prob=0.1, generator=generator)
        tokens = regions["region_tokens"]
        qa_labels = torch.where(itm_labels.bool(), input_ids[:, 1] % c.num_qa_labels,
                                torch.full_like(itm_labels, IGNORE_INDEX))
        batch = {"input_ids": mlm_input_ids, "visual_feats": feats, "visual_pos": boxes,
                 "attention_mask": text["attention_mask"], "visual_attention_mask": regions["region_mask"],
                 "mlm_labels": mlm_labels, "itm_labels": itm_labels, "masked_regions": chosen,
                 "obj_labels": tokens % c.num_object_labels, "attr_labels": tokens % c.num_attr_labels,
                 "feat_labels": regions["region_features"], "qa_labels": qa_labels}
        return to_device(batch, device)

    # -- HuggingFace -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, use_kernels: bool = True) -> "LXMERT":
        """A copy of a transformers ``LxmertModel`` (encoder and pooler; the heads keep their
        initialisation) or ``LxmertForPreTraining`` (also the MLM, matching, object and answer
        heads it has): config, weights, dtype, device and train/eval mode. Its forward with
        LxmertModel's keyword inputs gives HF's language_output, vision_output, pooled_output."""
        backbone = getattr(hf_model, "lxmert", hf_model)
        hf = backbone.config
        weight = backbone.embeddings.word_embeddings.weight
        act_module = next((m.intermediate_act_fn for m in backbone.modules() if hasattr(m, "intermediate_act_fn")),
                          None)
        if backbone.config.hidden_size % backbone.config.num_attention_heads:
            raise ValueError("LXMERT.from_hf: hidden_size must be a multiple of num_attention_heads")
        config = LXMERTConfig(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size, l_layers=hf.l_layers, r_layers=hf.r_layers,
            x_layers=hf.x_layers, hidden_act=activation_name(act_module) if act_module is not None else "gelu",
            visual_feat_dim=hf.visual_feat_dim, visual_pos_dim=hf.visual_pos_dim,
            max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
            max_text_len=min(20, hf.max_position_embeddings), num_object_labels=hf.num_object_labels,
            num_attr_labels=hf.num_attr_labels, num_qa_labels=hf.num_qa_labels, dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob, initializer_range=hf.initializer_range,
            visual_loss_normalizer=getattr(hf, "visual_loss_normalizer", 6.67))
        model = cls(config, use_kernels=use_kernels)
        model.embeddings.load_state_dict(backbone.embeddings.state_dict(), strict=True)
        encoder = backbone.encoder
        model.visual_encoder.load_state_dict(encoder.visn_fc.state_dict(), strict=True)
        for ours, theirs in [*zip(model.layers, encoder.layer), *zip(model.r_layers, encoder.r_layers)]:
            ours.load_hf_state_dict(theirs.state_dict())
        for ours, theirs in zip(model.x_layers, encoder.x_layers):
            ours.load_hf_state_dict(theirs.state_dict())
        model.pooler.load_state_dict(backbone.pooler.state_dict(), strict=True)
        if hf_model is not backbone:
            model._load_hf_heads(hf_model)
        return model.to(device=weight.device, dtype=weight.dtype).train(hf_model.training)

    def _load_hf_heads(self, hf_model: nn.Module) -> None:
        """The pretraining heads of an HF ``LxmertForPreTraining`` (those it was built with)."""
        predictions = hf_model.cls.predictions
        if not torch.equal(predictions.decoder.weight, self.embeddings.word_embeddings.weight):
            raise ValueError("LXMERT.from_hf: the MLM decoder is not tied to the word embeddings "
                             "(LXMERT ties them; this model always does)")
        head = {k: v for k, v in predictions.state_dict().items() if k != "decoder.weight"}
        head["decoder.weight"] = self.embeddings.word_embeddings.weight
        self.mlm_head.load_state_dict(head, strict=True)
        self.itm_head.load_state_dict(hf_model.cls.seq_relationship.state_dict(), strict=True)
        if hasattr(hf_model, "obj_predict_head"):
            # HF builds a decoder only for the visual losses its config enables.
            result = self.obj_head.load_state_dict(hf_model.obj_predict_head.state_dict(), strict=False)
            bad = result.unexpected_keys + [k for k in result.missing_keys if not k.startswith("decoder_dict.")]
            if bad:
                raise ValueError(f"LXMERT.from_hf: obj_predict_head keys do not match: {', '.join(bad)}")
        if hasattr(hf_model, "answer_head"):
            self.qa_head.load_state_dict({k[len("logit_fc."):]: v for k, v in
                                          hf_model.answer_head.state_dict().items()}, strict=True)
