"""Model-specific checks of the pixel-patch models VLMo and SimVLM (vlkernels.models.vlmo,
.simvlm): head shapes, which objectives run, input errors, and their forward passes against
explicit plain-torch re-implementations (VLMo's modality routing and relative position bias,
SimVLM's prefix-LM mask and loss). The generic kernels-vs-references and training checks are
in tests/test_models.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.models.common import IGNORE_INDEX, contrastive_loss, hard_negative_indices
from vlkernels.models.simvlm import SimVLM, SimVLMConfig
from vlkernels.models.synthetic import SyntheticPairs
from vlkernels.models.vlmo import VLMo, VLMoConfig, relative_position_index
from vlkernels.testing import DEVICE, rel_error

TOLERANCE = 1e-5  # fp32, the same ops in another order


def _vlmo(seed=0, **overrides):
    torch.manual_seed(seed)
    return VLMo(dataclasses.replace(VLMoConfig.tiny(), **overrides), use_kernels=False).train()


def _simvlm(seed=0, **overrides):
    torch.manual_seed(seed)
    return SimVLM(dataclasses.replace(SimVLMConfig.tiny(), **overrides), use_kernels=False).train()


def _pairs(model, batch=3, length=7, seed=0):
    """Random text shorter than max_text_len (with padding in one sample) and random images."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, c.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2:] = 0
    ids[0, length - 2:] = 0
    pixels = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g)
    return ids, mask, pixels


