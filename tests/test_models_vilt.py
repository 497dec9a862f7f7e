"""Model-specific checks of ViLT (vlkernels.models.vilt): head shapes, which objectives run, the
ITM / MLM passes and the WPA loss against explicit references, ViLT's patch sampling and key
masking, input errors, and parity with HuggingFace's ViltModel / ViltForMaskedLM (weights
mapped by ViLT.from_hf, same outputs to fp32 rounding, patch draws equal under one seed). The
generic kernels-vs-references and training checks are in tests/test_models.py."""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.models.common import IGNORE_INDEX
from vlkernels.models.vilt import ViLT, ViLTConfig
from vlkernels.reference.optimal_transport import ot_loss, wra_distance
from vlkernels.testing import DEVICE

transformers = pytest.importorskip("transformers")


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ViLT(dataclasses.replace(ViLTConfig.tiny(), **overrides), use_kernels=False).eval()


def _batch(model, batch_size=4, seed=0):
    return model.synthetic_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def _seeded(model, seed=0, **inputs):
    torch.manual_seed(seed)
    return model(**inputs)


def _plain(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}


# -- heads and objectives -------------------------------------------------------------------------
def test_head_and_encoder_shapes():
    model = _model()
    c = model.config
    batch = _batch(model)
    b, s = batch["input_ids"].shape
    out = _seeded(model, **batch)
    assert out.mlm_logits.shape == (b, s, c.vocab_size)
    assert out.itm_logits.shape == (b, 2)
    plain = _seeded(model, **_plain(batch))
    assert "loss" not in plain and "losses" not in plain
    # Full 4x4 grids (16 patches) are capped to max_image_len = 12 tokens, plus the image [CLS].
    tokens = 1 + c.max_image_len
    assert plain.last_hidden_state.shape == (b, s + tokens, c.hidden_size)
    assert plain.text_hidden_state.shape == (b, s, c.hidden_size)
    assert plain.image_hidden_state.shape == (b, tokens, c.hidden_size)
    assert plain.pooler_output.shape == (b, c.hidden_size)
    assert plain.image_mask.shape == (b, tokens) and plain.image_mask.dtype == torch.bool
    assert plain.patch_index.shape == (b, c.max_image_len, 2)
    torch.testing.assert_close(plain.pooler_output, torch.tanh(model.pooler.dense(plain.last_hidden_state[:, 0])))


@pytest.mark.parametrize("objectives", [("mlm",), ("itm",), ("mlm", "itm")], ids="-".join)
def test_each_objective_appears_with_its_labels(objectives):
    model = _model()
    batch = _batch(model)
    if "mlm" not in objectives:
        del batch["mlm_input_ids"], batch["mlm_labels"]
    if "itm" not in objectives:
        del batch["itm_labels"], batch["itm_image_index"]
    out = _seeded(model, **batch)
    expected = {"mlm"} if objectives == ("mlm",) else set(objectives) | {"wpa"}
    assert set(out.losses) == expected
    weights = {"mlm": 1.0, "itm": 1.0, "wpa": 0.1}
    total = sum(weights[name] * value for name, value in out.losses.items())
    torch.testing.assert_close(out.loss, total)
    assert ("mlm_logits" in out) == ("mlm" in objectives) and ("itm_logits" in out) == ("itm" in objectives)


def test_wpa_weight_zero_skips_the_alignment():
    model = _model(wpa_weight=0.0)
    out = _seeded(model, **_batch(model))
    assert set(out.losses) == {"mlm", "itm"}


