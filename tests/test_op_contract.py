"""The contract every public op keeps, on every backend that runs here, checked over one table
of cases (adding an op is one entry in CASES):

- gradients accumulate: two backwards over a retained graph plus one over a fresh graph give
  three times the gradient, and that gradient matches the float64 reference;
- every returned gradient owns its storage (gradient accumulation, clip_grad_norm_ and any
  in-place update of one .grad must not change another);
- every tensor argument, parameters and in-place states included, may come in any layout
  (strided with gaps, dims stored in reverse order) and gives the contiguous result;
- a NaN or Inf fed in is propagated identically by every backend, or refused by all with the
  library's own error, and never silently replaced;
- calls repeated on the same inputs are bit-identical (on a GPU, 20 times: a race between
  programs shows up as a difference).

Sizes are above every block size of the kernels in fp32 (attention 64 x 32, GEMM 128 x 128 x 32,
visual-dictionary feature blocks of 256) so that every kernel runs more than one program along
each axis. Per-op behaviour (masks, tolerances in 16-bit, bad inputs) is in tests/test_<op>.py.
"""
from __future__ import annotations

import functools
import inspect
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import vlkernels
import vlkernels.ops as ops
from vlkernels import _extension
from vlkernels.testing import DEVICE, HostReads, fp32_tolerance, rel_error

# The race check's repeats: 20 on a GPU (bench/gpu_check.sh runs it once more under
# compute-sanitizer with VLKERNELS_REPEATS=1), 2 on CPU, where programs run one at a time.
REPEATS = int(os.environ.get("VLKERNELS_REPEATS", 20 if DEVICE.type == "cuda" else 2))


@dataclass(frozen=True)
class OpCase:
    """make(generator) -> the op's keyword inputs; call(**inputs) -> a tensor or a tuple of
    tensors; grads: the inputs that get gradients; backends: those that implement the op;
    poison: the input that gets a NaN / Inf (default: the first floating one)."""

    name: str
    make: Callable[[torch.Generator], dict]
    call: Callable
    backends: tuple[str, ...]
    grads: tuple[str, ...] = ()
    poison: Optional[str] = None


def _randn(generator, *shape, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)


def _mask(generator, batch, length):
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[:, 0] = True
    return mask.to(DEVICE)


def _patch_embed_inputs(g):
    dim, tokens = 136, 5 * 9 + 1  # 40 x 72 images, patch 8: 45 patches + cls; K = 3 * 8 * 8 = 192
    return dict(images=_randn(g, 3, 3, 40, 72), weight=_randn(g, dim, 3, 8, 8, scale=0.1), bias=_randn(g, dim),
                pos_embed=_randn(g, 1, tokens, dim), cls_token=_randn(g, 1, 1, dim))


def _attention_inputs(g, seq_q=70, seq_k=70):
    return dict(q=_randn(g, 2, 2, seq_q, 40), k=_randn(g, 2, 2, seq_k, 40), v=_randn(g, 2, 2, seq_k, 40))


def _co_attention_inputs(g):
    text, image = _attention_inputs(g, 20, 20), _attention_inputs(g, 70, 70)
    return dict(q_t=text["q"], k_t=text["k"], v_t=text["v"], q_i=image["q"], k_i=image["k"], v_i=image["v"],
                text_mask=_mask(g, 2, 20), image_mask=_mask(g, 2, 70))


def _varlen_inputs(g):
    lengths = torch.tensor([70, 5, 0, 33])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    total = int(lengths.sum())
    return dict(q=_randn(g, total, 2, 40), k=_randn(g, total, 2, 40), v=_randn(g, total, 2, 40),
                cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=70, max_seqlen_k=70)


