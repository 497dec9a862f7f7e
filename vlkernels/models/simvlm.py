"""SimVLM: one Transformer trained with a prefix language model over image patches + text.

Follows SPEC "SimVLM" (paper arXiv 2108.10904; no code release):
- Loss -sum_{t >= Tp} log P(x_t | x_[Tp, t), x_<Tp), averaged over the predicted text tokens.
  The prefix is the image tokens plus the first ``text_prefix_len`` text tokens (image tokens
  always in the prefix, Tp >= Ti); in pretraining the text prefix length is drawn per sample.
- Mask: bidirectional among the prefix positions, causal over the suffix, every suffix position
  sees the whole prefix (the attention op's ``prefix_len`` [B]).

This is the decoder-only form of PrefixLM over the joint sequence [image patches, text]: one
stack of pre-LN ViT blocks (``vlkernels.nn.PreLNBlock``) whose attention mask makes the prefix
an encoder and the suffix a decoder. The paper's model is an encoder-decoder (prefix in the
encoder, suffix in the decoder with cross-attention); the decoder-only form computes the same
kind of factorisation with shared weights for both parts. The image side is a patch embedding
on pixels plus a learned position embedding (SimVLM's first ResNet stages are not built).
The LM head is tied to the word embeddings.

Choices the paper leaves open (documented here): text [CLS] (BERT ids in the synthetic data)
serves as the beginning-of-text token and is always in the prefix when the prefix length is
drawn; the drawn text prefix length is uniform over [1, L - 1] for a text of L real tokens, so
at least one token is predicted; learned position embeddings for text and image; a final
LayerNorm before the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from vlkernels.models.common import (
    IGNORE_INDEX, ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_fixed_size_pixels, check_text,
    masked_lm_loss,
)
from vlkernels.models.synthetic import PAD, SyntheticPairs, to_device
from vlkernels.nn import PreLNBlock
from vlkernels.nn.patch_embed import project_patches


@dataclass
class SimVLMConfig:
    """SimVLM's sizes (base: ViT-B-like 768 hidden, 12 layers, 12 heads, images 224 / patch 16)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    max_text_len: int = 64
    layer_norm_eps: float = 1e-6
    dropout: float = 0.1
    attention_dropout: float = 0.0  # on the attention probabilities (the paper states none; in the attention op)
    initializer_range: float = 0.02

    @classmethod
    def base(cls) -> "SimVLMConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SimVLMConfig":
        """For tests: 2 layers, 32 hidden, 2 heads, 32x32 images of 16x16 patches, 12 text tokens."""
        return cls(vocab_size=160, hidden_size=32, num_layers=2, num_heads=2, image_size=32, patch_size=16,
                   max_text_len=12, dropout=0.0)


