"""The two-stream models, LXMERT and ViLBERT: heads and objectives, input checks, masks, the
co-attention schedule, the synthetic labels, and LXMERT's parity with HF transformers."""
import copy

import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.models import build_model
from vlkernels.models.common import IGNORE_INDEX
from vlkernels.models.lxmert import LXMERT, LXMERTConfig
from vlkernels.models.synthetic import SyntheticPairs
from vlkernels.testing import DEVICE
from vlkernels.models.vilbert import ViLBERTConfig, with_area

TIGHT = dict(rtol=1e-5, atol=1e-5)
# The Triton kernels: the interpreter here (fp32 exact to rounding), tf32 dots on a GPU.
KERNELS = TIGHT if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=1e-2)


def _batch(model, seed=0, batch_size=4):
    return model.synthetic_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def _without(batch, *names):
    return {k: v for k, v in batch.items() if k not in names}


def test_base_configs_have_the_spec_sizes():
    lxmert = LXMERTConfig.base()
    assert (lxmert.l_layers, lxmert.r_layers, lxmert.x_layers) == (9, 5, 5)
    assert (lxmert.hidden_size, lxmert.num_heads, lxmert.intermediate_size) == (768, 12, 3072)
    assert (lxmert.visual_feat_dim, lxmert.visual_pos_dim) == (2048, 4)
    assert (lxmert.num_object_labels, lxmert.num_attr_labels, lxmert.obj_mask_rate) == (1600, 400, 0.15)
    vilbert = ViLBERTConfig.base()
    assert (vilbert.hidden_size, vilbert.intermediate_size, vilbert.num_heads, vilbert.num_text_layers) == (768, 3072,
                                                                                                         12, 12)
    assert (vilbert.v_hidden_size, vilbert.v_intermediate_size, vilbert.v_num_heads) == (1024, 1024, 8)
    assert (vilbert.bi_hidden_size, vilbert.bi_num_heads, vilbert.v_feature_size) == (1024, 8, 2048)
    # Text layers 0-5 first, then 6 rounds of (co-layer, text layer, image layer).
    assert tuple(vilbert.t_biattention_id) == (6, 7, 8, 9, 10, 11)
    assert tuple(vilbert.v_biattention_id) == (0, 1, 2, 3, 4, 5) and vilbert.v_num_layers == 6


# -- LXMERT -------------------------------------------------------------------------------------------
LXMERT_LABELS = ("mlm_labels", "itm_labels", "masked_regions", "obj_labels", "attr_labels", "feat_labels", "qa_labels")


def test_lxmert_heads_shapes_losses_and_weights():
    torch.manual_seed(0)
    model = build_model("lxmert", "tiny")
    c = model.config
    batch = _batch(model)
    out = model(**batch)
    B, S = batch["input_ids"].shape
    N = batch["visual_feats"].shape[1]
    assert out.language_output.shape == (B, S, c.hidden_size)
    assert out.vision_output.shape == (B, N, c.hidden_size)
    assert out.pooled_output.shape == (B, c.hidden_size)
    assert out.mlm_logits.shape == (B, S, c.vocab_size)
    assert out.itm_logits.shape == (B, 2)
    assert out.obj_logits.shape == (B, N, c.num_object_labels)
    assert out.attr_logits.shape == (B, N, c.num_attr_labels)
    assert out.feat_logits.shape == (B, N, c.visual_feat_dim)
    assert out.qa_logits.shape == (B, c.num_qa_labels)
    assert set(out.losses) == {"mlm", "itm", "obj", "attr", "feat", "qa"}
    expected = (out.losses["mlm"] + out.losses["itm"] + out.losses["qa"]
                + 6.67 * (out.losses["obj"] + out.losses["attr"] + out.losses["feat"]))
    torch.testing.assert_close(out.loss, expected)
    # The visual losses are means over ALL RoIs of the masked ones' losses (LXMERT's formula).
    weight = batch["masked_regions"].float().flatten()
    assert weight.sum() > 0
    per_roi = F.cross_entropy(out.obj_logits.flatten(0, 1), batch["obj_labels"].flatten(), reduction="none")
    torch.testing.assert_close(out.losses["obj"], (per_roi * weight).sum() / weight.numel())
    per_roi = F.smooth_l1_loss(out.feat_logits, batch["feat_labels"], reduction="none").mean(-1).flatten()
    torch.testing.assert_close(out.losses["feat"], (per_roi * weight).sum() / weight.numel())
    answered = batch["qa_labels"] != IGNORE_INDEX
    torch.testing.assert_close(out.losses["qa"], F.cross_entropy(out.qa_logits[answered], batch["qa_labels"][answered]))


