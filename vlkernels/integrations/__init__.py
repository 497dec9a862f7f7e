"""Patch HuggingFace transformers models to run on the vlkernels ops, Liger-Kernel style.

``apply_vlkernels(model)`` dispatches by model type to the per-model functions below.
``apply_vlkernels_to_<model>(model)`` binds kernel forwards on a loaded model's modules (state
dict and outputs unchanged); ``apply_vlkernels_to_<model>()`` patches the transformers classes
so models created afterwards use the kernels. ``revert_vlkernels_to_<model>`` undoes either.
transformers is imported only when one of these functions is called; the supported versions
are :data:`TRANSFORMERS_RANGE` (4.57.x and 5.x), any other raises an ImportError.
"""
from vlkernels.integrations.lxmert import apply_vlkernels_to_lxmert, revert_vlkernels_to_lxmert
from vlkernels.integrations.vilt import apply_vlkernels_to_vilt, revert_vlkernels_to_vilt
from vlkernels.integrations.visual_bert import apply_vlkernels_to_visual_bert, revert_vlkernels_to_visual_bert
from vlkernels.integrations.vit import apply_vlkernels_to_vit, revert_vlkernels_to_vit
from vlkernels.integrations._kernels import FallbackWarning
from vlkernels.integrations._versions import TRANSFORMERS_RANGE, TRANSFORMERS_VERSIONS
from vlkernels.integrations.auto import apply_vlkernels, revert_vlkernels

__all__ = [
    "apply_vlkernels", "revert_vlkernels",
    "apply_vlkernels_to_lxmert", "apply_vlkernels_to_vilt", "apply_vlkernels_to_visual_bert", "apply_vlkernels_to_vit",
    "revert_vlkernels_to_lxmert", "revert_vlkernels_to_vilt", "revert_vlkernels_to_visual_bert",
    "revert_vlkernels_to_vit", "FallbackWarning", "TRANSFORMERS_RANGE", "TRANSFORMERS_VERSIONS",
]
