"""The ops: each a public function that validates its inputs and dispatches to a backend.

Every op traces into torch.compile(fullgraph=True) without a graph break; the checks of input
values that need a host sync in eager mode run inside the graph there (vlkernels.ops._checks).
Excepted by nature: unpad_input and the ViLT patch helpers, whose output shapes depend on the data.
"""
from vlkernels.ops import attention as _attention_module
from vlkernels.ops import mome_ffn as _mome_ffn_module
from vlkernels.ops import optimal_transport as _optimal_transport_module
from vlkernels.ops import patch_embed as _patch_embed_module
from vlkernels.ops import visual_dictionary as _visual_dictionary_module
from vlkernels.ops.attention import attention, attention_varlen, co_attention, pad_input, unpad_input
from vlkernels.ops.mome_ffn import mome_ffn
from vlkernels.ops.optimal_transport import gromov_wasserstein_distance, ipot, sinkhorn, wra_distance
from vlkernels.ops.patch_embed import patch_embed
from vlkernels.ops.vilt_patches import interpolate_pos_embed, select_patches, valid_patch_grid, vilt_visual_embed
from vlkernels.ops.visual_dictionary import vd_ema_update_, vd_nearest

# Modules holding Triton kernels, each with aot_variants() for the sm_90a report.
KERNEL_MODULES = (_patch_embed_module, _visual_dictionary_module, _attention_module, _mome_ffn_module,
                  _optimal_transport_module)

__all__ = [
    "attention", "attention_varlen", "co_attention", "gromov_wasserstein_distance", "interpolate_pos_embed", "ipot",
    "mome_ffn", "pad_input", "patch_embed", "select_patches", "sinkhorn", "unpad_input", "valid_patch_grid",
    "vd_ema_update_", "vd_nearest", "vilt_visual_embed", "wra_distance",
]
