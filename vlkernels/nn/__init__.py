"""Drop-in nn.Modules over the vlkernels ops, state-dict compatible with the modules users already have."""
from vlkernels.nn.attention import PostLNAttention, PostLNFeedForward, VLMultiheadAttention, real_token_mask
from vlkernels.nn.co_attention import LXMERTCrossLayer, METERCrossLayer, ViLBERTCoLayer
from vlkernels.nn.mome import MoMEBlock, MoMEFFN, VLMoAttention
from vlkernels.nn.multihead_attention import MultiheadAttention
from vlkernels.nn.optimal_transport import WPALoss, WRALoss
from vlkernels.nn.patch_embed import PatchEmbed
from vlkernels.nn.transformer import (
    BertLayer, MLMHead, Mlp, Pooler, PredictionTransform, PreLNBlock, TextEmbeddings,
)
from vlkernels.nn.visual_dictionary import VisualDictionary, mvm_mask

__all__ = [
    "BertLayer", "LXMERTCrossLayer", "METERCrossLayer", "MLMHead", "Mlp", "MoMEBlock", "MoMEFFN", "MultiheadAttention",
    "PatchEmbed", "Pooler", "PostLNAttention", "PostLNFeedForward", "PredictionTransform", "PreLNBlock", "TextEmbeddings", "ViLBERTCoLayer",
    "VLMoAttention", "VLMultiheadAttention", "VisualDictionary", "WPALoss", "WRALoss", "mvm_mask", "real_token_mask",
]
