"""Backend selection: environment variable, context manager, and the error naming every refusal."""
import pytest
import torch

import vlkernels
from vlkernels import _backend
from vlkernels._backend import Implementation, NoBackendError, dispatch


def test_context_manager_overrides_environment(monkeypatch):
    monkeypatch.setenv("VLKERNELS_BACKEND", "torch")
    assert vlkernels.requested_backend() == "torch"
    with vlkernels.use_backend("triton"):
        assert vlkernels.requested_backend() == "triton"
        with vlkernels.use_backend("cpp"):
            assert vlkernels.requested_backend() == "cpp"
        assert vlkernels.requested_backend() == "triton"
    assert vlkernels.requested_backend() == "torch"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown vlkernels backend 'tirton'"):
        with vlkernels.use_backend("tirton"):
            pass
    monkeypatch.setenv("VLKERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="unknown vlkernels backend 'gpu'"):
        vlkernels.requested_backend()


def _impls(calls):
    return [
        Implementation("cpp", lambda x: "not built", lambda x: calls.append("cpp")),
        Implementation("triton", lambda x: None if x > 0 else "x must be positive", lambda x: calls.append("triton")),
        Implementation("torch", lambda x: None, lambda x: calls.append("torch")),
    ]


def test_auto_order_skips_refusals_and_explicit_names_run_only_that_backend():
    calls = []
    with vlkernels.use_backend("auto"):
        dispatch("demo", _impls(calls), torch.device("cpu"), 1)  # cpp refuses, triton is not in the CPU order
        dispatch("demo", _impls(calls), torch.device("cuda"), 1)  # no cuda impl, triton accepts
        dispatch("demo", _impls(calls), torch.device("cuda"), -1)  # triton refuses, torch accepts
    with vlkernels.use_backend("triton"):
        dispatch("demo", _impls(calls), torch.device("cpu"), 1)
    assert calls == ["torch", "triton", "torch", "triton"]


def test_error_lists_every_backend_tried_and_why():
    with vlkernels.use_backend("cpp"), pytest.raises(NoBackendError) as error:
        dispatch("demo", _impls([]), torch.device("cpu"), 1)
    assert "vlkernels.demo" in str(error.value) and "cpp: not built" in str(error.value)
    impls = [impl for impl in _impls([]) if impl.backend != "torch"]
    with vlkernels.use_backend("auto"), pytest.raises(NoBackendError) as error:
        dispatch("demo", impls, torch.device("cuda"), -1)
    message = str(error.value)
    assert "cuda: demo has no cuda implementation" in message
    assert "triton: x must be positive" in message
    assert "torch: demo has no torch implementation" in message


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _backend.triton_refusal(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.triton_refusal(torch.device("cpu")) is None
    assert "does not run on meta" in _backend.triton_refusal(torch.device("meta"))