def _mome_inputs(g, experts=3, dim=136, hidden=140):
    return dict(x=_randn(g, 130, dim), expert_index=torch.randint(0, experts, (130,), generator=g).to(DEVICE),
                w1=_randn(g, experts, dim, hidden, scale=dim ** -0.5), b1=_randn(g, experts, hidden),
                w2=_randn(g, experts, hidden, dim, scale=hidden ** -0.5), b2=_randn(g, experts, dim),
                ln_weight=1 + _randn(g, experts, dim, scale=0.1), ln_bias=_randn(g, experts, dim, scale=0.1))


def _segments_inputs(g):
    inputs = _mome_inputs(g, experts=2)
    inputs["x"] = inputs["x"].reshape(2, 65, 136)
    del inputs["expert_index"]
    return inputs


def _embeddings(g, batch=3, rows=20, cols=36, dim=100):
    return dict(txt=_randn(g, batch, rows, dim), img=_randn(g, batch, cols, dim),
                txt_mask=_mask(g, batch, rows), img_mask=_mask(g, batch, cols))


def _cost_inputs(g):
    return dict(cost=torch.rand(3, 20, 37, generator=g).to(DEVICE), x_mask=_mask(g, 3, 20), y_mask=_mask(g, 3, 37))


def _vd_update_inputs(g, entries=40, dim=300):
    mask = torch.rand(50, generator=g) < 0.8
    mask[0] = True  # row 0 is counted (the non-finite test poisons it)
    return dict(codebook=_randn(g, entries, dim), cluster_size=torch.rand(entries, generator=g).to(DEVICE),
                embed_avg=_randn(g, entries, dim), x=_randn(g, 50, dim),
                index=torch.randint(0, entries, (50,), generator=g).to(DEVICE), mask=mask.to(DEVICE))


def _vd_update(codebook, cluster_size, embed_avg, x, index, mask):
    ops.vd_ema_update_(codebook, cluster_size, embed_avg, x, index, decay=0.4, mask=mask)
    return codebook, cluster_size, embed_avg


_NATIVE = ("torch", "triton", "cpp")
CASES = [
    OpCase("patch_embed", _patch_embed_inputs, ops.patch_embed, ("torch", "triton"),
           ("images", "weight", "bias", "pos_embed", "cls_token")),
    OpCase("attention-key_mask", lambda g: dict(_attention_inputs(g), key_mask=_mask(g, 2, 70)), ops.attention,
           ("torch", "triton"), ("q", "k", "v")),
    OpCase("attention-prefix_len", lambda g: dict(_attention_inputs(g), prefix_len=torch.tensor([9, 70]).to(DEVICE)),
           ops.attention, ("torch", "triton"), ("q", "k", "v")),
    OpCase("attention-causal", lambda g: dict(_attention_inputs(g), causal=True), ops.attention,
           ("torch", "triton"), ("q", "k", "v")),
    OpCase("co_attention", _co_attention_inputs, ops.co_attention, ("torch", "triton"),
           ("q_t", "k_t", "v_t", "q_i", "k_i", "v_i")),
    OpCase("attention_varlen", _varlen_inputs, ops.attention_varlen, ("torch", "triton"), ("q", "k", "v")),
    OpCase("mome_ffn-expert_index", _mome_inputs, ops.mome_ffn, ("torch", "triton"),
           ("x", "w1", "b1", "w2", "b2", "ln_weight", "ln_bias")),
    OpCase("mome_ffn-segments", _segments_inputs, lambda **kw: ops.mome_ffn(expert_index=None, segments=(40, 0, 1), **kw),
           ("torch", "triton"), ("x", "w1", "b1", "w2", "b2", "ln_weight", "ln_bias")),
    OpCase("wra_distance", _embeddings, ops.wra_distance, _NATIVE, ("txt", "img")),
    OpCase("gromov_wasserstein_distance", lambda g: _embeddings(g, 2, 7, 9, 40), ops.gromov_wasserstein_distance,
           _NATIVE, ("txt", "img")),
    OpCase("ipot", _cost_inputs, ops.ipot, _NATIVE),
    OpCase("sinkhorn", _cost_inputs, lambda **kw: ops.sinkhorn(reg=0.1, iters=30, **kw), _NATIVE),
    OpCase("vd_nearest", lambda g: dict(x=_randn(g, 50, 300), codebook=_randn(g, 40, 300)), ops.vd_nearest,
           ("torch", "triton")),
    OpCase("vd_ema_update_", _vd_update_inputs, _vd_update, _NATIVE, poison="x"),  # the old codebook is not read
]
CASE_IDS = [case.name for case in CASES]


