"""The single-stream region models, VisualBERT, UNITER and Oscar: heads and objectives, input
checks, masks, the per-objective passes and losses, the synthetic labels, and VisualBERT's
parity with HF transformers."""
import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.models import build_model
from vlkernels.models._single_stream import box_features
from vlkernels.models.common import IGNORE_INDEX
from vlkernels.models.oscar import Oscar, OscarConfig, caption_and_tags, oscar_region_features
from vlkernels.models.synthetic import CLS, FIRST_WORD_ID, PAD, SEP
from vlkernels.models.uniter import (
    UNITER, UNITERConfig, mask_real_regions, region_class_targets, synthetic_soft_labels,
)
from vlkernels.models.visual_bert import VisualBERT, VisualBERTConfig
from vlkernels.reference.optimal_transport import wra_distance as reference_wra_distance
from vlkernels.testing import DEVICE

TIGHT = dict(rtol=1e-5, atol=1e-5)
LABELS = {
    "visualbert": ("mlm_labels", "itm_labels"),
    "uniter": ("mlm_input_ids", "mlm_labels", "masked_regions", "region_labels", "region_soft_labels", "itm_labels",
               "itm_image_index"),
    "oscar": ("mlm_labels", "contrastive_labels"),
}
# per model: (text mask, region input, region mask)
REGION_KEYS = {"visualbert": ("attention_mask", "visual_embeds", "visual_attention_mask"),
               "uniter": ("attention_mask", "region_features", "region_mask"),
               "oscar": ("attention_mask", "img_feats", "img_mask")}


def _batch(model, seed=0, batch_size=4):
    return model.synthetic_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def _without(batch, *names):
    return {k: v for k, v in batch.items() if k not in names}


def _inputs(name, batch):
    return _without(batch, *LABELS[name])


# -- heads, objectives, weights ------------------------------------------------------------------------
def test_visualbert_heads_shapes_losses_and_weights():
    torch.manual_seed(0)
    model = build_model("visualbert", "tiny")
    c, batch = model.config, _batch(model)
    out = model(**batch)
    B, S = batch["input_ids"].shape
    N = batch["visual_embeds"].shape[1]
    assert out.last_hidden_state.shape == (B, S + N, c.hidden_size)
    assert out.pooler_output.shape == (B, c.hidden_size)
    assert out.mlm_logits.shape == (B, S, c.vocab_size)
    assert out.itm_logits.shape == (B, 2)
    assert set(out.losses) == {"mlm", "itm"}
    torch.testing.assert_close(out.loss, out.losses["mlm"] + out.losses["itm"])
    labelled = batch["mlm_labels"] != IGNORE_INDEX
    assert labelled.any()
    torch.testing.assert_close(out.losses["mlm"], F.cross_entropy(out.mlm_logits[labelled],
                                                                  batch["mlm_labels"][labelled]))
    torch.testing.assert_close(out.losses["itm"], F.cross_entropy(out.itm_logits, batch["itm_labels"]))


def test_uniter_heads_shapes_losses_and_weights():
    torch.manual_seed(0)
    model = build_model("uniter", "tiny")
    c, batch = model.config, _batch(model)
    out = model(**batch)
    B, S = batch["input_ids"].shape
    N = batch["region_features"].shape[1]
    assert out.mlm_logits.shape == (B, S, c.vocab_size)
    assert out.mrfr_logits.shape == (B, N, c.img_dim)
    assert out.mrc_logits.shape == (B, N, c.num_region_classes)
    assert out.itm_logits.shape == (B, 2)
    assert set(out.losses) == {"mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra"}
    expected = sum(v for k, v in out.losses.items() if k != "wra") + 0.1 * out.losses["wra"]
    torch.testing.assert_close(out.loss, expected)
    # The region losses cover exactly the masked regions (UNITER's means).
    masked = batch["masked_regions"]
    torch.testing.assert_close(out.losses["mrfr"], F.mse_loss(out.mrfr_logits[masked],
                                                              batch["region_features"][masked]))
    torch.testing.assert_close(out.losses["mrc"], F.cross_entropy(out.mrc_logits[masked],
                                                                  batch["region_labels"][masked]))
    kl = F.kl_div(F.log_softmax(out.mrc_logits[masked], -1), batch["region_soft_labels"][masked], reduction="none")
    torch.testing.assert_close(out.losses["mrc_kl"], kl.mean())
    torch.testing.assert_close(out.losses["itm"], F.cross_entropy(out.itm_logits, batch["itm_labels"]))