class SimVLM(PretrainingModel):
    """SimVLM as a decoder-only prefix LM (see the module docstring).

    forward(input_ids [B, S], pixel_values [B, C, H, W] = None, attention_mask [B, S] = None, *,
            labels [B, S] = None, text_prefix_len: int | [B] int tensor = None)
      input_ids: text ids, 1 <= S <= max_text_len; attention_mask: 1 / True = real token.
      pixel_values: images of exactly image_size x image_size; None: a text-only prefix LM.
      labels: the target ids, aligned with input_ids (usually input_ids with -100 on padding);
        the loss predicts labels[:, t] for every t >= text_prefix_len with labels != -100.
      text_prefix_len: text tokens in the prefix, in [0, S]; None: drawn per sample with torch's
        global RNG, uniform over [1, L_b - 1] (L_b = real tokens of sample b, at least 1) when
        labels are given, else 1 (image + the first text token: captioning).
    returns ModelOutput:
      last_hidden_state [B, N + S, D] (N image patches, then the text), image_hidden_state
      [B, N, D], text_hidden_state [B, S, D];
      lm_logits [B, S, V]: lm_logits[:, t] is the distribution of text token t + 1 (it sees the
        prefix and the text up to t; meaningful for t + 1 >= text_prefix_len);
      text_prefix_len [B], prefix_len [B] (= N + text_prefix_len, the attention's prefix);
      with labels: losses {"prefix_lm"} and loss (weight 1).
    """

    def __init__(self, config: SimVLMConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"SimVLM: image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        d = c.hidden_size
        self.num_patches = (c.image_size // c.patch_size) ** 2
        # The patch projection lives in a Conv2d (timm's key patch_embed.proj); the fused op reads it.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c.num_channels, d, kernel_size=c.patch_size, stride=c.patch_size)
        self.image_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d))
        self.word_embeddings = nn.Embedding(c.vocab_size, d, padding_idx=PAD)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, c.max_text_len, d))
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(d, c.num_heads, c.mlp_ratio, eps=c.layer_norm_eps, dropout=c.dropout,
                       attention_dropout=c.attention_dropout)
            for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(d, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        for parameter in (self.image_pos_embed, self.text_pos_embed):
            nn.init.trunc_normal_(parameter, std=c.initializer_range)
        self.lm_head.weight = self.word_embeddings.weight  # tied after the initialisation

    def tied_weights(self) -> dict:
        return {"lm_head.weight": "word_embeddings.weight"}

    def _init_weights(self, module: nn.Module) -> None:
        # ViT / BERT initialisation: N(0, initializer_range) for Linear and Embedding weights, zero biases.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.weight[module.padding_idx])

    # -- inputs ----------------------------------------------------------------------------------
    def _text_prefix_len(self, text_prefix_len, text_mask: Optional[torch.Tensor], labels, batch: int,
                         length: int, device) -> torch.Tensor:
        """The [B] int64 text prefix lengths: given (checked to lie in [0, S]) or drawn."""
        if text_prefix_len is None:
            if labels is None:
                return torch.ones(batch, dtype=torch.long, device=device)
            real = text_mask.sum(1) if text_mask is not None else torch.full((batch,), length, device=device)
            # uniform over [1, real - 1]; a text of one token keeps it as the prefix (nothing predicted)
            offset = (torch.rand(batch, device=device) * (real - 1).clamp_min(0)).long()
            return 1 + torch.minimum(offset, (real - 2).clamp_min(0))
        if isinstance(text_prefix_len, int) and not isinstance(text_prefix_len, bool):
            text_prefix_len = torch.full((batch,), text_prefix_len, dtype=torch.long, device=device)
        if (not isinstance(text_prefix_len, torch.Tensor) or text_prefix_len.is_floating_point()
                or text_prefix_len.shape != (batch,)):
            shape = list(text_prefix_len.shape) if isinstance(text_prefix_len, torch.Tensor) else text_prefix_len
            raise ValueError(f"SimVLM: text_prefix_len must be an int or an integer [{batch}] tensor, got {shape}")
        if batch and (int(text_prefix_len.min()) < 0 or int(text_prefix_len.max()) > length):
            raise ValueError(f"SimVLM: text_prefix_len must lie in [0, {length}] (the text length), "
                             f"got [{int(text_prefix_len.min())}, {int(text_prefix_len.max())}]")
        return text_prefix_len.to(device=device, dtype=torch.long)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, *, labels: Optional[torch.Tensor] = None,
                text_prefix_len: Union[int, torch.Tensor, None] = None) -> ModelOutput:
        c = self.config
        check_text("SimVLM", input_ids, c.max_text_len, c.vocab_size)
        if input_ids.shape[1] < 1:
            raise ValueError("SimVLM: input_ids needs at least one token")
        if pixel_values is not None:
            check_fixed_size_pixels("SimVLM", pixel_values, c.num_channels, c.image_size)
        batch = check_batch("SimVLM", input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            labels=labels)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"SimVLM: labels must have input_ids' shape {list(input_ids.shape)}, "
                             f"got {list(labels.shape)}")
        text_mask = as_bool_mask("SimVLM", "attention_mask", attention_mask, input_ids.shape)
        length, device = input_ids.shape[1], input_ids.device
        text_prefix = self._text_prefix_len(text_prefix_len, text_mask, labels, batch, length, device)

        with self.kernels():
            text = self.word_embeddings(input_ids) + self.text_pos_embed[:, :length]
            x, mask, image_len = text, text_mask, 0
            if pixel_values is not None:
                image = project_patches("SimVLM.patch_embed", self.patch_embed.proj, pixel_values,
                                        pos_embed=self.image_pos_embed)
                image_len = image.shape[1]
                x = torch.cat([image, text], 1)
                if mask is not None:
                    mask = torch.cat([torch.ones(image.shape[:2], dtype=torch.bool, device=device), mask], 1)
            x = self.embed_dropout(x)
            prefix_len = image_len + text_prefix
            for block in self.blocks:
                x = block(x, mask, prefix_len=prefix_len)
            x = self.norm(x)
            out = ModelOutput(last_hidden_state=x, image_hidden_state=x[:, :image_len],
                              text_hidden_state=x[:, image_len:], text_prefix_len=text_prefix, prefix_len=prefix_len)
            out.lm_logits = self.lm_head(out.text_hidden_state)
            if labels is not None:
                # Token t is predicted (from position t - 1) when it lies in the suffix.
                targets = labels[:, 1:]
                in_suffix = torch.arange(1, length, device=device)[None, :] >= text_prefix[:, None]
                targets = torch.where(in_suffix, targets, torch.full_like(targets, IGNORE_INDEX))
                out.losses = {"prefix_lm": masked_lm_loss(out.lm_logits[:, :-1], targets)}
                out.loss = out.losses["prefix_lm"]
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs for the prefix-LM objective: input_ids, attention_mask [B, max_text_len],
        pixel_values [B, C, image_size, image_size] (unpadded), labels (input_ids, -100 on padding).
        The text prefix lengths are drawn inside forward."""
        c = self.config
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        images = pairs.images(text["input_ids"], c.image_size, c.image_size, c.patch_size, c.num_channels,
                              generator, pad=False)
        labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, IGNORE_INDEX)
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": images["pixel_values"], "labels": labels}
        return to_device(batch, device)
