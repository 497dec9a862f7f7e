"""Runs the Triton kernels on CUDA where a GPU is present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before vlkernels is imported: @triton.jit reads it when the
kernel modules load.

Value checks run in the strict (host) mode, see below.

The property-based tests (hypothesis) share one profile: a bounded example budget so the
suite stays within CI's time, no per-example deadline (the interpreter's first call of a
kernel compiles it), and a fixed example sequence under CI so a run is reproducible.
"""
import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Bad values raise the library's own ValueError / IndexError in the strict (host) mode, which
# the bad-input tests expect; tests/test_op_contract.py proves the default (device) mode.
os.environ.setdefault("VLKERNELS_VALUE_CHECKS", "host")

settings.register_profile(
    "vlkernels", max_examples=12, deadline=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("vlkernels")