def test_oscar_heads_shapes_losses_and_weights():
    torch.manual_seed(0)
    model = build_model("oscar", "tiny")
    c, batch = model.config, _batch(model)
    out = model(**batch)
    B, S = batch["input_ids"].shape
    N = batch["img_feats"].shape[1]
    assert out.last_hidden_state.shape == (B, S + N, c.hidden_size)
    assert out.pooler_output.shape == (B, c.hidden_size)
    assert out.mlm_logits.shape == (B, S, c.vocab_size)
    assert out.contrastive_logits.shape == (B, 2)
    assert set(out.losses) == {"mlm", "contrastive"}
    torch.testing.assert_close(out.loss, out.losses["mlm"] + out.losses["contrastive"])
    torch.testing.assert_close(out.losses["contrastive"],
                               F.cross_entropy(out.contrastive_logits, batch["contrastive_labels"]))


@pytest.mark.parametrize("name, given, expected", [
    ("visualbert", (), set()),
    ("visualbert", ("mlm_labels",), {"mlm"}),
    ("visualbert", ("itm_labels",), {"itm"}),
    ("uniter", (), set()),
    ("uniter", ("mlm_labels",), {"mlm"}),
    ("uniter", ("masked_regions",), {"mrfr"}),
    ("uniter", ("masked_regions", "region_labels"), {"mrfr", "mrc"}),
    ("uniter", ("masked_regions", "region_soft_labels"), {"mrfr", "mrc_kl"}),
    ("uniter", ("itm_labels", "itm_image_index"), {"itm", "wra"}),
    ("oscar", (), set()),
    ("oscar", ("mlm_labels",), {"mlm"}),
    ("oscar", ("contrastive_labels",), {"contrastive"}),
])
def test_each_objective_appears_exactly_when_its_labels_are_given(name, given, expected):
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    out = model(**_without(_batch(model), *(set(LABELS[name]) - set(given))))
    assert set(out.get("losses", {})) == expected
    assert ("loss" in out) == bool(expected)
    heads = {"mlm": "mlm_logits", "itm": "itm_logits", "mrfr": "mrfr_logits", "contrastive": "contrastive_logits"}
    assert {name for name, key in heads.items() if key in out} == expected & set(heads)
    if not expected:
        assert {"last_hidden_state", "pooler_output"} <= set(out)


