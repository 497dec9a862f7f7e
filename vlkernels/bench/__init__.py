"""Benchmarks of the vlkernels ops against eager torch, torch.compile and installed peers.

    vlkernels-bench [--op patch_embed] [--quick] [--modes forward,full] [--out DIR]
    python -m vlkernels.bench ...

Each op has a module here (``vlkernels/bench/<op>.py``) with its presets and providers and a
``cases(device, quick) -> list[Case]`` function; :data:`OPS` registers it. The harness
(:mod:`vlkernels.bench.harness`) times the cases, :mod:`vlkernels.bench.plot` draws them.
"""
from __future__ import annotations

import importlib

# op name -> module with cases(device, quick). Modules import lazily: an op under construction
# elsewhere in the tree must not break the benchmarks of the others.
OPS = {
    "patch_embed": "vlkernels.bench.patch_embed",
}


def load_cases(op: str, device, quick: bool = False):
    """The benchmark cases of ``op`` on ``device``."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(OPS)}")
    return importlib.import_module(OPS[op]).cases(device, quick)


__all__ = ["OPS", "load_cases"]
