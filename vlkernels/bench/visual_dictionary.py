"""Benchmark presets of SOHO's visual dictionary (K = 2048 entries, D = 768):
N = 64 x 24 x 24 grid cells (SOHO's batch at 384 px) and N = 256 x 576 on a GPU; 4 x 576 on CPU.

vd_nearest providers: vlkernels, eager (the torch reference: the distance matrix, a block of
rows at a time), torch.compile(reference), torch.cdist + argmin (one fp32 N x K matrix) and
addmm + argmin (|e|^2 - 2 x e^T as one GEMM in the inputs' dtype: bf16 on a GPU run).
vd_ema_update providers: vlkernels, eager (the reference: index_add of counts and sums, then
the moving average), torch.compile(reference). Each provider updates its own copy of the
dictionary state, so every provider's first call starts from the same state.
"""
from __future__ import annotations

import torch

from vlkernels.bench.harness import Case, Inputs, standard_providers

ENTRIES, DIM = 2048, 768
GPU_ROWS = [64 * 576, 256 * 576]


def _rows(device: torch.device, quick: bool) -> list[int]:
    return [2 * 576] if quick else ([4 * 576] if device.type != "cuda" else GPU_ROWS)


def nearest_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops import vd_nearest
    from vlkernels.reference.visual_dictionary import vd_nearest as reference

    def cdist_argmin(x, codebook):
        sqdist, index = torch.cdist(x.float(), codebook.float()).square().min(1)
        return index, sqdist

    def addmm_argmin(x, codebook):
        # |e|^2 - 2 x.e as one GEMM in the inputs' dtype (bf16 / fp16 at the tensor cores' full
        # rate, the N x K scores in that dtype), argmin over it, then |x|^2 added to the minima
        norms = codebook.float().square().sum(1).to(x.dtype)
        best, index = torch.addmm(norms[None, :], x, codebook.t(), alpha=-2).min(1)
        return index, best.float() + x.float().square().sum(1)

    providers = standard_providers(vd_nearest, reference, {"cdist+argmin": cdist_argmin,
                                                           "addmm+argmin": addmm_argmin})
    cases = []
    for rows in _rows(device, quick):
        def make(device, dtype, rows=rows):
            return Inputs((torch.randn(rows, DIM, device=device, dtype=dtype),
                           torch.randn(ENTRIES, DIM, device=device, dtype=dtype)))

        flops = 2.0 * rows * ENTRIES * DIM
        cases.append(Case("vd_nearest", f"soho-N{rows}-K{ENTRIES}-D{DIM}", make, providers,
                          flops=lambda mode, f=flops: f,
                          bytes=lambda mode, dtype, n=rows: float((n + ENTRIES) * DIM * torch.finfo(dtype).bits // 8
                                                                  + n * 12)))
    return cases


def _own_state(update):
    """A provider that applies ``update`` to its own copy of the dictionary state (made at
    its first call on new inputs) and returns the codebook."""
    copies = {}

    def run(codebook, cluster_size, embed_avg, x, index, mask):
        key = id(codebook)
        if key not in copies:
            copies.clear()
            copies[key] = [t.clone() for t in (codebook, cluster_size, embed_avg)]
        state = copies[key]
        update(*state, x, index, decay=0.99, mask=mask)
        return state[0]

    return run


def update_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops import vd_ema_update_
    from vlkernels.reference.visual_dictionary import vd_ema_update_ as reference

    providers = standard_providers(_own_state(vd_ema_update_), _own_state(reference))
    cases = []
    for rows in _rows(device, quick):
        def make(device, dtype, rows=rows):
            codebook = torch.randn(ENTRIES, DIM, device=device)
            return Inputs((codebook, torch.rand(ENTRIES, device=device), codebook.clone(),
                           torch.randn(rows, DIM, device=device, dtype=dtype),
                           torch.randint(0, ENTRIES, (rows,), device=device), torch.rand(rows, device=device) < 0.9))

        cases.append(Case("vd_ema_update", f"soho-N{rows}-K{ENTRIES}-D{DIM}", make, providers,
                          bytes=lambda mode, dtype, n=rows: float(n * DIM * torch.finfo(dtype).bits // 8
                                                                  + 5 * ENTRIES * DIM * 4)))
    return cases
