"""Deterministic mode (vlkernels.set_deterministic): with the flag on, every op's outputs and
gradients are bit-identical (torch.equal) from one run to the next, on each backend that runs
here (torch, cpp, triton in the interpreter); the flag's two deterministic schedules compute
what the default ones do and avoid the ops torch runs with atomics on CUDA. deterministic() blocks
are local to their thread / asyncio task."""
import asyncio
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlkernels
from vlkernels import _extension, ops
from vlkernels.reference import patch_embed as patch_embed_reference
from vlkernels.reference import visual_dictionary as vd_reference
from vlkernels.testing import random_key_mask as _mask

BACKENDS = ["torch", "triton"]
CPP_BACKENDS = BACKENDS + ["cpp"]


@pytest.fixture(autouse=True)
def flag_off_after():
    yield
    vlkernels.set_deterministic(False)


def _rand(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def _vd_update(codebook, cluster_size, embed_avg, x, index, mask):
    state = [t.clone() for t in (codebook, cluster_size, embed_avg)]  # each run from the same state
    ops.vd_ema_update_(*state, x, index, decay=0.4, mask=mask)
    return state


def _mome(x, index, *weights):
    return ops.mome_ffn(x, index, *weights[:4], ln_weight=weights[4], ln_bias=weights[5])


def _mome_weights():
    return [_rand(3, 8, 16, grad=True), _rand(3, 16, grad=True), _rand(3, 16, 8, grad=True), _rand(3, 8, grad=True),
            _rand(3, 8, grad=True), _rand(3, 8, grad=True)]


CU = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
# name -> (function, inputs builder, backends); small odd sizes, fresh random inputs per test.
CASES = {
    "patch_embed": (lambda im, w, b, pos, cls: ops.patch_embed(im, w, b, pos_embed=pos, cls_token=cls),
                    lambda: [_rand(2, 3, 8, 12, grad=True), _rand(16, 3, 4, 4, grad=True), _rand(16, grad=True),
                             _rand(1, 7, 16, grad=True), _rand(1, 1, 16, grad=True)], BACKENDS),
    "attention": (lambda q, k, v, m: ops.attention(q, k, v, key_mask=m, causal=True),
                  lambda: [_rand(2, 2, 9, 16, grad=True) for _ in range(3)] + [_mask(2, 9)], BACKENDS),
    "attention-prefix": (lambda q, k, v: ops.attention(q, k, v, prefix_len=3),
                         lambda: [_rand(2, 2, 9, 16, grad=True) for _ in range(3)], BACKENDS),
    "co_attention": (lambda *a: ops.co_attention(*a[:6], text_mask=a[6], image_mask=a[7]),
                     lambda: [_rand(2, 2, 5, 16, grad=True) for _ in range(3)]
                     + [_rand(2, 2, 9, 16, grad=True) for _ in range(3)] + [_mask(2, 5), _mask(2, 9)], BACKENDS),
    "attention_varlen": (lambda q, k, v: ops.attention_varlen(q, k, v, CU, CU, 7, 7, causal=True),
                         lambda: [_rand(11, 2, 16, grad=True) for _ in range(3)], BACKENDS),
    "pad_input": (lambda packed: ops.pad_input(packed, torch.tensor([0, 1, 2, 5, 6, 9]), 2, 5),
                  lambda: [_rand(6, 2, 4, grad=True)], ["torch"]),  # plain torch, no backends
    "mome_ffn": (_mome, lambda: [_rand(2, 5, 8, grad=True), torch.randint(0, 3, (2, 5))] + _mome_weights(), BACKENDS),
    "mome_ffn-segments": (lambda x, *w: ops.mome_ffn(x, None, *w, segments=(2, 0, 1)),
                          lambda: [_rand(2, 5, 8, grad=True)] + _mome_weights()[:4], BACKENDS),
    "ipot": (lambda cost, xm, ym: ops.ipot(cost, xm, ym, iters=6),
             lambda: [torch.rand(2, 5, 7), _mask(2, 5), _mask(2, 7)], CPP_BACKENDS),
    "sinkhorn": (lambda cost: ops.sinkhorn(cost, reg=0.5, iters=8), lambda: [torch.rand(2, 5, 7)], CPP_BACKENDS),
    "wra_distance": (lambda txt, img, tm, im: ops.wra_distance(txt, img, tm, im, iters=6, return_plan=True),
                     lambda: [_rand(2, 5, 12, grad=True), _rand(2, 7, 12, grad=True), _mask(2, 5), _mask(2, 7)],
                     CPP_BACKENDS),
    "gromov_wasserstein_distance": (
        lambda txt, img, tm, im: ops.gromov_wasserstein_distance(txt, img, tm, im, iters=2, ot_iters=4),
        lambda: [_rand(2, 5, 12, grad=True), _rand(2, 7, 12, grad=True), _mask(2, 5), _mask(2, 7)], CPP_BACKENDS),
    "vd_nearest": (ops.vd_nearest, lambda: [_rand(40, 6), _rand(9, 6)], BACKENDS),
    "vd_ema_update_": (_vd_update, lambda: [_rand(5, 6), torch.rand(5), _rand(5, 6), _rand(40, 6),
                                            torch.randint(0, 5, (40,)), _mask(40)], CPP_BACKENDS),
}
PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}") for name, (_, _, backends) in CASES.items()
          for backend in backends]


