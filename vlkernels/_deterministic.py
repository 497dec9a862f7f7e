"""Deterministic mode: bit-identical outputs and gradients from run to run (see set_deterministic)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vlkernels._context import BlockSetting

# set_deterministic's process-wide setting, and the innermost deterministic() block's, local to
# each thread / asyncio task (see vlkernels._context for how torch.compile reads it).
_enabled = False
_block = BlockSetting("vlkernels_deterministic")


def set_deterministic(enabled: bool) -> None:
    """Switch vlkernels' deterministic mode on or off for the whole process: with it on, every
    op gives bit-identical outputs and gradients from one run to the next on the same inputs.

    Which op paths are deterministic whatever the flag (audited; the Triton kernels hold no
    ``tl.atomic_*``, the C++ and CUDA sources no ``atomicAdd``, no launcher autotunes):

    - Triton kernels, every op: each output element is written by one program; patch_embed's
      d(weight) split over patch rows sums fixed fp32 partial slots in torch; attention's and
      co-attention's backward give dk/dv and dq to separate programs; vd's cluster sums are a
      segmented reduction over rows sorted by entry (one program per entry, rows in input order).
    - C++ kernels (optimal transport, visual dictionary): OpenMP threads own whole problems /
      feature slabs and walk rows in order. CUDA kernels (optimal transport): fixed warp-shuffle trees.
    - torch references of attention, co-attention, varlen, mome_ffn (index_select / index_copy of
      distinct rows: each gradient row receives one contribution), optimal transport.

    What the flag changes (torch backend, the two paths that reach ops torch runs with atomics on CUDA):

    - ``vd_ema_update_``: the per-entry sums are a segmented sum over rows sorted by entry
      (``torch.segment_reduce``) instead of ``index_add_`` (float atomics on CUDA).
    - ``patch_embed``: the projection is a GEMM over the patches (a reshape: stride = kernel) instead
      of ``conv2d``, whose cuDNN weight gradient may pick an algorithm that accumulates with atomics.

    The flag is on when ``set_deterministic(True)`` was called (for the whole process; inside a
    ``deterministic()`` block, the block's setting wins, for the thread or asyncio task that opened
    it) or when torch's own ``torch.use_deterministic_algorithms(True)`` is in force. Same-machine,
    same-thread-count determinism: CPU libraries may pick other kernels on other hardware.
    """
    global _enabled
    _enabled = bool(enabled)


def is_deterministic() -> bool:
    """True when vlkernels runs its deterministic schedules: inside ``deterministic()`` (or
    ``deterministic(False)``: off) as the block says, else ``set_deterministic(True)``; and whenever
    ``torch.use_deterministic_algorithms(True)`` is in force."""
    block = _block.get()
    return (_enabled if block is None else block) or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Run the block with deterministic mode on (or off) in this thread or asyncio task; overlapping
    blocks elsewhere do not see it, and after the block the previous setting holds again."""
    with _block.block(bool(enabled)):
        yield
