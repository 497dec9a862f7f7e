"""Builds vlkernels, with its compiled extension ``vlkernels._C`` when it can.

Metadata lives in pyproject.toml; this file only adds the extension. The extension is built
with torch.utils.cpp_extension against the torch that is installed, so install with

    pip install --no-build-isolation -e ".[test,bench]"     # or: pip install --no-build-isolation .

- CPU build: python_bindings/*.cpp + csrc/cpu/**/*.cpp (C++17, OpenMP where the compiler has it).
- GPU build: also csrc/cuda/**/*.cu and python_bindings/cuda/*.cpp, for sm_80 and sm_90a, when
  torch was built with CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME, PATH or
  /usr/local/cuda).
- No extension (pure Python + Triton, with a warning) when VLKERNELS_NO_EXTENSION=1, when
  torch cannot be imported (pip's isolated build env) or when compiling fails.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The archs of the GPU build: A100 (sm_80) and H100 with its wgmma/TMA instructions (sm_90a,
# which only runs on compute capability 9.0 exactly).
CUDA_GENCODES = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
CUDA_ARCHS = "sm_80,sm_90a"
HOW_TO_BUILD = 'pip install --no-build-isolation -e ".[test,bench]" (or: pip install --no-build-isolation .)'


def _warn(message: str) -> None:
    """A build warning that stands out in pip's output (pip shows it with -v, or on failure)."""
    banner = "=" * 78
    body = textwrap.fill(message, width=78)
    print(f"\n{banner}\nWARNING (vlkernels): {body}\n{banner}\n", file=sys.stderr, flush=True)


def _sources(folder: str, suffix: str) -> list:
    # Relative, sorted paths: stable build.ninja files and stable object order across builds.
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob(f"*{suffix}"))


def _compiler_has_openmp() -> bool:
    """Whether the C++ compiler compiles and links ``-fopenmp`` (gcc does; Apple clang does not)."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.cpp")
        source.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([compiler, "-fopenmp", str(source), "-o", str(Path(tmp, "probe"))],
                                    capture_output=True)
        except OSError:
            return False
    return result.returncode == 0


def _extension_build():
    """(ext_modules, cmdclass) for setup(); both empty when the extension is not built."""
    if os.environ.get("VLKERNELS_NO_EXTENSION", "0") == "1":
        print("vlkernels: VLKERNELS_NO_EXTENSION=1, building without the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as error:  # ImportError, or a broken torch install
        _warn(f"torch is not importable at build time ({error}); pip builds in an isolated environment "
              "without torch unless given --no-build-isolation. vlkernels installs as pure Python + Triton, "
              f"without its compiled extension vlkernels._C. To build it, install torch, then: {HOW_TO_BUILD}")
        return [], {}

    # torch's BuildExtension compiles with $CXX, else c++. Without one there is nothing to try:
    # say so (vlkernels warns again when imported, since pip shows this only with -v).
    compiler = (os.environ.get("CXX", "").strip() or "c++").split()[0]
    if shutil.which(compiler) is None:
        _warn(f"no C++ compiler found ({compiler!r} is not on PATH; set CXX to choose one). The compiled "
              "extension vlkernels._C needs a C++17 compiler (g++ or clang++; nvcc too for the GPU build), so "
              f"vlkernels installs as pure Python + Triton without it. Install one, then reinstall: {HOW_TO_BUILD}")
        return [], {}

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    gpu_build = bool(torch.version.cuda) and nvcc is not None and nvcc.exists()
    if torch.version.cuda and not gpu_build:
        _warn(f"torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc was not found (set CUDA_HOME): "
              "building the CPU half of vlkernels._C only.")
    openmp = _compiler_has_openmp()

    # The build facts build_info() reports. Each -D value is a C string literal; torch quotes
    # every flag for the shell, so the quotes reach the compiler intact.
    defines = [f'-DVLKERNELS_TORCH_VERSION="{torch.__version__}"']
    # No -std: torch adds the C++ standard its headers need. No --use_fast_math: the kernels
    # are held to 1e-5 against float64, so a fast intrinsic is chosen at the line that wants it.
    cxx_flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    nvcc_flags = ["-O3", "-lineinfo"] + CUDA_GENCODES
    if gpu_build:
        defines += ["-DVLKERNELS_WITH_CUDA", f'-DVLKERNELS_CUDA_ARCHS="{CUDA_ARCHS}"',
                    f'-DVLKERNELS_CUDA_VERSION="{torch.version.cuda}"']
    # python_bindings/cuda/ includes ATen's CUDA headers: GPU build only.
    sources = [path for path in _sources("python_bindings", ".cpp") if gpu_build or Path(path).parts[1] != "cuda"]
    sources += _sources("csrc/cpu", ".cpp")
    common = dict(
        name="vlkernels._C",
        include_dirs=[str(ROOT / "csrc"), str(ROOT / "python_bindings")],
        extra_link_args=["-fopenmp"] if openmp else [],
    )
    if gpu_build:
        extension = CUDAExtension(sources=sources + _sources("csrc/cuda", ".cu"),
                                  extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
                                  **common)
    else:
        extension = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags + defines}, **common)
    what = f"GPU build ({CUDA_ARCHS}, CUDA {torch.version.cuda})" if gpu_build else "CPU build"
    print(f"vlkernels: building vlkernels._C against torch {torch.__version__}: {what}, "
          f"OpenMP {'on' if openmp else 'off'}", file=sys.stderr)

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension (ninja, torch's flags), except that a failed compile warns instead of failing."""

        failed: list = []

        def build_extensions(self):
            try:  # torch's checks before any compile (e.g. nvcc's CUDA major differs from torch's) raise here
                super().build_extensions()
            except Exception as error:
                self.failed.extend(ext.name for ext in self.extensions)
                _warn(f"building vlkernels._C failed ({error}), so vlkernels installs as pure Python + Triton "
                      f"without it. Fix the error above, then reinstall: {HOW_TO_BUILD}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler errors surface as RuntimeError, CompileError, ...
                self.failed.append(ext.name)
                _warn(f"compiling {ext.name} failed ({error}), so vlkernels installs as pure Python + Triton "
                      f"without it. Fix the compiler error above, then reinstall: {HOW_TO_BUILD}")

        def _built(self):
            return [ext for ext in self.extensions if ext.name not in self.failed]

        # Leave the failed extension out of what setuptools copies (inplace / editable) and packs,
        # and delete its stale in-tree copy, which would otherwise load with yesterday's kernels.
        def copy_extensions_to_source(self):
            package_dir = self.get_finalized_command("build_py").get_package_dir("vlkernels")
            for name in self.failed:
                stale = Path(package_dir, Path(self.get_ext_filename(name)).name)
                if stale.exists():
                    print(f"vlkernels: removing the stale {stale}", file=sys.stderr)
                    stale.unlink()
            self.extensions, every = self._built(), self.extensions
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = every

        def get_outputs(self):
            return [path for path in super().get_outputs() if Path(path).exists() or not self.failed]

        def get_output_mapping(self):
            return {dest: src for dest, src in super().get_output_mapping().items()
                    if Path(src).exists() or not self.failed}

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