# -- input checks ---------------------------------------------------------------------------------------
BAD_INPUTS = {
    "visualbert": {
        "batch size": dict(visual_embeds=lambda b: b["visual_embeds"][:3]),
        "max_text_len|tokens": dict(input_ids=lambda b: torch.full((4, 13), 104), attention_mask=None, mlm_labels=None),
        "visual_embeds": dict(visual_embeds=lambda b: torch.randn(4, 6, 17)),
        "visual_attention_mask": dict(visual_attention_mask=lambda b: torch.ones(4, 5)),
        "attention_mask": dict(attention_mask=lambda b: torch.ones(4, 11)),
        "token_type_ids": dict(token_type_ids=lambda b: torch.full((4, 12), 2)),
        "position_ids": dict(position_ids=lambda b: torch.arange(13)[None]),
        "image_text_alignment": dict(image_text_alignment=lambda b: torch.full((4, 6, 2), 12)),
        "itm_labels": dict(itm_labels=lambda b: torch.full((4,), 2)),
        "inputs_embeds": dict(inputs_embeds=lambda b: torch.randn(4, 12, 32)),
        "output_attentions": dict(output_attentions=True),
        "return_dict": dict(return_dict=False),
    },
    "uniter": {
        "batch size": dict(region_features=lambda b: b["region_features"][:3]),
        "max_text_len|tokens": dict(input_ids=lambda b: torch.full((4, 13), 104), attention_mask=None,
                                    mlm_input_ids=None, mlm_labels=None),
        "region_features": dict(region_features=lambda b: torch.randn(4, 6, 17)),
        "boxes": dict(boxes=lambda b: torch.rand(4, 6, 5)),
        "cover": dict(boxes=lambda b: torch.rand(4, 5, 4)),
        "region_mask": dict(region_mask=lambda b: torch.ones(4, 5)),
        "region_soft_labels": dict(region_soft_labels=lambda b: torch.rand(4, 6, 11)),
        "padded regions": dict(masked_regions=lambda b: torch.ones(4, 6, dtype=torch.bool)),
        "needs masked_regions": dict(masked_regions=None),
        "needs itm_labels": dict(itm_labels=None),
        "itm_image_index": dict(itm_image_index=lambda b: torch.tensor([0, 1, 2, 4])),
        "mlm_input_ids": dict(mlm_input_ids=lambda b: b["mlm_input_ids"][:, :11]),
    },
    "oscar": {
        "batch size": dict(img_feats=lambda b: b["img_feats"][:3]),
        "max_text_len|tokens": dict(input_ids=lambda b: torch.full((4, 15), 104), attention_mask=None,
                                    token_type_ids=None, mlm_labels=None),
        "img_feats": dict(img_feats=lambda b: torch.randn(4, 6, 16)),
        "img_mask": dict(img_mask=lambda b: torch.ones(4, 7)),
        "token_type_ids": dict(token_type_ids=lambda b: torch.full((4, 14), 2)),
        "mlm_labels": dict(mlm_labels=lambda b: torch.full((4, 14), 160)),
        "contrastive_labels": dict(contrastive_labels=lambda b: torch.ones(4, 1, dtype=torch.long)),
    },
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_raise_clear_value_errors(name):
    model = build_model(name, "tiny")
    batch = _batch(model)
    for pattern, change in BAD_INPUTS[name].items():
        changed = {k: (v(batch) if callable(v) else v) for k, v in change.items()}
        with pytest.raises(ValueError, match=pattern):
            model(**{**batch, **changed})


# -- masks and the joint sequence -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["visualbert", "uniter", "oscar"])
def test_padded_tokens_and_regions_do_not_change_real_outputs(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    batch = _inputs(name, _batch(model))
    text_key, region_key, region_mask_key = REGION_KEYS[name]
    pad_tokens, pad_regions = batch[text_key] == 0, batch[region_mask_key] == 0
    assert pad_tokens.any() and pad_regions.any()
    changed = dict(batch)
    changed[region_key] = torch.where(pad_regions[..., None], torch.randn_like(batch[region_key]), batch[region_key])
    changed["input_ids"] = torch.where(pad_tokens, torch.randint_like(batch["input_ids"], 104, 160),
                                       batch["input_ids"])
    out, other = model(**batch), model(**changed)
    S = batch["input_ids"].shape[1]
    real = torch.cat([~pad_tokens, ~pad_regions], 1)
    torch.testing.assert_close(other.pooler_output, out.pooler_output, **TIGHT)
    torch.testing.assert_close(other.last_hidden_state[real], out.last_hidden_state[real], **TIGHT)
    assert not torch.allclose(other.last_hidden_state[:, :S][pad_tokens], out.last_hidden_state[:, :S][pad_tokens])


@pytest.mark.parametrize("name", ["visualbert", "uniter", "oscar"])
def test_regions_carry_no_order_permuting_them_permutes_their_outputs(name):
    # Regions get no position embedding (VisualBERT without image_text_alignment gives all the
    # same visual position; UNITER's location is per box; Oscar none).
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    batch = _inputs(name, _batch(model))
    region_key, mask_key = REGION_KEYS[name][1:]
    order = torch.randperm(batch[region_key].shape[1])
    permuted = dict(batch)
    for key in (region_key, mask_key, "boxes"):
        if key in batch:
            permuted[key] = batch[key][:, order]
    out, other = model(**batch), model(**permuted)
    S = batch["input_ids"].shape[1]
    torch.testing.assert_close(other.last_hidden_state[:, :S], out.last_hidden_state[:, :S], **TIGHT)
    torch.testing.assert_close(other.last_hidden_state[:, S:], out.last_hidden_state[:, S:][:, order], **TIGHT)
    torch.testing.assert_close(other.pooler_output, out.pooler_output, **TIGHT)


# -- VisualBERT: HF parity and embeddings ---------------------------------------------------------------------
def _hf_visual_bert(cls_name="VisualBertModel", **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.VisualBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, visual_embedding_dim=12, max_position_embeddings=20,
                                           type_vocab_size=3, pad_token_id=0, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # move every weight off its initial value (unit LayerNorms, zero biases ...)
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def _hf_inputs(case, generator_seed=1):
    g = torch.Generator().manual_seed(generator_seed)
    B, S, N = 3, 7, 5
    inputs = {"input_ids": torch.randint(1, 99, (B, S), generator=g),
              "attention_mask": torch.ones(B, S, dtype=torch.long),
              "visual_embeds": torch.randn(B, N, 12, generator=g),
              "visual_attention_mask": torch.ones(B, N, dtype=torch.long)}
    inputs["attention_mask"][1, 5:] = 0
    inputs["attention_mask"][2, 3:] = 0
    inputs["visual_attention_mask"][0, 3:] = 0
    inputs["visual_attention_mask"][2, 1:] = 0
    if case == "types_positions_alignment":
        inputs["token_type_ids"] = torch.randint(0, 3, (B, S), generator=g)
        inputs["visual_token_type_ids"] = torch.randint(0, 3, (B, N), generator=g)
        inputs["position_ids"] = torch.randint(0, 20, (B, S), generator=g)
        alignment = torch.randint(-1, S, (B, N, 3), generator=g)
        alignment[0, 1] = -1  # a region aligned to no word
        inputs["image_text_alignment"] = alignment
    if case == "text_only":
        del inputs["visual_embeds"], inputs["visual_attention_mask"]
    return inputs


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "references"])
@pytest.mark.parametrize("case", ["padded", "types_positions_alignment", "text_only"])
def test_visualbert_matches_hf_visual_bert_model(case, use_kernels):
    # On DEVICE: the Triton kernels run in the interpreter on CPU (fp32 rounding), or on the
    # GPU, where their tf32 dots allow a looser match.
    hf = _hf_visual_bert().to(DEVICE)
    model = VisualBERT.from_hf(hf, use_kernels=use_kernels)
    assert not model.training and model.embeddings.word_embeddings.weight.device.type == DEVICE.type
    inputs = {k: v.to(DEVICE) for k, v in _hf_inputs(case).items()}
    with torch.no_grad():
        expected = hf(**inputs)
        with vlkernels.use_backend("triton" if use_kernels else "torch"):
            actual = model(**inputs)
    tolerance = TIGHT if DEVICE.type == "cpu" or not use_kernels else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **tolerance)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **tolerance)


