"""vlkernels: Triton and CUDA kernels for vision-language pretraining, with drop-in torch modules."""
from vlkernels._coverage import FallbackWarning, kernel_coverage
from vlkernels._backend import BACKENDS, NoBackendError, requested_backend, use_backend
from vlkernels._deterministic import deterministic, is_deterministic, set_deterministic
from vlkernels.flash_attn import flash_attn_func, flash_attn_varlen_func
from vlkernels.integrations import apply_vlkernels, revert_vlkernels
from vlkernels.ops._checks import set_value_checks, value_check_mode, value_checks
from vlkernels import _extension as _extension_module

_extension_module.warn_if_not_built()  # an install without a C++ compiler warns here: pip hides setup.py's warning
del _extension_module

__version__ = "0.1.0"
__all__ = ["BACKENDS", "FallbackWarning", "NoBackendError", "deterministic", "flash_attn_func", "flash_attn_varlen_func",
           "apply_vlkernels", "is_deterministic", "kernel_coverage", "requested_backend", "revert_vlkernels",
           "set_deterministic", "set_value_checks", "use_backend", "value_check_mode", "value_checks", "__version__"]