def _backend_params():
    params = []
    for case in CASES:
        for backend in case.backends:
            marks = []
            if backend == "cpp" and _extension.unavailable_reason() is not None:
                marks = [pytest.mark.skip(reason=f"no C++ extension: {_extension.unavailable_reason()}")]
            params.append(pytest.param(case, backend, id=f"{case.name}-{backend}", marks=marks))
    return params


BACKEND_PARAMS = _backend_params()
DIFFERENTIABLE = [p for p in BACKEND_PARAMS if p.values[0].grads]


def _inputs(case: OpCase, seed: int = 0) -> dict:
    return case.make(torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + seed))


def _tensors(result) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _run(case: OpCase, inputs: dict, backend: str, *, backward: bool = True):
    """Outputs and input gradients (of a fixed random projection of the outputs) on ``backend``."""
    leaves = {name: inputs[name].requires_grad_() for name in case.grads} if backward else {}
    with vlkernels.use_backend(backend):
        outputs = _tensors(case.call(**inputs))
        grads = ()
        if leaves:
            loss = _projection(outputs)
            grads = torch.autograd.grad(loss, list(leaves.values()))
    return tuple(o.detach() for o in outputs), grads


def _projection(outputs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=generator).to(o)).sum()
               for o in outputs if o.is_floating_point())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("case,backend", DIFFERENTIABLE)
def test_gradients_accumulate_and_own_their_storage(case, backend):
    inputs = _inputs(case)
    leaves = {name: inputs[name].requires_grad_() for name in case.grads}
    with vlkernels.use_backend(backend):
        loss = _projection(_tensors(case.call(**inputs)))
        once = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()  # accumulates into .grad over the retained graph
        _projection(_tensors(case.call(**inputs))).backward()  # and over a fresh graph

    owners = {}
    for (name, leaf), grad in zip(leaves.items(), once):
        assert leaf.grad is not None, f"{case.name}: no gradient for {name}"
        error = rel_error(leaf.grad, 3 * grad)
        assert error <= 1e-6, f"{case.name}/{backend}: {name}.grad after three backwards is off by {error:.2e}"
        for label, tensor in ((f"{name}.grad", leaf.grad), (f"d{name}", grad)):
            other = owners.setdefault(_storage(tensor), label)
            assert other == label, f"{case.name}/{backend}: {label} shares storage with {other}"

    # ... and the gradient itself is right: against the float64 reference (the torch backend),
    # within the fp32 bound or twice the error of the torch backend's own fp32 run (iterative
    # ops such as Gromov-Wasserstein lose digits in fp32 whatever computes them).
    _, expected = _run(case, _float64(_inputs(case)), "torch")
    for name, grad, want, bound in zip(case.grads, once, expected, _bounds(case)[-len(once):]):
        error = rel_error(grad, want)
        assert error <= bound, f"{case.name}/{backend}: d{name} relative error {error:.2e} > {bound:.2e}"


def _float64(inputs: dict) -> dict:
    return {name: t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for name, t in inputs.items()}


