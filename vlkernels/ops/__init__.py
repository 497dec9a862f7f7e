"""The ops: each a public function that validates its inputs and dispatches to a backend."""
from vlkernels.ops import patch_embed as _patch_embed_module
from vlkernels.ops import visual_dictionary as _visual_dictionary_module
from vlkernels.ops.patch_embed import patch_embed
from vlkernels.ops.visual_dictionary import vd_ema_update_, vd_nearest

# Modules holding Triton kernels, each with aot_variants() for the sm_90a report.
KERNEL_MODULES = (_patch_embed_module, _visual_dictionary_module)

__all__ = ["patch_embed", "vd_ema_update_", "vd_nearest"]
