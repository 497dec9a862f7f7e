"""Checks of input values (ids in range, finite costs, sequence bounds, non-negative lengths).

Shape, dtype and device checks need no data and always raise before any launch. A check of
the data itself needs its verdict somewhere, and where depends on the mode:

- ``"device"`` (the default): ``torch._assert_async`` checks the verdict where the data lives,
  without a host read. On a GPU a host read is a stream synchronisation inside every layer, so
  no op reads a value on the host in this mode; a violation raises RuntimeError with the op's
  message (on CUDA, a device-side assert that ends the process's CUDA context).
- ``"host"`` (strict): the verdict is read on the host (one sync) and a violation raises the
  library's own ValueError / IndexError before any kernel launches. Choose it while debugging a
  data pipeline: ``VLKERNELS_VALUE_CHECKS=host`` or ``vlkernels.set_value_checks("host")``.

Under torch.compile the device form is always used: a host read would break the graph, and
``torch._check`` would need the value on the host as an unbacked symbol.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

VALUE_CHECK_MODES = ("device", "host")

# Set by set_value_checks / value_checks; None defers to VLKERNELS_VALUE_CHECKS. A module
# global, like the backend choice: torch.compile traces globals without a graph break.
_mode: Optional[str] = None


def _checked(mode: str) -> str:
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"value checks must be one of {', '.join(VALUE_CHECK_MODES)}, got {mode!r}")
    return mode


def value_check_mode() -> str:
    """The mode in force: set_value_checks / value_checks, else VLKERNELS_VALUE_CHECKS, else "device"."""
    if _mode is not None:
        return _mode
    return _checked(os.environ.get("VLKERNELS_VALUE_CHECKS", "device").strip().lower() or "device")


def set_value_checks(mode: str) -> None:
    """Check input values on the "device" (default: no host read, RuntimeError on a violation)
    or on the "host" (one sync per check, the library's ValueError before any launch)."""
    global _mode
    _mode = _checked(mode)


@contextlib.contextmanager
def value_checks(mode: str) -> Iterator[None]:
    """set_value_checks for the calls inside the block."""
    global _mode
    outer, _mode = _mode, _checked(mode)
    try:
        yield
    finally:
        _mode = outer


def compiling() -> bool:
    """True while torch.compile traces the caller."""
    return torch.compiler.is_compiling()


def reads_on_host() -> bool:
    """True when value checks read their verdict on the host now (strict mode, eager)."""
    return not compiling() and value_check_mode() == "host"


def check_value(ok: torch.Tensor, message: str, error: type = ValueError) -> None:
    """Fail with ``message`` unless the one-element bool tensor ``ok`` is True: on the host as
    ``error`` in strict mode, else in place without a host read (RuntimeError)."""
    if reads_on_host():
        if not bool(ok):
            raise error(message)
    else:
        torch._assert_async(ok, message)


def assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless the one-element bool tensor ``ok`` is True (checked in place)."""
    torch._assert_async(ok, message)
