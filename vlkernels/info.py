"""``vlkernels-info`` / ``python -m vlkernels.info``: what vlkernels will run on this machine.

Prints the versions that matter, the device, the requested backend, whether each backend is
usable (and why not) and how the compiled extension was built. Paste it into bug reports.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import warnings


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu only"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}, {torch.cuda.device_count()} visible)"


def lines() -> list[str]:
    """The report, one line per fact."""
    import torch

    import vlkernels
    from vlkernels import _backend, _extension

    with warnings.catch_warnings():  # the reason is printed below; the load warning would repeat it
        warnings.simplefilter("ignore", RuntimeWarning)
        availability = _backend.backend_availability()
        info = _extension.build_info()
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
    out = [
        f"vlkernels        {vlkernels.__version__}",
        f"python           {platform.python_version()} ({sys.executable})",
        f"torch            {torch.__version__}{cuda}",
        f"triton           {_version('triton')}",
        f"numpy            {_version('numpy')}",
        f"device           {_device()}",
        f"TRITON_INTERPRET {os.environ.get('TRITON_INTERPRET', 'unset')}",
        f"backend          {_backend.requested_backend()} (VLKERNELS_BACKEND={os.environ.get('VLKERNELS_BACKEND', 'unset')})",
        "backends:",
    ]
    for name, why in availability.items():
        out.append(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    if info is None:
        out.append(f"extension        none ({_extension.unavailable_reason()})")
    else:
        archs = ", ".join(info["cuda_archs"]) or "none"
        cuda_part = f"CUDA {info['cuda_version']} for {archs}" if info["cuda"] else "no CUDA kernels"
        out.append(
            f"extension        vlkernels._C built against torch {info['torch_version']}, {cuda_part}, "
            f"{info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'}, "
            f"_GLIBCXX_USE_CXX11_ABI={info.get('cxx11_abi')}"
        )
    return out


def main() -> int:
    print("\n".join(lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
