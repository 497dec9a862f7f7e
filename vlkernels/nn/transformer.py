"""Transformer building blocks the reference models share, over the vlkernels attention op.

- :class:`Mlp`: timm's / ViT's feed-forward, ``fc2(act(fc1(x)))``.
- :class:`PreLNBlock`: the ViT block (ViLT, SimVLM, SOHO's fusion stack): pre-LN attention
  and MLP with residuals; loads timm ``Block`` state dicts (``attn.qkv`` / ``attn.proj``).
- :class:`BertLayer`: the BERT encoder layer (post-LN self-attention, optional cross-attention,
  FFN): UNITER, Oscar, VisualBERT, LXMERT's single-stream layers, ViLBERT's text stream.
- :class:`TextEmbeddings`: BERT's word + position + token-type embeddings, LayerNorm, dropout
  (HF ``BertEmbeddings`` key names, so its state dict loads unchanged).
- :class:`Pooler` (tanh on a linear of token 0), :class:`PredictionTransform` (BERT's head
  transform) and :class:`MLMHead` (BERT's prediction head with a decoder tied to the word embeddings).

Masks are bool [B, S] with True = a real token, as in the ops.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from vlkernels.nn.attention import ACTIVATIONS, PostLNAttention, PostLNFeedForward, VLMultiheadAttention


class Mlp(nn.Module):
    """timm's / ViT's MLP: fc2(act(fc1(x))); x [..., D] -> [..., D] (fc1 D -> F, fc2 F -> D)."""

    def __init__(self, dim: int, hidden_dim: int, *, activation: str = "gelu", dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, dim, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(ACTIVATIONS[self.activation](self.fc1(x)))))


class PreLNBlock(nn.Module):
    """The ViT block (timm ``Block``):

        x = x + dropout(attn(norm1(x)))        x = x + mlp(norm2(x))

    forward(x [B, S, D], key_padding_mask [B, S] bool (True = real token) = None, *,
            causal=False, prefix_len=None) -> [B, S, D]
    ``prefix_len`` (int or [B]) gives SimVLM's prefix-LM mask: bidirectional over the first
    prefix_len tokens, causal after. A timm state dict (``attn.qkv.*``, ``attn.proj.*``) loads
    into ``attn.in_proj_*`` / ``attn.out_proj.*``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, eps: float = 1e-6, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation: str = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=eps, **factory)
        self.attn = VLMultiheadAttention(dim, heads, dropout=attention_dropout, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **factory)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation=activation, dropout=dropout, **factory)
        self.dropout = nn.Dropout(dropout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # timm names the fused projection qkv and the output proj.
        for timm_name, name in (("attn.qkv.", "attn.in_proj_"), ("attn.proj.", "attn.out_proj.")):
            for part in ("weight", "bias"):
                if prefix + timm_name + part in state_dict:
                    state_dict[prefix + name + part] = state_dict.pop(prefix + timm_name + part)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, *, causal: bool = False,
                prefix_len: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, causal=causal,
                                       prefix_len=prefix_len))
        return x + self.mlp(self.norm2(x))


class BertLayer(nn.Module):
    """The BERT encoder layer (HF ``BertLayer``), post-LN:

        x = attention(x)  [= norm(x + dropout(self_attn(x)))]
        x = crossattention(x, context)   (when built with cross_attention=True)
        x = feed_forward(x)

    forward(x [B, S, D], key_padding_mask [B, S] bool = None, *, context [B, Sc, D] = None,
            context_mask [B, Sc] bool = None) -> [B, S, D]
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, *, dropout: float = 0.1,
                 attention_dropout: float = 0.0, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 cross_attention: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        block = dict(dropout=dropout, attention_dropout=attention_dropout, layer_norm_eps=layer_norm_eps, **factory)
        self.attention = PostLNAttention(hidden, heads, **block)
        self.crossattention = PostLNAttention(hidden, heads, **block) if cross_attention else None
        self.feed_forward = PostLNFeedForward(hidden, intermediate, dropout=dropout, activation=activation,
                                              layer_norm_eps=layer_norm_eps, **factory)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, *,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attention(x, key_padding_mask=key_padding_mask)
        if self.crossattention is not None:
            if context is None:
                raise ValueError("BertLayer: a layer with cross-attention needs a context")
            x = self.crossattention(x, context, key_padding_mask=context_mask)
        return self.feed_forward(x)

    def load_hf_state_dict(self, state_dict):
        """Load an HF ``BertLayer`` state dict (``attention.*``, ``crossattention.*``,
        ``intermediate.*``, ``output.*``)."""
        def part(prefix):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

        self.attention.load_hf_state_dict(part("attention."))
        if self.crossattention is not None:
            self.crossattention.load_hf_state_dict(part("crossattention."))
        self.feed_forward.load_hf_state_dict({k: v for k, v in state_dict.items()
                                              if k.startswith(("intermediate.", "output."))})


class TextEmbeddings(nn.Module):
    """BERT's text embeddings (HF ``BertEmbeddings`` keys: ``word_embeddings``,
    ``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``):

        LayerNorm(word[input_ids] + position[0..S) + token_type[token_type_ids]), then dropout

    forward(input_ids [B, S] int, token_type_ids [B, S] int = zeros) -> [B, S, D]
    """

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int = 2, *,
                 pad_token_id: int = 0, layer_norm_eps: float = 1e-12, dropout: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(max_positions, hidden, **factory)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden, **factory)
        self.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps, **factory)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"TextEmbeddings: input_ids must be [B, S], got {list(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"TextEmbeddings: {length} tokens exceed the {self.position_embeddings.num_embeddings} "
                             "positions this model has")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(x[:, 0])); x [B, S, D] -> [B, D] (HF key ``dense``)."""

    def __init__(self, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class PredictionTransform(nn.Module):
    """BERT's head transform LayerNorm(act(dense(x))) (HF keys ``dense``, ``LayerNorm``); x [..., D] -> [..., D]."""

    def __init__(self, hidden: int, *, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"PredictionTransform: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.dense = nn.Linear(hidden, hidden, device=device, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(ACTIVATIONS[self.activation](self.dense(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head (HF ``BertLMPredictionHead`` keys ``transform.dense``,
    ``transform.LayerNorm``, ``decoder``, ``bias``):

        logits = decoder(LayerNorm(act(dense(x)))) + bias

    forward(x [..., D]) -> [..., V]. Pass ``word_embeddings`` to tie the decoder weight to it.
    """

    def __init__(self, hidden: int, vocab_size: int, *, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 word_embeddings: Optional[nn.Embedding] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.transform = PredictionTransform(hidden, activation=activation, layer_norm_eps=layer_norm_eps, **factory)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False, **factory)
        if word_embeddings is not None:
            self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(vocab_size, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias
