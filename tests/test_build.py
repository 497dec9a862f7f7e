"""The build: the compiled extension loads and matches the running torch, every .cu in csrc/
compiles for the GPU build's archs, the extension loader degrades safely, vlkernels.info runs."""
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from vlkernels import _extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted(ROOT.glob("csrc/**/*.cu"))
# The GPU build's archs (setup.py): SASS for A100 and for H100 with wgmma/TMA (sm_90a).
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
DELIBERATELY_UNBUILT = os.environ.get("VLKERNELS_NO_EXTENSION", "0") == "1"


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home, "bin", "nvcc")
    return str(candidate) if candidate.exists() else None


def _cuobjdump():
    """The cuobjdump shipped inside the triton wheel, else one on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


@pytest.mark.skipif(DELIBERATELY_UNBUILT, reason="VLKERNELS_NO_EXTENSION=1: vlkernels._C deliberately not built")
def test_extension_loads_and_matches_running_torch():
    assert _extension.unavailable_reason() is None, _extension.unavailable_reason()
    module = _extension.extension()
    assert module is not None and module.__name__ == "vlkernels._C"
    info = _extension.build_info()
    assert set(info) >= {"torch_version", "cuda", "cuda_archs", "cuda_version", "compiler", "openmp", "cxx11_abi"}
    assert info["cxx11_abi"] == torch.compiled_with_cxx11_abi()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert _extension.has_cuda_kernels() is info["cuda"]
    if info["cuda"]:
        assert torch.version.cuda, "a CUDA build of the extension needs a CUDA torch"
        assert info["cuda_archs"] == list(ARCHS) and info["cuda_version"] == torch.version.cuda
        assert hasattr(module, "cuda_kernel_arch")
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None
        assert not hasattr(module, "cuda_kernel_arch")
    assert re.fullmatch(r"(gcc|clang|msvc) [0-9.]+", info["compiler"]), info["compiler"]
    if sys.platform.startswith("linux"):
        assert info["openmp"], "setup.py builds with -fopenmp wherever the compiler has it (gcc on Linux does)"


@pytest.mark.skipif(not (_extension.has_cuda_kernels() and torch.cuda.is_available()),
                    reason="needs the GPU build of vlkernels._C and a CUDA device")
def test_cuda_kernels_run_on_this_gpu():
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        expected = 900  # the sm_90a SASS
    elif major == 8:
        expected = 800  # sm_80 SASS runs on every 8.x device
    else:
        pytest.skip(f"the GPU build carries SASS for {', '.join(ARCHS)} only, none for sm_{major}{minor}")
    assert _extension.extension().cuda_kernel_arch(torch.cuda.current_device()) == expected


@pytest.fixture
def fresh_loader():
    """Lets a test reload the extension under a fake vlkernels._C; restores the real one afterwards."""
    _extension._load.cache_clear()
    yield
    _extension._load.cache_clear()


def test_loader_refuses_a_module_built_against_another_torch(monkeypatch, fresh_loader):
    stale = types.ModuleType("vlkernels._C")
    stale.__spec__ = importlib.machinery.ModuleSpec("vlkernels._C", None)
    stale.build_info = lambda: {"torch_version": "1.0.0", "cuda": False, "cuda_archs": []}
    monkeypatch.setitem(sys.modules, "vlkernels._C", stale)
    monkeypatch.delenv("VLKERNELS_NO_EXTENSION", raising=False)
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
        assert _extension.extension() is None
    assert "--no-build-isolation" in _extension.unavailable_reason()
    assert _extension.build_info() is None and _extension.has_cuda_kernels() is False


@pytest.mark.parametrize("built, message", [
    ({"cxx11_abi": not torch.compiled_with_cxx11_abi()}, "_GLIBCXX_USE_CXX11_ABI"),
    ({"cuda": True, "cuda_archs": ["sm_90a"], "cuda_version": "9.9"}, "carries CUDA 9.9 kernels"),
], ids=["cxx11-abi", "cuda-version"])
def test_loader_refuses_an_abi_mismatch_and_falls_back(monkeypatch, fresh_loader, built, message):
    stale = types.ModuleType("vlkernels._C")
    stale.__spec__ = importlib.machinery.ModuleSpec("vlkernels._C", None)
    stale.build_info = lambda: {"torch_version": torch.__version__, "cuda": False, "cuda_archs": [], **built}
    monkeypatch.setitem(sys.modules, "vlkernels._C", stale)
    monkeypatch.delenv("VLKERNELS_NO_EXTENSION", raising=False)
    with pytest.warns(RuntimeWarning, match=message):
        assert _extension.extension() is None
    # The ops fall back: auto on CPU runs the torch reference instead of the refused C++ ipot.
    import vlkernels
    from vlkernels.ops import ipot
    cost = torch.rand(2, 5, 4)
    with pytest.raises(vlkernels.NoBackendError, match="cpp"), vlkernels.use_backend("cpp"):
        ipot(cost, None, None)
    with vlkernels.use_backend("torch"):
        expected = ipot(cost, None, None)
    assert torch.equal(ipot(cost, None, None), expected)


def test_loader_survives_a_missing_module(monkeypatch, fresh_loader):
    monkeypatch.setitem(sys.modules, "vlkernels._C", None)  # how Python marks a module as not importable
    monkeypatch.delenv("VLKERNELS_NO_EXTENSION", raising=False)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert _extension.extension() is None
    assert _extension.has_cuda_kernels() is False


def test_loader_off_switch_is_silent(monkeypatch, fresh_loader, recwarn):
    monkeypatch.setenv("VLKERNELS_NO_EXTENSION", "1")
    assert _extension.extension() is None
    assert "VLKERNELS_NO_EXTENSION" in _extension.unavailable_reason()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (PATH, CUDA_HOME or /usr/local/cuda)")
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("source", CU_FILES, ids=[str(path.relative_to(ROOT / "csrc")) for path in CU_FILES])
def test_cu_file_compiles(source, arch, tmp_path):
    """Each torch-free .cu compiles to an object with SASS for the arch (as in the GPU build, without torch)."""
    obj = tmp_path / (source.stem + ".o")
    command = [_nvcc(), "-c", str(source), "-o", str(obj), "-I", str(ROOT / "csrc"), "-std=c++17", "-O3",
               "-lineinfo", ARCHS[arch]]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    cuobjdump = _cuobjdump()
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
        # cuobjdump names the sm_90a cubin "sm_90"
        assert re.search(rf"\.{arch.rstrip('a')}\.cubin", listing), listing


def test_info_prints_every_backend():
    result = subprocess.run([sys.executable, "-m", "vlkernels.info"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in ("torch", "triton", "cuda", "cpp"):
        assert re.search(rf"^\s+{name}\s+(available|unavailable: .+)$", result.stdout, re.M), result.stdout
    for field in ("vlkernels", "torch", "triton", "numpy", "device", "TRITON_INTERPRET", "backend", "extension"):
        assert re.search(rf"^{field}\s", result.stdout, re.M), f"no {field!r} line in:\n{result.stdout}"


def test_info_main_in_process(capsys):
    from vlkernels import info

    assert info.main() == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "0.1.0" in out


def _cmake_globs(kind: str) -> list:
    """The files a file(GLOB[_RECURSE] VAR ... "<dir>/<pattern>") line of CMakeLists.txt names."""
    text = (ROOT / "CMakeLists.txt").read_text()
    files = []
    for recurse, pattern in re.findall(rf'file\((GLOB(?:_RECURSE)?) VLKERNELS_{kind} [A-Z_ ]*"\$\{{CMAKE_CURRENT_SOURCE_DIR\}}/([^"]+)"\)', text):
        folder, name = pattern.rsplit("/", 1)
        files += (ROOT / folder).rglob(name) if recurse == "GLOB_RECURSE" else (ROOT / folder).glob(name)
    return sorted(files)


def test_cmake_builds_every_source_setup_py_builds():
    # The standalone library (CMakeLists.txt) and the extension (setup.py) compile the same csrc/.
    cpu = sorted(ROOT.glob("csrc/cpu/**/*.cpp"))
    assert cpu and _cmake_globs("CPU_SOURCES") == cpu
    assert _cmake_globs("CUDA_SOURCES") == CU_FILES
    tests = _cmake_globs("CPU_TESTS")
    assert {path.name for path in tests} >= {"test_optimal_transport.cpp", "test_visual_dictionary.cpp"}
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "80-real 90a-real" in text  # the archs of setup.py's GPU build
    assert "add_test(" in text and "csrc/tests" in text


def test_import_warns_when_the_extension_was_never_built():
    # pip shows setup.py's warning only with -v, so `import vlkernels` says it again (once).
    hide = ("import importlib.util, warnings; find = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'vlkernels._C' else find(name, *a); "
            "warnings.simplefilter('default'); import vlkernels; from vlkernels import _extension; "
            "print('reason:', _extension.unavailable_reason())")
    env = {k: v for k, v in os.environ.items() if k != "VLKERNELS_NO_EXTENSION"}
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the C++/CUDA extension is unavailable") == 1, proc.stderr
    assert "not built" in proc.stderr and "reason: vlkernels._C is not built" in proc.stdout


def test_setup_py_warns_and_installs_pure_python_without_a_compiler(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"))
    env.pop("VLKERNELS_NO_EXTENSION", None)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "vlkernels"
    warning = " ".join(proc.stderr.split())  # the box wraps its text at 78 columns
    assert "WARNING (vlkernels): no C++ compiler found" in warning and "needs a C++17 compiler" in warning
