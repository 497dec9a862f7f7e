"""Runs the Triton kernels on CUDA where a GPU is present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before vlkernels is imported: @triton.jit reads it when the
kernel modules load.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
