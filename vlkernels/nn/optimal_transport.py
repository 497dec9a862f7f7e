"""The optimal-transport alignment losses of UNITER (word-region alignment, WRA) and ViLT
(word-patch alignment, WPA), over vlkernels.ops.wra_distance."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlkernels.ops.optimal_transport import wra_distance
from vlkernels.reference.optimal_transport import ot_loss, wpa_masks


class WRALoss(nn.Module):
    """UNITER's WRA loss (its ``ot_loss`` scaled by ``itm_ot_lambda``) over image-text matching pairs.

    forward(txt: [B, M, D], img: [B, N, D], txt_mask: [B, M] bool, img_mask: [B, N] bool
    (True = real token), targets: [B] (1 = matched pair, 0 = negative)) -> scalar:
        weight * (sum of positive pairs' distances - sum of negative pairs' distances) / (n_pos + n_neg)
    with the distances of ``vlkernels.ops.wra_distance`` (cosine cost, IPOT with beta, iters, k;
    computed in fp32 whatever the inputs' dtype, as UNITER runs it). UNITER adds it to the ITM
    cross-entropy with weight 0.1. A pair whose masks leave no text or no region has distance 0.
    """

    def __init__(self, weight: float = 0.1, beta: float = 0.5, iters: int = 50, k: int = 1) -> None:
        super().__init__()
        self.weight, self.beta, self.iters, self.k = weight, beta, iters, k

    def distances(self, txt: torch.Tensor, img: torch.Tensor, txt_mask: Optional[torch.Tensor],
                  img_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[B] WRA distance of each pair."""
        return wra_distance(txt, img, txt_mask, img_mask, beta=self.beta, iters=self.iters, k=self.k)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, txt_mask: Optional[torch.Tensor],
                img_mask: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if targets.shape != txt.shape[:1]:
            raise ValueError(f"{type(self).__name__}: targets must have shape [{txt.shape[0]}], "
                             f"got {list(targets.shape)}")
        return self.weight * ot_loss(self.distances(txt, img, txt_mask, img_mask), targets)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, beta={self.beta}, iters={self.iters}, k={self.k}"


class WPALoss(WRALoss):
    """ViLT's word-patch alignment loss (``itm_wpa_loss``): the WRA loss between the text and
    image tokens of ViLT's ITM forward, after ViLT's token selection.

    forward(text_feats: [B, M, D], image_feats: [B, N, D], text_masks: [B, M], image_masks: [B, N]
    (True / 1 = real token, as ViLT's ``infer`` returns them), itm_labels: [B]) -> scalar.
    The text loses its [CLS] (position 0) and its last real token ([SEP]); the image loses its
    first ``image_skip`` tokens ([CLS]; 2 for DeiT backbones, whose distillation token follows).
    Then weight * ot_loss with beta 0.5, 50 iterations, k 1 and weight 0.1 by default, as ViLT.
    """

    def __init__(self, weight: float = 0.1, beta: float = 0.5, iters: int = 50, k: int = 1,
                 image_skip: int = 1) -> None:
        super().__init__(weight, beta, iters, k)
        self.image_skip = image_skip

    def forward(self, text_feats: torch.Tensor, image_feats: torch.Tensor, text_masks: torch.Tensor,
                image_masks: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
        txt_mask, img_mask = wpa_masks(text_masks, image_masks, image_skip=self.image_skip)
        return super().forward(text_feats, image_feats, txt_mask, img_mask, itm_labels)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", image_skip={self.image_skip}"