def _outputs_and_grads(fn, inputs):
    """Every output tensor, then the gradient of sum(out * fixed cotangent) for each input that
    requires grad (the cotangent is a fixed function of the output's shape)."""
    outputs = fn(*inputs)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    differentiable = [out for out in outputs if out.requires_grad]
    grads = []
    if differentiable:
        generator = torch.Generator().manual_seed(1)
        loss = sum((out * torch.randn(out.shape, generator=generator)).sum() for out in differentiable)
        grads = list(torch.autograd.grad(loss, leaves))
    return [out.detach() for out in outputs] + grads


@pytest.mark.parametrize("name, backend", PARAMS)
def test_repeated_runs_are_bit_identical(name, backend):
    if backend == "cpp" and _extension.unavailable_reason() is not None:
        pytest.skip(f"the C++ extension is unavailable: {_extension.unavailable_reason()}")
    fn, make_inputs, _ = CASES[name]
    torch.manual_seed(0)
    inputs = make_inputs()
    vlkernels.set_deterministic(True)
    with vlkernels.use_backend(backend):
        first = _outputs_and_grads(fn, inputs)
        second = _outputs_and_grads(fn, inputs)
    assert len(first) == len(second) and len(first) > 0
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{name} on {backend}: result {index} differs between two runs"


def test_flag_api():
    assert not vlkernels.is_deterministic()
    with vlkernels.deterministic():
        assert vlkernels.is_deterministic()
        with vlkernels.deterministic(False):
            assert not vlkernels.is_deterministic()
        assert vlkernels.is_deterministic()
    assert not vlkernels.is_deterministic()
    vlkernels.set_deterministic(True)
    assert vlkernels.is_deterministic()
    vlkernels.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert vlkernels.is_deterministic()  # torch's own switch turns vlkernels' on too
    finally:
        torch.use_deterministic_algorithms(False)
    assert not vlkernels.is_deterministic()


def test_blocks_are_local_to_their_thread_and_set_deterministic_to_the_process():
    opened, closed, seen, errors = threading.Barrier(3, timeout=30), threading.Barrier(3, timeout=30), {}, []

    def worker(enabled: bool):
        try:
            with vlkernels.deterministic(enabled):
                opened.wait()
                seen[enabled] = vlkernels.is_deterministic()
            closed.wait()
            seen[f"{enabled} after"] = vlkernels.is_deterministic()
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    opened.wait()
    seen["outsider"] = vlkernels.is_deterministic()
    closed.wait()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen == {True: True, False: False, "outsider": False, "True after": False, "False after": False}
    assert not vlkernels.is_deterministic()
    vlkernels.set_deterministic(True)  # the whole process, other threads included
    other = []
    thread = threading.Thread(target=lambda: other.append(vlkernels.is_deterministic()))
    thread.start()
    thread.join()
    assert other == [True]
    with vlkernels.deterministic(False):  # a block wins over the process setting, inside it
        assert not vlkernels.is_deterministic()
    assert vlkernels.is_deterministic()


def test_blocks_are_local_to_their_asyncio_task():
    async def task(enabled: bool, mine: asyncio.Event, other: asyncio.Event):
        seen = []
        with vlkernels.deterministic(enabled):
            mine.set()
            await other.wait()
            for _ in range(3):
                seen.append(vlkernels.is_deterministic())
                await asyncio.sleep(0)
        return seen + [vlkernels.is_deterministic()]

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task(True, a, b), task(False, b, a))

    assert asyncio.run(main()) == [[True, True, True, False], [False, False, False, False]]


def test_compiled_code_follows_the_block_without_a_graph_break():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(lambda x: x * 2 if vlkernels.is_deterministic() else x * 3, fullgraph=True,
                             backend="eager")
    x = torch.ones(2)
    assert compiled(x).tolist() == [3, 3]
    with vlkernels.deterministic():
        assert compiled(x).tolist() == [2, 2]
    assert compiled(x).tolist() == [3, 3]
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2


class _RecordOps(TorchDispatchMode):
    """Records the name of every aten op that runs (forward and backward) inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__.rstrip("_"))  # in-place and functional variants alike
        return func(*args, **(kwargs or {}))


def _vd_statistics_run():
    x, index, mask = torch.randn(50, 7, dtype=torch.float64), torch.randint(0, 6, (50,)), _mask(50)
    return lambda: vd_reference.vd_cluster_statistics(x, index, 8, mask)


def _patch_embed_run():
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    cls_token = torch.randn(1, 1, 5, dtype=torch.float64)
    cotangent = torch.randn(2, 7, 5, dtype=torch.float64)

    def run():
        out = patch_embed_reference.patch_embed(images, weight, bias, cls_token=cls_token)
        return (out, *torch.autograd.grad((out * cotangent).sum(), (images, weight, bias)))

    return run


@pytest.mark.parametrize("make_run, atomic_op", [(_vd_statistics_run, "index_add"),
                                                 (_patch_embed_run, "convolution_backward")],
                         ids=["vd_cluster_statistics", "patch_embed"])
def test_deterministic_schedules_match_and_avoid_atomic_ops(make_run, atomic_op):
    """The reference paths the flag switches: the same results (float64) without the op that
    torch runs with atomics on CUDA (index_add_; cuDNN's convolution weight gradient)."""
    torch.manual_seed(0)
    run = make_run()
    with _RecordOps() as default_ops:
        expected = run()
    with vlkernels.deterministic(), _RecordOps() as deterministic_ops:
        actual = run()
    assert atomic_op in default_ops.names  # the recorder sees it when it runs
    assert atomic_op not in deterministic_ops.names
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
