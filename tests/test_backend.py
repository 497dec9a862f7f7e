"""Backend selection: environment variable, context manager (local to each thread / asyncio task, and
read by torch.compile without a graph break), and the error naming every refusal."""
import asyncio
import threading

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


def test_overlapping_blocks_in_threads_never_leak(monkeypatch):
    """Two requests served at once, each in its own use_backend block: each sees its own choice, a
    third thread sees the environment's, and once both blocks closed (in the order that used to pin
    the process to a backend) VLKERNELS_BACKEND holds again everywhere."""
    monkeypatch.setenv("VLKERNELS_BACKEND", "torch")
    opened, first_closed, seen, errors = threading.Barrier(3, timeout=30), threading.Barrier(2, timeout=30), {}, []

    def request(name: str, closes_first: bool):
        try:
            with vlkernels.use_backend(name):
                opened.wait()  # both blocks open, the outsider looking
                seen[name] = vlkernels.requested_backend()
                if not closes_first:
                    first_closed.wait()  # the other block has closed
                    seen[name + " after the other closed"] = vlkernels.requested_backend()
            if closes_first:
                first_closed.wait()
            seen[name + " after"] = vlkernels.requested_backend()
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=request, args=("triton", True)),
               threading.Thread(target=request, args=("cpp", False))]
    for thread in threads:
        thread.start()
    opened.wait()
    seen["outsider"] = vlkernels.requested_backend()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen == {"triton": "triton", "cpp": "cpp", "outsider": "torch", "cpp after the other closed": "cpp",
                    "triton after": "torch", "cpp after": "torch"}
    assert vlkernels.requested_backend() == "torch" and _backend._requested.process_value is None
    monkeypatch.setenv("VLKERNELS_BACKEND", "cpp")
    assert vlkernels.requested_backend() == "cpp"


def test_overlapping_blocks_in_asyncio_tasks_never_leak(monkeypatch):
    monkeypatch.setenv("VLKERNELS_BACKEND", "torch")

    async def request(name: str, mine: asyncio.Event, other: asyncio.Event):
        seen = []
        with vlkernels.use_backend(name):
            mine.set()
            await other.wait()  # the other task's block is open too
            for _ in range(3):
                seen.append(vlkernels.requested_backend())
                await asyncio.sleep(0)  # the other task runs between two reads
        seen.append(vlkernels.requested_backend())
        return seen

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(request("triton", a, b), request("cpp", b, a))

    assert asyncio.run(main()) == [["triton"] * 3 + ["torch"], ["cpp"] * 3 + ["torch"]]
    assert vlkernels.requested_backend() == "torch"


def test_compiled_code_follows_the_block_without_a_graph_break(monkeypatch):
    """torch.compile cannot trace ContextVar.get: compiled code reads the open block's choice from
    a value dynamo guards on, so it recompiles for a new choice and never breaks the graph."""
    monkeypatch.setenv("VLKERNELS_BACKEND", "auto")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(lambda x: x * 2 if vlkernels.requested_backend() == "torch" else x * 3,
                             fullgraph=True, backend="eager")
    x = torch.ones(2)
    assert compiled(x).tolist() == [3, 3]
    with vlkernels.use_backend("torch"):
        assert compiled(x).tolist() == [2, 2]
    assert compiled(x).tolist() == [3, 3]
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2


def test_blocks_opened_inside_compiled_code_hold_for_their_body(monkeypatch):
    """use_backend and deterministic() opened inside a compiled function (a use_kernels=False
    model) trace without a graph break: the body traces with the block's value, the code after
    it with the value from before, and nothing is left set once the call returns."""
    from vlkernels import _backend, _deterministic
    monkeypatch.setenv("VLKERNELS_BACKEND", "auto")
    torch._dynamo.reset()
    seen = []

    def body(x):
        seen.append((vlkernels.requested_backend(), vlkernels.is_deterministic()))
        return x + 1

    def f(x):
        with vlkernels.use_backend("cpp"), vlkernels.deterministic():
            x = body(x)
        return body(x)
    assert torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2)).tolist() == [3, 3]
    assert seen == [("cpp", True), ("auto", False)]
    assert _backend._requested.process_value is None and _deterministic._block.process_value is None
