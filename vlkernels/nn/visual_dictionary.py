"""SOHO's visual dictionary as a module, with its masked-visual-modeling helpers."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels.ops import vd_ema_update_, vd_nearest


class VisualDictionary(nn.Module):
    """Quantises visual features to their nearest dictionary entry (SOHO's VD).

    Buffers: ``embed`` [K, D] (init N(0, 1)), ``cluster_size`` [K], ``embed_avg`` [K, D]; SOHO
    checkpoints store them under the same names and shapes. In training mode each forward
    first updates the dictionary by SOHO's moving average, then quantises with the updated
    entries, as SOHO does. When torch.distributed is initialised, the step's statistics are
    all-reduced over ``process_group`` (None: the default group) so that every process of the
    group keeps the same dictionary, as SOHO's; ``sync=False`` turns that off (each process
    updates from its own batch, with no collective).
    The decay follows SOHO's schedule: ``set_decay_updates(n)`` sets it to
    ``min(decay * n, max_decay)``; until then it is ``decay``.

    forward(x: [..., D], mask: [...] bool or None) -> (quantized [..., D], index [...] int64):
    ``quantized`` has the entries' values and passes gradients straight through to ``x``;
    masked-out positions (mask False) are quantised but do not update the dictionary. While no
    position has been counted yet (a fresh dictionary after fully masked or empty steps) the
    entries keep their initial values (see ``vd_ema_update_``). A step reads no value on the
    host in the default value-check mode (VLKERNELS_VALUE_CHECKS / vlkernels.set_value_checks):
    the ids come from ``vd_nearest`` and are checked on the device by ``vd_ema_update_``.
    """

    sync, process_group = True, None  # the defaults for modules pickled before these options existed

    def __init__(self, num_embeddings: int = 2048, dim: int = 768, decay: float = 0.4, eps: float = 1e-5,
                 max_decay: float = 0.99, *, sync: bool = True, process_group=None) -> None:
        super().__init__()
        self.sync, self.process_group = sync, process_group
        self.num_embeddings, self.dim = num_embeddings, dim
        self.decay, self.max_decay, self.eps = decay, max_decay, eps
        self.current_decay = decay
        self.register_buffer("embed", torch.randn(num_embeddings, dim))
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("embed_avg", torch.zeros(num_embeddings, dim))

    def set_decay_updates(self, num_updates: int) -> None:
        self.current_decay = min(self.decay * num_updates, self.max_decay)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"VisualDictionary: features have {x.shape[-1]} channels, the dictionary {self.dim}")
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"VisualDictionary: mask must have shape {list(x.shape[:-1])}, got {list(mask.shape)}")
        if self.training and not torch.compiler.is_compiling() and torch._C._functorch.is_batchedtensor(x):
            raise RuntimeError("VisualDictionary: a training step updates the dictionary's buffers in place from "
                               "the batch, which torch.func.vmap cannot batch (as for any module updating a buffer "
                               "from its input); vmap it in eval mode, or call it on the whole batch")
        flat = x.detach().reshape(-1, self.dim)
        index, _ = vd_nearest(flat, self.embed.to(flat.dtype))
        if self.training:
            vd_ema_update_(self.embed, self.cluster_size, self.embed_avg, flat, index, decay=self.current_decay,
                           eps=self.eps, mask=None if mask is None else mask.reshape(-1), sync=self.sync,
                           process_group=self.process_group)
        quantized = self.embed[index].to(x.dtype).view(x.shape)
        return x + (quantized - x).detach(), index.view(x.shape[:-1])

    def mvm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., D] -> [..., K]: cosine similarity to every entry (SOHO's masked visual
        modeling scores; no temperature, no gradient into the dictionary)."""
        return F.normalize(hidden, dim=-1) @ F.normalize(self.embed.detach().to(hidden.dtype), dim=-1).T


def mvm_mask(index: torch.Tensor, valid: torch.Tensor, prob: float = 0.015,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SOHO's masked-visual-modeling masks.

    index: [B, L] dictionary entry of each grid cell, valid: [B, L] bool (real cells).
    One cell position is drawn for the whole batch; in each sample every valid cell with the
    same entry as that position is masked (none when the position is padding there), and
    each sample keeps its masking with probability ``prob``.
    returns (masked [B, L] bool, labels [B, L] int64: the entry at masked cells, -100 elsewhere).
    """
    if index.dim() != 2 or valid.shape != index.shape or valid.dtype != torch.bool:
        raise ValueError(f"mvm_mask: index must be [B, L] and valid a bool [B, L]; got {list(index.shape)} "
                         f"and {valid.dtype} {list(valid.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mvm_mask: prob must lie in [0, 1], got {prob}")
    batch, cells = index.shape
    # The position stays a tensor (a gather, no int()): no host sync, no graph break under torch.compile.
    # generator=None is left out: torch's generator overloads take no symbolic sizes (compile, dynamic=True).
    draw = {} if generator is None else {"generator": generator}
    position = torch.randint(cells, (1,), **draw).to(index.device).expand(batch, 1)
    drawn = index.gather(1, position)
    keep = torch.rand(batch, 1, device=generator.device if generator else "cpu", **draw) < prob
    masked = (index == drawn) & valid & valid.gather(1, position) & keep.to(index.device)
    return masked, torch.where(masked, index, torch.full_like(index, -100))
