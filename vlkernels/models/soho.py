"""SOHO: a single-stream BERT over text and "visual dictionary" tokens of a CNN feature map,
pretrained with masked language modeling (MLM), masked visual modeling (MVM) and image-text
matching (ITM), all three from ONE pass over each pair.

Follows SPEC "SOHO visual dictionary" and the release (researchmm/soho: the pretraining neck
SimpleVDforPreGate of configs/Pretrain, VLBert, the MLM_MVM_ITM head):
- Input: a backbone's last feature map [B, C, h, w] (SOHO trains a ResNet end to end; the
  backbone is not part of this model) and optionally which cells are real ([B, h, w]; padded
  images give padded cells). The map is max-pooled by ``pool_size`` (2: SOHO pools C5 once
  more); a pooled cell is real when its top-left input cell is (nearest-neighbour resizing of
  the mask, as SOHO resizes its pixel mask).
- 1x1 projection to the hidden width (a Linear over the cells; kaiming-normal init as SOHO's
  conv), then ``vlkernels.nn.VisualDictionary`` (K = 2048 entries, EMA decay 0.4, Laplace
  smoothing, straight-through; updated in training mode from the real cells only).
- Visual token of a cell: the quantised feature through a Linear (SOHO's ``pos_line``) mixed
  with the projected feature by a gate softmax(Linear(2D, 2)) (``gated_mix``; without it their
  sum, SOHO's SimpleVDforPre); MVM-masked cells replaced by a learned mask embedding; + a fixed
  2-D sine position embedding of the cell (DETR-style, positions normalised by the image's
  real extent); LayerNorm. No token-type embedding (SOHO's VLBert adds none to visual tokens).
- MVM masking (``vlkernels.nn.mvm_mask``): one grid position drawn for the batch; in each
  sample every real cell holding the same dictionary entry as that position is masked; each
  sample keeps its masking with probability ``mvm_probability`` (0.015 in SOHO; 1.0 in tiny so
  the loss is present in small batches). Draws use torch's global RNG or ``generator``.
- Fusion: BERT text embeddings (token type 0) concatenated with the visual tokens, then a
  ``BertLayer`` stack over [text ; visual] with the padding of both masked.

Objectives (weights 1, 1, 1: SOHO's head sums them):
- ``mlm``: logits = text hidden states @ word_embeddings^T (SOHO's tied ``mask_l_fc``: no
  transform, no bias); cross-entropy over the masked tokens (15% per-token masking, BERT
  80/10/10, done by the data pipeline; SOHO masks every pair, matched or not).
- ``mvm``: cosine of each visual hidden state to every dictionary entry
  (``VisualDictionary.mvm_logits``: no temperature, no dictionary gradient); cross-entropy
  over the masked cells against their entries.
- ``itm``: Linear(D, 2, no bias) on the first token's hidden state (SOHO's ``match_class``; no
  pooler); cross-entropy against ``itm_labels`` (1 = matched; SOHO swaps 50% of the captions).

Not implemented: the backbone; the BatchNorm (SyncBN) after SOHO's 1x1 convolutions (its batch
statistics over padded cells have no clean equivalent here; the kaiming init keeps the features
at the dictionary's scale); the decay schedule is the caller's (``dictionary.set_decay_updates``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    IGNORE_INDEX, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_text, init_bert_weights,
    mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, mismatched_pairs, to_device
from vlkernels.nn import BertLayer, TextEmbeddings, VisualDictionary, mvm_mask
from vlkernels.nn._submodules import embedding_row


@dataclass
class SOHOConfig:
    """SOHO's sizes. ``feature_channels``: the backbone feature map's channels (ResNet-101 C5:
    2048); ``pool_size``: the max-pool applied to it; ``dictionary_size`` x ``hidden_size``: the
    visual dictionary."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_text_len: int = 16  # SOHO's pretraining captions (max_length 16)
    max_position_embeddings: int = 512
    feature_channels: int = 2048
    pool_size: int = 2
    dictionary_size: int = 2048
    dictionary_decay: float = 0.4
    gated_mix: bool = True
    mvm_probability: float = 0.015
    layer_norm_eps: float = 1e-12  # BERT's
    visual_layer_norm_eps: float = 1e-5  # the neck's nn.LayerNorm
    dropout: float = 0.1
    attention_dropout: float = 0.1  # SOHO trains with 0.1 (in the attention op)
    initializer_range: float = 0.02
    mlm_probability: float = 0.15
    itm_negative_prob: float = 0.5
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    itm_weight: float = 1.0
    # synthetic_batch only: the feature map it draws (rows x cols cells before pooling)
    grid_rows: int = 16
    grid_cols: int = 16

    @classmethod
    def base(cls) -> "SOHOConfig":
        """SOHO with ResNet-101 features and a BERT-base fusion stack (768 / 12 layers / 12
        heads), dictionary 2048 x 768 with decay 0.4, MVM keep probability 0.015."""
        return cls()

    @classmethod
    def tiny(cls) -> "SOHOConfig":
        """For tests: 16-channel 6x6 feature maps pooled to 3x3, 32 hidden, 2 layers, a 32-entry
        dictionary; every drawn MVM mask is kept so the loss is present."""
        return cls(vocab_size=160, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_text_len=12,
                   max_position_embeddings=12, feature_channels=16, dictionary_size=32, mvm_probability=1.0,
                   dropout=0.0, attention_dropout=0.0, grid_rows=6, grid_cols=6)


