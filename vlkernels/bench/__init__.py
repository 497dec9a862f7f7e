"""Benchmarks of the vlkernels ops against eager torch, torch.compile and installed peers.

    vlkernels-bench [--op patch_embed] [--quick] [--modes forward,full] [--out DIR]
    python -m vlkernels.bench ...

Each op has presets and providers in a module here (``vlkernels/bench/<op>.py``) and a
``(device, quick) -> list[Case]`` function that :data:`OPS` registers. The harness
(:mod:`vlkernels.bench.harness`) times the cases, :mod:`vlkernels.bench.plot` draws them.
"""
from __future__ import annotations

import importlib

# op name -> "module:function", the function giving its cases(device, quick). Modules import
# lazily: an op under construction elsewhere in the tree must not break the others' benchmarks.
OPS = {
    "patch_embed": "vlkernels.bench.patch_embed:cases",
    "attention": "vlkernels.bench.attention:attention_cases",
    "co_attention": "vlkernels.bench.attention:co_attention_cases",
    "vd_nearest": "vlkernels.bench.visual_dictionary:nearest_cases",
    "vd_ema_update": "vlkernels.bench.visual_dictionary:update_cases",
    "wra_distance": "vlkernels.bench.optimal_transport:wra_cases",
    "sinkhorn": "vlkernels.bench.optimal_transport:sinkhorn_cases",
    "mome_ffn": "vlkernels.bench.mome_ffn:cases",
    "model_step": "vlkernels.bench.models:cases",  # one pretraining step of each reference model
}


def load_cases(op: str, device, quick: bool = False):
    """The benchmark cases of ``op`` on ``device``."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(OPS)}")
    module, function = OPS[op].split(":")
    return getattr(importlib.import_module(module), function)(device, quick)


__all__ = ["OPS", "load_cases"]
