"""The compiled extension ``vlkernels._C``, loaded lazily and never fatally.

The first call to any function here tries to import the extension once. A missing module (a
pure-Python install), a failed load (undefined symbols after torch was upgraded) or a module
built against another torch than the one running all leave the extension unavailable, with one
warning; ``unavailable_reason()`` then says why and the ``cpp`` / ``cuda`` backends refuse.
``VLKERNELS_NO_EXTENSION=1`` switches it off without a warning (setup.py then skips building it).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

HOW_TO_BUILD = 'pip install --no-build-isolation -e ".[test,bench]" (or: pip install --no-build-isolation .) with torch installed'


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) when the extension is usable, else (None, why not)."""
    if os.environ.get("VLKERNELS_NO_EXTENSION", "0") == "1":
        return None, "disabled by VLKERNELS_NO_EXTENSION=1"
    try:
        missing = importlib.util.find_spec("vlkernels._C") is None
    except (ImportError, ValueError):  # a broken entry in sys.modules: let the import below report it
        missing = False
    if missing:
        return _refuse(f"vlkernels._C is not built (or its build failed); build it with {HOW_TO_BUILD}")
    try:
        module = importlib.import_module("vlkernels._C")
    except Exception as error:  # ImportError (undefined symbol: torch changed since the build), OSError, ...
        return _refuse(f"vlkernels._C failed to load ({error}); rebuild it with {HOW_TO_BUILD}")
    try:
        info = dict(module.build_info())
    except Exception as error:
        return _refuse(f"vlkernels._C has no usable build_info() ({error}); rebuild it with {HOW_TO_BUILD}")
    mismatch = abi_mismatch(info)
    if mismatch:
        return _refuse(f"{mismatch}; rebuild it with {HOW_TO_BUILD}")
    return module, None


def warn_if_not_built() -> None:
    """At ``import vlkernels``: the one warning when the extension was not built at all (no C++
    compiler at install time, a failed compile), which pip shows only with -v. Cheap: it looks
    the module up without loading it; a built module is loaded (and checked) at first use."""
    if os.environ.get("VLKERNELS_NO_EXTENSION", "0") == "1":
        return
    try:
        missing = importlib.util.find_spec("vlkernels._C") is None
    except (ImportError, ValueError):
        return
    if missing:
        _load()  # warns once, naming how to build it; later calls reuse the cached answer


def abi_mismatch(info: dict) -> Optional[str]:
    """Why a module with this build_info() cannot run with the running torch, or None."""
    if info.get("torch_version") != torch.__version__:
        return (f"vlkernels._C was built against torch {info.get('torch_version')} but torch {torch.__version__} "
                "is running (the C++ ABI may differ)")
    abi = info.get("cxx11_abi")
    if abi is not None and abi != torch.compiled_with_cxx11_abi():
        return (f"vlkernels._C was built with _GLIBCXX_USE_CXX11_ABI={int(abi)} but torch with "
                f"{int(torch.compiled_with_cxx11_abi())}")
    if info.get("cuda") and info.get("cuda_version") != torch.version.cuda:
        return (f"vlkernels._C carries CUDA {info.get('cuda_version')} kernels but torch runs CUDA "
                f"{torch.version.cuda or 'none (a CPU build)'}")
    return None


def _refuse(reason: str) -> tuple[None, str]:
    warnings.warn(f"vlkernels: the C++/CUDA extension is unavailable: {reason}", RuntimeWarning, stacklevel=4)
    return None, reason


def extension() -> Optional[ModuleType]:
    """The loaded ``vlkernels._C`` module, or None when it is unavailable."""
    return _load()[0]


def unavailable_reason() -> Optional[str]:
    """None when the extension is usable, else why not."""
    return _load()[1]


def build_info() -> Optional[dict]:
    """How the extension was built (torch_version, cuda, cuda_archs, cuda_version, compiler, openmp,
    cxx11_abi), or None."""
    module = extension()
    return None if module is None else dict(module.build_info())


def has_cuda_kernels() -> bool:
    """True when the extension is usable and carries CUDA kernels (the GPU build)."""
    info = build_info()
    return bool(info and info.get("cuda"))