@functools.lru_cache(maxsize=None)
def _bounds(case: OpCase) -> tuple[float, ...]:
    """Per output and gradient: how far two fp32 computations of the op may differ, the fp32
    bound or twice the error of the torch backend's fp32 run against float64, whichever is
    larger (iterative ops such as Gromov-Wasserstein lose digits in fp32 whatever runs them)."""
    outputs, grads = _run(case, _inputs(case), "torch")
    outputs64, grads64 = _run(case, _float64(_inputs(case)), "torch")
    return tuple(max(fp32_tolerance(True), 2 * rel_error(a, b)) if a.is_floating_point() else 0.0
                 for a, b in zip(outputs + grads, outputs64 + grads64))


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: 'gaps' strides every dim over unused elements;
    'reversed' stores the dims in reverse order (a transposed storage)."""
    if t.dim() == 0:
        return t.clone()
    if layout == "gaps":
        strides, step = [], 2
        for size in reversed(t.shape):
            strides.append(step)
            step *= 2 * size + 1
        out = torch.empty_strided(t.shape, tuple(reversed(strides)), dtype=t.dtype, device=t.device)
    else:
        order = tuple(reversed(range(t.dim())))
        out = torch.empty(tuple(t.shape[i] for i in order), dtype=t.dtype, device=t.device).permute(order)
    return out.copy_(t)


@pytest.mark.parametrize("layout", ["gaps", "reversed"])
@pytest.mark.parametrize("case,backend", BACKEND_PARAMS)
def test_every_argument_in_any_layout(case, backend, layout):
    expected_outputs, expected_grads = _run(case, _inputs(case), backend)
    inputs = {name: _relayout(t, layout) if isinstance(t, torch.Tensor) else t for name, t in _inputs(case).items()}
    if layout == "gaps":
        assert all(not t.is_contiguous() for t in inputs.values() if isinstance(t, torch.Tensor) and t.numel() > 1)
    outputs, grads = _run(case, inputs, backend)
    results = zip(outputs + grads, expected_outputs + expected_grads, _bounds(case))
    for i, (actual, expected, bound) in enumerate(results):
        label = f"output {i}" if i < len(outputs) else f"d{case.grads[i - len(outputs)]}"
        assert actual.shape == expected.shape, f"{case.name}/{backend}/{layout}: {label} shape"
        if actual.is_floating_point():  # a layout may change the summation order, not more
            error = rel_error(actual, expected)
            assert error <= bound, f"{case.name}/{backend}/{layout}: {label} differs by {error:.2e} > {bound:.2e}"
        else:
            assert torch.equal(actual, expected), f"{case.name}/{backend}/{layout}: {label} differs"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_finite_input_is_propagated_alike_or_refused(case, value):
    backends = [b for b in case.backends if b != "cpp" or _extension.unavailable_reason() is None]
    poisoned = case.poison or next(name for name, t in _inputs(case).items()
                                   if isinstance(t, torch.Tensor) and t.is_floating_point())
    verdicts = {}
    for backend in backends:
        inputs = _inputs(case)
        inputs[poisoned].view(-1)[0] = value
        try:
            outputs, _ = _run(case, inputs, backend, backward=False)
        except (ValueError, vlkernels.NoBackendError) as error:
            verdicts[backend] = f"refused: {type(error).__name__}"
            continue
        verdicts[backend] = outputs
    refused = {b for b, v in verdicts.items() if isinstance(v, str)}
    assert not refused or refused == set(verdicts), f"{case.name}: refused by {sorted(refused)} only: {verdicts}"
    if refused:
        return
    first, *others = backends

    def pattern(outputs):  # where the outputs are NaN, +Inf and -Inf
        return [(o.isnan(), o.isposinf(), o.isneginf()) for o in outputs if o.is_floating_point()]

    assert any(bool(masks[0].any() | masks[1].any() | masks[2].any()) for masks in pattern(verdicts[first])), (
        f"{case.name}: {poisoned}[0] = {value} gave only finite outputs on {first}: the value was replaced")
    for backend in others:
        for i, (mine, theirs) in enumerate(zip(pattern(verdicts[backend]), pattern(verdicts[first]))):
            for kind, a, b in zip(("NaN", "+Inf", "-Inf"), mine, theirs):
                assert torch.equal(a, b), (f"{case.name}: {poisoned}[0] = {value}: output {i} is {kind} at "
                                           f"{int(a.sum())} places on {backend}, {int(b.sum())} on {first}")
        for i, (mine, theirs) in enumerate(zip(verdicts[backend], verdicts[first])):
            if not mine.is_floating_point():
                assert torch.equal(mine, theirs), f"{case.name}: integer output {i} differs between {backend} and {first}"


@pytest.mark.parametrize("case,backend", BACKEND_PARAMS)
def test_repeated_calls_are_bit_identical(case, backend):
    first_outputs, first_grads = _run(case, _inputs(case), backend)
    for repeat in range(1, REPEATS):
        outputs, grads = _run(case, _inputs(case), backend)
        for i, (actual, expected) in enumerate(zip(outputs + grads, first_outputs + first_grads)):
            assert torch.equal(actual, expected), (
                f"{case.name}/{backend}: result {i} of call {repeat + 1} differs from the first call's bits")


def _tile_key(constexprs: dict) -> dict:
    """The constexprs that make a kernel configuration (tile shapes, dot precision), as opposed
    to those describing the call (flags, head dim), which the report covers by a preset."""
    return {name: value for name, value in constexprs.items() if name.startswith("BLOCK") or name == "DOT_PRECISION"}


@pytest.mark.skipif(DEVICE.type == "cuda", reason="records launches through Triton's interpreter")
def test_every_launch_uses_a_configuration_the_report_compiles(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from vlkernels.report import all_variants

    launches = {}
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = inspect.signature(self.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        annotations = self.fn.__annotations__
        constexprs = {name: value for name, value in bound.arguments.items()
                      if "constexpr" in str(annotations.get(name, ""))}
        # The dtype of the first tensor argument (the data the kernel computes on); later
        # pointers may be placeholders of any dtype for terms a call leaves out.
        first = next(name for name, value in bound.arguments.items() if isinstance(value, torch.Tensor))
        dtypes = ((first, bound.arguments[first].dtype),)
        options = (kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
        launches[(self.fn.__name__, tuple(sorted(_tile_key(constexprs).items())), options, dtypes)] = True
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    for case in CASES:
        for dtype in (torch.float32, torch.float16):
            inputs = {name: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                      and name not in ("cluster_size",) else t for name, t in _inputs(case).items()}
            try:
                _run(case, inputs, "triton")
            except (ValueError, TypeError, vlkernels.NoBackendError):
                continue  # the op refuses this dtype with its own error: nothing launched

    variants = all_variants()
    missing = []
    for name, tile, (warps, stages), dtypes in launches:
        def covers(variant):
            options = (variant.options.get("num_warps", 4), variant.options.get("num_stages", 3))
            return (variant.name == name and tuple(sorted(_tile_key(variant.constexprs).items())) == tile
                    and options == (warps, stages)
                    and all(variant.pointers.get(arg, dtype) == dtype for arg, dtype in dtypes))
        if not any(covers(variant) for variant in variants):
            missing.append(f"{name} {dict(tile)} warps={warps} stages={stages} {dict(dtypes)}")
    assert launches, "no kernel launch was recorded"
    assert not missing, "launched configurations the sm_90a report does not compile:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_host_reads_in_the_default_mode(case):
    """On a GPU a host read is a stream synchronisation: in the default (device) value-check
    mode no op reads a value on the host, forward or backward, once warm."""
    with vlkernels.value_checks("device"):
        _run(case, _inputs(case), "triton")  # warm: first-call caches may read once
        inputs, counter = _inputs(case), HostReads()  # building the inputs may read: not the op's
        with counter:
            _run(case, inputs, "triton")
    assert not counter.reads, f"{case.name}: {counter.reads} host read(s), the first from:\n{counter.sources[0]}"
