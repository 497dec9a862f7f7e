"""vlkernels.kernel_coverage(): which backend ran each op call, and every fallback with its reason;
nested blocks, threads and asyncio tasks each see their own calls; nothing is recorded (and the
graph stays whole) while torch.compile traces."""
import asyncio
import threading
import warnings

import pytest
import torch

import vlkernels
from vlkernels import _backend, _coverage, ops
from vlkernels.nn import MultiheadAttention


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_coverage, "_WARNED", set())


def _nearest():
    ops.vd_nearest(torch.randn(5, 4), torch.randn(3, 4))


def test_calls_name_the_op_and_the_backend_that_ran_it():
    with vlkernels.kernel_coverage() as cov:
        with vlkernels.use_backend("torch"):
            _nearest()
        with vlkernels.use_backend("triton"):
            _nearest()
    assert [(c.op, c.backend) for c in cov.calls] == [("vd_nearest", "torch"), ("vd_nearest", "triton")]
    assert cov.backends() == {"torch": 1, "triton": 1} and cov.backends("attention") == {}
    assert cov.fallbacks == [] and cov.fallback_ops() == set()


def test_auto_records_the_backend_auto_picked():
    """vd_nearest has no C++ implementation (auto runs torch on CPU); wra_distance has one."""
    with vlkernels.kernel_coverage() as cov:
        _nearest()
        ops.wra_distance(torch.randn(1, 3, 4), torch.randn(1, 2, 4), None, None, iters=2)
    native = "cpp" if _backend.backend_availability()["cpp"] is None else "torch"
    assert [(c.op, c.backend) for c in cov.calls] == [("vd_nearest", "torch"), ("wra_distance", native)]


def test_a_refused_call_records_nothing():
    with vlkernels.kernel_coverage() as cov, vlkernels.use_backend("cuda"):
        if _backend.backend_availability()["cuda"] is None:
            pytest.skip("the CUDA backend runs here")
        with pytest.raises(vlkernels.NoBackendError):
            _nearest()
    assert cov.calls == []


def test_fallbacks_are_recorded_every_time_and_warned_once():
    module = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.warns(vlkernels.FallbackWarning, match="need_weights=True") as caught:
        with vlkernels.kernel_coverage() as cov:
            module(x, x, x)  # need_weights defaults to True: torch's path
            module(x, x, x)
            module(x, x, x, need_weights=False)  # the kernel
    assert len([w for w in caught if issubclass(w.category, vlkernels.FallbackWarning)]) == 1
    assert [f.op for f in cov.fallbacks] == ["MultiheadAttention"] * 2
    assert "need_weights=True" in cov.fallbacks[0].reason and cov.fallback_ops() == {"MultiheadAttention"}
    assert [c.op for c in cov.calls] == ["attention"]  # only the kernel call dispatched an op


def test_outside_a_block_a_fallback_only_warns_once_per_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _coverage.record_fallback("op", "reason a")
            _coverage.record_fallback("op", "reason b")
    messages = [str(w.message) for w in caught if issubclass(w.category, vlkernels.FallbackWarning)]
    assert len(messages) == 2 and messages[0].startswith("op: reason a") and "reason b" in messages[1]


@pytest.mark.filterwarnings("ignore::vlkernels.FallbackWarning")
def test_nested_blocks_each_record():
    with vlkernels.kernel_coverage() as outer:
        _nearest()
        with vlkernels.kernel_coverage() as inner:
            _nearest()
            _coverage.record_fallback("op", "why")
        _nearest()
    assert (len(outer.calls), len(inner.calls)) == (3, 1)
    assert outer.fallbacks == inner.fallbacks == [_coverage.Fallback("op", "why")]
    with vlkernels.kernel_coverage() as again:  # a closed block records no more
        _nearest()
    assert (len(outer.calls), len(inner.calls), len(again.calls)) == (3, 1, 1)


@pytest.mark.filterwarnings("ignore::vlkernels.FallbackWarning")
def test_overlapping_blocks_in_threads_see_their_own_calls():
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def worker(calls: int):
        try:
            with vlkernels.kernel_coverage() as cov:
                barrier.wait()  # both blocks open
                for _ in range(calls):
                    _nearest()
                _coverage.record_fallback(f"op{calls}", "why")
                barrier.wait()  # both done before either closes
            results[calls] = cov
        except Exception as error:  # surfaced below: an exception in a thread fails nothing by itself
            errors.append(error)

    with vlkernels.kernel_coverage() as main:
        threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert (len(results[1].calls), len(results[2].calls)) == (1, 2)
    assert (results[1].fallback_ops(), results[2].fallback_ops()) == ({"op1"}, {"op2"})
    assert main.calls == [] and main.fallbacks == []  # a new thread starts outside every block


def test_overlapping_blocks_in_asyncio_tasks_see_their_own_calls():
    async def task(calls: int, started: asyncio.Event, other: asyncio.Event):
        with vlkernels.kernel_coverage() as cov:
            started.set()
            await other.wait()  # the other task's block is open too
            for _ in range(calls):
                _nearest()
                await asyncio.sleep(0)  # interleave with the other task
        return cov

    async def main():
        first, second = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task(1, first, second), task(3, second, first))

    one, three = asyncio.run(main())
    assert (len(one.calls), len(three.calls)) == (1, 3)


def test_nothing_is_recorded_or_broken_while_compiling():
    module = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)

    def run(x):
        ops.vd_nearest(x[0], x[1, :2])
        _coverage.record_fallback("compiled", "why")
        return module(x, x, x, need_weights=False)[0]

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", vlkernels.FallbackWarning)  # not warned while tracing either
        with vlkernels.kernel_coverage() as cov:
            compiled = torch.compile(run, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, module(x, x, x, need_weights=False)[0])
    assert cov.calls == [] and cov.fallbacks == []
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
