"""Benchmark presets and providers of ``vlkernels.ops.mome_ffn`` (VLMo's modality-expert FFN).

Presets: VLMo-B (D 768, F 3072) at batch 32/64/128 and VLMo-L (1024/4096) at batch 32/64, each
sample 40 text + 197 image tokens (237), 3 experts with pre-LayerNorm, routed as
  split     VLMo's lower-layer joint input: tokens 0-39 of each sample to expert 0 (text), the
            rest to expert 1 (image), given as per-token expert ids (the general, sorting path);
  segments  the same routing through the ``segments`` fast path (no sort);
  random    every token to a random expert of the three (the general path at its worst).
GPU: the batches above; CPU and --quick: batch 1-2 of VLMo-B.

Providers: vlkernels; on an sm_90+ GPU vlkernels[tma] (the row GEMMs over sorted rows through
TMA descriptors, opt-in until this benchmark measures it faster); eager (the reference: gather /
per-expert LN + MLP / scatter loop); torch.compile(reference); looped nn.Linear (per expert:
select its tokens, LayerNorm, two F.linear, scatter back); dense (one LN + FFN over all the
tokens: the speed of light of this op, no routing at all); torch._grouped_mm (sort, LN, two
grouped GEMMs, scatter) where torch has it (CUDA); on a GPU torch.compile(reference,
mode="max-autotune-no-cudagraphs") (expensive: left out of --quick).
All experts hold the same weights (repeated E times, distinct storage) so that the dense
provider computes the same output as the routed ones and passes the harness's check against
eager; the timings do not depend on the values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vlkernels.bench.harness import Case, Compiled, Inputs, standard_providers

OP = "mome_ffn"
TEXT_TOKENS, IMAGE_TOKENS = 40, 197  # VLMo: max_text_len 40; 14x14 patches + cls at 224/16
EXPERTS = 3


@dataclass(frozen=True)
class Preset:
    name: str
    dim: int
    hidden: int
    routing: str  # "split", "segments" or "random"

    @property
    def seq_len(self) -> int:
        return TEXT_TOKENS + IMAGE_TOKENS

    def label(self, batch: int) -> str:
        return f"{self.name}-{self.routing}-B{batch}x{self.seq_len}"


VLMO_B = [Preset("vlmo-b", 768, 3072, r) for r in ("split", "segments", "random")]
VLMO_L = [Preset("vlmo-l", 1024, 4096, r) for r in ("split", "segments")]

GPU_PRESETS = [(p, b) for b in (32, 64, 128) for p in VLMO_B] + [(p, b) for b in (32, 64) for p in VLMO_L]
GPU_QUICK_PRESETS = [(VLMO_B[0], 8), (VLMO_B[1], 8)]
CPU_PRESETS = [(p, 2) for p in VLMO_B]
CPU_QUICK_PRESETS = [(VLMO_B[0], 1)]


def _route(x, expert_index, segments):
    if segments is not None:
        from vlkernels.reference.mome_ffn import segments_expert_index

        return segments_expert_index(x.shape[0], x.shape[1], segments, x.device)
    return expert_index.reshape(-1)


def dense_ffn(x, expert_index, w1, b1, w2, b2, *, ln_weight=None, ln_bias=None, eps=1e-6, segments=None):
    """Expert 0's LN + FFN over every token: the same GEMM work without any routing."""
    h = F.layer_norm(x, x.shape[-1:], ln_weight[0], ln_bias[0], eps)
    return F.linear(F.gelu(F.linear(h, w1[0].t(), b1[0])), w2[0].t(), b2[0])


def looped_linear_ffn(x, expert_index, w1, b1, w2, b2, *, ln_weight=None, ln_bias=None, eps=1e-6,
                      segments=None):
    """What a per-expert nn.ModuleList computes: each expert's tokens selected, LN + Linear +
    GELU + Linear, scattered back (a loop over the experts, one host sync per expert)."""
    dim = x.shape[-1]
    index = _route(x, expert_index, segments)
    tokens = x.reshape(-1, dim)
    out = tokens.new_zeros(tokens.shape)
    for e in range(w1.shape[0]):
        rows = torch.nonzero(index == e).squeeze(1)
        h = F.layer_norm(tokens[rows], (dim,), ln_weight[e], ln_bias[e], eps)
        out = out.index_copy(0, rows, F.linear(F.gelu(F.linear(h, w1[e].t(), b1[e])), w2[e].t(), b2[e]))
    return out.reshape(x.shape)


def grouped_mm_ffn(x, expert_index, w1, b1, w2, b2, *, ln_weight=None, ln_bias=None, eps=1e-6, segments=None):
    """torch._grouped_mm: stable sort by expert, LN with gathered affine, two grouped GEMMs, scatter."""
    dim = x.shape[-1]
    index = _route(x, expert_index, segments)
    order = torch.argsort(index, stable=True)
    offsets = torch.cumsum(torch.bincount(index, minlength=w1.shape[0]), 0).to(torch.int32)
    experts = index[order]
    tokens = x.reshape(-1, dim)[order]
    tokens = F.layer_norm(tokens, (dim,), eps=eps) * ln_weight[experts] + ln_bias[experts]
    h = F.gelu(torch._grouped_mm(tokens, w1, offs=offsets) + b1[experts])
    y = torch._grouped_mm(h, w2, offs=offsets) + b2[experts]
    return y.new_zeros(y.shape).index_copy(0, order, y).reshape(x.shape)


