"""METER and SOHO (vlkernels.models.meter / .soho): heads, objectives, input checks and the
behaviour specific to each model (METER's CLIP tower and BERT text encoder against independent
references, its ITM / MLM passes; SOHO's visual dictionary neck, MVM masking, padding).
The kernels-vs-references agreement and the convergence of every model are in test_models.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models import build_model
from vlkernels.models.common import IGNORE_INDEX
from vlkernels.models.soho import sine_position_embedding

B = 4


def _model(name, **overrides):
    torch.manual_seed(0)
    return build_model(name, "tiny", **overrides).eval()


def _batch(model, seed=0):
    return model.synthetic_batch(B, generator=torch.Generator().manual_seed(seed))


def _only(batch, *keys):
    return {k: v for k, v in batch.items() if k in keys}


# ---------------------------------------------------------------------------------------------
# METER
# ---------------------------------------------------------------------------------------------
METER_INPUTS = ("input_ids", "pixel_values", "attention_mask")


def test_meter_outputs_and_head_shapes():
    model = _model("meter")
    c, batch = model.config, _batch(model)
    seq, patches = batch["input_ids"].shape[1], (c.image_size // c.patch_size) ** 2
    out = model(**_only(batch, *METER_INPUTS))
    assert "loss" not in out and "losses" not in out
    assert out.text_hidden_state.shape == (B, seq, c.hidden_size)
    assert out.image_hidden_state.shape == (B, 1 + patches, c.hidden_size)
    assert out.text_pooler_output.shape == out.image_pooler_output.shape == (B, c.hidden_size)
    torch.testing.assert_close(out.pooler_output, torch.cat([out.text_pooler_output, out.image_pooler_output], -1))
    # The poolers read each stream's first token.
    torch.testing.assert_close(out.text_pooler_output, model.text_pooler(out.text_hidden_state))
    image_first = out.image_hidden_state[:, 0]
    torch.testing.assert_close(out.image_pooler_output, torch.tanh(model.image_pooler.dense(image_first)))
    full = model(**batch)
    assert full.mlm_logits.shape == (B, seq, c.vocab_size)
    assert full.itm_logits.shape == (B, 2)
    assert set(full.losses) == {"mlm", "itm"}
    torch.testing.assert_close(full.loss, full.losses["mlm"] + full.losses["itm"])


@pytest.mark.parametrize("objective", ["mlm", "itm"])
def test_meter_each_objective_appears_with_its_labels(objective):
    model = _model("meter")
    batch = _batch(model)
    keys = {"mlm": ("mlm_input_ids", "mlm_labels"), "itm": ("itm_labels", "itm_image_index")}[objective]
    out = model(**_only(batch, *METER_INPUTS, *keys))
    assert set(out.losses) == {objective}
    assert f"{objective}_logits" in out and torch.isfinite(out.loss)
    assert ({"mlm", "itm"} - {objective}).isdisjoint(name.split("_")[0] for name in out if name.endswith("_logits"))


def test_meter_itm_pairs_each_text_with_the_indexed_image():
    model = _model("meter")
    batch = _batch(model, seed=1)
    index, labels = batch["itm_image_index"], batch["itm_labels"]
    assert (index != torch.arange(B)).any(), "the synthetic batch should contain a swapped image"
    indexed = model(**_only(batch, *METER_INPUTS), itm_labels=labels, itm_image_index=index)
    swapped = dict(_only(batch, *METER_INPUTS), pixel_values=batch["pixel_values"][index])
    given = model(**swapped, itm_labels=labels)
    torch.testing.assert_close(indexed.itm_logits, given.itm_logits)
    # Without an index the ITM pass is the pass over the inputs as given: its pooled features are returned.
    torch.testing.assert_close(given.itm_logits, model.itm_head(given.pooler_output))
    torch.testing.assert_close(given.losses["itm"], F.cross_entropy(given.itm_logits, labels))


def test_meter_mlm_reads_the_masked_text_with_the_batch_images():
    model = _model("meter")
    batch = _batch(model)
    out = model(**_only(batch, *METER_INPUTS, "mlm_input_ids", "mlm_labels"))
    masked = model(input_ids=batch["mlm_input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], mlm_labels=batch["mlm_labels"])
    torch.testing.assert_close(out.mlm_logits, masked.mlm_logits)
    torch.testing.assert_close(masked.mlm_logits, model.mlm_head(masked.text_hidden_state))
    labelled = batch["mlm_labels"] != IGNORE_INDEX
    assert labelled.any()
    expected = F.cross_entropy(masked.mlm_logits[labelled], batch["mlm_labels"][labelled])
    torch.testing.assert_close(masked.losses["mlm"], expected)
    # METER's MLM decoder is its own weight, not the word embeddings.
    assert model.mlm_head.decoder.weight is not model.text_embeddings.word_embeddings.weight


def test_meter_text_padding_is_invisible():
    model = _model("meter")
    batch = _only(_batch(model), *METER_INPUTS)
    pad = batch["attention_mask"] == 0
    assert pad.any()
    changed = dict(batch, input_ids=torch.where(pad, torch.full_like(batch["input_ids"], 150), batch["input_ids"]))
    out, out_changed = model(**batch), model(**changed)
    torch.testing.assert_close(out.image_hidden_state, out_changed.image_hidden_state)
    torch.testing.assert_close(out.text_hidden_state[~pad], out_changed.text_hidden_state[~pad])
    torch.testing.assert_close(out.pooler_output, out_changed.pooler_output)


def _clip_tower_reference(model, pixels):
    """CLIP's vision Transformer written with torch's own modules: conv1 (no bias), class token,
    positions, ln_pre, blocks (nn.MultiheadAttention, QuickGELU MLP), ln_post on every token."""
    c = model.config
    x = F.conv2d(pixels, model.patch_embed.proj.weight, stride=c.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.expand(len(x), -1, -1), x], dim=1) + model.image_position_embedding
    x = model.image_pre_norm(x)
    for block in model.image_blocks:
        attention = nn.MultiheadAttention(c.image_hidden_size, c.image_num_heads, batch_first=True)
        attention.load_state_dict(block.attn.state_dict())
        h = block.norm1(x)
        x = x + attention(h, h, h, need_weights=False)[0]
        h = block.mlp.fc1(block.norm2(x))
        x = x + block.mlp.fc2(h * torch.sigmoid(1.702 * h))
    return model.image_post_norm(x)


def test_meter_image_encoder_is_clips_vision_transformer():
    model = _model("meter", image_num_layers=2)
    with torch.no_grad():  # fresh non-trivial LayerNorms and biases
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2), module.bias.normal_(0.0, 0.2)
    pixels = torch.randn(3, 3, 32, 32)
    expected = model.image_transform(_clip_tower_reference(model, pixels)) + model.token_type_embeddings.weight[1]
    torch.testing.assert_close(model._encode_image(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.patch_embed.proj.bias is None  # CLIP's conv1 has no bias
    assert model.config.image_layer_norm_eps == 1e-5


def test_meter_text_encoder_matches_hf_bert():
    transformers = pytest.importorskip("transformers")
    model = _model("meter", text_num_layers=2)
    c = model.config
    hf_config = transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.text_hidden_size,
                                        num_hidden_layers=c.text_num_layers, num_attention_heads=c.text_num_heads,
                                        intermediate_size=c.text_intermediate_size,
                                        max_position_embeddings=c.max_position_embeddings, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(1)
    bert = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    model.text_embeddings.load_state_dict(bert.embeddings.state_dict(), strict=False)
    for layer, hf_layer in zip(model.text_layers, bert.encoder.layer):
        layer.load_hf_state_dict(hf_layer.state_dict())
    batch = _batch(model, seed=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = model.text_transform(hidden) + model.token_type_embeddings.weight[0]
        actual = model._encode_text(ids, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_meter_rejects_bad_inputs():
    model = _model("meter")
    batch = _batch(model)
    inputs = _only(batch, *METER_INPUTS)
    with pytest.raises(ValueError, match="batch size"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:3]))
    with pytest.raises(ValueError, match="max_text_len"):
        model(**dict(inputs, input_ids=torch.full((B, 13), 104), attention_mask=None))
    with pytest.raises(ValueError, match="pixel_values"):
        model(**dict(inputs, pixel_values=torch.randn(B, 3, 48, 48)))
    with pytest.raises(ValueError, match="pixel_values"):
        model(**dict(inputs, pixel_values=torch.randn(B, 1, 32, 32)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(**dict(inputs, attention_mask=inputs["attention_mask"][:, :5]))
    with pytest.raises(ValueError, match="mlm_labels"):
        model(**inputs, mlm_labels=batch["mlm_labels"][:, :5])
    with pytest.raises(ValueError, match="itm_image_index"):
        model(**inputs, itm_labels=batch["itm_labels"], itm_image_index=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="itm_labels"):
        model(**inputs, itm_labels=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="token ids"):
        model(**dict(inputs, input_ids=torch.full_like(inputs["input_ids"], 160)))


def test_meter_base_config_has_the_papers_sizes():
    from vlkernels.models.meter import METERConfig
    c = METERConfig.base()
    assert (c.hidden_size, c.num_heads, c.intermediate_size, c.num_cross_layers) == (768, 12, 3072, 6)
    assert (c.image_size, c.patch_size, c.image_hidden_size, c.text_num_layers) == (224, 16, 768, 12)
    assert (c.mlm_weight, c.itm_weight, c.mlm_probability, c.itm_negative_prob) == (1.0, 1.0, 0.15, 0.5)


# ---------------------------------------------------------------------------------------------
# SOHO
# ---------------------------------------------------------------------------------------------
SOHO_INPUTS = ("input_ids", "grid_features", "attention_mask", "grid_mask")


def test_soho_outputs_and_head_shapes():
    model = _model("soho")
    c, batch = model.config, _batch(model)
    seq, cells = batch["input_ids"].shape[1], (c.grid_rows // c.pool_size) * (c.grid_cols // c.pool_size)
    out = model(**_only(batch, *SOHO_INPUTS))
    assert "loss" not in out and "mvm_mask" not in out
    assert out.last_hidden_state.shape == (B, seq + cells, c.hidden_size)
    torch.testing.assert_close(out.text_hidden_state, out.last_hidden_state[:, :seq])
    torch.testing.assert_close(out.visual_hidden_state, out.last_hidden_state[:, seq:])
    assert out.visual_mask.shape == out.visual_index.shape == (B, cells)
    full = model(**batch)
    assert full.mlm_logits.shape == (B, seq, c.vocab_size)
    assert full.mvm_logits.shape == (B, cells, c.dictionary_size)
    assert full.itm_logits.shape == (B, 2)
    assert set(full.losses) == {"mlm", "mvm", "itm"}
    torch.testing.assert_close(full.loss, sum(full.losses.values()))


@pytest.mark.parametrize("objective", ["mlm", "mvm", "itm"])
def test_soho_each_objective_appears_when_requested(objective):
    model = _model("soho")
    batch = _batch(model)
    extra = {"mlm": {"mlm_labels": batch["mlm_labels"]}, "itm": {"itm_labels": batch["itm_labels"]},
             "mvm": {"mvm": True}}[objective]
    torch.manual_seed(0)
    out = model(**_only(batch, *SOHO_INPUTS), **extra)
    assert set(out.losses) == {objective}
    assert f"{objective}_logits" in out and torch.isfinite(out.loss)


def test_soho_heads_follow_the_release():
    model = _model("soho")
    batch = _batch(model)
    torch.manual_seed(0)
    out = model(**batch)
    # MLM: tied to the word embeddings, no transform, no bias.
    torch.testing.assert_close(out.mlm_logits, out.text_hidden_state @ model.text_embeddings.word_embeddings.weight.T)
    # ITM: Linear(D, 2) without bias on the first token (no pooler).
    assert model.itm_head.bias is None
    torch.testing.assert_close(out.itm_logits, out.last_hidden_state[:, 0] @ model.itm_head.weight.T)
    # MVM: cosine to every entry, no temperature; cross-entropy over the masked cells.
    entries = F.normalize(model.dictionary.embed, dim=-1)
    torch.testing.assert_close(out.mvm_logits, F.normalize(out.visual_hidden_state, dim=-1) @ entries.T)
    assert out.mvm_logits.abs().max() <= 1 + 1e-6
    masked = out.mvm_labels != IGNORE_INDEX
    assert masked.any()
    torch.testing.assert_close(out.losses["mvm"], F.cross_entropy(out.mvm_logits[masked], out.mvm_labels[masked]))


def test_soho_mvm_masks_every_real_cell_of_the_drawn_entry():
    model = _model("soho")
    batch = _batch(model, seed=3)
    for seed in range(6):
        torch.manual_seed(seed)
        out = model(**batch)
        real, index = out.visual_mask, out.visual_index
        assert not (out.mvm_mask & ~real).any()
        torch.testing.assert_close(out.mvm_labels[out.mvm_mask], index[out.mvm_mask])
        assert (out.mvm_labels[~out.mvm_mask] == IGNORE_INDEX).all()
        for b in range(B):
            if out.mvm_mask[b].any():
                entry = index[b][out.mvm_mask[b]].unique()
                assert entry.numel() == 1, "one drawn entry per sample"
                assert torch.equal(out.mvm_mask[b], real[b] & (index[b] == entry)), "all its real cells are masked"
        # tiny keeps every sample's masking: the unpadded sample 0 always has a masked cell.
        assert out.mvm_mask[0].any()


def test_soho_mvm_draws_follow_torchs_rng_and_the_generator():
    model = _model("soho")
    batch = _batch(model, seed=4)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(model(**batch).mvm_mask)
    assert torch.equal(draws[0], draws[1])
    by_generator = [model(**batch, generator=torch.Generator().manual_seed(7)).mvm_mask for _ in range(2)]
    assert torch.equal(*by_generator)
    # Different positions draw different masks somewhere across a few seeds.
    masks = {tuple(model(**batch, generator=torch.Generator().manual_seed(s)).mvm_mask.flatten().tolist())
             for s in range(8)}
    assert len(masks) > 1


def test_soho_masked_cells_see_the_mask_embedding_not_their_features():
    model = _model("soho")
    batch = _batch(model, seed=5)
    torch.manual_seed(0)
    out = model(**batch)
    assert out.mvm_mask.any()
    # Change the mask embedding: the output moves; with mvm off it does not.
    with torch.no_grad():
        model.mask_embedding.weight.add_(1.0)
    torch.manual_seed(0)
    moved = model(**batch)
    assert not torch.allclose(moved.last_hidden_state, out.last_hidden_state)
    plain = _only(batch, *SOHO_INPUTS)
    before = model(**plain).last_hidden_state
    with torch.no_grad():
        model.mask_embedding.weight.sub_(1.0)
    torch.testing.assert_close(model(**plain).last_hidden_state, before)


def test_soho_dictionary_updates_in_training_only_and_not_from_padding():
    model = _model("soho")
    batch = _only(_batch(model), *SOHO_INPUTS)
    assert (batch["grid_mask"] == 0).any()
    embed = model.dictionary.embed.clone()
    model(**batch)
    assert torch.equal(model.dictionary.embed, embed), "eval mode must not update the dictionary"
    model.train()
    out = model(**batch)
    assert not torch.equal(model.dictionary.embed, embed)
    # The counts of the EMA are the real cells only (decay 0.4 from empty counts: 0.6 * count).
    torch.testing.assert_close(model.dictionary.cluster_size.sum(), 0.6 * out.visual_mask.sum().float())


def test_soho_padded_cells_are_invisible():
    model = _model("soho")
    batch = _only(_batch(model, seed=6), *SOHO_INPUTS)
    padded = batch["grid_mask"] == 0
    assert padded.any()
    noisy = dict(batch, grid_features=batch["grid_features"] + 5 * torch.randn_like(batch["grid_features"])
                 * padded[:, None])
    out, out_noisy = model(**batch), model(**noisy)
    real = torch.cat([batch["attention_mask"].bool(), out.visual_mask], dim=1)
    torch.testing.assert_close(out.last_hidden_state[real], out_noisy.last_hidden_state[real])
    assert (out.visual_index[~out.visual_mask] == IGNORE_INDEX).all()


def test_soho_pools_the_feature_map_and_resizes_the_mask():
    model = _model("soho")
    c = model.config
    ids = torch.full((2, 5), 104)
    features = torch.randn(2, c.feature_channels, 7, 5)  # odd sizes: pooling floors to 3 x 2
    mask = torch.zeros(2, 7, 5, dtype=torch.long)
    mask[0] = 1
    mask[1, :3, :3] = 1  # pooled cells whose top-left input cell is real: rows 0-1, columns 0-1
    out = model(ids, features, grid_mask=mask)
    assert out.visual_mask.shape == (2, 6)
    expected = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    assert torch.equal(out.visual_mask, expected)
    cells, real = model._pooled_cells(features, mask.bool())
    torch.testing.assert_close(cells[0, 1, 1], features[0, :, 2:4, 2:4].amax(dim=(1, 2)))


def test_soho_sine_position_embedding_is_detrs():
    valid = torch.zeros(2, 3, 4, dtype=torch.bool)
    valid[0] = True
    valid[1, :2, :3] = True
    dim = 8
    pos = sine_position_embedding(valid, dim)
    assert pos.shape == (2, 3, 4, dim)
    half = dim // 2
    for b, i, j in [(0, 0, 0), (0, 2, 3), (1, 1, 2), (1, 0, 1)]:
        column, row = valid[b, :, j], valid[b, i, :]
        y = valid[b, : i + 1, j].sum() / (column.sum() + 1e-6) * 2 * math.pi
        x = valid[b, i, : j + 1].sum() / (row.sum() + 1e-6) * 2 * math.pi
        expected = []
        for coordinate in (y, x):
            for k in range(half):
                angle = coordinate / 10000 ** (2 * (k // 2) / half)
                expected.append(torch.sin(angle) if k % 2 == 0 else torch.cos(angle))
        torch.testing.assert_close(pos[b, i, j], torch.stack(expected).float())


def test_soho_gated_and_summed_mixes():
    gated, summed = _model("soho"), _model("soho", gated_mix=False)
    assert summed.mix_gate is None and gated.mix_gate is not None
    batch = _only(_batch(gated), *SOHO_INPUTS)
    assert not torch.allclose(gated(**batch).last_hidden_state, summed(**batch).last_hidden_state)
    # Without the gate the quantised and projected features are summed: the dictionary reaches
    # the output, and no longer does with the projection of the quantised features set to zero.
    start = summed(**batch).last_hidden_state
    embed = summed.dictionary.embed.clone()
    summed.dictionary.embed.normal_()
    assert not torch.allclose(summed(**batch).last_hidden_state, start)
    summed.dictionary.embed.copy_(embed)
    with torch.no_grad():
        summed.quantized_projection.weight.zero_(), summed.quantized_projection.bias.zero_()
    before = summed(**batch).last_hidden_state
    summed.dictionary.embed.normal_()
    torch.testing.assert_close(summed(**batch).last_hidden_state, before)


def test_soho_rejects_bad_inputs():
    model = _model("soho")
    batch = _only(_batch(model), *SOHO_INPUTS)
    features = batch["grid_features"]
    with pytest.raises(ValueError, match="batch size"):
        model(**dict(batch, grid_features=features[:3]))
    with pytest.raises(ValueError, match="max_text_len"):
        model(**dict(batch, input_ids=torch.full((B, 13), 104), attention_mask=None))
    with pytest.raises(ValueError, match="grid_features"):
        model(**dict(batch, grid_features=features[:, :8]))
    with pytest.raises(ValueError, match="grid_features"):
        model(**dict(batch, grid_features=features[:, :, 0]))
    with pytest.raises(ValueError, match="pooling"):
        model(**dict(batch, grid_features=features[:, :, :1], grid_mask=None))
    with pytest.raises(ValueError, match="grid_mask"):
        model(**dict(batch, grid_mask=batch["grid_mask"][:, :4]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(**dict(batch, attention_mask=batch["attention_mask"][:, :4]))
    with pytest.raises(ValueError, match="itm_labels"):
        model(**batch, itm_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="mlm_labels"):
        model(**batch, mlm_labels=torch.zeros(B, 3, dtype=torch.long))


def test_soho_base_config_follows_the_release():
    from vlkernels.models.soho import SOHOConfig
    c = SOHOConfig.base()
    assert (c.hidden_size, c.num_layers, c.num_heads, c.dictionary_size) == (768, 12, 12, 2048)
    assert (c.dictionary_decay, c.mvm_probability, c.pool_size) == (0.4, 0.015, 2)
    assert (c.mlm_weight, c.mvm_weight, c.itm_weight) == (1.0, 1.0, 1.0)
