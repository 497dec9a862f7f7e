"""Benchmark presets of the optimal-transport ops at the seed models' ITM shapes.

wra_distance (UNITER's WRA / ViLT's WPA: cosine cost, 50 IPOT iterations, sum C*T):
  UNITER-B ITM: words <= 60 and regions <= 100 (ragged), D = 768;
  ViLT-B/32 WPA: words <= 40 and patches <= 200 (ragged), D = 768.
  GPU: batches 128, 256, 512 (UNITER) and 128, 256 (ViLT); CPU: 64 pairs of <= 20 x 36 (the CPU
  target's shape), 128 (UNITER) and 64 (ViLT); --quick: 16 (UNITER only on a CPU).
  Providers: vlkernels (auto), each kernel backend that can run on the device
  (vlkernels[triton], vlkernels[cuda], vlkernels[cpp]), eager (UNITER's loop: the torch
  reference), torch.compile(reference). POT has no IPOT: its batched proximal solver
  (ot.batch.proximal_bregman_log_plan_batch, POT 0.9.7) forms the step's kernel as
  -(C + beta log T) / beta, dividing by the previous plan where IPOT multiplies, so its plans
  differ; POT is timed on the Sinkhorn problem below instead.
sinkhorn (entropic OT, log domain, reg 0.1, 100 iterations, on the same ragged shapes with a
  cosine cost): vlkernels, its backends, eager (the torch reference), torch.compile(reference),
  pot-per-sample (ot.sinkhorn(method="sinkhorn_log") on each problem's valid block: POT solves
  one problem at a time) and pot-batched (ot.batch.solve_batch(method="log_sinkhorn") over the
  padded batch, zero mass on padding).
Lengths are drawn per sample in [L/4, L] with every preset's maximum present.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vlkernels.bench.harness import Case, Inputs, expensive, standard_providers

DIM = 768
ITERS = 50  # UNITER's and ViLT's IPOT iterations
SINKHORN_REG, SINKHORN_ITERS = 0.1, 100


@dataclass(frozen=True)
class Preset:
    name: str
    words: int
    regions: int

    def label(self, batch: int) -> str:
        return f"{self.name}-M{self.words}-N{self.regions}-B{batch}"


UNITER = Preset("uniter-b-itm", 60, 100)
VILT = Preset("vilt-b32-wpa", 40, 200)
# The CPU target's shape (GEMM / optimal-transport issue): 64 UNITER pairs of <= 20 words and
# <= 36 regions. The CPU run prints the C++ path's speed-up over the torch reference and, in the
# full run (POT's providers are expensive), over POT's per-sample loop.
UNITER_SMALL = Preset("uniter-ot-cpu", 20, 36)
GPU_PRESETS = [(UNITER, 128), (UNITER, 256), (UNITER, 512), (VILT, 128), (VILT, 256)]
CPU_PRESETS = [(UNITER_SMALL, 64), (UNITER, 128), (VILT, 64)]
QUICK_PRESETS = [(UNITER, 16), (VILT, 16)]
CPU_QUICK_PRESETS = QUICK_PRESETS[:1]  # the eager references' 50-100 iteration loops dominate a CPU --quick run


def _presets(device: torch.device, quick: bool):
    if quick:
        return QUICK_PRESETS if device.type == "cuda" else CPU_QUICK_PRESETS
    return GPU_PRESETS if device.type == "cuda" else CPU_PRESETS


def _ragged_mask(batch: int, length: int, device) -> torch.Tensor:
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), device=device)
    lengths[0] = length
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def _with_backend(fn: Callable, backend: str) -> Callable:
    import vlkernels

    def run(*args, **kwargs):
        with vlkernels.use_backend(backend):
            return fn(*args, **kwargs)

    return run


def _backend_providers(fn: Callable, device: torch.device) -> dict:
    """vlkernels[backend] for each kernel backend that can run on the device here."""
    from vlkernels import _backend

    available = _backend.backend_availability()
    kernels = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    return {f"vlkernels[{name}]": _with_backend(fn, name) for name in kernels if available.get(name) is None}


def wra_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops.optimal_transport import wra_distance
    from vlkernels.reference.optimal_transport import wra_distance as reference

    providers = standard_providers(wra_distance, reference, _backend_providers(wra_distance, device))
    cases = []
    for preset, batch in _presets(device, quick):
        def make(device, dtype, preset=preset, batch=batch):
            txt = torch.randn(batch, preset.words, DIM, device=device, dtype=dtype, requires_grad=True)
            img = torch.randn(batch, preset.regions, DIM, device=device, dtype=dtype, requires_grad=True)
            return Inputs((txt, img, _ragged_mask(batch, preset.words, device),
                           _ragged_mask(batch, preset.regions, device)))

        pairs = batch * preset.words * preset.regions
        # forward: the cost GEMM plus ~8 flops per entry per iteration; backward: two GEMMs of the same size
        gemm = 2.0 * pairs * DIM
        flops = {"forward": gemm + 8.0 * ITERS * pairs, "backward": 2 * gemm}
        flops["full"] = flops["forward"] + flops["backward"]
        embeddings = batch * (preset.words + preset.regions) * DIM

        def nbytes(mode, dtype, embeddings=embeddings, pairs=pairs):
            size = torch.finfo(dtype).bits // 8
            forward = embeddings * size + pairs * 4  # read the embeddings, write the plan (fp32) for the backward
            backward = pairs * 4 + 2 * embeddings * size  # read the plan and embeddings, write the gradients
            return float({"forward": forward, "backward": backward + embeddings * size,
                          "full": forward + backward}[mode])

        cases.append(Case("wra_distance", preset.label(batch), make, providers, flops=lambda mode, f=flops: f[mode],
                          bytes=nbytes))
    return cases


def _pot_per_sample(cost, *, reg, iters, x_mask, y_mask):
    import ot

    plan = torch.zeros(cost.shape, dtype=torch.float64, device=cost.device)
    for i in range(cost.shape[0]):
        block = cost[i][x_mask[i]][:, y_mask[i]].double()
        a = torch.full((block.shape[0],), 1.0 / block.shape[0], dtype=torch.float64, device=cost.device)
        b = torch.full((block.shape[1],), 1.0 / block.shape[1], dtype=torch.float64, device=cost.device)
        solved = ot.sinkhorn(a, b, block, reg, method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
        plan[i, x_mask[i].nonzero()[:, 0][:, None], y_mask[i].nonzero()[:, 0][None, :]] = solved
    return plan


def _pot_batched(cost, *, reg, iters, x_mask, y_mask):
    from ot.batch import solve_batch

    a = x_mask.double() / x_mask.sum(1, keepdim=True)
    b = y_mask.double() / y_mask.sum(1, keepdim=True)
    return solve_batch(cost.double(), reg, a, b, max_iter=iters, tol=0.0, method="log_sinkhorn", grad="detach").plan


def sinkhorn_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops.optimal_transport import sinkhorn
    from vlkernels.reference.optimal_transport import cost_matrix_cosine
    from vlkernels.reference.optimal_transport import sinkhorn as reference

    def fixed(fn):  # the providers' common signature: (cost, x_mask, y_mask), reg and iterations fixed
        def run(cost, x_mask, y_mask):
            return fn(cost, x_mask=x_mask, y_mask=y_mask, reg=SINKHORN_REG, iters=SINKHORN_ITERS)

        return run

    peers = {name: fixed(fn) for name, fn in _backend_providers(sinkhorn, device).items()}
    try:
        import ot  # noqa: F401

        # Expensive (POT's solvers take seconds per call on a CPU): the full run times them, not --quick.
        peers.update({"pot-per-sample": expensive(fixed(_pot_per_sample)), "pot-batched": expensive(fixed(_pot_batched))})
    except ImportError:  # POT is optional: its providers are left out
        pass
    providers = standard_providers(fixed(sinkhorn), fixed(reference), peers)
    cases = []
    for preset, batch in _presets(device, quick):
        def make(device, dtype, preset=preset, batch=batch):
            txt = torch.randn(batch, preset.words, DIM, device=device)
            img = torch.randn(batch, preset.regions, DIM, device=device)
            cost = cost_matrix_cosine(txt, img).to(dtype)
            return Inputs((cost, _ragged_mask(batch, preset.words, device),
                           _ragged_mask(batch, preset.regions, device)))

        pairs = batch * preset.words * preset.regions
        cases.append(Case("sinkhorn", preset.label(batch), make, providers,
                          bytes=lambda mode, dtype, pairs=pairs: float(pairs * (torch.finfo(dtype).bits // 8 + 4))))
    return cases