def test_itm_pass_pairs_each_text_with_its_indexed_image_and_wpa_follows_vilt():
    model = _model()
    batch = _batch(model)
    index, labels = torch.tensor([2, 0, 1, 3]), torch.tensor([0, 0, 0, 1])
    out = _seeded(model, **_plain(batch), itm_labels=labels, itm_image_index=index)
    swapped = _seeded(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"][index], pixel_mask=batch["pixel_mask"][index])
    torch.testing.assert_close(out.itm_logits, model.itm_score(swapped.pooler_output))
    torch.testing.assert_close(out.losses["itm"], F.cross_entropy(out.itm_logits, labels))
    # WPA: text without [CLS] and its last real token ([SEP]), image without its [CLS].
    text_mask = batch["attention_mask"].bool().clone()
    text_mask[torch.arange(4), text_mask.sum(1) - 1] = False
    text_mask[:, 0] = False
    image_mask = swapped.image_mask.clone()
    image_mask[:, 0] = False
    distance = wra_distance(swapped.text_hidden_state.double(), swapped.image_hidden_state.double(), text_mask,
                            image_mask)
    torch.testing.assert_close(out.losses["wpa"].double(), ot_loss(distance, labels), rtol=1e-5, atol=1e-6)


def test_mlm_pass_reads_the_masked_text_and_scores_only_masked_tokens():
    model = _model()
    batch = _batch(model)
    out = _seeded(model, **_plain(batch), mlm_input_ids=batch["mlm_input_ids"], mlm_labels=batch["mlm_labels"])
    masked = _seeded(model, input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    torch.testing.assert_close(out.mlm_logits, model.mlm_score(masked.text_hidden_state))
    labels = batch["mlm_labels"]
    assert bool((labels != IGNORE_INDEX).any())
    chosen = labels != IGNORE_INDEX
    torch.testing.assert_close(out.losses["mlm"], F.cross_entropy(out.mlm_logits[chosen], labels[chosen]))
    # No pass over input_ids ran, so there is no encoder output of it; without mlm_input_ids
    # the MLM pass is that pass.
    assert "last_hidden_state" not in out
    out = _seeded(model, **_plain(batch), mlm_labels=batch["mlm_labels"])
    torch.testing.assert_close(out.last_hidden_state, _seeded(model, **_plain(batch)).last_hidden_state)


# -- ViLT's image embedding -----------------------------------------------------------------------
def _padded_images(model, batch=3, seed=0):
    """Random text and 32x32 images; image 1 real only in its top 2x3 patches, image 2 in 4x2."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, c.vocab_size, (batch, 6), generator=g)
    pixels = torch.randn(batch, c.num_channels, 32, 32, generator=g)
    mask = torch.ones(batch, 32, 32, dtype=torch.long)
    mask[1, 16:], mask[1, :, 24:] = 0, 0
    mask[2, :, 16:] = 0
    return ids, pixels, mask


@pytest.mark.parametrize("cap", [-1, 8, 12])
def test_patch_sampling_keeps_valid_patches_and_pads_smaller_images(cap):
    model = _model(max_image_len=cap)
    ids, pixels, mask = _padded_images(model)
    out = _seeded(model, input_ids=ids, pixel_values=pixels, pixel_mask=mask)
    valid = torch.tensor([16, 6, 8])
    length = 16 if cap < 0 else min(16, cap)
    assert out.image_mask.shape == (3, 1 + length)
    assert out.image_mask[:, 0].all()
    assert out.image_mask[:, 1:].sum(1).tolist() == valid.clamp_max(length).tolist()
    rows, cols = out.patch_index.unbind(-1)
    real = out.image_mask[:, 1:]
    # Real tokens come from the valid grid, pad tokens from outside it; no real patch twice.
    valid_rows, valid_cols = torch.tensor([4, 2, 4])[:, None], torch.tensor([4, 3, 2])[:, None]
    inside = (rows < valid_rows) & (cols < valid_cols)
    assert torch.equal(inside, real)
    for b in range(3):
        flat = (rows[b] * 4 + cols[b])[real[b]]
        assert flat.unique().numel() == flat.numel()


def test_pad_patches_are_masked_keys():
    """Pixels under the padding change only the pad patch tokens' own outputs."""
    model = _model(max_image_len=-1)
    ids, pixels, mask = _padded_images(model)
    first = _seeded(model, input_ids=ids, pixel_values=pixels, pixel_mask=mask)
    noisy = pixels + 5 * torch.randn(pixels.shape) * (mask[:, None] == 0)
    second = _seeded(model, input_ids=ids, pixel_values=noisy, pixel_mask=mask)
    real = torch.cat([torch.ones(3, ids.shape[1], dtype=torch.bool), first.image_mask], 1)
    torch.testing.assert_close(second.last_hidden_state[real], first.last_hidden_state[real])
    assert not torch.allclose(second.last_hidden_state[~real], first.last_hidden_state[~real])


def test_pad_text_tokens_are_masked_keys():
    model = _model()
    ids, pixels, mask = _padded_images(model)
    text_mask = torch.ones_like(ids)
    text_mask[0, 4:] = 0
    first = _seeded(model, input_ids=ids, attention_mask=text_mask, pixel_values=pixels, pixel_mask=mask)
    changed = ids.clone()
    changed[0, 4:] = 105
    second = _seeded(model, input_ids=changed, attention_mask=text_mask, pixel_values=pixels, pixel_mask=mask)
    torch.testing.assert_close(second.last_hidden_state[0, :4], first.last_hidden_state[0, :4])
    torch.testing.assert_close(second.last_hidden_state[0, ids.shape[1]:], first.last_hidden_state[0, ids.shape[1]:])
    torch.testing.assert_close(second.last_hidden_state[1:], first.last_hidden_state[1:])


def test_same_seed_same_patches_other_seed_other_patches():
    model = _model()
    ids, pixels, mask = _padded_images(model)
    a = _seeded(model, 1, input_ids=ids, pixel_values=pixels, pixel_mask=mask)
    b = _seeded(model, 1, input_ids=ids, pixel_values=pixels, pixel_mask=mask)
    c = _seeded(model, 2, input_ids=ids, pixel_values=pixels, pixel_mask=mask)
    assert torch.equal(a.patch_index, b.patch_index) and torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert not torch.equal(a.patch_index, c.patch_index)


# -- input errors ---------------------------------------------------------------------------------
def _bad_inputs():
    model = _model()
    batch = _batch(model, batch_size=2)
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["pixel_mask"]
    c = model.config
    cases = {
        "batch": (dict(input_ids=ids, pixel_values=torch.cat([pixels, pixels])), "batch size"),
        "too-long-text": (dict(input_ids=torch.full((2, c.max_text_len + 1), 104), pixel_values=pixels),
                          "max_text_len"),
        "token-out-of-vocab": (dict(input_ids=ids + c.vocab_size, pixel_values=pixels), "token ids"),
        "channels": (dict(input_ids=ids, pixel_values=pixels[:, :2]), "pixel_values"),
        "image-too-small": (dict(input_ids=ids, pixel_values=pixels[:, :, :4, :4]), "patch"),
        "pixel-mask-shape": (dict(input_ids=ids, pixel_values=pixels, pixel_mask=mask[:, :16]), "pixel_mask"),
        "attention-mask-shape": (dict(input_ids=ids, attention_mask=batch["attention_mask"][:, :3],
                                      pixel_values=pixels), "attention_mask"),
        "empty-image": (dict(input_ids=ids, pixel_values=pixels, pixel_mask=torch.zeros_like(mask)), "no valid patch"),
        "token-type-range": (dict(input_ids=ids, token_type_ids=torch.full_like(ids, 2), pixel_values=pixels),
                             "token_type_ids"),
        "image-token-type": (dict(input_ids=ids, pixel_values=pixels, image_token_type_idx=2),
                             "image_token_type_idx"),
        "inputs-embeds-dim": (dict(inputs_embeds=torch.randn(2, 5, c.hidden_size + 1), pixel_values=pixels),
                              "inputs_embeds"),
        "image-embeds-dim": (dict(input_ids=ids, image_embeds=torch.randn(2, 5, 7)), "image_embeds"),
        "ids-and-embeds": (dict(input_ids=ids, inputs_embeds=torch.randn(2, ids.shape[1], c.hidden_size),
                                pixel_values=pixels), "exactly one"),
        "no-image": (dict(input_ids=ids), "exactly one"),
        "attentions": (dict(input_ids=ids, pixel_values=pixels, output_attentions=True), "output_attentions"),
        "mlm-labels-shape": (dict(input_ids=ids, pixel_values=pixels, mlm_labels=batch["mlm_labels"][:, :3]),
                             "mlm_labels"),
        "itm-index-range": (dict(input_ids=ids, pixel_values=pixels, itm_labels=batch["itm_labels"],
                                 itm_image_index=torch.tensor([0, 2])), "itm_image_index"),
        "itm-labels-range": (dict(input_ids=ids, pixel_values=pixels, itm_labels=torch.tensor([0, 2])), "itm_labels"),
        "objective-without-pixels": (dict(input_ids=ids, image_embeds=torch.randn(2, 5, c.hidden_size),
                                          itm_labels=batch["itm_labels"]), "need input_ids and pixel_values"),
    }
    return model, cases


_MODEL_FOR_ERRORS, _ERROR_CASES = _bad_inputs()


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_bad_inputs_raise_clear_errors(case):
    inputs, message = _ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        _MODEL_FOR_ERRORS(**inputs)


# -- HuggingFace parity ---------------------------------------------------------------------------
def _hf_config(**overrides):
    fields = dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  image_size=32, patch_size=8, max_position_embeddings=12)
    fields.update(overrides)
    return transformers.ViltConfig(**fields)


def _randomized(module, seed=0):
    """Every parameter redrawn (HF initialises cls token, position grid and biases to zero,
    which would let a wrong mapping of them pass)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    return module.eval()


def _hf_inputs(batch=3, length=9, height=40, width=48, seed=0):
    """Padded text (two lengths) and padded images: 40x48 pixels (a 5x6 patch grid of 8x8),
    image 1 real in its top 24 rows (3x6 patches), image 2 in its left 16 columns (5x2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 160, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 6:], attention_mask[2, 4:] = 0, 0
    token_type_ids = torch.randint(0, 2, (batch, length), generator=g)
    pixel_values = torch.randn(batch, 3, height, width, generator=g)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
    pixel_mask[1, 24:], pixel_mask[2, :, 16:] = 0, 0
    return dict(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                pixel_values=pixel_values, pixel_mask=pixel_mask)


def _both(hf, ours, seed=0, backend=None, **inputs):
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = hf(**inputs)
    torch.manual_seed(seed)
    with torch.no_grad(), (vlkernels.use_backend(backend) if backend else contextlib.nullcontext()):
        actual = ours(**inputs)
    return actual, expected


@pytest.fixture
def ieee_fp32():
    """fp32 matmuls and convolutions in IEEE fp32 on a GPU (no tf32), on HF's side and in the
    kernels (which follow the same torch flags), so that fp32 tolerances apply."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("use_kernels,backend", [(False, None), (True, None), (True, "triton")],
                         ids=["references", "kernels-auto", "kernels-triton"])
def test_matches_hf_vilt_model(use_kernels, backend, ieee_fp32):
    """On DEVICE: the Triton kernels on a GPU, else in the interpreter (or the CPU backends)."""
    hf = _randomized(transformers.ViltModel(_hf_config())).to(DEVICE)
    ours = ViLT.from_hf(hf, use_kernels=use_kernels)
    assert not ours.training and ours.pos_embed.device.type == DEVICE.type
    inputs = {k: v.to(DEVICE) for k, v in _hf_inputs().items()}
    actual, expected = _both(hf, ours, backend=backend, **inputs)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output)
    # The padded pixel batch kept all valid patches (max_image_length -1) and padded the rest.
    assert actual.image_mask[:, 1:].sum(1).tolist() == [30, 18, 10]


@pytest.mark.parametrize("variant", ["sampling-cap", "nlvr2-token-type", "no-qkv-bias-gelu-new", "default-masks",
                                     "whole-patches"])
def test_matches_hf_vilt_model_variants(variant):
    config, inputs, extra = {}, _hf_inputs(), {}
    if variant == "sampling-cap":  # sample 12 of 30 / 18 valid patches, pad the 10-patch image
        config = dict(max_image_length=12)
    elif variant == "nlvr2-token-type":
        config, extra = dict(modality_type_vocab_size=3), dict(image_token_type_idx=2)
    elif variant == "no-qkv-bias-gelu-new":
        config = dict(qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-5)
    elif variant == "default-masks":
        inputs = {k: inputs[k] for k in ("input_ids", "pixel_values")}
    elif variant == "whole-patches":
        inputs = _hf_inputs(height=32, width=32)
    hf = _randomized(transformers.ViltModel(_hf_config(**config)))
    for use_kernels in (False, True):
        ours = ViLT.from_hf(hf, use_kernels=use_kernels)
        actual, expected = _both(hf, ours, seed=3, **inputs, **extra)
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state)
        torch.testing.assert_close(actual.pooler_output, expected.pooler_output)


def _real_tokens_by_patch(out, grid_cols):
    """{(image, patch position): hidden state} over the real patch tokens."""
    image, real = out.image_hidden_state[:, 1:], out.image_mask[:, 1:]
    flat = out.patch_index[..., 0] * grid_cols + out.patch_index[..., 1]
    return {(b, int(flat[b, t])): image[b, t] for b, t in real.nonzero().tolist()}


@pytest.mark.parametrize("full_image", [True, False], ids=["an-image-fills-the-grid", "tall-and-wide"])
def test_static_sampling_computes_what_hf_computes(full_image):
    """patch_sampling="static" (one graph under torch.compile) on HF's weights: with every valid
    patch kept (max_image_length -1), text tokens and pooled output equal HF's, and every real
    patch token equals HF's for that patch (the order of the tokens is the sampling's own).
    Without an image filling the grid the static length is larger: the extra tokens are pads."""
    hf = _randomized(transformers.ViltModel(_hf_config()))
    inputs = _hf_inputs()
    if not full_image:  # image 0 real in its left 4 columns (5x4), image 1 in its top 3 rows (3x6)
        inputs["pixel_mask"][0, :, 32:] = 0
    ours = ViLT.from_hf(hf)  # "vilt": HF's draws, proven equal to HF above
    static = ViLT.from_hf(hf)
    static.config.patch_sampling = "static"
    actual, expected = _both(hf, static, **inputs)
    vilt, _ = _both(hf, ours, **inputs)
    text = inputs["input_ids"].shape[1]
    torch.testing.assert_close(actual.last_hidden_state[:, :text], expected.last_hidden_state[:, :text])
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output)
    # a 5x6 patch grid: static keeps 30 tokens; ViLT the largest count (30, or 5x4 = 20)
    assert actual.image_mask.shape[1] == 1 + 30 and vilt.image_mask.shape[1] == 1 + (30 if full_image else 20)
    static_tokens, vilt_tokens = _real_tokens_by_patch(actual, 6), _real_tokens_by_patch(vilt, 6)
    assert static_tokens.keys() == vilt_tokens.keys()
    for key, value in vilt_tokens.items():
        torch.testing.assert_close(static_tokens[key], value, msg=lambda m: f"patch {key}: {m}")


def test_matches_hf_with_embeddings_given_and_hidden_states():
    hf = _randomized(transformers.ViltModel(_hf_config()))
    ours = ViLT.from_hf(hf)
    g = torch.Generator().manual_seed(1)
    inputs = dict(inputs_embeds=torch.randn(2, 7, 32, generator=g),
                  attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
                  image_embeds=torch.randn(2, 10, 32, generator=g),
                  pixel_mask=torch.tensor([[1] * 10, [1] * 6 + [0] * 4]), output_hidden_states=True)
    actual, expected = _both(hf, ours, **inputs)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output)
    assert len(actual.hidden_states) == len(expected.hidden_states) == 3
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(mine, theirs)


def test_matches_hf_masked_lm_head():
    hf = _randomized(transformers.ViltForMaskedLM(_hf_config()))
    ours = ViLT.from_hf(hf)
    assert ours.mlm_score.decoder.weight is ours.text_embeddings.word_embeddings.weight  # HF ties them
    inputs = _hf_inputs()
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[:, 1:3] = inputs["input_ids"][:, 1:3]
    torch.manual_seed(0)
    with torch.no_grad():
        expected = hf(**inputs, labels=labels)
    torch.manual_seed(0)
    with torch.no_grad():
        actual = ours(**inputs, mlm_labels=labels)
    torch.testing.assert_close(actual.mlm_logits, expected.logits)
    torch.testing.assert_close(actual.losses["mlm"], expected.loss)


def test_from_hf_keeps_dtype_and_mode_and_refuses_other_heads():
    hf = transformers.ViltModel(_hf_config()).double().train()
    ours = ViLT.from_hf(hf, use_kernels=False)
    assert ours.training and all(p.dtype == torch.float64 for p in ours.parameters())
    hf.eval()
    ours.eval()
    actual, expected = _both(hf, ours, **{k: v.double() if v.is_floating_point() else v
                                          for k, v in _hf_inputs().items()})
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ViltModel or ViltForMaskedLM"):
        ViLT.from_hf(transformers.ViltForQuestionAnswering(_hf_config(num_labels=3)))
