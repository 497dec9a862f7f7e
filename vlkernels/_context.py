"""A setting chosen for a block of code (``use_backend``, ``deterministic``), local to the thread
or asyncio task that opened the block.

Eager code reads the block's value from a ContextVar, so overlapping blocks in two threads or
two asyncio tasks never see each other's choice, and nothing outlives the blocks. torch.compile
cannot trace ``ContextVar.get`` (torch 2.13: "Dynamo does not know how to trace method `get` of
class `ContextVar`", a graph break), so while it traces, the setting is read from
``process_value``: the value of the most recently opened block still open in the process (None
when none is), an attribute dynamo reads and guards on (a compiled function recompiles when it
changes). A block opened inside compiled code (a ``use_kernels=False`` model's forward) sets
``process_value`` for its body while dynamo traces, and restores it after. Only compiled code
running while blocks of different values overlap in several threads or tasks can see another's
choice; once they are all closed nothing is left over.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator, Optional

import torch


class BlockSetting:
    """The value of the innermost open block, per thread / task: ``with setting.block(v): ...``."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)
        self._open: dict = {}  # one key per open block, in the order they were opened
        self._lock = threading.Lock()
        self.process_value: Optional[Any] = None  # read while torch.compile traces (see the module)

    def get(self) -> Optional[Any]:
        """The innermost open block's value in this thread / task, None outside every block."""
        if torch.compiler.is_compiling():
            return self.process_value
        return self._var.get()

    @contextlib.contextmanager
    def block(self, value: Any) -> Iterator[None]:
        if torch.compiler.is_compiling():  # a block inside compiled code: its value while it traces
            previous, self.process_value = self.process_value, value
            try:
                yield
            finally:
                self.process_value = previous
            return
        key = object()
        token = self._var.set(value)
        with self._lock:
            self._open[key] = value
            self.process_value = value
        try:
            yield
        finally:
            try:
                self._var.reset(token)
            except ValueError:  # closed in another context than it was opened in (a moved generator)
                pass
            with self._lock:
                del self._open[key]
                self.process_value = next(reversed(self._open.values()), None)
