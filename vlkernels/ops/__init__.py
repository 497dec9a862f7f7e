"""The ops: each a public function that validates its inputs and dispatches to a backend."""
from vlkernels.ops import patch_embed as _patch_embed_module
from vlkernels.ops.patch_embed import patch_embed

# Modules holding Triton kernels, each with aot_variants() for the sm_90a report.
KERNEL_MODULES = (_patch_embed_module,)

__all__ = ["patch_embed"]
