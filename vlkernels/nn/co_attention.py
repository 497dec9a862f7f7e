"""Two-stream co-attention layers of LXMERT, ViLBERT and METER (post-LN, BERT-style), each
running both cross directions in ONE ``co_attention`` launch (forward and backward).

Streams are (text, image) everywhere except LXMERT, which keeps its own names (lang, visn).
Masks are bool [B, S] with True = a real token; a sample whose other stream is fully padded
gets zero cross-attention outputs (finite, zero gradients), not NaN. Dropout: ``dropout`` is
the hidden dropout after each dense projection; ``attention_dropout`` drops attention
probabilities in training, in the attention ops (``dropout_p``, both co-attention directions
in the one launch). The original models train with 0.1 of both.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from vlkernels.nn.attention import (
    PostLNAttention, PostLNFeedForward, activation_name, check_mask, check_stream, co_attend, convert_hf_attention,
    convert_hf_feed_forward, convert_strictly,
)


def _check_streams(module: str, text_name: str, text, text_dim: int, image_name: str, image, image_dim: int,
                   text_mask, image_mask) -> None:
    check_stream(module, text_name, text, text_dim)
    check_stream(module, image_name, image, image_dim, text.shape[0])
    check_mask(module, f"{text_name}_mask", text_mask, text.shape[0], text.shape[1])
    check_mask(module, f"{image_name}_mask", image_mask, image.shape[0], image.shape[1])


def _check_dims(module: str, **dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{module}: {name} must be a positive int, got {value!r}")
    width = "hidden" if "hidden" in dims else "bi_dim"
    if dims[width] % dims["heads"]:
        raise ValueError(f"{module}: {width} ({dims[width]}) must be a multiple of heads ({dims['heads']})")


class LXMERTCrossLayer(nn.Module):
    """LXMERT's cross-modality layer (HF ``LxmertXLayer``; airsplay/lxmert ``LXRTXLayer``):

        lang' = CrossAtt(lang, visn, visn_mask)      visn' = CrossAtt(visn, lang, lang_mask)
        (ONE shared cross-attention block, the same weights in both directions, one launch)
        lang'' = LangSelfAtt(lang', lang_mask)       visn'' = VisnSelfAtt(visn', visn_mask)
        out_lang = LangFFN(lang'')                   out_visn = VisnFFN(visn'')

    each block post-LN: LayerNorm(x + Dropout(sublayer(x))).

    forward(lang [B, Sl, D], visn [B, Sv, D], *, lang_mask [B, Sl] bool, visn_mask [B, Sv] bool)
    -> (lang [B, Sl, D], visn [B, Sv, D]); masks True = real token (HF takes additive masks).

    Submodules: ``cross_attention``, ``lang_self_attention``, ``visn_self_attention``
    (:class:`PostLNAttention`), ``lang_feed_forward``, ``visn_feed_forward``
    (:class:`PostLNFeedForward`). Load HF weights with :meth:`from_hf` / :meth:`load_hf_state_dict`.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, *, dropout: float = 0.1,
                 attention_dropout: float = 0.0, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_dims("LXMERTCrossLayer", hidden=hidden, heads=heads, intermediate=intermediate)
        self.hidden = hidden
        attention = dict(dropout=dropout, attention_dropout=attention_dropout, layer_norm_eps=layer_norm_eps,
                         device=device, dtype=dtype)
        ffn = dict(dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps, device=device, dtype=dtype)
        self.cross_attention = PostLNAttention(hidden, heads, **attention)
        self.lang_self_attention = PostLNAttention(hidden, heads, **attention)
        self.visn_self_attention = PostLNAttention(hidden, heads, **attention)
        self.lang_feed_forward = PostLNFeedForward(hidden, intermediate, **ffn)
        self.visn_feed_forward = PostLNFeedForward(hidden, intermediate, **ffn)

    def forward(self, lang: torch.Tensor, visn: torch.Tensor, *, lang_mask: Optional[torch.Tensor] = None,
                visn_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_streams("LXMERTCrossLayer", "lang", lang, self.hidden, "visn", visn, self.hidden, lang_mask, visn_mask)
        cross = self.cross_attention
        # Shared weights: each stream's q, k, v come from one GEMM with the same in_proj.
        q_l, k_l, v_l = cross.attention.project_qkv(lang)
        q_v, k_v, v_v = cross.attention.project_qkv(visn)
        out_l, out_v = co_attend(q_l, k_l, v_l, q_v, k_v, v_v, text_mask=lang_mask, image_mask=visn_mask,
                                 dropout=cross.attention.dropout, training=self.training)
        lang, visn = cross.residual_output(lang, out_l), cross.residual_output(visn, out_v)
        lang = self.lang_self_attention(lang, key_padding_mask=lang_mask)
        visn = self.visn_self_attention(visn, key_padding_mask=visn_mask)
        return self.lang_feed_forward(lang), self.visn_feed_forward(visn)

    @staticmethod
    def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF ``LxmertXLayer`` state dict -> this module's (q, k, v concatenated; strict)."""
        def convert(sd):
            out = {}
            for source, target in (("visual_attention.", "cross_attention."),
                                   ("lang_self_att.", "lang_self_attention."),
                                   ("visn_self_att.", "visn_self_attention.")):
                inner = "att." if source == "visual_attention." else "self."
                out.update(convert_hf_attention(sd, source + inner, source + "output.dense.", target + "attention.",
                                                norm_prefix=source + "output.LayerNorm."))
            for stream in ("lang", "visn"):
                out.update(convert_hf_feed_forward(sd, f"{stream}_inter.", f"{stream}_output.",
                                                   f"{stream}_feed_forward."))
            return out

        return convert_strictly(state_dict, convert, where="LXMERTCrossLayer.convert_hf_state_dict")

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load an HF ``LxmertXLayer`` state dict (e.g. ``encoder.x_layers.{i}.*`` with the prefix removed)."""
        return self.load_state_dict(self.convert_hf_state_dict(state_dict), strict=True)

    @classmethod
    def from_hf(cls, layer: nn.Module) -> "LXMERTCrossLayer":
        """A copy of an HF ``transformers.LxmertXLayer`` (sizes, dropouts, activation, eps, weights)."""
        attention = layer.visual_attention.att
        weight = attention.query.weight
        copy = cls(attention.query.in_features, attention.num_attention_heads, layer.lang_inter.dense.out_features,
                   dropout=layer.lang_output.dropout.p, attention_dropout=attention.dropout.p,
                   activation=activation_name(layer.lang_inter.intermediate_act_fn),
                   layer_norm_eps=layer.lang_output.LayerNorm.eps, device=weight.device, dtype=weight.dtype)
        copy.load_hf_state_dict(layer.state_dict())
        return copy.train(layer.training)


class ViLBERTCoLayer(nn.Module):
    """ViLBERT's co-TRM connection layer (facebookresearch/vilbert-multi-task
    ``BertConnectionLayer``): bi-attention, then per-stream output and FFN; no self-attention.

        text queries  -> image keys/values (masked by image_mask)   } one co_attention launch,
        image queries -> text keys/values  (masked by text_mask)    } heads of width bi_dim / heads
        text'  = LN(text  + Dropout(text_output(ctx_text)))    [bi_dim -> text_dim]
        image' = LN(image + Dropout(image_output(ctx_image)))  [bi_dim -> image_dim]
        out = (TextFFN(text'), ImageFFN(image'))               post-LN

    Each stream has its own q, k, v projection to bi_dim, in one Linear (``text_qkv``:
    text_dim -> 3 bi_dim, ``image_qkv``: image_dim -> 3 bi_dim; q | k | v rows).

    forward(text [B, St, text_dim], image [B, Si, image_dim], *, text_mask [B, St] bool,
            image_mask [B, Si] bool) -> (text [B, St, text_dim], image [B, Si, image_dim])
    (the original takes and returns (image, text); masks here are True = real token).
    """

    def __init__(self, text_dim: int, image_dim: int, bi_dim: int, heads: int, text_ffn: int, image_ffn: int, *,
                 dropout: float = 0.1, attention_dropout: float = 0.0, activation: str = "gelu",
                 image_activation: Optional[str] = None, layer_norm_eps: float = 1e-12, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_dims("ViLBERTCoLayer", text_dim=text_dim, image_dim=image_dim, bi_dim=bi_dim, heads=heads,
                    text_ffn=text_ffn, image_ffn=image_ffn)
        if not 0.0 <= attention_dropout <= 1.0:
            raise ValueError(f"ViLBERTCoLayer: attention_dropout must be in [0, 1], got {attention_dropout}")
        factory = dict(device=device, dtype=dtype)
        self.text_dim, self.image_dim, self.bi_dim, self.heads = text_dim, image_dim, bi_dim, heads
        self.attention_dropout = attention_dropout
        self.text_qkv = nn.Linear(text_dim, 3 * bi_dim, **factory)
        self.image_qkv = nn.Linear(image_dim, 3 * bi_dim, **factory)
        self.text_output = nn.Linear(bi_dim, text_dim, **factory)
        self.image_output = nn.Linear(bi_dim, image_dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.text_norm = nn.LayerNorm(text_dim, eps=layer_norm_eps, **factory)
        self.image_norm = nn.LayerNorm(image_dim, eps=layer_norm_eps, **factory)
        ffn = dict(dropout=dropout, layer_norm_eps=layer_norm_eps, **factory)
        self.text_feed_forward = PostLNFeedForward(text_dim, text_ffn, activation=activation, **ffn)
        self.image_feed_forward = PostLNFeedForward(image_dim, image_ffn, activation=image_activation or activation,
                                                    **ffn)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)  # [B, S, H, Dh] each
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, text: torch.Tensor, image: torch.Tensor, *, text_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_streams("ViLBERTCoLayer", "text", text, self.text_dim, "image", image, self.image_dim, text_mask,
                       image_mask)
        q_t, k_t, v_t = self._heads(self.text_qkv(text))
        q_i, k_i, v_i = self._heads(self.image_qkv(image))
        ctx_t, ctx_i = co_attend(q_t, k_t, v_t, q_i, k_i, v_i, text_mask=text_mask, image_mask=image_mask,
                                 dropout=self.attention_dropout, training=self.training)
        text = self.text_norm(text + self.dropout(self.text_output(ctx_t.transpose(1, 2).flatten(2))))
        image = self.image_norm(image + self.dropout(self.image_output(ctx_i.transpose(1, 2).flatten(2))))
        return self.text_feed_forward(text), self.image_feed_forward(image)

    @staticmethod
    def convert_vilbert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """vilbert-multi-task ``BertConnectionLayer`` state dict (``encoder.c_layer.{i}.*`` with
        the prefix removed) -> this module's. Stream 1 of the original is the image, stream 2 the
        text; ``biOutput.q_dense*`` (unused by the original forward) is dropped."""
        def convert(sd):
            out = {}
            for stream, index in (("image", 1), ("text", 2)):
                for part in ("weight", "bias"):
                    out[f"{stream}_qkv.{part}"] = torch.cat([sd[f"biattention.{name}{index}.{part}"]
                                                            for name in ("query", "key", "value")])
                    out[f"{stream}_output.{part}"] = sd[f"biOutput.dense{index}.{part}"]
                    out[f"{stream}_norm.{part}"] = sd[f"biOutput.LayerNorm{index}.{part}"]
            out.update(convert_hf_feed_forward(sd, "v_intermediate.", "v_output.", "image_feed_forward."))
            out.update(convert_hf_feed_forward(sd, "t_intermediate.", "t_output.", "text_feed_forward."))
            return out

        return convert_strictly(state_dict, convert, ignore=("biOutput.q_dense",),
                                where="ViLBERTCoLayer.convert_vilbert_state_dict")

    def load_vilbert_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load a vilbert-multi-task ``BertConnectionLayer`` state dict (see convert_vilbert_state_dict)."""
        return self.load_state_dict(self.convert_vilbert_state_dict(state_dict), strict=True)


