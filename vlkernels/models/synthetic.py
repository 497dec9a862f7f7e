"""Synthetic image-text pairs for tests, benchmarks and ``examples/pretrain.py``.

The images are not noise: every image cell, region or patch shows the "concept" (a fixed
random vector) of one of its caption's words, so image-text matching, alignment and masked
prediction are learnable and the losses of a few training steps fall. Tokens follow BERT's
ids ([PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103; words from 104 up), so vocabularies must
have more than 104 entries.
"""
from __future__ import annotations

from typing import Optional

import torch

PAD, CLS, SEP, MASK = 0, 101, 102, 103
FIRST_WORD_ID = 104


def _rand(generator: Optional[torch.Generator], *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=generator)


def _randint(generator: Optional[torch.Generator], low: int, high: int, shape) -> torch.Tensor:
    return torch.randint(low, high, tuple(shape), generator=generator)


class SyntheticPairs:
    """Captions and images (pixels, regions or grid features) that depict them.

    vocab_size: the text vocabulary (> 104); concept_dim: width of the hidden per-word concept
    vectors; seed: fixes the concepts and the projections to pixels / features, so every batch
    of one ``SyntheticPairs`` speaks the same visual language. Per-batch randomness comes from
    the ``generator`` each method takes (CPU tensors are built, then moved with ``.to``).
    """

    def __init__(self, vocab_size: int, *, concept_dim: int = 16, seed: int = 0) -> None:
        if vocab_size <= FIRST_WORD_ID + 1:
            raise ValueError(f"SyntheticPairs: vocab_size must exceed {FIRST_WORD_ID + 1} (BERT's special ids)")
        self.vocab_size, self.concept_dim, self.seed = vocab_size, concept_dim, seed
        self.concepts = torch.randn(vocab_size, concept_dim, generator=torch.Generator().manual_seed(seed))

    def _projection(self, width: int) -> torch.Tensor:
        """A fixed [concept_dim, width] map from concepts to an image representation of that width."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + width)
        return torch.randn(self.concept_dim, width, generator=generator) / self.concept_dim ** 0.5

    def text(self, batch: int, length: int, generator: Optional[torch.Generator] = None) -> dict:
        """Captions [CLS] w ... [SEP] [PAD]..., each word 1 or 2 word pieces.

        returns input_ids [B, S] int64, attention_mask [B, S] int64 (1 = real), word_ids [B, S]
        (the word each piece belongs to; -1 on special and pad tokens), maskable [B, S] bool
        (real word pieces: what masked-LM may mask)."""
        if length < 4:
            raise ValueError("SyntheticPairs.text: captions need length >= 4")
        lengths = _randint(generator, max(4, length // 2), length + 1, (batch,))
        input_ids = torch.full((batch, length), PAD, dtype=torch.long)
        word_ids = torch.full((batch, length), -1, dtype=torch.long)
        pieces = _randint(generator, FIRST_WORD_ID, self.vocab_size, (batch, length))
        continues = _rand(generator, batch, length) < 0.3  # this piece continues the previous word
        for b in range(batch):
            end = int(lengths[b]) - 1  # position of [SEP]
            input_ids[b, 0], input_ids[b, end] = CLS, SEP
            input_ids[b, 1:end] = pieces[b, 1:end]
            word = -1
            for t in range(1, end):
                word += 0 if (t > 1 and bool(continues[b, t])) else 1
                word_ids[b, t] = word
        attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "word_ids": word_ids,
                "maskable": word_ids >= 0}

    def _depicted_tokens(self, input_ids: torch.Tensor, count: int, generator) -> torch.Tensor:
        """[B, count] token ids drawn from each caption's real words (what the image shows)."""
        real = input_ids >= FIRST_WORD_ID
        weights = real.float() + 1e-9 * (~real).float()  # captions always have >= 1 word
        picks = torch.multinomial(weights, count, replacement=True, generator=generator)
        return input_ids.gather(1, picks)

    def regions(self, input_ids: torch.Tensor, count: int, feature_dim: int,
                generator: Optional[torch.Generator] = None) -> dict:
        """Detector-style regions: region_features [B, N, F] (a depicted word's concept projected
        to F, plus noise), boxes [B, N, 4] normalised (x1, y1, x2, y2), region_mask [B, N] int64
        (1 = real; at least half the regions are real), region_tokens [B, N] int64 (the caption
        token each region depicts: what a detector would name it, for region class labels)."""
        batch = input_ids.shape[0]
        shown = self._depicted_tokens(input_ids, count, generator)
        features = self.concepts[shown] @ self._projection(feature_dim)
        features = features + 0.1 * torch.randn(features.shape, generator=generator)
        corners = _rand(generator, batch, count, 2, 2)  # two random points per box
        boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
        real = _randint(generator, max(1, count // 2), count + 1, (batch,))
        region_mask = (torch.arange(count)[None, :] < real[:, None]).long()
        return {"region_features": features * region_mask[..., None], "boxes": boxes,
                "region_mask": region_mask, "region_tokens": shown}

    def images(self, input_ids: torch.Tensor, height: int, width: int, patch: int, channels: int = 3,
               generator: Optional[torch.Generator] = None, pad: bool = True) -> dict:
        """Pixel images whose patch x patch cells each show a depicted word's concept.

        returns pixel_values [B, C, H, W] and pixel_mask [B, H, W] int64 (1 = real pixel); with
        ``pad`` some images are smaller than H x W (padded by whole patches, as ViLT batches)."""
        batch, rows, cols = input_ids.shape[0], height // patch, width // patch
        shown = self._depicted_tokens(input_ids, rows * cols, generator)
        cells = self.concepts[shown] @ self._projection(channels * patch * patch)  # [B, rows*cols, C*P*P]
        cells = cells + 0.1 * torch.randn(cells.shape, generator=generator)
        pixels = cells.view(batch, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
        pixels = pixels.reshape(batch, channels, rows * patch, cols * patch)
        pixel_values = torch.zeros(batch, channels, height, width)
        pixel_values[:, :, :rows * patch, :cols * patch] = pixels
        pixel_mask = torch.zeros(batch, height, width, dtype=torch.long)
        for b in range(batch):
            keep_rows = int(_randint(generator, max(1, rows // 2), rows + 1, ())) if pad and b % 2 else rows
            keep_cols = int(_randint(generator, max(1, cols // 2), cols + 1, ())) if pad and b % 2 else cols
            pixel_mask[b, :keep_rows * patch, :keep_cols * patch] = 1
        return {"pixel_values": pixel_values * pixel_mask[:, None], "pixel_mask": pixel_mask}

    def grid_features(self, input_ids: torch.Tensor, rows: int, cols: int, channels: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A backbone-like feature map [B, C, rows, cols] whose cells show depicted words' concepts."""
        batch = input_ids.shape[0]
        shown = self._depicted_tokens(input_ids, rows * cols, generator)
        cells = self.concepts[shown] @ self._projection(channels)
        cells = cells + 0.1 * torch.randn(cells.shape, generator=generator)
        return cells.view(batch, rows, cols, channels).permute(0, 3, 1, 2).contiguous()


def mismatched_pairs(batch: int, generator: Optional[torch.Generator] = None,
                     negative_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching pairs by swapping images: returns (image_index [B] int64, labels [B]
    int64) where sample i keeps its image (label 1) or, with probability ``negative_prob``, takes
    another sample's image (label 0). Images are assumed distinct across the batch."""
    if batch < 2:
        raise ValueError("mismatched_pairs: a batch of at least 2 pairs is needed to draw negatives")
    negative = _rand(generator, batch) < negative_prob
    shift = _randint(generator, 1, batch, (batch,))
    image_index = torch.where(negative, (torch.arange(batch) + shift) % batch, torch.arange(batch))
    return image_index, (~negative).long()


def mask_regions(features: torch.Tensor, region_mask: torch.Tensor, *, prob: float, zero_prob: float,
                 random_prob: float, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked region modelling's input corruption: each real region (region_mask [B, N]) is
    chosen with probability ``prob``; a chosen one is zeroed with probability ``zero_prob``,
    replaced by a random real region's feature of the batch with ``random_prob``, else kept.
    features [B, N, F] -> (corrupted features [B, N, F], chosen [B, N] bool)."""
    batch, count = region_mask.shape
    real = region_mask.bool()
    chosen = (torch.rand(batch, count, generator=generator) < prob) & real
    roll = torch.rand(batch, count, generator=generator)
    real_flat = real.flatten().nonzero().squeeze(1)
    donors = real_flat[torch.randint(0, len(real_flat), (batch, count), generator=generator)]
    corrupted = torch.where((chosen & (roll < zero_prob))[..., None], torch.zeros_like(features), features)
    replaced = chosen & (roll >= zero_prob) & (roll < zero_prob + random_prob)
    corrupted = torch.where(replaced[..., None], features.flatten(0, 1)[donors], corrupted)
    return corrupted, chosen


def seeded_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """The given CPU generator, or a fresh one seeded from torch's global RNG (so that
    ``torch.manual_seed`` fixes a batch drawn without a generator)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))


def to_device(batch: dict, device: Optional[torch.device]) -> dict:
    """Move every tensor of a batch dict to ``device`` (None: leave it)."""
    if device is None:
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
