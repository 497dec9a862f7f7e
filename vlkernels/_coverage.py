"""Counted coverage: which backend ran each op call, and every call that did not run the kernels.

``with vlkernels.kernel_coverage() as cov: ...`` records, for the code inside the block:

- ``cov.calls``: one :class:`OpCall` (``.op``, ``.backend``) per op dispatched (``attention``,
  ``patch_embed``, ``vd_nearest``, ...; see ``vlkernels._backend.dispatch``);
- ``cov.fallbacks``: one :class:`Fallback` (``.op``, ``.reason``) per call that ran torch's
  path (or HF's forward) instead of the kernels: a module or model with an option the kernel
  does not take, a wrapped submodule, a patched HF forward that gives up.

:func:`record_fallback` is the one place every fallback goes: outside any block it warns once
per (op, reason) with a :class:`FallbackWarning`; inside it records as well (and still warns once).
Nested blocks each record. The active blocks live in a ContextVar, so a block sees the calls of
its own thread or asyncio task only (a new thread starts outside every block). While
torch.compile traces, nothing is recorded and nothing is warned (the graph stays whole); the
eager calls of the same code report.
"""
from __future__ import annotations

import contextvars
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Fallback", "FallbackWarning", "KernelCoverage", "OpCall", "kernel_coverage", "record_fallback"]


class FallbackWarning(UserWarning):
    """A vlkernels module, model or patched HF forward ran a call without its kernel (see the message)."""


@dataclass(frozen=True)
class OpCall:
    """One dispatched op call: ``op`` ran on ``backend`` (``torch``, ``triton``, ``cuda`` or ``cpp``)."""

    op: str
    backend: str


@dataclass(frozen=True)
class Fallback:
    """One call of ``op`` that ran torch's path instead of the kernels, because of ``reason``."""

    op: str
    reason: str


@dataclass
class KernelCoverage:
    """What ran inside one ``kernel_coverage()`` block (a context manager; ``__enter__`` returns it)."""

    calls: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    _tokens: list = field(default_factory=list, repr=False, compare=False)

    def fallback_ops(self) -> set:
        """The names of the ops (and modules) that fell back at least once."""
        return {entry.op for entry in self.fallbacks}

    def backends(self, op: Optional[str] = None) -> dict:
        """{backend: number of calls} over every call, or over the calls of ``op``."""
        counts: dict = {}
        for entry in self.calls:
            if op is None or entry.op == op:
                counts[entry.backend] = counts.get(entry.backend, 0) + 1
        return counts

    def __enter__(self) -> "KernelCoverage":
        self._tokens.append(_active.set(_active.get() + (self,)))
        return self

    def __exit__(self, *exc) -> None:
        token = self._tokens.pop()
        try:
            _active.reset(token)
        except ValueError:  # left in another context than it was entered in: drop just this block
            _active.set(tuple(block for block in _active.get() if block is not self))


def kernel_coverage() -> KernelCoverage:
    """A context manager that records the op calls and fallbacks of the code inside it (see the module)."""
    return KernelCoverage()


# The blocks open in this thread / task, outermost first. Read only outside torch.compile's tracing.
_active: contextvars.ContextVar = contextvars.ContextVar("vlkernels_kernel_coverage", default=())

# (op, reason) pairs already warned about, process-wide.
_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _entries_of_open_blocks(field: str) -> list:
    """The ``field`` lists (calls or fallbacks) of every block open in this context."""
    return [getattr(block, field) for block in _active.get()]


def record_call(op: str, backend: str) -> None:
    """Count a call of ``op`` on ``backend`` in every open block (called by ``dispatch``)."""
    if torch.compiler.is_compiling():
        return
    for entries in _entries_of_open_blocks("calls"):
        entries.append(OpCall(op, backend))


def record_fallback(op: str, reason: str, *, stacklevel: int = 5) -> None:
    """Report that ``op`` ran torch's path instead of the kernels because of ``reason``: counted in
    every open ``kernel_coverage()`` block, and a :class:`FallbackWarning` once per (op, reason)
    per process (stacklevel 5 names the caller of a module's ``__call__``; a function passes 3)."""
    if torch.compiler.is_compiling():
        return
    for entries in _entries_of_open_blocks("fallbacks"):
        entries.append(Fallback(op, reason))
    with _WARNED_LOCK:
        if (op, reason) in _WARNED:
            return
        _WARNED.add((op, reason))
    warnings.warn(f"{op}: {reason}, so this call runs torch's path instead of the vlkernels kernels "
                  "(said once per reason; vlkernels.kernel_coverage() counts every call)",
                  FallbackWarning, stacklevel=stacklevel)