def test_visualbert_from_hf_pretraining_heads_give_hf_logits_and_loss():
    hf = _hf_visual_bert("VisualBertForPreTraining")
    model = VisualBERT.from_hf(hf, use_kernels=False)
    inputs = _hf_inputs("padded")
    B, S = inputs["input_ids"].shape
    N = inputs["visual_embeds"].shape[1]
    mlm_labels = torch.where(torch.rand(B, S) < 0.5, inputs["input_ids"], torch.full((B, S), IGNORE_INDEX))
    mlm_labels[0, 1] = inputs["input_ids"][0, 1]
    hf_matching = torch.tensor([0, 1, 0])  # HF: 0 = the caption matches
    with torch.no_grad():
        expected = hf(**inputs, labels=torch.cat([mlm_labels, torch.full((B, N), IGNORE_INDEX)], 1),
                      sentence_image_labels=hf_matching)
        actual = model(**inputs, mlm_labels=mlm_labels, itm_labels=1 - hf_matching)
    torch.testing.assert_close(actual.mlm_logits, expected.prediction_logits[:, :S], **TIGHT)
    torch.testing.assert_close(actual.itm_logits, expected.seq_relationship_logits.flip(-1), **TIGHT)
    torch.testing.assert_close(actual.loss, expected.loss, **TIGHT)
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight


def test_visualbert_from_hf_copies_dtype_mode_and_config_and_rejects_bypass():
    hf = _hf_visual_bert(hidden_act="relu").double().train()
    model = VisualBERT.from_hf(hf, use_kernels=False)
    assert model.training and model.config.hidden_act == "relu" and model.config.type_vocab_size == 3
    assert all(p.dtype == torch.float64 for p in model.parameters())
    inputs = _hf_inputs("padded")
    inputs["visual_embeds"] = inputs["visual_embeds"].double()
    hf.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, hf(**inputs).last_hidden_state,
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="bypass_transformer"):
        VisualBERT.from_hf(_hf_visual_bert(bypass_transformer=True))


def test_visualbert_special_visual_initialize_copies_the_text_tables():
    model = VisualBERT(VisualBERTConfig.tiny())
    e = model.embeddings
    assert torch.equal(e.visual_token_type_embeddings.weight, e.token_type_embeddings.weight)
    assert torch.equal(e.visual_position_embeddings.weight, e.position_embeddings.weight)
    assert e.visual_position_embeddings.weight is not e.position_embeddings.weight  # copies, trained apart
    plain = VisualBERT(VisualBERTConfig(**{**VisualBERTConfig.tiny().__dict__, "special_visual_initialize": False}))
    assert not torch.equal(plain.embeddings.visual_position_embeddings.weight,
                           plain.embeddings.position_embeddings.weight)


