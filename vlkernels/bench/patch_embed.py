"""Benchmark presets and providers of ``vlkernels.ops.patch_embed``.

Presets are the seed models' real patch embeddings (C = 3 RGB channels, D = 768, base size):
  ViLT-B/32 at 384x384 and at 384x640 (ViLT's resized max side), with cls token and
  pos-embed [1, 1+N, D] — ViLT's visual embedding;
  ViT-B/16 at 224x224 without cls/pos — what timm's PatchEmbed (a Conv2d) computes.
GPU: batches 32, 128, 256. CPU and --quick: batches 2-8 and fewer shapes.

Providers: vlkernels (the op, on its auto backend), eager (the torch reference: conv2d +
flatten + transpose + cat cls + add pos; nn.Conv2d is cuDNN / cuBLAS on a GPU), torch.compile(reference),
and on a GPU torch.compile(reference, mode="max-autotune-no-cudagraphs") (expensive: left out of
--quick). No other peer is listed: the usual implementations (timm's PatchEmbed, HF ViT/ViLT
embeddings) are the same nn.Conv2d + cat + add as the eager reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vlkernels.bench.harness import Case, Compiled, Inputs, standard_providers

OP = "patch_embed"


@dataclass(frozen=True)
class Preset:
    name: str  # the model the shape comes from
    height: int
    width: int
    patch: int
    embed_dim: int = 768
    channels: int = 3
    cls_pos: bool = False  # ViLT: cls token first and pos-embed [1, 1+N, D]; else plain (timm PatchEmbed)

    @property
    def patches(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def tokens(self) -> int:
        return self.patches + self.cls_pos

    def label(self, batch: int) -> str:
        extra = "-cls-pos" if self.cls_pos else ""
        return f"{self.name}-{self.height}x{self.width}{extra}-B{batch}"


VILT_384 = Preset("vilt-b32", 384, 384, 32, cls_pos=True)
VILT_384x640 = Preset("vilt-b32", 384, 640, 32, cls_pos=True)
VIT_224 = Preset("vit-b16", 224, 224, 16)

# (preset, batch) per setting; CPU sizes keep one call in the tens of milliseconds on 2 cores.
# Batch-major order: a run cut short by its time limit loses the largest batches, not a whole model.
GPU_PRESETS = [(p, b) for b in (32, 128, 256) for p in (VILT_384, VILT_384x640, VIT_224)]
GPU_QUICK_PRESETS = [(VILT_384, 8), (VIT_224, 8)]
CPU_PRESETS = [(VILT_384, 4), (VILT_384x640, 2), (VIT_224, 8)]
CPU_QUICK_PRESETS = [(VILT_384, 2), (VIT_224, 2)]


def _providers(device: torch.device) -> dict:
    from vlkernels.ops import patch_embed
    from vlkernels.reference.patch_embed import patch_embed as reference

    peers = {}
    if device.type == "cuda":  # inductor's autotuning benchmarks Triton templates: a GPU's
        peers["torch.compile max-autotune"] = Compiled(reference, mode="max-autotune-no-cudagraphs")
    return standard_providers(patch_embed, reference, peers)


def _make_inputs(preset: Preset, batch: int):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        def rand(*shape, scale=1.0):
            # Fresh normal values (never zeros), scaled like a trained model's (weights ~ 1/sqrt(K)).
            return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

        fan_in = preset.channels * preset.patch * preset.patch
        images = rand(batch, preset.channels, preset.height, preset.width)
        weight = rand(preset.embed_dim, preset.channels, preset.patch, preset.patch, scale=fan_in ** -0.5)
        bias = rand(preset.embed_dim, scale=0.02)
        kwargs = {}
        if preset.cls_pos:
            kwargs = dict(pos_embed=rand(1, preset.tokens, preset.embed_dim, scale=0.02),
                          cls_token=rand(1, 1, preset.embed_dim, scale=0.02))
        return Inputs((images, weight, bias), kwargs)

    return make


def _flops(preset: Preset, batch: int):
    # Forward: the [B*N, K] x [K, D] GEMM, K = C*P*P (bias/pos adds are negligible).
    # Backward: d(images) and d(weight), one GEMM of the same size each.
    forward = 2.0 * batch * preset.patches * preset.embed_dim * preset.channels * preset.patch**2
    factor = {"forward": 1.0, "backward": 2.0, "full": 3.0}

    def flops(mode: str) -> float:
        return forward * factor[mode]

    return flops


def _bytes(preset: Preset, batch: int):
    # Minimal HBM traffic: every operand read once and every result written once.
    images = batch * preset.channels * preset.height * preset.width
    weight = preset.embed_dim * preset.channels * preset.patch**2
    small = preset.embed_dim * (1 + (preset.tokens + 1 if preset.cls_pos else 0))  # bias, pos, cls
    out = batch * preset.tokens * preset.embed_dim
    elements = {
        "forward": images + weight + small + out,
        "backward": out + images + weight + images + weight + small,  # read grad_out, images, weight; write grads
    }
    elements["full"] = elements["forward"] + elements["backward"]

    def nbytes(mode: str, dtype: torch.dtype) -> Optional[float]:
        return float(elements[mode] * torch.finfo(dtype).bits // 8)

    return nbytes


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """The patch_embed benchmark cases for ``device`` (small batches on CPU and with ``quick``)."""
    if device.type == "cuda":
        presets = GPU_QUICK_PRESETS if quick else GPU_PRESETS
    else:
        presets = CPU_QUICK_PRESETS if quick else CPU_PRESETS
    providers = _providers(device)
    return [Case(OP, preset.label(batch), _make_inputs(preset, batch), providers,
                 flops=_flops(preset, batch), bytes=_bytes(preset, batch),
                 tf32=lambda: torch.backends.cudnn.allow_tf32)  # patch_embed follows nn.Conv2d's flag
            for preset, batch in presets]