@pytest.mark.parametrize("given, expected", [
    ((), set()),
    (("mlm_labels",), {"mlm"}),
    (("itm_labels", "qa_labels"), {"itm", "qa"}),
    (("masked_regions", "obj_labels"), {"obj"}),
    (("masked_regions", "attr_labels", "feat_labels"), {"attr", "feat"}),
])
def test_lxmert_computes_exactly_the_objectives_given(given, expected):
    torch.manual_seed(0)
    model = build_model("lxmert", "tiny")
    batch = _batch(model)
    out = model(**_without(batch, *(set(LXMERT_LABELS) - set(given))))
    assert set(out.get("losses", {})) == expected
    assert ("loss" in out) == bool(expected)
    heads = {"mlm": "mlm_logits", "itm": "itm_logits", "qa": "qa_logits", "obj": "obj_logits",
             "attr": "attr_logits", "feat": "feat_logits"}
    assert {name for name, key in heads.items() if key in out} == expected


def test_lxmert_rejects_bad_inputs():
    model = build_model("lxmert", "tiny")
    batch = _batch(model)
    cases = {
        "batch size": dict(visual_feats=batch["visual_feats"][:3]),
        "max_text_len|tokens": dict(input_ids=torch.full((4, 13), 104), attention_mask=None, mlm_labels=None),
        "visual_feats": dict(visual_feats=torch.randn(4, 6, 17)),
        "visual_pos": dict(visual_pos=torch.rand(4, 6, 5)),
        "visual_attention_mask": dict(visual_attention_mask=torch.ones(4, 5)),
        "covers": dict(visual_pos=torch.rand(4, 5, 4)),
        "need masked_regions": dict(masked_regions=None),
        "feat_labels": dict(feat_labels=torch.randn(4, 6, 15)),
        "token_type_ids": dict(token_type_ids=torch.full((4, 12), 2)),
    }
    for pattern, change in cases.items():
        with pytest.raises(ValueError, match=pattern):
            model(**{**batch, **change})


def test_lxmert_padded_regions_and_tokens_do_not_change_real_outputs():
    torch.manual_seed(0)
    model = build_model("lxmert", "tiny").eval()
    batch = _without(_batch(model), *LXMERT_LABELS)
    pad_regions = batch["visual_attention_mask"] == 0
    pad_tokens = batch["attention_mask"] == 0
    assert pad_regions.any() and pad_tokens.any()
    changed = dict(batch)
    changed["visual_feats"] = torch.where(pad_regions[..., None], torch.randn_like(batch["visual_feats"]),
                                          batch["visual_feats"])
    changed["input_ids"] = torch.where(pad_tokens, torch.randint_like(batch["input_ids"], 104, 160),
                                       batch["input_ids"])
    out, other = model(**batch), model(**changed)
    torch.testing.assert_close(other.pooled_output, out.pooled_output, **TIGHT)
    torch.testing.assert_close(other.language_output[~pad_tokens], out.language_output[~pad_tokens], **TIGHT)
    torch.testing.assert_close(other.vision_output[~pad_regions], out.vision_output[~pad_regions], **TIGHT)


def test_lxmert_position_and_token_type_row_zero_is_frozen_like_the_original():
    torch.manual_seed(0)
    model = build_model("lxmert", "tiny")
    embeddings = model.embeddings
    assert embeddings.position_embeddings.weight[0].abs().max() == 0
    assert embeddings.token_type_embeddings.weight[0].abs().max() == 0
    model(**_batch(model)).loss.backward()
    assert embeddings.position_embeddings.weight.grad[0].abs().max() == 0
    assert embeddings.position_embeddings.weight.grad[1].abs().max() > 0
    assert embeddings.token_type_embeddings.weight.grad.abs().max() == 0  # every token has type 0
    # The MLM decoder is the word embedding table itself.
    assert model.mlm_head.decoder.weight is embeddings.word_embeddings.weight