# -- UNITER: passes, location, tied head, WRA ----------------------------------------------------------------
def test_uniter_location_is_the_7d_box_feature():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.6]]])
    torch.testing.assert_close(box_features(boxes, area=True),
                               torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]]]))
    torch.manual_seed(0)
    model = build_model("uniter", "tiny").eval()
    batch = _inputs("uniter", _batch(model))
    seven = {**batch, "boxes": box_features(batch["boxes"], area=True)}
    torch.testing.assert_close(model(**seven).last_hidden_state, model(**batch).last_hidden_state, **TIGHT)
    moved = {**batch, "boxes": batch["boxes"].flip(-1)}
    assert not torch.allclose(model(**moved).last_hidden_state, model(**batch).last_hidden_state)


def test_uniter_region_pass_uses_the_mask_embedding_and_the_clean_caption():
    torch.manual_seed(0)
    model = build_model("uniter", "tiny").eval()
    batch = _batch(model)
    masked = batch["masked_regions"]
    out = model(**_without(batch, "mlm_labels", "mlm_input_ids", "itm_labels", "itm_image_index"))
    # The same pass by hand: masked features replaced by the mask embedding, no labels.
    replaced = torch.where(masked[..., None], model.img_embeddings.mask_embedding.detach(), batch["region_features"])
    plain = model(**{**_inputs("uniter", batch), "region_features": replaced})
    S = batch["input_ids"].shape[1]
    torch.testing.assert_close(out.mrfr_logits, model.feat_regress(plain.last_hidden_state[:, S:]), **TIGHT)
    # MRFR regresses the unmasked features, through the head tied to img_linear.
    assert model.feat_regress.weight is model.img_embeddings.img_linear.weight
    out.losses["mrfr"].backward()
    assert model.img_embeddings.mask_embedding.grad.abs().sum() > 0
    # The masked caption (mlm_input_ids) only feeds the MLM pass.
    other = model(**_without({**batch, "mlm_input_ids": torch.full_like(batch["input_ids"], 103)},
                             "itm_labels", "itm_image_index"))
    torch.testing.assert_close(other.losses["mrfr"], out.losses["mrfr"], **TIGHT)
    assert not torch.allclose(other.mlm_logits, model(**_without(batch, "itm_labels", "itm_image_index")).mlm_logits)


def test_uniter_itm_pass_pairs_captions_with_itm_image_index_and_adds_wra():
    torch.manual_seed(0)
    model = build_model("uniter", "tiny").eval()
    batch = _batch(model, seed=3)
    index, labels = batch["itm_image_index"], batch["itm_labels"]
    assert (labels == 0).any() and (labels == 1).any()
    out = model(**_without(batch, "mlm_labels", "mlm_input_ids", "masked_regions", "region_labels",
                           "region_soft_labels"))
    paired = {**_inputs("uniter", batch), "region_features": batch["region_features"][index],
              "boxes": batch["boxes"][index], "region_mask": batch["region_mask"][index]}
    plain = model(**paired)
    torch.testing.assert_close(out.itm_logits, model.itm_head(plain.pooler_output), **TIGHT)
    # WRA: IPOT distance of the text half ([CLS] and [SEP] included) vs the region half.
    S = batch["input_ids"].shape[1]
    distance = reference_wra_distance(plain.last_hidden_state[:, :S].double(), plain.last_hidden_state[:, S:].double(),
                                      batch["attention_mask"].bool(), paired["region_mask"].bool())
    expected = (distance[labels == 1].sum() - distance[labels == 0].sum()) / len(labels)
    torch.testing.assert_close(out.losses["wra"].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, out.losses["itm"] + 0.1 * out.losses["wra"])


def test_uniter_without_ot_lambda_skips_wra():
    model = UNITER(UNITERConfig(**{**UNITERConfig.tiny().__dict__, "itm_ot_lambda": 0.0}))
    out = model(**_without(_batch(model), "mlm_input_ids", "mlm_labels", "masked_regions", "region_labels",
                           "region_soft_labels"))
    assert set(out.losses) == {"itm"}


def test_uniter_synthetic_region_labels():
    tokens = torch.tensor([[104, 115, 159]])
    soft = synthetic_soft_labels(tokens, 12)
    torch.testing.assert_close(soft.sum(-1), torch.ones(1, 3))
    assert torch.equal(region_class_targets(soft), 1 + tokens % 11)
    # The background (class 0) is never a target even when it is the likeliest class.
    background = torch.tensor([[0.6, 0.1, 0.3]])
    assert region_class_targets(background).item() == 2
    region_mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 50)
    masked = mask_real_regions(region_mask, 0.15, torch.Generator().manual_seed(0))
    assert masked.any(1).all() and not (masked & (region_mask == 0)).any()


