"""ViLT: one single-stream Transformer over word embeddings and raw image patches (no region
detector, no CNN), pretrained with masked language modeling, image-text matching and
word-patch alignment.

Follows SPEC "ViLT" (dandelin/ViLT, vilt/modules/vilt_module.py + vision_transformer.py) and
the HuggingFace ``ViltModel`` layout (SPEC "HuggingFace transformers module names"):
- Text: BERT embeddings (``vlkernels.nn.TextEmbeddings``: word + position + token type,
  LayerNorm eps 1e-12, dropout); the position table has max_text_len (40) entries.
- Image (ViLT's variable-size ``visual_embed``, ``vlkernels.ops.vilt_patches``): the padded
  pixel batch is cut into patches (Conv2d(3, D, 32, stride 32) for ViT-B/32; one fused
  ``vlkernels.ops.patch_embed`` that also adds each image's position embedding). Each image's
  valid patch grid (h, w) comes from its pixel mask (``valid_patch_grid``); the ViT position
  grid (image_size / patch_size square, 12x12 at 384 / 32) is resized bilinearly
  (align_corners=True) to (h, w) and zero-padded (``interpolate_pos_embed``); then
  ``vilt_visual_embed`` keeps L patches per image (max_image_len 200 in pretraining, <= 0 = no
  cap): images with >= L valid patches get L sampled without replacement, the others all of
  theirs plus pad patches sampled with replacement (masked out); the [CLS] token (+ its position
  entry) goes first; dropout. ``patch_sampling`` (``vlkernels.ops.vilt_patches``): "static"
  (the default) keeps L = min(patch grid size, max_image_len) by tensor ops, so the model
  compiles in one graph under ``torch.compile(dynamic=True, fullgraph=True)``; it is ViLT's L
  whenever an image fills the batch's grid (ViLT's collate pads to the largest image), else the
  extra tokens are masked pad patches. "vilt" keeps ViLT's data-dependent L = min(largest valid
  count, max_image_len) with ViLT's / HF's exact draws (eager; ``from_hf`` picks it).
- Modality (token type) embedding added to every token: 0 text, 1 image
  (``image_token_type_idx``, 2 for NLVR2's second image).
- Encoder: [text ; image] through ``num_layers`` pre-LN ViT blocks (``vlkernels.nn.PreLNBlock``,
  LayerNorm eps 1e-6, GELU MLP of 4x width) whose attention masks pad text tokens and pad
  patches as keys; a final LayerNorm; the tanh pooler (``vlkernels.nn.Pooler``) on token 0
  (the text [CLS]).

Objectives (ViLT's pretraining, loss weights mlm 1, itm 1, wpa 0.1):
- ``mlm``: the masked text (15% whole-word masking, BERT 80/10/10: done by the data pipeline,
  ``synthetic_batch`` uses ``common.mask_tokens``) with its own images; BERT's prediction head
  (``vlkernels.nn.MLMHead``, not tied to the word embeddings, as ViLT's ``mlm_score``) on the
  text tokens; cross-entropy over the masked tokens.
- ``itm``: a second pass over the unmasked text with the images of ``itm_image_index`` (half of
  the pairs get another image: ``synthetic.mismatched_pairs``); ViLT's ITM head, Linear(D, 2)
  on the pooled output; cross-entropy against ``itm_labels`` (1 = matched).
- ``wpa``: word-patch alignment on the same ITM pass (``vlkernels.nn.WPALoss``: IPOT with beta
  0.5, 50 iterations, k 1, in fp32, on the text tokens without [CLS] / [SEP] and the image
  tokens without [CLS]): distance of matched pairs minus that of mismatched pairs. ``losses``
  holds it unscaled; ``loss`` adds it times ``wpa_weight`` (0.1; 0 skips it).

HuggingFace parity: ``ViLT.from_hf(vilt_model)`` copies a transformers ``ViltModel`` (or a
``ViltForMaskedLM``, whose ``mlm_score`` maps to the MLM head); ``forward`` takes ViltModel's
keyword inputs and returns its ``last_hidden_state`` and ``pooler_output`` (patch_sampling
"vilt": the patch draws equal HF's under the same ``torch.manual_seed``).

Not implemented: masked patch prediction (dropped from ViLT's final recipe), ViLT's RandAugment
and image resizing (the caller gives padded pixel batches and their masks), the downstream
heads (VQA, NLVR2, retrieval), DeiT backbones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.models.common import (
    ModelOutput, PretrainingModel, as_bool_mask, check_batch, check_text, mask_tokens, masked_lm_loss,
)
from vlkernels.models.synthetic import MASK, PAD, SyntheticPairs, mismatched_pairs, to_device
from vlkernels.nn import MLMHead, PatchEmbed, Pooler, PreLNBlock, TextEmbeddings, VLMultiheadAttention, WPALoss
from vlkernels.nn._submodules import embedding_row
from vlkernels.nn.attention import activation_name
from vlkernels.nn.patch_embed import project_patches
from vlkernels.ops import interpolate_pos_embed, valid_patch_grid, vilt_visual_embed
from vlkernels.ops.vilt_patches import SAMPLINGS
from vlkernels.ops._checks import assert_in_graph


@dataclass
class ViLTConfig:
    """ViLT's sizes. ``image_size`` / ``patch_size`` set the ViT position grid (image_size //
    patch_size square), which is resized to each image; images may have any size (at least
    one patch). ``max_text_len`` is also the size of the text position table."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # a vlkernels.nn.attention.ACTIVATIONS name
    max_text_len: int = 40
    type_vocab_size: int = 2  # BERT's segment ids inside the text embeddings
    modality_type_vocab_size: int = 2  # the modality embedding: 0 text, 1 image (3: NLVR2's second image)
    pad_token_id: Optional[int] = PAD
    image_size: int = 384
    patch_size: int = 32
    num_channels: int = 3
    max_image_len: int = 200  # patch tokens per image; <= 0 = keep all valid patches
    # "static": min(grid size, max_image_len) tokens by tensor ops (one graph under torch.compile);
    # "vilt": ViLT's data-dependent count and HF's exact draws under one seed (eager parity)
    patch_sampling: str = "static"
    layer_norm_eps: float = 1e-6  # the ViT blocks, the final norm (timm's ViT)
    text_layer_norm_eps: float = 1e-12  # BERT's embeddings and MLM head
    qkv_bias: bool = True
    dropout: float = 0.1  # ViLT's drop_rate: embeddings, block outputs, MLP
    attention_dropout: float = 0.0  # ViLT's attn_drop_rate (0; in the attention op when set)
    initializer_range: float = 0.02
    tie_mlm_decoder: bool = False  # ViLT's MLM decoder has its own weight (HF's ViltForMaskedLM ties it)
    mlm_probability: float = 0.15
    itm_negative_prob: float = 0.5
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    wpa_weight: float = 0.1

    @classmethod
    def base(cls) -> "ViLTConfig":
        """ViLT-B/32: ViT-B/32 at 384 (768 hidden, 12 layers, 12 heads), bert-base-uncased
        vocabulary, max_text_len 40, max_image_len 200."""
        return cls()

    @classmethod
    def tiny(cls) -> "ViLTConfig":
        """For tests: 2 layers, 32 hidden, 2 heads, 32x32 images of 8x8 patches (a 4x4 grid),
        at most 12 patch tokens per image (so that both of ViLT's sampling branches run)."""
        return cls(vocab_size=160, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128,
                   max_text_len=12, image_size=32, patch_size=8, max_image_len=12, dropout=0.0)

    @classmethod
    def from_hf(cls, hf_config) -> "ViLTConfig":
        """The config of a transformers ``ViltConfig`` (one LayerNorm eps for all norms, as HF
        uses ``layer_norm_eps`` everywhere; its ``max_image_length`` -1 keeps all patches)."""
        image_size, patch_size = hf_config.image_size, hf_config.patch_size
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise ValueError(f"ViLT.from_hf: square int image_size and patch_size are supported, got "
                             f"{image_size!r} and {patch_size!r}")
        max_image_length = hf_config.max_image_length
        activation = hf_config.hidden_act
        if isinstance(activation, str):
            from transformers.activations import ACT2FN

            activation = ACT2FN[activation]
        return cls(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size, hidden_act=activation_name(activation),
            max_text_len=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size, modality_type_vocab_size=hf_config.modality_type_vocab_size,
            pad_token_id=hf_config.pad_token_id, image_size=image_size, patch_size=patch_size,
            num_channels=hf_config.num_channels,
            max_image_len=max_image_length if isinstance(max_image_length, int) else -1, patch_sampling="vilt",
            layer_norm_eps=hf_config.layer_norm_eps, text_layer_norm_eps=hf_config.layer_norm_eps,
            qkv_bias=hf_config.qkv_bias, dropout=hf_config.hidden_dropout_prob,
            attention_dropout=hf_config.attention_probs_dropout_prob, initializer_range=hf_config.initializer_range)


