"""Shared helpers of the test suite: the device under test, tolerances against float64
references, NaN-poisoned allocations and a counter of host reads.

Kernels are tested on CUDA where a GPU is present, else on CPU tensors in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before vlkernels is imported).
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes the Triton kernels are tested in here. Triton 3.6's interpreter returns garbage
    for tl.dot on bf16 operands, so bf16 is proven on the GPU only."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference||, in float64 (NaN anywhere gives NaN)."""
    actual, reference = actual.detach().double().cpu(), reference.detach().double().cpu()
    return ((actual - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def fp32_tolerance(uses_tf32_dot: bool) -> float:
    """fp32 bound from the design rules: 1e-5, or 1e-3 where a tl.dot runs in tf32 on a GPU."""
    return 1e-3 if uses_tf32_dot and DEVICE.type == "cuda" else 1e-5


def assert_matches_reference(name, actual, reference64, same_dtype_torch, *, uses_tf32_dot=True,
                             fp32_conditioned=False) -> None:
    """Check ``actual`` against the float64 reference.

    fp32: rel. error within ``fp32_tolerance``, or, with ``fp32_conditioned``, within twice
    same_dtype_torch's own error where that is larger (an ill-conditioned result, such as a
    gradient summed over a broadcast dimension whose terms cancel, which torch's own fp32 misses
    by more than 1e-5); use it only where same_dtype_torch is computed independently of ``actual``.
    fp16/bf16 (flash-attention's rule): the error is at most twice that of the same computation
    run by torch in the same dtype, plus 1e-6 so that an exactly representable result does not
    demand a bit-exact kernel.
    """
    error = rel_error(actual, reference64)
    assert actual.dtype == same_dtype_torch.dtype, f"{name}: dtype {actual.dtype}, expected {same_dtype_torch.dtype}"
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(reference64.shape)}"
    if actual.dtype == torch.float32:
        bound = fp32_tolerance(uses_tf32_dot)
        if fp32_conditioned:
            bound = max(bound, 2 * rel_error(same_dtype_torch, reference64))
    else:
        bound = 2 * rel_error(same_dtype_torch, reference64) + 1e-6
    assert error <= bound, f"{name}: relative error {error:.3e} exceeds {bound:.3e} ({actual.dtype})"


def random_key_mask(*shape: int, real: float = 0.7) -> torch.Tensor:
    """A bool mask of ``shape`` (True = real token, each with probability ``real``) whose first
    position along the last dim is always real, so no row is fully masked."""
    mask = torch.rand(*shape) < real
    mask[..., 0] = True
    return mask


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside the block, torch.empty / empty_like fill floating tensors with NaN and integer
    tensors with their minimum, so an output element a kernel forgot to write fails the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool and tensor.numel():
            tensor.fill_(torch.iinfo(tensor.dtype).min)
        return tensor

    torch.empty = lambda *args, **kwargs: poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like



class HostReads(TorchDispatchMode):
    """Counts the device-to-host value reads (``.item()``, ``bool(t)``, ``int(t)``,
    ``.tolist()``) of the calls made inside it; on a GPU each one is a stream synchronisation.
    ``reads``: how many; ``sources``: the stack of each (for the failure message)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.reads, self.sources = 0, []

    def _count(self) -> None:
        self.reads += 1
        self.sources.append("".join(traceback.format_stack(limit=10)[:-3]))

    def __enter__(self):
        # tolist reads the data without dispatching an aten op: counted by wrapping it.
        self._real_tolist = real_tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda tensor: self._count() or real_tolist(tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self._count()
        return func(*args, **(kwargs or {}))