def test_uniter_mrc_ignores_background_and_unmasked_regions():
    torch.manual_seed(0)
    model = build_model("uniter", "tiny").eval()
    batch = _without(_batch(model), "mlm_input_ids", "mlm_labels", "itm_labels", "itm_image_index",
                     "region_soft_labels")
    masked = batch["masked_regions"]
    labels = batch["region_labels"].clone()
    labels[~masked] = 3  # unmasked regions' labels are ignored
    first = masked.nonzero()[0]
    labels[first[0], first[1]] = 0  # background: ignored
    out = model(**{**batch, "region_labels": labels})
    keep = masked.clone()
    keep[first[0], first[1]] = False
    assert keep.any()
    torch.testing.assert_close(out.losses["mrc"], F.cross_entropy(out.mrc_logits[keep], labels[keep]))


# -- Oscar: text layout, tags, region input -----------------------------------------------------------------
def test_oscar_caption_and_tags_layout():
    captions = torch.tensor([[CLS, 110, 111, SEP, PAD], [CLS, 120, SEP, PAD, PAD]])
    text = caption_and_tags(captions, captions != PAD, [[130, 131], [140]], 8)
    assert text["input_ids"].tolist() == [[CLS, 110, 111, SEP, 130, 131, SEP, PAD],
                                          [CLS, 120, SEP, 140, SEP, PAD, PAD, PAD]]
    assert text["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert text["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 5 + [0] * 3]
    assert text["maskable"].tolist() == [[False, True, True, False, True, True, False, False],
                                         [False, True, False, True, False, False, False, False]]
    with pytest.raises(ValueError, match="fit"):
        caption_and_tags(captions, captions != PAD, [[130, 131, 132, 133], [140]], 7)


def test_oscar_synthetic_tags_are_the_depicted_words_or_polluted():
    model = build_model("oscar", "tiny")
    batch = _batch(model, seed=5, batch_size=8)
    labels = batch["contrastive_labels"]
    assert (labels == 0).any() and (labels == 1).any()
    original = torch.where(batch["mlm_labels"] != IGNORE_INDEX, batch["mlm_labels"], batch["input_ids"])
    masked = batch["mlm_labels"] != IGNORE_INDEX
    assert masked.any() and (original[masked] >= FIRST_WORD_ID).all()  # only caption words and tags are masked
    polluted_and_foreign = 0
    for b in range(8):
        ids, types = original[b].tolist(), batch["token_type_ids"][b].tolist()
        first_sep = ids.index(SEP)
        caption, tags = ids[1:first_sep], [t for t, s in zip(ids, types) if s == 1][:-1]
        assert ids[0] == CLS and all(s == 0 for s in types[:first_sep + 1]) and tags
        assert [t for t, s in zip(ids, types) if s == 1][-1] == SEP
        if labels[b] == 1:  # the image's own tags name words of its caption
            assert set(tags) <= set(caption)
        else:
            polluted_and_foreign += not set(tags) <= set(caption)
    assert polluted_and_foreign > 0
    # Padded regions are all-zero rows (feature and box values).
    assert (batch["img_feats"][batch["img_mask"] == 0] == 0).all()


def test_oscar_region_input_and_optional_layer_norm():
    features, boxes = torch.randn(2, 3, 16), torch.rand(2, 3, 4)
    combined = oscar_region_features(features, boxes)
    assert combined.shape == (2, 3, 22)
    torch.testing.assert_close(combined[..., :16], features)
    torch.testing.assert_close(combined[..., 20], boxes[..., 2] - boxes[..., 0])
    torch.testing.assert_close(combined[..., 21], boxes[..., 3] - boxes[..., 1])
    torch.manual_seed(0)
    plain = Oscar(OscarConfig.tiny()).eval()
    normed = Oscar(OscarConfig(**{**OscarConfig.tiny().__dict__, "use_img_layernorm": True})).eval()
    assert plain.img_layer_norm is None and normed.img_layer_norm is not None
    normed.load_state_dict(plain.state_dict(), strict=False)
    batch = _inputs("oscar", _batch(plain))
    with torch.no_grad():
        normed.img_layer_norm.weight.fill_(2.0)
    S = batch["input_ids"].shape[1]
    assert not torch.allclose(normed(**batch).last_hidden_state[:, S:], plain(**batch).last_hidden_state[:, S:])