class ViLT(PretrainingModel):
    """ViLT (see the module docstring for the architecture and the SPEC facts).

    forward(input_ids [B, S] = None, attention_mask [B, S] = None, token_type_ids [B, S] = None,
            pixel_values [B, C, H, W] = None, pixel_mask [B, H, W] = None, inputs_embeds [B, S, D] = None,
            image_embeds [B, N, D] = None, image_token_type_idx: int = None,
            output_attentions = None, output_hidden_states = None, return_dict = None, *,
            mlm_input_ids [B, S] = None, mlm_labels [B, S] = None,
            itm_labels [B] = None, itm_image_index [B] = None)
      The first eleven are ``ViltModel.forward``'s inputs:
      input_ids: token ids, S <= max_text_len (or inputs_embeds: word embeddings, replacing the
        lookup); attention_mask: 1 / True = real token (None: all real); token_type_ids: BERT
        segment ids (None: 0).
      pixel_values: padded images, H and W at least patch_size (a remainder of fewer than
        patch_size pixels is ignored, as the strided convolution does); pixel_mask: 1 = real
        pixel (None: all real). Or image_embeds: ready image tokens (no [CLS], position
        embedding or sampling added; pixel_mask then gives their mask, [B, N] or any shape
        that flattens to it).
      image_token_type_idx: the modality id of the image tokens (None: 1).
      output_hidden_states: also return hidden_states (the embeddings and each block's
        output, before the final norm). output_attentions=True is refused (the attention
        kernels do not form the probabilities); return_dict=False is refused (a ModelOutput is
        always returned).
      mlm_labels: original ids at the masked positions, -100 elsewhere (MLM objective); the MLM
        pass reads mlm_input_ids (the masked text) or, when None, input_ids, with the batch's
        own images.
      itm_labels: 1 = the text matches the image of its ITM pair, 0 = not (ITM and WPA
        objectives); itm_image_index: the image (index into the batch) each text is paired
        with in the ITM pass over input_ids; None = the images as given.
      Objectives need input_ids and pixel_values.
    returns ModelOutput:
      the pass over the given inputs (always without objectives; with them when an objective's
      pass is that pass: no mlm_input_ids, or no itm_image_index):
        last_hidden_state [B, S + 1 + L, D] (text, then image [CLS] and L patch tokens),
        pooler_output [B, D], text_hidden_state [B, S, D], image_hidden_state [B, 1 + L, D],
        image_mask [B, 1 + L] bool (False = pad patch), patch_index [B, L, 2] (row, col of each
        patch token; absent with image_embeds), hidden_states (with output_hidden_states, without
        objectives);
      mlm: mlm_logits [B, S, V]; itm: itm_logits [B, 2];
      losses {"mlm", "itm", "wpa"} (those whose labels were given; "wpa" unscaled) and loss =
      mlm_weight * mlm + itm_weight * itm + wpa_weight * wpa.
    Patch sampling draws from torch's default generator of the pixels' device ("static"), or
    from the global CPU generator exactly as ViLT and HF do ("vilt").
    """

    def __init__(self, config: ViLTConfig, use_kernels: bool = True) -> None:
        super().__init__(config, use_kernels)
        c = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"ViLT: hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        if c.image_size < c.patch_size:
            raise ValueError(f"ViLT: image_size {c.image_size} is smaller than patch_size {c.patch_size}")
        if c.patch_sampling not in SAMPLINGS:
            raise ValueError(f"ViLT: patch_sampling must be one of {', '.join(map(repr, SAMPLINGS))}, "
                             f"got {c.patch_sampling!r}")
        d = c.hidden_size
        self.grid = c.image_size // c.patch_size  # the side of the square ViT position grid
        self.text_embeddings = TextEmbeddings(c.vocab_size, d, c.max_text_len, c.type_vocab_size,
                                              pad_token_id=c.pad_token_id, layer_norm_eps=c.text_layer_norm_eps,
                                              dropout=c.dropout)
        self.token_type_embeddings = nn.Embedding(c.modality_type_vocab_size, d)
        # PatchEmbed holds the projection (timm key patch_embed.proj); forward calls the fused op
        # directly, which also adds the per-image position embedding.
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.num_channels, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))
        self.pos_drop = nn.Dropout(c.dropout)
        # + 0.5 so that PreLNBlock's int(dim * ratio) gives exactly intermediate_size.
        mlp_ratio = (c.intermediate_size + 0.5) / d
        self.blocks = nn.ModuleList(
            PreLNBlock(d, c.num_heads, mlp_ratio, eps=c.layer_norm_eps, dropout=c.dropout,
                       attention_dropout=c.attention_dropout, activation=c.hidden_act)
            for _ in range(c.num_layers))
        if not c.qkv_bias:
            for block in self.blocks:
                # No q/k/v bias, but out_proj keeps its bias: a zero buffer in place of the parameter.
                del block.attn.in_proj_bias
                block.attn.register_buffer("in_proj_bias", torch.zeros(3 * d), persistent=False)
        self.norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.pooler = Pooler(d)
        self.mlm_score = MLMHead(d, c.vocab_size, activation=c.hidden_act, layer_norm_eps=c.text_layer_norm_eps,
                                 word_embeddings=self.text_embeddings.word_embeddings if c.tie_mlm_decoder else None)
        self.itm_score = nn.Linear(d, 2)
        self.wpa_loss = WPALoss(weight=1.0)  # scaled by wpa_weight in the total
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=c.initializer_range)
        nn.init.trunc_normal_(self.pos_embed, std=c.initializer_range)

    def derived_buffers(self) -> dict:
        # qkv_bias=False: the zero q/k/v bias buffers (not in ViLT's checkpoints).
        if self.config.qkv_bias:
            return {}
        zeros = torch.zeros(3 * self.config.hidden_size)
        return {f"blocks.{i}.attn.in_proj_bias": zeros for i in range(len(self.blocks))}

    def tied_weights(self) -> dict:
        if not self.config.tie_mlm_decoder:
            return {}
        return {"mlm_score.decoder.weight": "text_embeddings.word_embeddings.weight"}

    def _init_weights(self, module: nn.Module) -> None:
        # ViLT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms
        # (the patch projection keeps torch's Conv2d default, as in ViLT's timm ViT).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VLMultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=std)
            if isinstance(module.in_proj_bias, nn.Parameter):
                nn.init.zeros_(module.in_proj_bias)

    # -- inputs ----------------------------------------------------------------------------------
    def _check_pixels(self, pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """pixel_values [B, C, H, W] with C = num_channels and H, W >= patch_size; returns the
        pixel mask (all ones when None) after checking its shape [B, H, W]."""
        c = self.config
        if (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4
                or not pixel_values.is_floating_point() or pixel_values.shape[1] != c.num_channels):
            shape = list(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"ViLT: pixel_values must be a floating [B, {c.num_channels}, H, W] tensor, got {shape}")
        if pixel_values.shape[2] < c.patch_size or pixel_values.shape[3] < c.patch_size:
            raise ValueError(f"ViLT: images of {pixel_values.shape[2]}x{pixel_values.shape[3]} pixels are smaller "
                             f"than one {c.patch_size}x{c.patch_size} patch")
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            return torch.ones(batch, height, width, dtype=torch.long, device=pixel_values.device)
        return as_bool_mask("ViLT", "pixel_mask", pixel_mask, (batch, height, width))

    def _check_index(self, name: str, tensor: torch.Tensor, batch: int, high: int) -> None:
        if tensor.shape != (batch,) or tensor.is_floating_point():
            raise ValueError(f"ViLT: {name} must be an integer [{batch}] tensor, got "
                             f"{tensor.dtype} {list(tensor.shape)}")
        if torch.compiler.is_compiling():  # a host read would break the graph: assert in it instead
            # The message names no bound: formatting a symbolic batch size would specialise it.
            bound = "2" if name == "itm_labels" else "the batch size"
            assert_in_graph(((tensor >= 0) & (tensor < high)).all(), f"ViLT: {name} must lie in [0, {bound})")
            return
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= high):
            raise ValueError(f"ViLT: {name} must lie in [0, {high}), got [{int(tensor.min())}, {int(tensor.max())}]")

    # -- embeddings and encoder ------------------------------------------------------------------
    def _embed_text(self, input_ids: Optional[torch.Tensor], token_type_ids: Optional[torch.Tensor],
                    inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """BERT embeddings [B, S, D] of input_ids, or of the given word embeddings."""
        if inputs_embeds is None:
            return self.text_embeddings(input_ids, token_type_ids)
        text = self.text_embeddings
        length = inputs_embeds.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        positions = torch.arange(length, device=inputs_embeds.device)
        # HF's order of the sums (word + token type, then + position).
        x = inputs_embeds + text.token_type_embeddings(token_type_ids) + text.position_embeddings(positions)
        return text.dropout(text.LayerNorm(x))

    def _image_grid(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        """The patch grid (rows, cols) and each image's valid patches: (patch_mask [B, rows*cols]
        bool, valid_hw [B, 2])."""
        rows, cols = pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size
        patch_mask, valid_hw = valid_patch_grid(pixel_mask, (rows, cols))
        if torch.compiler.is_compiling():  # a host read would break the graph: assert in it instead
            assert_in_graph(patch_mask.any(dim=1).all(), "ViLT: an image has no valid patch (its pixel_mask is "
                                                         "all padding at the patch grid's resolution)")
            return (rows, cols), patch_mask, valid_hw
        empty = (~patch_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"ViLT: images {empty} have no valid patch (their pixel_mask is all padding at the "
                             f"patch grid's resolution)")
        return (rows, cols), patch_mask, valid_hw

    def _embed_image(self, pixel_values: torch.Tensor, grid, patch_mask: torch.Tensor, valid_hw: torch.Tensor):
        """ViLT's visual_embed: (tokens [B, 1 + L, D], mask [B, 1 + L] bool, patch_index [B, L, 2])."""
        (rows, cols), p, d = grid, self.config.patch_size, self.config.hidden_size
        proj = self.patch_embed.proj
        # The strided convolution ignores a remainder of fewer than p pixels; the op wants whole patches.
        pixels = pixel_values[:, :, :rows * p, :cols * p].to(proj.weight.dtype)
        pos_grid = self.pos_embed[:, 1:].transpose(1, 2).reshape(1, d, self.grid, self.grid)
        pos = interpolate_pos_embed(pos_grid, valid_hw, (rows, cols))  # [B, rows*cols, D]
        patches = project_patches("ViLT.patch_embed", proj, pixels, pos_embed=pos)
        tokens = vilt_visual_embed(patches, patch_mask, (rows, cols), self.cls_token, self.config.max_image_len,
                                   cls_pos=self.pos_embed[:, :1], valid_hw=valid_hw,
                                   sampling=self.config.patch_sampling)
        return self.pos_drop(tokens.embeddings), tokens.mask, tokens.patch_index

    def _encode(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor,
                image_token_type: int = 1, keep_hidden_states: bool = False) -> ModelOutput:
        """The single stream over [text + modality 0 ; image + modality image_token_type]."""
        types = self.token_type_embeddings
        x = torch.cat([text + embedding_row(types, 0), image + embedding_row(types, image_token_type)], dim=1)
        mask = torch.cat([text_mask, image_mask], dim=1)
        hidden_states = [x]
        for block in self.blocks:
            x = block(x, mask)
            hidden_states.append(x)
        x = self.norm(x)
        out = ModelOutput(last_hidden_state=x, pooler_output=self.pooler(x), text_hidden_state=x[:, :text.shape[1]],
                          image_hidden_state=x[:, text.shape[1]:], image_mask=image_mask)
        if keep_hidden_states:
            out.hidden_states = tuple(hidden_states)
        return out

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                pixel_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, image_token_type_idx: Optional[int] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, *, mlm_input_ids: Optional[torch.Tensor] = None,
                mlm_labels: Optional[torch.Tensor] = None, itm_labels: Optional[torch.Tensor] = None,
                itm_image_index: Optional[torch.Tensor] = None) -> ModelOutput:
        c = self.config
        if output_attentions:
            raise ValueError("ViLT: output_attentions is not supported (the attention kernels do not form the "
                             "attention probabilities)")
        if return_dict is False:
            raise ValueError("ViLT: return_dict=False is not supported; the model returns a ModelOutput")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ViLT: give exactly one of input_ids and inputs_embeds")
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("ViLT: give exactly one of pixel_values and image_embeds")
        objectives = mlm_labels is not None or itm_labels is not None
        if objectives and (input_ids is None or pixel_values is None):
            raise ValueError("ViLT: the mlm, itm and wpa objectives need input_ids and pixel_values")
        if itm_image_index is not None and itm_labels is None:
            raise ValueError("ViLT: itm_image_index is given without itm_labels")
        if mlm_input_ids is not None and mlm_labels is None:
            raise ValueError("ViLT: mlm_input_ids is given without mlm_labels")
        batch = check_batch("ViLT", input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, pixel_values=pixel_values, image_embeds=image_embeds,
                            pixel_mask=pixel_mask, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels,
                            itm_labels=itm_labels, itm_image_index=itm_image_index)
        image_type = 1 if image_token_type_idx is None else int(image_token_type_idx)
        if not 0 <= image_type < c.modality_type_vocab_size:
            raise ValueError(f"ViLT: image_token_type_idx must lie in [0, {c.modality_type_vocab_size}) "
                             f"(modality_type_vocab_size), got {image_token_type_idx}")

        # Text.
        if input_ids is not None:
            check_text("ViLT", input_ids, c.max_text_len, c.vocab_size)
            text_shape = tuple(input_ids.shape)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or \
                    inputs_embeds.shape[-1] != c.hidden_size or not inputs_embeds.is_floating_point():
                shape = list(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
                raise ValueError(f"ViLT: inputs_embeds must be a floating [B, S, {c.hidden_size}] tensor, got {shape}")
            if inputs_embeds.shape[1] > c.max_text_len:
                raise ValueError(f"ViLT: the text has {inputs_embeds.shape[1]} tokens, more than max_text_len "
                                 f"{c.max_text_len}")
            text_shape = tuple(inputs_embeds.shape[:2])
        text_mask = as_bool_mask("ViLT", "attention_mask", attention_mask, text_shape)
        if text_mask is None:
            text_mask = torch.ones(text_shape, dtype=torch.bool, device=(input_ids if input_ids is not None
                                                                         else inputs_embeds).device)
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != text_shape or token_type_ids.is_floating_point():
                raise ValueError(f"ViLT: token_type_ids must be an integer {list(text_shape)} tensor, got "
                                 f"{token_type_ids.dtype} {list(token_type_ids.shape)}")
            if torch.compiler.is_compiling():  # a host read would break the graph: assert in it instead
                assert_in_graph(((token_type_ids >= 0) & (token_type_ids < c.type_vocab_size)).all(),
                                f"ViLT: token_type_ids must lie in [0, {c.type_vocab_size})")
            elif token_type_ids.numel() and (int(token_type_ids.min()) < 0
                                             or int(token_type_ids.max()) >= c.type_vocab_size):
                raise ValueError(f"ViLT: token_type_ids must lie in [0, {c.type_vocab_size})")

        # Image.
        embeds_mask = None  # bound before encode() closes over it (dynamo cannot read an unbound cell)
        if pixel_values is not None:
            pixel_mask = self._check_pixels(pixel_values, pixel_mask)
            grid, patch_mask, valid_hw = self._image_grid(pixel_values, pixel_mask)
        else:
            if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or \
                    image_embeds.shape[-1] != c.hidden_size or not image_embeds.is_floating_point():
                shape = list(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds)
                raise ValueError(f"ViLT: image_embeds must be a floating [B, N, {c.hidden_size}] tensor, got {shape}")
            if pixel_mask is None:
                embeds_mask = torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=image_embeds.device)
            elif pixel_mask[0].numel() != image_embeds.shape[1]:
                raise ValueError(f"ViLT: with image_embeds, pixel_mask must flatten to [{batch}, "
                                 f"{image_embeds.shape[1]}], got {list(pixel_mask.shape)}")
            else:
                embeds_mask = pixel_mask.flatten(1) != 0

        for name, tensor in (("mlm_input_ids", mlm_input_ids), ("mlm_labels", mlm_labels)):
            if tensor is not None and tuple(tensor.shape) != text_shape:
                raise ValueError(f"ViLT: {name} must have input_ids' shape {list(text_shape)}, "
                                 f"got {list(tensor.shape)}")
        if mlm_input_ids is not None:
            check_text("ViLT", mlm_input_ids, c.max_text_len, c.vocab_size)
        if itm_labels is not None:
            self._check_index("itm_labels", itm_labels, batch, 2)
        if itm_image_index is not None:
            self._check_index("itm_image_index", itm_image_index, batch, batch)

        with self.kernels():
            def encode(ids, image_index=None, keep_hidden_states=False):
                # Text first, then the image: ViLT's (and HF's) order of the random draws.
                text = self._embed_text(ids, token_type_ids, inputs_embeds if ids is None else None)
                if pixel_values is None:
                    return self._encode(text, text_mask, image_embeds, embeds_mask, image_type, keep_hidden_states)
                pixels, patches, hw = pixel_values, patch_mask, valid_hw
                if image_index is not None:
                    pixels, patches, hw = pixels[image_index], patches[image_index], hw[image_index]
                image, image_mask, patch_index = self._embed_image(pixels, grid, patches, hw)
                out = self._encode(text, text_mask, image, image_mask, image_type, keep_hidden_states)
                out.patch_index = patch_index
                return out

            out, losses, plain = ModelOutput(), {}, None
            if mlm_labels is not None:
                fused = encode(input_ids if mlm_input_ids is None else mlm_input_ids)
                plain = fused if mlm_input_ids is None else plain
                out.mlm_logits = self.mlm_score(fused.text_hidden_state)
                losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels)
            if itm_labels is not None:
                fused = encode(input_ids, itm_image_index)
                plain = fused if itm_image_index is None else plain
                out.itm_logits = self.itm_score(fused.pooler_output)
                losses["itm"] = F.cross_entropy(out.itm_logits.float(), itm_labels)
                if c.wpa_weight:
                    losses["wpa"] = self.wpa_loss(fused.text_hidden_state.float(), fused.image_hidden_state.float(),
                                                  text_mask, fused.image_mask, itm_labels)
            if not losses:
                plain = encode(input_ids, keep_hidden_states=bool(output_hidden_states))
            if plain is not None:
                out.update(plain)
            out.set_losses(losses, {"mlm": c.mlm_weight, "itm": c.itm_weight, "wpa": c.wpa_weight})
            return out

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """Synthetic pairs with every objective: input_ids, attention_mask [B, max_text_len],
        pixel_values [B, C, image_size, image_size] with pixel_mask [B, image_size, image_size]
        (odd samples padded to smaller images, as ViLT's collate pads), mlm_input_ids /
        mlm_labels (15% whole-word masking), itm_image_index / itm_labels (50% swapped images)."""
        c = self.config
        pairs = SyntheticPairs(c.vocab_size)
        text = pairs.text(batch_size, c.max_text_len, generator)
        images = pairs.images(text["input_ids"], c.image_size, c.image_size, c.patch_size, c.num_channels,
                              generator, pad=True)
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], vocab_size=c.vocab_size, mask_token_id=MASK,
                                                maskable=text["maskable"], word_ids=text["word_ids"],
                                                prob=c.mlm_probability, generator=generator)
        itm_image_index, itm_labels = mismatched_pairs(batch_size, generator, c.itm_negative_prob)
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": images["pixel_values"], "pixel_mask": images["pixel_mask"],
                 "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
                 "itm_labels": itm_labels, "itm_image_index": itm_image_index}
        return to_device(batch, device)

    # -- HuggingFace -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, use_kernels: bool = True) -> "ViLT":
        """A ViLT with the config and weights of a transformers ``ViltModel`` (or of a
        ``ViltForMaskedLM``: its ``mlm_score`` becomes the MLM head, tied to the word embeddings
        when HF ties it), in hf_model's dtype, device and train/eval mode. Heads HF does not
        have (ITM; MLM for a ViltModel; the pooler of a ViltModel built without one) keep their
        initialisation. Other Vilt* heads: pass their ``.vilt``."""
        mlm_head = getattr(hf_model, "mlm_score", None)
        vilt = hf_model.vilt if mlm_head is not None else hf_model
        if not all(hasattr(vilt, name) for name in ("embeddings", "encoder", "layernorm")) or \
                type(hf_model).__name__ not in ("ViltModel", "ViltForMaskedLM"):
            raise ValueError(f"ViLT.from_hf: expected a transformers ViltModel or ViltForMaskedLM, got "
                             f"{type(hf_model).__name__} (for other Vilt* models pass their .vilt)")
        config = ViLTConfig.from_hf(vilt.config)
        if mlm_head is not None:
            config.tie_mlm_decoder = mlm_head.decoder.weight is vilt.embeddings.text_embeddings.word_embeddings.weight
        weight = vilt.embeddings.patch_embeddings.projection.weight
        model = cls(config, use_kernels=use_kernels).to(device=weight.device, dtype=weight.dtype)
        state = _state_from_hf(vilt, mlm_head)
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = ("itm_score.", "mlm_score.") if mlm_head is None else ("itm_score.",)
        if vilt.pooler is None:
            allowed += ("pooler.",)
        missing = [key for key in missing if not key.startswith(allowed)]
        if missing or unexpected:
            raise ValueError(f"ViLT.from_hf: state mismatch (missing {missing}, unexpected {unexpected})")
        return model.train(hf_model.training)