def test_lxmert_synthetic_batch_masks_regions_and_derives_learnable_labels():
    model = build_model("lxmert", "tiny")
    c = model.config
    batch = _batch(model, seed=5, batch_size=32)
    chosen, real = batch["masked_regions"], batch["visual_attention_mask"].bool()
    assert not (chosen & ~real).any()
    assert 0.08 < chosen.sum() / real.sum() < 0.25  # 15% of the real RoIs
    zeroed = (batch["visual_feats"] == 0).all(-1) & chosen
    assert 0.6 < zeroed.sum() / chosen.sum() < 0.95  # 80% zeroed
    torch.testing.assert_close(batch["visual_feats"][~chosen], batch["feat_labels"][~chosen])
    # Objects and attributes are derived from the token each region depicts.
    assert int(batch["obj_labels"].max()) < c.num_object_labels and int(batch["attr_labels"].max()) < c.num_attr_labels
    assert not torch.equal(batch["obj_labels"], batch["attr_labels"])
    # QA answers only for matched pairs.
    assert torch.equal(batch["qa_labels"] == IGNORE_INDEX, batch["itm_labels"] == 0)
    assert (batch["itm_labels"] == 0).any() and (batch["itm_labels"] == 1).any()


def test_region_tokens_are_what_the_regions_show():
    pairs = SyntheticPairs(160)
    input_ids = pairs.text(6, 12, torch.Generator().manual_seed(0))["input_ids"]
    regions = pairs.regions(input_ids, 5, 16, torch.Generator().manual_seed(1))
    shown = pairs.concepts[regions["region_tokens"]] @ pairs._projection(16)
    real = regions["region_mask"].bool()
    noise = (regions["region_features"] - shown)[real]
    assert noise.abs().max() < 0.6 and noise.std() < 0.15  # only the 0.1-std noise is left
    assert all(int(t) in set(input_ids[b].tolist()) for b in range(6) for t in regions["region_tokens"][b])


transformers = pytest.importorskip("transformers")


def _hf_lxmert_config(**overrides):
    return transformers.LxmertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37,
                                     l_layers=2, r_layers=1, x_layers=2, visual_feat_dim=11, visual_pos_dim=4,
                                     num_qa_labels=5, num_object_labels=7, num_attr_labels=3,
                                     max_position_embeddings=16, **overrides)