# -- VLMo: an explicit reference of the MoME Transformer ------------------------------------------
def _reference_vlmo_encode(model, x, key_mask, experts_of_layer, index=None):
    """The block stack token by token: shared attention (with the relative position bias read
    entry by entry from the table when ``index`` is given), then each token through the expert
    experts_of_layer(layer)[t], LayerScale on both branches, final norm."""
    heads = model.config.num_heads
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        q, k, v = (h @ attn.qkv.weight.T + bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if index is not None:
            table = model.relative_position_bias_table
            scores = scores + torch.stack([table[index, layer * heads + head] for head in range(heads)])
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + block.gamma_1 * attn.proj(attended)
        experts = experts_of_layer(layer)
        ffn = torch.stack([block.ffn.mlp(e)(block.ffn.norm(e)(x[:, t])) for t, e in enumerate(experts)], 1)
        x = x + block.gamma_2 * ffn
    return model.norm(x)


def _reference_vlmo_embeddings(model, ids, pixels):
    types = model.token_type_embeddings.weight
    text = model.text_embeddings(ids) + types[0]
    conv = model.patch_embed.proj
    patches = F.conv2d(pixels, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    image = torch.cat([model.cls_token.expand(len(pixels), -1, -1), patches], 1) + model.pos_embed + types[1]
    return text, image


@pytest.mark.parametrize("relative_position_bias", [False, True], ids=["abs-pos", "rel-pos-bias"])
def test_vlmo_routes_tokens_to_their_modality_experts(relative_position_bias):
    model = _vlmo(relative_position_bias=relative_position_bias)
    c = model.config
    ids, mask, pixels = _pairs(model)
    with torch.no_grad():
        for block in model.blocks:  # LayerScale 1: each expert's output counts fully, so a misrouted token shows
            block.gamma_1.fill_(1.0), block.gamma_2.fill_(1.0)
        out = model(ids, pixels, mask)
        length, missing = ids.shape[1], c.max_text_len - ids.shape[1]
        text, image = _reference_vlmo_embeddings(model, ids, pixels)
        padded, _ = _reference_vlmo_embeddings(model, F.pad(ids, (0, missing)), pixels)
        image_len = image.shape[1]
        index = model.relative_position_index if relative_position_bias else None

        # Fusion: the text padded to max_text_len, L-FFN / V-FFN by position below the VL layers.
        joint_mask = torch.cat([F.pad(mask, (0, missing)).bool(), torch.ones(len(ids), image_len, dtype=torch.bool)], 1)
        def fusion_experts(layer):
            if layer >= c.vlffn_start_layer_index:
                return ["vl"] * (c.max_text_len + image_len)
            return ["text"] * c.max_text_len + ["image"] * image_len
        expected = _reference_vlmo_encode(model, torch.cat([padded, image], 1), joint_mask, fusion_experts, index)
        assert rel_error(out.last_hidden_state, expected) <= TOLERANCE
        assert rel_error(out.text_hidden_state, expected[:, :length]) <= TOLERANCE
        assert rel_error(out.image_hidden_state, expected[:, c.max_text_len:]) <= TOLERANCE
        assert rel_error(out.pooler_output, torch.tanh(model.pooler.dense(expected[:, 0]))) <= TOLERANCE

        # Dual encoder: every layer (the VL ones too) runs L-FFN on text, V-FFN on images.
        text_index = None if index is None else index[:length, :length]
        text_only = _reference_vlmo_encode(model, text, mask.bool(), lambda layer: ["text"] * length, text_index)
        image_index = None if index is None else index[c.max_text_len:, c.max_text_len:]
        image_only = _reference_vlmo_encode(model, image, torch.ones(len(ids), image_len, dtype=torch.bool),
                                            lambda layer: ["image"] * image_len, image_index)
        assert rel_error(model(ids, attention_mask=mask).last_hidden_state, text_only) <= TOLERANCE
        assert rel_error(model(pixel_values=pixels).last_hidden_state, image_only) <= TOLERANCE
        assert rel_error(model.encode_text(ids, mask),
                         F.normalize(model.itc_text_proj(text_only[:, 0]), dim=-1)) <= TOLERANCE
        assert rel_error(model.encode_image(pixels),
                         F.normalize(model.itc_image_proj(image_only[:, 0]), dim=-1)) <= TOLERANCE


def test_vlmo_short_text_equals_text_padded_by_the_caller():
    model = _vlmo()
    ids, mask, pixels = _pairs(model)
    missing = model.config.max_text_len - ids.shape[1]
    with torch.no_grad():
        short = model(ids, pixels, mask)
        full = model(F.pad(ids, (0, missing)), pixels, F.pad(mask, (0, missing)))
    assert rel_error(short.last_hidden_state, full.last_hidden_state) <= TOLERANCE
    assert torch.equal(short.text_hidden_state, short.last_hidden_state[:, :ids.shape[1]])


def test_vlmo_relative_position_index_kinds_of_pairs():
    text_len, rows, cols = 5, 3, 4
    index, entries = relative_position_index(text_len, (rows, cols))
    size = text_len + 1 + rows * cols
    assert index.shape == (size, size) and int(index.min()) == 0 and int(index.max()) == entries - 1
    assert len(index.unique()) == entries  # every entry is used
    text = index[:text_len, :text_len]
    for i in range(text_len):
        for j in range(text_len):
            assert text[i, j] == text[0, 0] + (i - j), "text pairs are indexed by their 1-D offset"
    patches = index[text_len + 1:, text_len + 1:]
    position = [(r, c) for r in range(rows) for c in range(cols)]
    for a, (ra, ca) in enumerate(position):
        for b, (rb, cb) in enumerate(position):
            same_offset = [patches[x, y] for x, (rx, cx) in enumerate(position) for y, (ry, cy) in enumerate(position)
                           if (rx - ry, cx - cy) == (ra - rb, ca - cb)]
            assert all(v == patches[a, b] for v in same_offset)
    assert len(patches.unique()) == (2 * rows - 1) * (2 * cols - 1)
    cls = text_len
    kinds = [index[cls, cls + 1:], index[cls + 1:, cls], index[cls, cls:cls + 1], index[:text_len, cls:],
             index[cls:, :text_len]]
    values = [k.unique() for k in kinds]
    assert all(len(v) == 1 for v in values), "each special kind of pair has one entry"
    special = set(torch.cat(values).tolist())
    assert len(special) == 5
    assert special.isdisjoint(set(patches.unique().tolist()) | set(text.unique().tolist()))


def test_vlmo_zero_relative_position_bias_changes_nothing_and_a_learned_one_gets_gradients():
    with_bias = _vlmo(relative_position_bias=True)
    without = _vlmo(relative_position_bias=False)
    without.load_state_dict({k: v for k, v in with_bias.state_dict().items()
                             if k != "relative_position_bias_table"})
    batch = with_bias.synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with_bias(**batch).loss.backward()
    assert with_bias.relative_position_bias_table.grad.abs().sum() > 0
    passes = ({"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]},
              {"input_ids": batch["input_ids"]}, {"pixel_values": batch["pixel_values"]})
    with torch.no_grad():
        with_bias.relative_position_bias_table.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        for inputs in passes:
            assert rel_error(with_bias(**inputs).last_hidden_state, without(**inputs).last_hidden_state) > 1e-3
        with_bias.relative_position_bias_table.zero_()
        for inputs in passes:
            assert rel_error(with_bias(**inputs).last_hidden_state, without(**inputs).last_hidden_state) <= TOLERANCE


def test_vlmo_heads_and_objectives():
    model = _vlmo()
    c = model.config
    batch = model.synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    size, length, patches = 4, c.max_text_len, model.num_patches
    out = model(**batch)
    assert set(out.losses) == {"itc", "itm", "mlm"}
    assert torch.allclose(out.loss, sum(out.losses.values()))
    assert out.itc_logits.shape == (size, size)
    assert out.itm_logits.shape == (3 * size, 2)
    assert out.itm_labels.tolist() == [1] * size + [0] * (2 * size)
    assert out.mlm_logits.shape == (size, length, c.vocab_size)
    assert out.last_hidden_state.shape == (size, c.max_text_len + 1 + patches, c.hidden_size)
    assert out.image_hidden_state.shape == (size, 1 + patches, c.hidden_size)
    assert out.pooler_output.shape == (size, c.hidden_size)
    for features in (out.image_features, out.text_features):
        assert features.shape == (size, c.hidden_size)
        assert torch.allclose(features.norm(dim=-1), torch.ones(size))

    requests = {"itc": dict(itc=True), "itm": dict(itm=True),
                "mlm": dict(mlm_input_ids=batch["mlm_input_ids"], mlm_labels=batch["mlm_labels"])}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    plain = model(**inputs)
    assert "loss" not in plain and "losses" not in plain and "itm_logits" not in plain
    for name, request in requests.items():
        out = model(**inputs, **request)
        assert set(out.losses) == {name}, name
        assert torch.isfinite(out.loss) and out.loss.dim() == 0


def test_vlmo_itc_is_the_symmetric_contrastive_loss_of_the_dual_encoder():
    model = _vlmo()
    assert model.logit_scale.item() == pytest.approx(torch.tensor(1 / 0.07).log().item())
    ids, mask, pixels = _pairs(model, batch=4)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
        out = model(ids, pixels, mask, itc=True)
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    expected_loss, expected_logits = contrastive_loss(image, text, torch.tensor(1.5))
    assert rel_error(out.losses["itc"], expected_loss) <= TOLERANCE
    assert rel_error(out.itc_logits, torch.tensor(1.5).exp() * image @ text.T) <= TOLERANCE
    logits = expected_logits
    manual = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert rel_error(out.losses["itc"], manual) <= TOLERANCE


def test_vlmo_itm_pairs_each_image_and_text_with_a_hard_negative_from_the_itc_similarities():
    model = _vlmo()
    ids, mask, pixels = _pairs(model, batch=5)
    with torch.no_grad():
        torch.manual_seed(3)
        out = model(ids, pixels, mask, itm=True)
        torch.manual_seed(3)  # the forward draws nothing before the negatives (dropout 0)
        negative_images = hard_negative_indices(out.itc_logits.T)
        negative_texts = hard_negative_indices(out.itc_logits)
        assert torch.equal(out.itm_negative_images, negative_images)
        assert torch.equal(out.itm_negative_texts, negative_texts)
        assert not (negative_images == torch.arange(5)).any() and not (negative_texts == torch.arange(5)).any()
        pairs = [(ids, mask, pixels), (ids, mask, pixels[negative_images]),
                 (ids[negative_texts], mask[negative_texts], pixels)]
        expected = torch.cat([model.itm_head(model(t, p, m).pooler_output) for t, m, p in pairs])
        assert rel_error(out.itm_logits, expected) <= TOLERANCE
        assert rel_error(out.losses["itm"], F.cross_entropy(expected, out.itm_labels)) <= TOLERANCE
        # the positives' fusion pass is the plain fusion output
        assert rel_error(out.pooler_output, model(ids, pixels, mask).pooler_output) <= TOLERANCE


def test_vlmo_mlm_runs_the_fusion_pass_over_the_masked_text():
    model = _vlmo()
    batch = model.synthetic_batch(3, generator=torch.Generator().manual_seed(0))
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        out = model(ids, pixels, mask, mlm_input_ids=batch["mlm_input_ids"], mlm_labels=batch["mlm_labels"])
        masked = model(batch["mlm_input_ids"], pixels, mask)
        clean = model(ids, pixels, mask)
        assert rel_error(out.mlm_logits, model.mlm_head(masked.text_hidden_state)) <= TOLERANCE
        assert rel_error(out.last_hidden_state, clean.last_hidden_state) <= TOLERANCE
        labelled = batch["mlm_labels"] != IGNORE_INDEX
        expected = F.cross_entropy(out.mlm_logits[labelled], batch["mlm_labels"][labelled])
        assert rel_error(out.losses["mlm"], expected) <= TOLERANCE
        # without mlm_input_ids the given text is the masked one
        alone = model(batch["mlm_input_ids"], pixels, mask, mlm_labels=batch["mlm_labels"])
        assert rel_error(alone.mlm_logits, out.mlm_logits) <= TOLERANCE


def test_vlmo_synthetic_batch_masks_whole_words():
    model = _vlmo()
    c = model.config
    batch = model.synthetic_batch(16, generator=torch.Generator().manual_seed(5))
    text = SyntheticPairs(c.vocab_size).text(16, c.max_text_len, torch.Generator().manual_seed(5))
    assert torch.equal(text["input_ids"], batch["input_ids"])
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    assert chosen.any()
    for b in range(16):
        for word in text["word_ids"][b].unique():
            if word >= 0:
                pieces = chosen[b][text["word_ids"][b] == word]
                assert pieces.all() or not pieces.any()
    assert batch["itc"] is True and batch["itm"] is True
    assert batch["pixel_values"].shape == (16, c.num_channels, c.image_size, c.image_size)


def test_vlmo_rejects_bad_inputs():
    model = _vlmo()
    c = model.config
    ids, mask, pixels = _pairs(model, batch=3)
    with pytest.raises(ValueError, match="batch size"):
        model(ids, pixels[:2], mask)
    with pytest.raises(ValueError, match="batch size"):
        model(ids, pixels, mask[:2])
    with pytest.raises(ValueError, match="max_text_len"):
        model(torch.full((3, c.max_text_len + 1), 104), pixels)
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixels[:, :, :16, :16], mask)
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixels[:, :2], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, pixels, mask[:, :3])
    with pytest.raises(ValueError, match="need both"):
        model(ids, attention_mask=mask, itc=True)
    with pytest.raises(ValueError, match="need both"):
        model(pixel_values=pixels, mlm_labels=ids)
    with pytest.raises(ValueError, match="mlm_labels"):
        model(ids, pixels, mask, mlm_labels=ids[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        model(ids[:1], pixels[:1], mask[:1], itm=True)
    with pytest.raises(ValueError, match="token ids"):
        model(ids + c.vocab_size, pixels)
    with pytest.raises(ValueError, match="give input_ids"):
        model()


# -- SimVLM ---------------------------------------------------------------------------------------
def _reference_simvlm(model, ids, mask, pixels, text_prefix):
    """The forward with an explicit [B, S, S] attention mask: key j visible to query i when j is a
    real token and (j < prefix or j <= i)."""
    heads = model.config.num_heads
    text = model.word_embeddings(ids) + model.text_pos_embed[:, :ids.shape[1]]
    parts, real = [text], [mask.bool()]
    if pixels is not None:
        conv = model.patch_embed.proj
        image = F.conv2d(pixels, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
        parts.insert(0, image + model.image_pos_embed)
        real.insert(0, torch.ones(image.shape[:2], dtype=torch.bool))
    x, real = torch.cat(parts, 1), torch.cat(real, 1)
    prefix = text_prefix + (parts[0].shape[1] if pixels is not None else 0)
    query, key = torch.arange(x.shape[1])[:, None], torch.arange(x.shape[1])[None, :]
    visible = ((key[None] < prefix[:, None, None]) | (key <= query)[None]) & real[:, None, :]
    for block in model.blocks:
        attn = block.attn
        q, k, v = (block.norm1(x) @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible[:, None], float("-inf"))
        x = x + attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
        x = x + block.mlp(block.norm2(x))
    return model.norm(x)


@pytest.mark.parametrize("with_image", [True, False], ids=["image-text", "text-only"])
def test_simvlm_matches_an_explicit_prefix_lm(with_image):
    model = _simvlm()
    ids, mask, pixels = _pairs(model, batch=3, length=8)
    pixels = pixels if with_image else None
    text_prefix = torch.tensor([2, 0, 5])
    with torch.no_grad():
        out = model(ids, pixels, mask, text_prefix_len=text_prefix)
        expected = _reference_simvlm(model, ids, mask, pixels, text_prefix)
    patches = model.num_patches if with_image else 0
    assert rel_error(out.last_hidden_state, expected) <= TOLERANCE
    assert out.image_hidden_state.shape == (3, patches, model.config.hidden_size)
    assert out.text_hidden_state.shape == (3, 8, model.config.hidden_size)
    assert out.lm_logits.shape == (3, 8, model.config.vocab_size)
    assert out.prefix_len.tolist() == (text_prefix + patches).tolist()
    assert "loss" not in out


def test_simvlm_loss_is_the_mean_nll_of_the_suffix_tokens():
    model = _simvlm()
    ids, mask, pixels = _pairs(model, batch=3, length=8)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    text_prefix = torch.tensor([3, 1, 6])
    out = model(ids, pixels, mask, labels=labels, text_prefix_len=text_prefix)
    log_probs = out.lm_logits.log_softmax(-1)
    terms = [-log_probs[b, t - 1, ids[b, t]] for b in range(3) for t in range(int(text_prefix[b]), 8)
             if mask[b, t]]
    assert set(out.losses) == {"prefix_lm"}
    assert rel_error(out.loss, torch.stack(terms).mean()) <= TOLERANCE
    out.loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_simvlm_prefix_is_bidirectional_and_the_suffix_causal():
    model = _simvlm()
    ids, mask, pixels = _pairs(model, batch=2, length=8)
    mask = torch.ones_like(mask)
    prefix, patches = 4, model.num_patches
    with torch.no_grad():
        base = model(ids, pixels, mask, text_prefix_len=prefix).last_hidden_state
        suffix_changed = ids.clone()
        suffix_changed[:, 6] = 150
        after_suffix = model(suffix_changed, pixels, mask, text_prefix_len=prefix).last_hidden_state
        prefix_changed = ids.clone()
        prefix_changed[:, 3] = 150
        after_prefix = model(prefix_changed, pixels, mask, text_prefix_len=prefix).last_hidden_state
    # a suffix token reaches no earlier position, image tokens included
    assert torch.equal(after_suffix[:, :patches + 6], base[:, :patches + 6])
    assert not torch.allclose(after_suffix[:, patches + 6:], base[:, patches + 6:])
    # a prefix token reaches every position, the earlier prefix positions and the image too
    assert (after_prefix - base).abs().amax(-1).min() > 0


def test_simvlm_draws_the_text_prefix_per_sample_when_training():
    model = _simvlm()
    batch = model.synthetic_batch(8, generator=torch.Generator().manual_seed(0))
    real = batch["attention_mask"].sum(1)
    drawn = []
    for seed in range(6):
        torch.manual_seed(seed)
        out = model(**batch)
        prefix = out.text_prefix_len
        assert ((prefix >= 1) & (prefix <= real - 1)).all()
        torch.manual_seed(seed)
        assert torch.equal(model(**batch).text_prefix_len, prefix)
        drawn.append(prefix)
    assert len(torch.stack(drawn).unique()) > 3
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert model(**inputs).text_prefix_len.tolist() == [1] * 8  # no labels: captioning prefix [CLS]


def test_simvlm_ties_the_lm_head_to_the_word_embeddings():
    model = _simvlm()
    assert model.lm_head.weight is model.word_embeddings.weight
    ids, mask, pixels = _pairs(model)
    out = model(ids, pixels, mask)
    assert rel_error(out.lm_logits, out.text_hidden_state @ model.word_embeddings.weight.T) <= TOLERANCE


def test_simvlm_rejects_bad_inputs():
    model = _simvlm()
    c = model.config
    ids, mask, pixels = _pairs(model, batch=3)
    with pytest.raises(ValueError, match="batch size"):
        model(ids, pixels[:2], mask)
    with pytest.raises(ValueError, match="batch size"):
        model(ids, pixels, mask, labels=ids[:2])
    with pytest.raises(ValueError, match="max_text_len"):
        model(torch.full((3, c.max_text_len + 1), 104), pixels)
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixels[:, :, :16], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, pixels, mask[:, :2])
    with pytest.raises(ValueError, match="labels"):
        model(ids, pixels, mask, labels=ids[:, :2])
    with pytest.raises(ValueError, match="text_prefix_len"):
        model(ids, pixels, mask, text_prefix_len=ids.shape[1] + 1)
    with pytest.raises(ValueError, match="text_prefix_len"):
        model(ids, pixels, mask, text_prefix_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="text_prefix_len"):
        model(ids, pixels, mask, text_prefix_len=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float(), pixels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vlmo_attention_with_relative_position_bias_keeps_nan_and_zeroes_empty_rows(backend):
    """VLMoAttention with a relative position bias (the attention op's additive bias): a NaN
    from the inputs propagates, a padded key's NaN reaches no query, a query with no real key
    gets zeros, as without bias."""
    from vlkernels.nn import VLMoAttention

    torch.manual_seed(0)
    layer = VLMoAttention(32, 4)
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2] = False  # no real key at all
    bias = torch.randn(1, 4, 9, 9)
    poisoned = x.clone()
    poisoned[1, 7] = float("nan")  # a padded token: hidden from every query
    with vlkernels.use_backend(backend):
        out = layer(x, mask, relative_position_bias=bias)
        clean = layer(poisoned, mask, relative_position_bias=bias)
        poisoned[0, 0] = float("nan")  # a real token: every query of sample 0 sees it
        propagated = layer(poisoned, mask, relative_position_bias=bias)
    q, k, v = F.linear(x, layer.qkv.weight, torch.cat([layer.q_bias, torch.zeros_like(layer.v_bias), layer.v_bias])
                       ).unflatten(-1, (3, 4, -1)).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5 + bias
    weights = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), -1)
    expected = layer.proj((weights[:2] @ v[:2]).transpose(1, 2).flatten(2))
    assert rel_error(out[:2], expected) <= 1e-5
    assert torch.equal(out[2], layer.proj(torch.zeros(9, 32)))  # the empty rows: zeros before the projection
    assert torch.isfinite(clean[:, :7]).all() and torch.equal(clean[0], out[0])
    assert propagated[0].isnan().all()
