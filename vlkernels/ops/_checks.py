"""Checks of input values (ids in range, finite costs, sequence bounds) under torch.compile.

In eager mode the ops read such a verdict on the host (one sync) and raise a ValueError or
IndexError that names the offending values. Under torch.compile that host read (``.item()``,
``int(t)``, ``bool(t)``) would break the graph, so each op states the same condition once more
for the compiled path, through :func:`assert_in_graph`: ``torch._assert_async`` is traced into
the graph and checked where the data lives, without a sync; a violation raises RuntimeError
with the message (on CUDA, a device-side assert that ends the process's CUDA context).

Chosen over skipping the checks (a bad expert id or entry index would then index out of
bounds inside a kernel) and over ``torch._check`` (it needs the data on the host as an
unbacked symbol: ``capture_scalar_outputs``, a user setting, and still a sync).
Shape, dtype and device checks need no data and stay as they are under torch.compile.
"""
import torch


def compiling() -> bool:
    """True while torch.compile traces the caller: take the in-graph checks instead of host reads."""
    return torch.compiler.is_compiling()


def assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless the one-element bool tensor ``ok`` is True (checked in the graph)."""
    torch._assert_async(ok, message)
