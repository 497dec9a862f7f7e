"""Backend selection: the one place that decides which implementation runs an op.

The backend is requested with ``VLKERNELS_BACKEND=auto|torch|triton|cuda|cpp`` or, for a
block of code, ``with vlkernels.use_backend("triton"): ...`` (the context manager wins; its choice
is local to the thread or asyncio task that opens it).

``auto`` picks, in order: for CUDA tensors the CUDA extension, then Triton, then the torch
reference; for CPU tensors the C++ extension, then the torch reference. An explicit name
runs that backend or raises. Every implementation declares what it supports through a
``refuse`` callable that returns ``None`` (it can run the call) or a reason; a call that no
backend accepts raises :class:`NoBackendError` naming every backend tried and its reason.

``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before vlkernels is imported:
that runs the real Triton kernels in Triton's interpreter, which is how the test suite
proves them on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from vlkernels._context import BlockSetting
from vlkernels._coverage import record_call

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

# The innermost use_backend block's choice, local to each thread / asyncio task (see vlkernels._context
# for how torch.compile reads it).
_requested = BlockSetting("vlkernels_backend")


class NoBackendError(RuntimeError):
    """No backend accepted a call; the message lists each backend tried and why it refused."""


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown vlkernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost ``use_backend`` block, else ``VLKERNELS_BACKEND``, else auto."""
    name = _requested.get()
    if name is None:
        name = os.environ.get("VLKERNELS_BACKEND", "auto").strip().lower() or "auto"
    return _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` (one of ``BACKENDS``). The choice is
    local to the thread or asyncio task that opens the block: overlapping blocks elsewhere do not
    see it, and after the block the previous choice (or ``VLKERNELS_BACKEND``) holds again."""
    with _requested.block(_checked(name)):
        yield


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _find_triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install must not break vlkernels' import
        return f"triton failed to import ({error})"
    return None


# Decided once at import (a constant, which torch.compile traces without a cache wrapper).
_TRITON_IMPORT_ERROR = _find_triton_import_error()


def triton_refusal(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device`` (None when it can)."""
    missing = _TRITON_IMPORT_ERROR
    if missing:
        return missing
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if triton_interpreting() else "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    return f"Triton does not run on {device.type} tensors"


def backend_availability() -> dict[str, Optional[str]]:
    """For each concrete backend: None when usable on this machine, else why not (for ``vlkernels.info``)."""
    from vlkernels import _extension

    cuda = torch.cuda.is_available()
    triton_why = _TRITON_IMPORT_ERROR or (
        None if cuda or triton_interpreting() else "no CUDA device (set TRITON_INTERPRET=1 to run it on CPU)"
    )
    cpp_why = _extension.unavailable_reason()
    cuda_why = cpp_why or (None if _extension.has_cuda_kernels() else "the extension was built without CUDA")
    if cuda_why is None and not cuda:
        cuda_why = "no CUDA device"
    return {"torch": None, "triton": triton_why, "cuda": cuda_why, "cpp": cpp_why}


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op.

    ``refuse(*args, **kwargs)`` returns None when this implementation can run the call,
    else a short reason; ``run(*args, **kwargs)`` computes it.
    """

    backend: str
    refuse: Callable[..., Optional[str]]
    run: Callable


def dispatch(op: str, implementations: list[Implementation], device: torch.device, *args, **kwargs):
    """Run ``op`` on the first implementation that the requested backend allows and that accepts the call."""
    requested = requested_backend()
    order = _AUTO_ORDER.get(device.type, ("torch",)) if requested == "auto" else (requested,)
    by_backend = {impl.backend: impl for impl in implementations}
    reasons = []
    for name in order:
        impl = by_backend.get(name)
        why = f"{op} has no {name} implementation" if impl is None else impl.refuse(*args, **kwargs)
        if why is None:
            record_call(op, name)  # for vlkernels.kernel_coverage(); nothing while torch.compile traces
            return impl.run(*args, **kwargs)
        reasons.append(f"{name}: {why}")
    tried = "\n  ".join(reasons)
    raise NoBackendError(f"vlkernels.{op}: no backend can run this call (requested backend {requested!r}); tried:\n  {tried}")