def _perturbed(module, seed):
    """Every parameter redrawn (LayerNorm weights around 1), so zero biases and unit norms of a
    fresh HF init cannot hide a missing or swapped weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.copy_(1 + 0.2 * noise if "LayerNorm.weight" in name or "layer_norm.weight" in name
                            else 0.2 * noise)
    return module


def _hf_inputs(seed, batch=3, length=9, regions=5, feat_dim=11, vocab=99):
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    visual_attention_mask = torch.ones(batch, regions, dtype=torch.long)
    visual_attention_mask[0, 3:] = 0
    visual_attention_mask[2, 1:] = 0
    return dict(input_ids=torch.randint(1, vocab, (batch, length), generator=generator),
                visual_feats=torch.randn(batch, regions, feat_dim, generator=generator),
                visual_pos=torch.rand(batch, regions, 4, generator=generator),
                attention_mask=attention_mask, visual_attention_mask=visual_attention_mask,
                token_type_ids=torch.randint(0, 2, (batch, length), generator=generator))


@pytest.mark.parametrize("use_kernels", [False, True])
def test_lxmert_from_hf_lxmert_model_matches_hf(use_kernels):
    torch.manual_seed(0)
    hf = _perturbed(transformers.LxmertModel(_hf_lxmert_config()), seed=1).eval().to(DEVICE)
    model = LXMERT.from_hf(hf, use_kernels=use_kernels)
    assert not model.training
    inputs = {name: value.to(DEVICE) for name, value in _hf_inputs(seed=2).items()}
    with torch.no_grad():
        expected = hf(**inputs)
        with vlkernels.use_backend("triton" if use_kernels else "torch"):
            actual = model(**inputs)
    for name in ("language_output", "vision_output", "pooled_output"):
        torch.testing.assert_close(actual[name], expected[name], **(KERNELS if use_kernels else TIGHT), msg=name)


def test_lxmert_from_hf_pretraining_model_matches_hf_heads_and_loss():
    torch.manual_seed(0)
    hf = _perturbed(transformers.LxmertForPreTraining(_hf_lxmert_config()), seed=3).eval()
    hf.tie_weights()
    model = LXMERT.from_hf(hf, use_kernels=False)
    inputs = _hf_inputs(seed=4)
    generator = torch.Generator().manual_seed(5)
    B, S = inputs["input_ids"].shape
    N = inputs["visual_feats"].shape[1]
    mlm_labels = torch.where(torch.rand(B, S, generator=generator) < 0.3,
                             torch.randint(0, 99, (B, S), generator=generator), IGNORE_INDEX)
    mlm_labels[0, 1] = 7
    matched = torch.tensor([1, 0, 1])
    qa = torch.tensor([2, IGNORE_INDEX, 4])
    masked = (torch.rand(B, N, generator=generator) < 0.4).float()
    masked[0, 0] = 1.0
    obj = torch.randint(0, 7, (B, N), generator=generator)
    attr = torch.randint(0, 3, (B, N), generator=generator)
    feat = torch.randn(B, N, 11, generator=generator)
    with torch.no_grad():
        expected = hf(**inputs, labels=mlm_labels, matched_label=matched, ans=qa,
                      obj_labels={"obj": (obj, masked), "attr": (attr, masked), "feat": (feat, masked)})
        actual = model(**inputs, mlm_labels=mlm_labels, itm_labels=matched, qa_labels=qa, masked_regions=masked,
                       obj_labels=obj, attr_labels=attr, feat_labels=feat)
    torch.testing.assert_close(actual.mlm_logits, expected.prediction_logits, **TIGHT)
    torch.testing.assert_close(actual.itm_logits, expected.cross_relationship_score, **TIGHT)
    torch.testing.assert_close(actual.qa_logits, expected.question_answering_score, **TIGHT)
    torch.testing.assert_close(actual.loss, expected.loss, **TIGHT)


def test_lxmert_from_hf_copies_mode_dtype_and_rejects_untied_decoders():
    config = _hf_lxmert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = _perturbed(transformers.LxmertForPreTraining(config), seed=6).double().train()
    hf.tie_weights()
    model = LXMERT.from_hf(hf, use_kernels=False)
    assert model.training and model.config.dropout == 0.0 and model.config.attention_dropout == 0.0
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    inputs = _hf_inputs(seed=7)
    inputs["visual_feats"], inputs["visual_pos"] = inputs["visual_feats"].double(), inputs["visual_pos"].double()
    with torch.no_grad():
        expected, actual = hf.lxmert(**inputs), model(**inputs)
    for name in ("language_output", "vision_output", "pooled_output"):
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    untied = transformers.LxmertForPreTraining(_hf_lxmert_config(tie_word_embeddings=False))
    with torch.no_grad():
        untied.cls.predictions.decoder.weight.add_(1.0)
    with pytest.raises(ValueError, match="tied"):
        LXMERT.from_hf(untied)


# -- ViLBERT ------------------------------------------------------------------------------------------
VILBERT_LABELS = ("mlm_labels", "itm_labels", "masked_regions", "region_targets")


def test_vilbert_heads_shapes_losses_and_different_widths():
    torch.manual_seed(0)
    model = build_model("vilbert", "tiny").eval()
    c = model.config
    assert (c.hidden_size, c.v_hidden_size, c.bi_hidden_size) == (32, 48, 32)
    batch = _batch(model)
    out = model(**batch)
    B, S = batch["input_ids"].shape
    N = batch["image_feat"].shape[1]
    assert out.text_hidden_state.shape == (B, S, 32)
    assert out.image_hidden_state.shape == (B, 1 + N, 48)  # the global image token first
    for name in ("pooled_text", "pooled_image", "pooler_output"):
        assert out[name].shape == (B, 32)
    assert out.mlm_logits.shape == (B, S, c.vocab_size)
    assert out.mrm_logits.shape == (B, N, c.v_target_size)
    assert out.itm_logits.shape == (B, 2)
    assert set(out.losses) == {"mlm", "mrm", "itm"}
    torch.testing.assert_close(out.loss, out.losses["mlm"] + out.losses["mrm"] + out.losses["itm"])
    # Alignment prediction on the product of the pooled text and image vectors.
    torch.testing.assert_close(out.pooler_output, out.pooled_text * out.pooled_image)
    torch.testing.assert_close(out.itm_logits, model.itm_head(out.pooled_text * out.pooled_image))
    torch.testing.assert_close(out.pooled_image, F.relu(model.image_pooler.dense(out.image_hidden_state[:, 0])))
    # Masked multimodal modelling: KL(target || prediction) summed over classes, mean over masked regions.
    chosen = batch["masked_regions"]
    assert chosen.any()
    targets = batch["region_targets"][chosen]
    log_probs = out.mrm_logits[chosen].log_softmax(-1)
    torch.testing.assert_close(out.losses["mrm"], (targets * (targets.log() - log_probs)).sum(-1).mean())


@pytest.mark.parametrize("given, expected", [
    ((), set()), (("mlm_labels",), {"mlm"}), (("itm_labels",), {"itm"}),
    (("masked_regions", "region_targets"), {"mrm"}),
])
def test_vilbert_computes_exactly_the_objectives_given(given, expected):
    torch.manual_seed(0)
    model = build_model("vilbert", "tiny")
    out = model(**_without(_batch(model), *(set(VILBERT_LABELS) - set(given))))
    assert set(out.get("losses", {})) == expected
    assert {name for name in ("mlm", "mrm", "itm") if f"{name}_logits" in out} == expected


def test_vilbert_rejects_bad_inputs_and_schedules():
    model = build_model("vilbert", "tiny")
    batch = _batch(model)
    cases = {
        "batch size": dict(image_feat=batch["image_feat"][:2]),
        "max_text_len|tokens": dict(input_ids=torch.full((4, 13), 104), attention_mask=None, mlm_labels=None),
        "image_feat": dict(image_feat=torch.randn(4, 5, 15)),
        "image_loc": dict(image_loc=torch.rand(4, 5, 6)),
        "image_attention_mask": dict(image_attention_mask=torch.ones(4, 6)),
        "both masked_regions and region_targets": dict(region_targets=None),
        "region_targets": dict(region_targets=torch.rand(4, 5, 19)),
    }
    for pattern, change in cases.items():
        with pytest.raises(ValueError, match=pattern):
            model(**{**batch, **change})
    with pytest.raises(ValueError, match="one entry per co-layer"):
        build_model("vilbert", "tiny", t_biattention_id=(1, 2))
    with pytest.raises(ValueError, match="non-decreasing"):
        build_model("vilbert", "tiny", num_text_layers=3, t_biattention_id=(2, 1), v_biattention_id=(0, 1))
    with pytest.raises(ValueError, match="non-decreasing"):
        build_model("vilbert", "tiny", v_biattention_id=(2,))
    with pytest.raises(ValueError, match="multiple of bi_num_heads"):
        build_model("vilbert", "tiny", bi_num_heads=3)


def test_vilbert_runs_the_configured_schedule():
    # The base pattern at small scale: text layers 0-1 first, then 2 rounds of (co, text, image).
    torch.manual_seed(0)
    model = build_model("vilbert", "tiny", num_text_layers=4, v_num_layers=2, t_biattention_id=(2, 3),
                        v_biattention_id=(0, 1)).eval()
    order = []
    for kind in ("text_layers", "image_layers", "co_layers"):
        for i, layer in enumerate(getattr(model, kind)):
            layer.register_forward_hook(lambda *_, name=f"{kind[:-7]}{i}": order.append(name))
    batch = _without(_batch(model), *VILBERT_LABELS)
    out = model(**batch)
    # Text and image layers between two co-layers are independent; the model runs text first.
    assert order == ["text0", "text1", "co0", "text2", "image0", "co1", "text3", "image1"]
    # The same computation written out in SPEC's order.
    text = model.embeddings(batch["input_ids"])
    text_mask = batch["attention_mask"].bool()
    image, image_mask = model._embed_image(batch["image_feat"], batch["image_loc"],
                                           batch["image_attention_mask"].bool())
    for layer in model.text_layers[:2]:
        text = layer(text, text_mask)
    for k in range(2):
        text, image = model.co_layers[k](text, image, text_mask=text_mask, image_mask=image_mask)
        text, image = model.text_layers[2 + k](text, text_mask), model.image_layers[k](image, image_mask)
    torch.testing.assert_close(out.text_hidden_state, text, **TIGHT)
    torch.testing.assert_close(out.image_hidden_state, image, **TIGHT)


def test_vilbert_global_image_token_is_the_mean_of_real_regions_and_padding_is_ignored():
    torch.manual_seed(0)
    model = build_model("vilbert", "tiny").eval()
    batch = _without(_batch(model), *VILBERT_LABELS)
    real = batch["image_attention_mask"].bool()
    assert (~real).any()
    embedded, mask = model._embed_image(batch["image_feat"], batch["image_loc"], real)
    assert mask[:, 0].all() and torch.equal(mask[:, 1:], real)
    mean = (batch["image_feat"] * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(len(mean), 5)
    torch.testing.assert_close(embedded[:, 0], model.image_embeddings(mean, whole))
    # Features and locations of padded regions change nothing real.
    changed = dict(batch)
    changed["image_feat"] = torch.where(real[..., None], batch["image_feat"], torch.randn_like(batch["image_feat"]))
    changed["image_loc"] = torch.where(real[..., None], batch["image_loc"], torch.rand_like(batch["image_loc"]))
    out, other = model(**batch), model(**changed)
    torch.testing.assert_close(other.pooler_output, out.pooler_output, **TIGHT)
    torch.testing.assert_close(other.text_hidden_state, out.text_hidden_state, **TIGHT)
    # Boxes without the area give the same as locations with it.
    boxes = dict(batch, image_loc=batch["image_loc"][..., :4])
    torch.testing.assert_close(model(**boxes).pooler_output, out.pooler_output, **TIGHT)


def test_vilbert_without_global_token_keeps_n_regions():
    torch.manual_seed(0)
    model = build_model("vilbert", "tiny", global_image_token=False)
    batch = _batch(model)
    out = model(**batch)
    N = batch["image_feat"].shape[1]
    assert out.image_hidden_state.shape[1] == N and out.mrm_logits.shape[1] == N


def test_vilbert_synthetic_batch_targets_follow_the_depicted_class():
    model = build_model("vilbert", "tiny")
    c = model.config
    batch = _batch(model, seed=2, batch_size=32)
    targets = batch["region_targets"]
    torch.testing.assert_close(targets.sum(-1), torch.ones(targets.shape[:2]))
    assert torch.allclose(targets.max(-1).values, torch.tensor(0.9 + 0.1 / c.v_target_size))
    torch.testing.assert_close(batch["image_loc"], with_area(batch["image_loc"][..., :4]))
    chosen, real = batch["masked_regions"], batch["image_attention_mask"].bool()
    assert not (chosen & ~real).any() and 0.08 < chosen.sum() / real.sum() < 0.25
    zeroed = (batch["image_feat"] == 0).all(-1) & chosen
    assert 0.75 < zeroed.sum() / chosen.sum() <= 1.0  # 90% zeroed, the rest kept
    # Regions with the same synthetic class have the same target.
    classes = targets.argmax(-1)
    first = targets[classes == classes[0, 0]]
    assert torch.equal(first, first[:1].expand_as(first))


def test_vilbert_kernels_and_references_agree_on_padded_inputs():
    torch.manual_seed(0)
    reference = build_model("vilbert", "tiny", use_kernels=False).eval().to(DEVICE)
    kernels = copy.deepcopy(reference)
    kernels.use_kernels = True
    batch = {name: value.to(DEVICE) for name, value in _batch(reference, seed=4).items()}
    expected = reference(**batch)
    with vlkernels.use_backend("triton"):
        actual = kernels(**batch)
    for name in ("text_hidden_state", "image_hidden_state", "pooler_output", "loss"):
        torch.testing.assert_close(actual[name], expected[name], **KERNELS, msg=name)