def _with_tma_row_gemms(fn):
    """fn with the row GEMMs over sorted rows loading through TMA descriptors (vlkernels.ops.mome_ffn
    TMA_ROW_GEMMS, empty by default, set to every dtype for the call): the measurement that
    decides whether TMA becomes the default. A call decides at its forward, and its backward
    follows that choice, so the switch only needs to hold during the forward (one thread)."""
    from vlkernels.ops import mome_ffn as ops

    def run(*args, **kwargs):
        default = ops.TMA_ROW_GEMMS
        ops.TMA_ROW_GEMMS = frozenset(ops._SUPPORTED_DTYPES)
        try:
            return fn(*args, **kwargs)
        finally:
            ops.TMA_ROW_GEMMS = default

    return run


def _providers(device: torch.device) -> dict:
    from vlkernels.ops.mome_ffn import mome_ffn
    from vlkernels.reference.mome_ffn import mome_ffn as reference

    peers = {"looped nn.Linear": looped_linear_ffn, "dense": dense_ffn}
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9:
        peers["vlkernels[tma]"] = _with_tma_row_gemms(mome_ffn)
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):  # a CUDA-only op where torch has it
        peers["torch._grouped_mm"] = grouped_mm_ffn
    if device.type == "cuda":  # inductor's autotuning benchmarks Triton templates: a GPU's
        peers["torch.compile max-autotune"] = Compiled(reference, mode="max-autotune-no-cudagraphs")
    return standard_providers(mome_ffn, reference, peers)


def _make_inputs(preset: Preset, batch: int):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        def rand(*shape, scale=1.0, shift=0.0):
            return torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift

        def per_expert(values):  # one expert's values repeated: see the module docstring
            return values.unsqueeze(0).repeat(EXPERTS, *([1] * values.dim())).to(dtype).requires_grad_()

        d, f = preset.dim, preset.hidden
        x = rand(batch, preset.seq_len, d).to(dtype).requires_grad_()
        # the experts' nn.Linear weights ([out, in]) stacked and read transposed, as MoMEFFN passes them
        w1, b1 = per_expert(rand(f, d, scale=d ** -0.5)).transpose(1, 2), per_expert(rand(f, scale=0.02))
        w2, b2 = per_expert(rand(d, f, scale=f ** -0.5)).transpose(1, 2), per_expert(rand(d, scale=0.02))
        ln_weight, ln_bias = per_expert(rand(d, scale=0.1, shift=1.0)), per_expert(rand(d, scale=0.02))
        kwargs = dict(ln_weight=ln_weight, ln_bias=ln_bias)
        if preset.routing == "segments":
            return Inputs((x, None, w1, b1, w2, b2), dict(kwargs, segments=(TEXT_TOKENS, 0, 1)))
        if preset.routing == "split":
            index = (torch.arange(preset.seq_len, device=device) >= TEXT_TOKENS).long().expand(batch, -1).contiguous()
        else:
            index = torch.randint(0, EXPERTS, (batch, preset.seq_len), device=device)
        return Inputs((x, index, w1, b1, w2, b2), kwargs)

    return make


def _flops(preset: Preset, batch: int):
    forward = 2.0 * 2 * batch * preset.seq_len * preset.dim * preset.hidden  # FC1 + FC2
    factor = {"forward": 1.0, "backward": 2.0, "full": 3.0}

    def flops(mode: str) -> float:
        return forward * factor[mode]

    return flops


def _bytes(preset: Preset, batch: int):
    # Minimal HBM traffic: operands read once, results written once (x, out, the weights; the
    # backward also reads the saved [T, F] activation and writes every gradient).
    tokens = batch * preset.seq_len
    weights = EXPERTS * (2 * preset.dim * preset.hidden + preset.hidden + 3 * preset.dim)
    activation = tokens * preset.hidden
    elements = {"forward": 2 * tokens * preset.dim + weights,
                "backward": 3 * tokens * preset.dim + 2 * weights + activation}
    elements["full"] = elements["forward"] + elements["backward"]

    def nbytes(mode: str, dtype: torch.dtype) -> Optional[float]:
        return float(elements[mode] * torch.finfo(dtype).bits // 8)

    return nbytes


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """The mome_ffn benchmark cases for ``device`` (small batches on CPU and with ``quick``)."""
    if device.type == "cuda":
        presets = GPU_QUICK_PRESETS if quick else GPU_PRESETS
    else:
        presets = CPU_QUICK_PRESETS if quick else CPU_PRESETS
    providers = _providers(device)
    return [Case(OP, preset.label(batch), _make_inputs(preset, batch), providers,
                 flops=_flops(preset, batch), bytes=_bytes(preset, batch))
            for preset, batch in presets]