def _state_from_hf(vilt: nn.Module, mlm_head: Optional[nn.Module]) -> dict:
    """ViLT state-dict entries from an HF ViltModel (and ViltMLMHead)."""
    embeddings = vilt.embeddings
    state = {f"text_embeddings.{k}": v for k, v in embeddings.text_embeddings.state_dict().items()}
    state.update({
        "token_type_embeddings.weight": embeddings.token_type_embeddings.weight,
        "patch_embed.proj.weight": embeddings.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": embeddings.patch_embeddings.projection.bias,
        "cls_token": embeddings.cls_token,
        "pos_embed": embeddings.position_embeddings,
        "norm.weight": vilt.layernorm.weight,
        "norm.bias": vilt.layernorm.bias,
    })
    for i, layer in enumerate(vilt.encoder.layer):
        attention = layer.attention.attention
        prefix = f"blocks.{i}."
        state[prefix + "attn.in_proj_weight"] = torch.cat([attention.query.weight, attention.key.weight,
                                                          attention.value.weight])
        if attention.query.bias is not None:
            state[prefix + "attn.in_proj_bias"] = torch.cat([attention.query.bias, attention.key.bias,
                                                            attention.value.bias])
        for target, source in (("attn.out_proj.", layer.attention.output.dense), ("norm1.", layer.layernorm_before),
                               ("norm2.", layer.layernorm_after), ("mlp.fc1.", layer.intermediate.dense),
                               ("mlp.fc2.", layer.output.dense)):
            state[prefix + target + "weight"] = source.weight
            state[prefix + target + "bias"] = source.bias
    if vilt.pooler is not None:
        state["pooler.dense.weight"] = vilt.pooler.dense.weight
        state["pooler.dense.bias"] = vilt.pooler.dense.bias
    if mlm_head is not None:
        transform = mlm_head.transform
        state.update({
            "mlm_score.transform.dense.weight": transform.dense.weight,
            "mlm_score.transform.dense.bias": transform.dense.bias,
            "mlm_score.transform.LayerNorm.weight": transform.LayerNorm.weight,
            "mlm_score.transform.LayerNorm.bias": transform.LayerNorm.bias,
            "mlm_score.decoder.weight": mlm_head.decoder.weight,
            "mlm_score.bias": mlm_head.decoder.bias if mlm_head.decoder.bias is not None
            else torch.zeros_like(mlm_head.decoder.weight[:, 0]),
        })
    return {key: value.detach() for key, value in state.items()}
