"""vlkernels.models.common and .synthetic: masking, losses, checks and the synthetic data."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlkernels.models.common import (
    IGNORE_INDEX, ModelOutput, check_batch, check_features, check_text, contrastive_loss, hard_negative_indices,
    mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import CLS, MASK, SEP, SyntheticPairs, mismatched_pairs


def _text(batch=64, length=24, seed=0):
    return SyntheticPairs(160).text(batch, length, torch.Generator().manual_seed(seed))


def test_whole_word_masking_masks_every_piece_of_a_word_and_only_real_pieces():
    text = _text()
    ids, labels = mask_tokens(text["input_ids"], vocab_size=160, mask_token_id=MASK, maskable=text["maskable"],
                              word_ids=text["word_ids"], prob=0.3, generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~text["maskable"]).any()
    assert torch.equal(labels[chosen], text["input_ids"][chosen])
    assert torch.equal(ids[~chosen], text["input_ids"][~chosen])
    for b in range(ids.shape[0]):
        for word in text["word_ids"][b].unique():
            if word < 0:
                continue
            pieces = chosen[b][text["word_ids"][b] == word]
            assert pieces.all() or not pieces.any(), f"sample {b} word {word} half masked"


def test_masking_rates_follow_bert():
    text = _text(batch=512, length=32)
    ids, labels = mask_tokens(text["input_ids"], vocab_size=160, mask_token_id=MASK, maskable=text["maskable"],
                              prob=0.15, generator=torch.Generator().manual_seed(2))
    chosen = labels != IGNORE_INDEX
    real = int(text["maskable"].sum())
    assert abs(int(chosen.sum()) / real - 0.15) < 0.01
    as_mask = (ids == MASK) & chosen
    kept = (ids == text["input_ids"]) & chosen
    assert abs(int(as_mask.sum()) / int(chosen.sum()) - 0.8) < 0.03
    assert 0.08 < int(kept.sum()) / int(chosen.sum()) < 0.13  # 10% kept + random draws of the same id


def test_masked_lm_loss_is_cross_entropy_over_labelled_positions_and_zero_without_labels():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 4, 2
    expected = (F.cross_entropy(logits[0, 1][None], torch.tensor([4])) +
                F.cross_entropy(logits[1, 3][None], torch.tensor([2]))) / 2
    torch.testing.assert_close(masked_lm_loss(logits, labels).double(), expected)
    none = masked_lm_loss(logits, torch.full((2, 5), IGNORE_INDEX))
    assert none.item() == 0.0
    none.backward()  # still part of the graph
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_contrastive_loss_against_float64():
    generator = torch.Generator().manual_seed(3)
    image, text = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    scale = torch.tensor(math.log(1 / 0.07))
    loss, logits = contrastive_loss(image, text, scale)
    i64, t64 = F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)
    expected_logits = scale.double().exp() * i64 @ t64.T
    targets = torch.arange(6)
    expected = (F.cross_entropy(expected_logits, targets) + F.cross_entropy(expected_logits.T, targets)) / 2
    torch.testing.assert_close(logits.double(), expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_hard_negatives_are_never_the_positive_and_follow_the_similarity():
    similarity = torch.zeros(4, 4)
    similarity[0, 2] = 20.0  # row 0 almost surely picks column 2
    picks = torch.stack([hard_negative_indices(similarity, torch.Generator().manual_seed(s)) for s in range(50)])
    assert not (picks == torch.arange(4)).any()
    assert (picks[:, 0] == 2).float().mean() > 0.95
    with pytest.raises(ValueError, match="at least 2"):
        hard_negative_indices(torch.zeros(1, 1))


def test_mismatched_pairs_label_matches_whether_the_image_moved():
    index, labels = mismatched_pairs(64, torch.Generator().manual_seed(4))
    assert torch.equal(labels.bool(), index == torch.arange(64))
    assert 0.3 < labels.float().mean() < 0.7


def test_synthetic_pairs_are_well_formed_and_deterministic():
    data = SyntheticPairs(160)
    text = _text(batch=5, length=10, seed=5)
    assert (text["input_ids"][:, 0] == CLS).all()
    lengths = text["attention_mask"].sum(1)
    assert (text["input_ids"][torch.arange(5), lengths - 1] == SEP).all()
    regions = data.regions(text["input_ids"], 6, 12, torch.Generator().manual_seed(6))
    boxes = regions["boxes"]
    assert regions["region_features"].shape == (5, 6, 12) and boxes.shape == (5, 6, 4)
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert (regions["region_mask"].sum(1) >= 3).all()
    images = data.images(text["input_ids"], 32, 48, 16, generator=torch.Generator().manual_seed(7))
    assert images["pixel_values"].shape == (5, 3, 32, 48)
    assert (images["pixel_values"][images["pixel_mask"][:, None].expand(-1, 3, -1, -1) == 0] == 0).all()
    again = data.images(text["input_ids"], 32, 48, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(images["pixel_values"], again["pixel_values"])
    with pytest.raises(ValueError, match="vocab_size"):
        SyntheticPairs(100)


def test_input_checks_name_the_problem():
    with pytest.raises(ValueError, match="input_ids 2, pixel_values 3"):
        check_batch("M", input_ids=torch.zeros(2, 4), pixel_values=torch.zeros(3, 3, 8, 8))
    assert check_batch("M", a=torch.zeros(2), b=None) == 2
    with pytest.raises(ValueError, match="more than max_text_len 8"):
        check_text("M", torch.zeros(1, 9, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_text("M", torch.full((1, 3), 10), 8, vocab_size=10)
    with pytest.raises(ValueError, match="regions must be a floating"):
        check_features("M", "regions", torch.zeros(2, 3, 5), 4)
    out = ModelOutput(loss=torch.tensor(1.0))
    assert out.loss is out["loss"]
    with pytest.raises(AttributeError):
        out.missing