class METERCrossLayer(nn.Module):
    """One METER co-attention layer: the text and image ``BertCrossLayer`` pair
    (zdou0830/METER meter/modules/bert_model.py), both streams updated in parallel:

        text'  = TextSelfAtt(text, text_mask)        image'  = ImageSelfAtt(image, image_mask)
        text'' = TextCrossAtt(q=text', kv=image, image_mask)
        image''= ImageCrossAtt(q=image', kv=text, text_mask)    (one co_attention launch; k/v
                                                                  from the other stream's INPUT)
        out = (TextFFN(text''), ImageFFN(image''))

    each block post-LN, separate weights per stream.

    forward(text [B, St, D], image [B, Si, D], *, text_mask [B, St] bool, image_mask [B, Si] bool)
    -> (text [B, St, D], image [B, Si, D]); masks True = real token.

    Submodules ``{text,image}_self_attention``, ``{text,image}_cross_attention``
    (:class:`PostLNAttention`), ``{text,image}_feed_forward`` (:class:`PostLNFeedForward`).
    Each stream's ``BertCrossLayer`` has HF ``BertLayer``'s (with cross-attention) names: load it
    with :meth:`load_meter_state_dicts` / :meth:`from_hf_bert_layers`.
    """

    STREAMS = ("text", "image")

    def __init__(self, hidden: int, heads: int, intermediate: int, *, dropout: float = 0.1,
                 attention_dropout: float = 0.0, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_dims("METERCrossLayer", hidden=hidden, heads=heads, intermediate=intermediate)
        self.hidden = hidden
        attention = dict(dropout=dropout, attention_dropout=attention_dropout, layer_norm_eps=layer_norm_eps,
                         device=device, dtype=dtype)
        ffn = dict(dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps, device=device, dtype=dtype)
        self.text_self_attention = PostLNAttention(hidden, heads, **attention)
        self.text_cross_attention = PostLNAttention(hidden, heads, **attention)
        self.text_feed_forward = PostLNFeedForward(hidden, intermediate, **ffn)
        self.image_self_attention = PostLNAttention(hidden, heads, **attention)
        self.image_cross_attention = PostLNAttention(hidden, heads, **attention)
        self.image_feed_forward = PostLNFeedForward(hidden, intermediate, **ffn)

    def forward(self, text: torch.Tensor, image: torch.Tensor, *, text_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_streams("METERCrossLayer", "text", text, self.hidden, "image", image, self.hidden, text_mask,
                       image_mask)
        text_attended = self.text_self_attention(text, key_padding_mask=text_mask)
        image_attended = self.image_self_attention(image, key_padding_mask=image_mask)
        text_cross, image_cross = self.text_cross_attention, self.image_cross_attention
        q_t = text_cross.attention.project_query(text_attended)
        q_i = image_cross.attention.project_query(image_attended)
        # co_attention pairs q_t with (k_i, v_i): the image INPUT projected by the text layer's
        # key/value weights, and q_i with the text input projected by the image layer's.
        k_i, v_i = text_cross.attention.project_key_value(image)
        k_t, v_t = image_cross.attention.project_key_value(text)
        out_t, out_i = co_attend(q_t, k_t, v_t, q_i, k_i, v_i, text_mask=text_mask, image_mask=image_mask,
                                 dropout=text_cross.attention.dropout, training=self.training)
        text_out = self.text_feed_forward(text_cross.residual_output(text_attended, out_t))
        image_out = self.image_feed_forward(image_cross.residual_output(image_attended, out_i))
        return text_out, image_out

    @classmethod
    def convert_meter_state_dicts(cls, text_layer: Mapping[str, torch.Tensor],
                                  image_layer: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """METER's ``cross_modal_text_layers.{i}`` and ``cross_modal_image_layers.{i}`` state dicts
        (``BertCrossLayer``: ``attention.self.query.*`` ... ``crossattention.*``,
        ``intermediate.dense.*``, ``output.dense.*``, ``output.LayerNorm.*``) -> this module's."""
        def convert_stream(stream):
            def convert(sd):
                out = {}
                for source, target in (("attention.", f"{stream}_self_attention."),
                                       ("crossattention.", f"{stream}_cross_attention.")):
                    out.update(convert_hf_attention(sd, source + "self.", source + "output.dense.",
                                                    target + "attention.", norm_prefix=source + "output.LayerNorm."))
                out.update(convert_hf_feed_forward(sd, "intermediate.", "output.", f"{stream}_feed_forward."))
                return out
            return convert

        out = {}
        for stream, state_dict in zip(cls.STREAMS, (text_layer, image_layer)):
            out.update(convert_strictly(state_dict, convert_stream(stream),
                                        where=f"METERCrossLayer.convert_meter_state_dicts ({stream} layer)"))
        return out

    def load_meter_state_dicts(self, text_layer: Mapping[str, torch.Tensor], image_layer: Mapping[str, torch.Tensor]):
        """Load the text and image ``BertCrossLayer`` state dicts of one METER layer."""
        return self.load_state_dict(self.convert_meter_state_dicts(text_layer, image_layer), strict=True)

    @classmethod
    def from_hf_bert_layers(cls, text_layer: nn.Module, image_layer: nn.Module) -> "METERCrossLayer":
        """From two METER ``BertCrossLayer`` modules, or HF ``BertLayer`` modules built with
        ``add_cross_attention=True`` (the same structure and names)."""
        attention = text_layer.attention.self
        weight = attention.query.weight
        copy = cls(attention.query.in_features, attention.num_attention_heads,
                   text_layer.intermediate.dense.out_features,
                   dropout=text_layer.output.dropout.p, attention_dropout=attention.dropout.p,
                   activation=activation_name(text_layer.intermediate.intermediate_act_fn),
                   layer_norm_eps=text_layer.output.LayerNorm.eps, device=weight.device, dtype=weight.dtype)
        copy.load_meter_state_dicts(text_layer.state_dict(), image_layer.state_dict())
        return copy.train(text_layer.training)


__all__ = ["LXMERTCrossLayer", "METERCrossLayer", "ViLBERTCoLayer"]