def sine_position_embedding(valid: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine position embedding of grid cells (DETR's, as SOHO's neck).

    valid: [B, h, w] bool (real cells). A cell's row (column) coordinate is the count of real
    cells above it (left of it) inclusive, divided by the real count of its column (row), times
    2 pi. Each coordinate takes dim / 2 channels: sin and cos interleaved at frequencies
    temperature ** (2 i / (dim / 2)). returns [B, h, w, dim] = [row part ; column part].
    """
    half = dim // 2
    real = valid.float()
    rows, cols = real.cumsum(1), real.cumsum(2)
    eps = 1e-6  # columns / rows without a real cell
    rows = rows / (rows[:, -1:, :] + eps) * 2 * math.pi
    cols = cols / (cols[:, :, -1:] + eps) * 2 * math.pi
    frequencies = temperature ** (2 * (torch.arange(half, device=valid.device) // 2) / half)

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate[..., None] / frequencies  # [B, h, w, half]
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([encode(rows), encode(cols)], dim=-1)


class SOHO(PretrainingModel):
    """SOHO (see the module docstring for the architecture and the SPEC facts).

    forward(input_ids [B, S], grid_features [B, C, h, w], attention_mask [B, S] = None,
            grid_mask [B, h, w] = None, *, mlm_labels [B, S] = None, itm_labels [B] = None,
            mvm: bool = False, generator: torch.Generator = None)
      input_ids: token ids (already masked for MLM), S <= max_text_len; attention_mask: 1 / True
        = real token. grid_features: the backbone's feature map, C = feature_channels;
        grid_mask: 1 / True = real cell (None: all real). Every pair is one fused sequence.
      mlm_labels: original ids at the masked positions, -100 elsewhere (MLM objective).
      itm_labels: 1 = the text matches the feature map, 0 = not (ITM objective).
      mvm: draw MVM masks (torch's global RNG, or ``generator``) and train MVM.
    returns ModelOutput:
      last_hidden_state [B, S + L, D] (text, then L = (h // pool) * (w // pool) cells, row-major),
      text_hidden_state [B, S, D], visual_hidden_state [B, L, D], visual_mask [B, L] bool (real
      cells), visual_index [B, L] (each cell's dictionary entry, -100 on padded cells);
      mlm: mlm_logits [B, S, V]; itm: itm_logits [B, 2];
      mvm: mvm_logits [B, L, K], mvm_mask [B, L] bool (masked cells), mvm_labels [B, L] (entry at
        masked cells, -100 elsewhere);
      losses {"mlm", "mvm", "itm"} (those requested; mvm is 0 when no cell was masked) and loss
      = their weighted sum.
    In training mode every forward updates the dictionary (EMA) before quantising.
    """

    def __init__(self, config: SOHOConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.hidden_size % 4:
            raise ValueError(f"SOHO: hidden_size {c.hidden_size} must be a multiple of 4 (sine position embedding)")
        if c.max_text_len > c.max_position_embeddings:
            raise ValueError(f"SOHO: max_text_len {c.max_text_len} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if c.pool_size < 1:
            raise ValueError(f"SOHO: pool_size must be >= 1, got {c.pool_size}")
        d = c.hidden_size
        self.text_embeddings = TextEmbeddings(c.vocab_size, d, c.max_position_embeddings, pad_token_id=PAD,
                                              layer_norm_eps=c.layer_norm_eps, dropout=c.dropout)
        # The visual neck.
        self.visual_projection = nn.Linear(c.feature_channels, d)  # SOHO's 1x1 convolution
        self.dictionary = VisualDictionary(c.dictionary_size, d, decay=c.dictionary_decay)
        self.quantized_projection = nn.Linear(d, d)  # SOHO's pos_line
        self.mix_gate = nn.Linear(2 * d, 2) if c.gated_mix else None  # SOHO's gate_fc (1x1 conv)
        self.mask_embedding = nn.Embedding(1, d)
        self.visual_norm = nn.LayerNorm(d, eps=c.visual_layer_norm_eps)
        self.layers = nn.ModuleList(
            BertLayer(d, c.num_heads, c.intermediate_size, dropout=c.dropout, attention_dropout=c.attention_dropout,
                      layer_norm_eps=c.layer_norm_eps)
            for _ in range(c.num_layers))
        self.itm_head = nn.Linear(d, 2, bias=False)
        init_bert_weights(self, c.initializer_range)
        # SOHO's kaiming initialisation of its convolutions (fan_out, ReLU gain) and ITM head.
        nn.init.kaiming_normal_(self.visual_projection.weight, mode="fan_out", nonlinearity="relu")
        if self.mix_gate is not None:
            nn.init.kaiming_normal_(self.mix_gate.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.itm_head.weight)

    # -- inputs ----------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, grid_features, attention_mask, grid_mask, mlm_labels, itm_labels):
        c = self.config
        check_text("SOHO", input_ids, c.max_text_len, c.vocab_size)
        if (not isinstance(grid_features, torch.Tensor) or grid_features.dim() != 4
                or not grid_features.is_floating_point() or grid_features.shape[1] != c.feature_channels):
            shape = list(grid_features.shape) if isinstance(grid_features, torch.Tensor) else \
                type(grid_features).__name__
            raise ValueError(f"SOHO: grid_features must be a floating [B, {c.feature_channels}, h, w] feature map, "
                             f"got {shape}")
        rows, cols = grid_features.shape[2] // c.pool_size, grid_features.shape[3] // c.pool_size
        if rows == 0 or cols == 0:
            raise ValueError(f"SOHO: a {grid_features.shape[2]}x{grid_features.shape[3]} feature map has no cell "
                             f"after pooling by {c.pool_size}")
        check_batch("SOHO", input_ids=input_ids, grid_features=grid_features, attention_mask=attention_mask,
                    grid_mask=grid_mask, mlm_labels=mlm_labels, itm_labels=itm_labels)
        if mlm_labels is not None and mlm_labels.shape != input_ids.shape:
            raise ValueError(f"SOHO: mlm_labels must have input_ids' shape {list(input_ids.shape)}, "
                             f"got {list(mlm_labels.shape)}")
        if itm_labels is not None:
            if itm_labels.dim() != 1 or itm_labels.is_floating_point():
                raise ValueError(f"SOHO: itm_labels must be an integer [B] tensor, got {itm_labels.dtype} "
                                 f"{list(itm_labels.shape)}")
            if itm_labels.numel() and not torch.compiler.is_compiling():
                low, high = (int(v) for v in torch.aminmax(itm_labels))
                if low < 0 or high > 1:
                    raise ValueError(f"SOHO: itm_labels must be 0 or 1, got values in [{low}, {high}]")
        text_mask = as_bool_mask("SOHO", "attention_mask", attention_mask, input_ids.shape)
        cells = as_bool_mask("SOHO", "grid_mask", grid_mask, (grid_features.shape[0], *grid_features.shape[2:]))
        return text_mask, cells

    # -- visual tokens ---------------------------------------------------------------------------
    def _pooled_cells(self, grid_features: torch.Tensor, grid_mask: Optional[torch.Tensor]):
        """[B, C, h, w] (+ [B, h, w] mask) -> cells [B, h', w', C] and real [B, h', w'] bool."""
        p = self.config.pool_size
        pooled = F.max_pool2d(grid_features, p, stride=p) if p > 1 else grid_features
        rows, cols = pooled.shape[2:]
        if grid_mask is None:
            real = torch.ones(pooled.shape[0], rows, cols, dtype=torch.bool, device=pooled.device)
        else:  # nearest-neighbour resize: the top-left input cell of each pooled cell
            real = grid_mask[:, ::p, ::p][:, :rows, :cols]
        return pooled.permute(0, 2, 3, 1), real

    def _visual_tokens(self, grid_features, grid_mask, mvm: bool, generator) -> ModelOutput:
        cells, real = self._pooled_cells(grid_features, grid_mask)
        batch, rows, cols, _ = cells.shape
        projected = self.visual_projection(cells)  # [B, h', w', D]
        quantized, index = self.dictionary(projected, real)
        quantized = self.quantized_projection(quantized)
        if self.mix_gate is not None:
            weights = torch.softmax(self.mix_gate(torch.cat([quantized, projected], dim=-1)), dim=-1)
            mixed = weights[..., :1] * quantized + weights[..., 1:] * projected
        else:
            mixed = quantized + projected
        real, index = real.flatten(1), index.flatten(1)
        out = ModelOutput(visual_mask=real, visual_index=index.masked_fill(~real, IGNORE_INDEX))
        mixed = mixed.flatten(1, 2)  # [B, L, D]
        if mvm:
            out.mvm_mask, out.mvm_labels = mvm_mask(index, real, self.config.mvm_probability, generator)
            mixed = torch.where(out.mvm_mask[..., None], embedding_row(self.mask_embedding, 0).to(mixed.dtype), mixed)
        position = sine_position_embedding(real.view(batch, rows, cols), self.config.hidden_size).flatten(1, 2)
        out.tokens = self.visual_norm(mixed + position.to(mixed.dtype))
        return out

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, grid_features: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, grid_mask: Optional[torch.Tensor] = None, *,
                mlm_labels: Optional[torch.Tensor] = None, itm_labels: Optional[torch.Tensor] = None,
                mvm: bool = False, generator: Optional[torch.Generator] = None) -> ModelOutput:
        c = self.config
        text_mask, grid_mask = self._check_inputs(input_ids, grid_features, attention_mask, grid_mask, mlm_labels,
                                                  itm_labels)
        if text_mask is None:
            text_mask = torch.ones_like(input_ids, dtype=torch.bool)
        with self.kernels():
            visual = self._visual_tokens(grid_features, grid_mask, mvm, generator)
            tokens = visual.pop("tokens")
            length = input_ids.shape[1]
            hidden = torch.cat([self.text_embeddings(input_ids), tokens], dim=1)
            mask = torch.cat([text_mask, visual.visual_mask], dim=1)
            for layer in self.layers:
                hidden = layer(hidden, mask)
            out, losses = ModelOutput(last_hidden_state=hidden, text_hidden_state=hidden[:, :length],
                                      visual_hidden_state=hidden[:, length:]), {}
            out.update(visual)
            if mlm_labels is not None:
                out.mlm_logits = F.linear(out.text_hidden_state, self.text_embeddings.word_embeddings.weight)
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if mvm:
                out.mvm_logits = self.dictionary.mvm_logits(out.visual_hidden_state)
                losses["mvm"] = masked_lm_loss(out.mvm_logits, out.mvm_labels)
            if itm_labels is not None:
                out.itm_logits = self.itm_head(hidden[:, 0])
                losses["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels)
            out.set_losses(losses, {"mlm": c.mlm_weight, "mvm": c.mvm_weight, "itm": c.itm_weight})
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective: input_ids (15% per-token masked, as SOHO) with
        attention_mask and mlm_labels [B, max_text_len]; grid_features [B, feature_channels,
        grid_rows, grid_cols] with 50% of them taken from another pair (itm_labels 0) and
        grid_mask (the odd samples padded by whole pooled cells, their padding zeroed); mvm=True."""
        c = self.config
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        features = pairs.grid_features(text["input_ids"], c.grid_rows, c.grid_cols, c.feature_channels, generator)
        masked_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                             maskable=text["maskable"], prob=c.mlm_probability, generator=generator)
        image_index, itm_labels = mismatched_pairs(batch_size, generator, c.itm_negative_prob)
        rows, cols = c.grid_rows // c.pool_size, c.grid_cols // c.pool_size
        grid_mask = torch.zeros(batch_size, c.grid_rows, c.grid_cols, dtype=torch.long)
        for b in range(batch_size):
            keep_rows, keep_cols = rows, cols
            if b % 2:
                keep_rows = int(torch.randint(max(1, rows // 2), rows + 1, (), generator=generator))
                keep_cols = int(torch.randint(max(1, cols // 2), cols + 1, (), generator=generator))
            grid_mask[b, :keep_rows * c.pool_size, :keep_cols * c.pool_size] = 1
        batch = {"input_ids": masked_ids, "attention_mask": text["attention_mask"],
                 "grid_features": features[image_index] * grid_mask[:, None], "grid_mask": grid_mask,
                 "mlm_labels": mlm_labels, "itm_labels": itm_labels, "mvm": True}
        return to_device(batch, device)
