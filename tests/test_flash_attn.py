"""vlkernels.flash_attn_func / flash_attn_varlen_func against a float64 restatement of flash-attn's
semantics ([batch, seqlen, nheads, headdim] layout, GQA head grouping, bottom-right causal
alignment, softmax_scale), outputs and the gradients of q, k, v; flash-attn's signatures; and
the clear refusals of what is not supported."""
import inspect

import pytest
import torch

import vlkernels
from vlkernels import flash_attn_func, flash_attn_varlen_func
from vlkernels.testing import DEVICE, fp32_tolerance, rel_error


def flash_reference(q, k, v, softmax_scale=None, causal=False):
    """flash-attn's attention, restated in float64: q [B, Sq, H, D], k and v [B, Sk, Hk, D];
    query head h reads k/v head h // (H // Hk); causal: query i sees key j <= i + Sk - Sq, and a
    query that sees no key gets zeros."""
    q, k, v = q.double(), k.double(), v.double()
    _, seq_q, heads, dim = q.shape
    seq_k, heads_k = k.shape[1], k.shape[2]
    kv_head = torch.arange(heads) // (heads // heads_k)
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        allowed = torch.arange(seq_k)[None, :] <= torch.arange(seq_q)[:, None] + seq_k - seq_q
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys: all -inf -> zeros
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


# name: (Sq, Sk, H, Hk, causal, softmax_scale); lengths past the kernels' 64-row blocks
DENSE_CASES = {
    "square": (70, 70, 2, 2, False, None),
    "square-causal": (70, 70, 2, 2, True, None),
    "causal-longer-keys": (40, 70, 2, 2, True, None),  # bottom-right: every query sees the first 31 keys
    "causal-longer-queries": (70, 40, 2, 2, True, None),  # the first 30 queries see no key
    "gqa-causal-scale": (33, 33, 4, 2, True, 0.3),
    "mqa-cross": (20, 45, 4, 1, False, None),
}
DENSE_PARAMS = [(name, "torch") for name in DENSE_CASES] + [
    (name, "triton") for name in ("square-causal", "causal-longer-queries", "gqa-causal-scale")]


def _grads(out, inputs, cotangent):
    return torch.autograd.grad(out, inputs, cotangent.to(out.device, out.dtype))


@pytest.mark.parametrize("name, backend", DENSE_PARAMS)
def test_flash_attn_func_matches_flash_attn_semantics(name, backend):
    seq_q, seq_k, heads, heads_k, causal, scale = DENSE_CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    dim = 16
    q = torch.randn(2, seq_q, heads, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(2, seq_k, heads_k, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(2, seq_k, heads_k, dim, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(2, seq_q, heads, dim, generator=generator, dtype=torch.float64)
    inputs = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    with vlkernels.use_backend(backend):
        out = flash_attn_func(*inputs, softmax_scale=scale, causal=causal)
        grads = _grads(out, inputs, cotangent)
    inputs64 = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = flash_reference(*inputs64, softmax_scale=scale, causal=causal)
    expected_grads = _grads(expected, inputs64, cotangent)
    assert out.shape == (2, seq_q, heads, dim) and out.is_contiguous()
    for label, actual, wanted in zip(["out", "grad q", "grad k", "grad v"], [out, *grads], [expected, *expected_grads]):
        assert actual.shape == wanted.shape and torch.isfinite(actual).all(), label
        error = rel_error(actual, wanted)
        assert error <= fp32_tolerance(uses_tf32_dot=True), f"{label}: relative error {error:.3e}"
    if causal and seq_q > seq_k:  # flash-attn's rows without keys: exact zeros
        assert torch.equal(out[:, :seq_q - seq_k].cpu(), torch.zeros_like(out[:, :seq_q - seq_k].cpu()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func_matches_per_sequence_attention(causal, backend):
    generator = torch.Generator().manual_seed(3 + causal)
    lengths_q = [5, 0, 70]
    lengths_k = lengths_q if causal else [9, 3, 41]
    heads, heads_k, dim = 4, 2, 16
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lengths_q), heads, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), heads_k, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), heads_k, dim, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    inputs = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    with vlkernels.use_backend(backend):
        out = flash_attn_varlen_func(*inputs, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lengths_q), max(lengths_k),
                                     causal=causal)
        grads = _grads(out, inputs, cotangent)
    inputs64 = [t.clone().requires_grad_() for t in (q, k, v)]
    pieces = []
    for b in range(len(lengths_q)):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        pieces.append(flash_reference(inputs64[0][None, rows_q], inputs64[1][None, rows_k], inputs64[2][None, rows_k],
                                      causal=causal)[0])
    expected = torch.cat(pieces)
    expected_grads = _grads(expected, inputs64, cotangent)
    for label, actual, wanted in zip(["out", "grad q", "grad k", "grad v"], [out, *grads], [expected, *expected_grads]):
        assert actual.shape == wanted.shape, label
        error = rel_error(actual, wanted)
        assert error <= fp32_tolerance(uses_tf32_dot=True), f"{label}: relative error {error:.3e}"


FLASH_ATTN_FUNC = ["q", "k", "v", ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
                   ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
                   ("return_attn_probs", False)]
FLASH_ATTN_VARLEN_FUNC = FLASH_ATTN_FUNC[:3] + ["cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"] + \
    FLASH_ATTN_FUNC[3:] + [("block_table", None)]


@pytest.mark.parametrize("function, expected", [(flash_attn_func, FLASH_ATTN_FUNC),
                                                (flash_attn_varlen_func, FLASH_ATTN_VARLEN_FUNC)])
def test_signatures_are_flash_attns(function, expected):
    parameters = inspect.signature(function).parameters.values()
    assert [p.name if p.default is inspect.Parameter.empty else (p.name, p.default) for p in parameters] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)


def test_unsupported_arguments_are_refused_by_name():
    q = torch.randn(1, 4, 2, 8)
    packed, cu = torch.randn(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)
    for name, value in (("window_size", (8, 0)), ("softcap", 30.0), ("alibi_slopes", torch.ones(2)),
                        ("return_attn_probs", True)):
        with pytest.raises(NotImplementedError, match=f"flash_attn_func: {name}"):
            flash_attn_func(q, q, q, **{name: value})
        with pytest.raises(NotImplementedError, match=f"flash_attn_varlen_func: {name}"):
            flash_attn_varlen_func(packed, packed, packed, cu, cu, 4, 4, **{name: value})
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(packed, packed, packed, cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"nheads \(3\) must be a multiple of nheads_k \(2\)"):
        flash_attn_func(torch.randn(1, 4, 3, 8), q, q)
    with pytest.raises(ValueError, match=r"q must be \[batch, seqlen, nheads, headdim\]"):
        flash_attn_func(packed, q, q)
    with pytest.raises(ValueError, match="one batch size"):
        flash_attn_func(torch.randn(2, 4, 2, 8), q, q)
    with pytest.raises(TypeError, match="one floating dtype"):
        flash_attn_func(q, q.half(), q.half())
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        flash_attn_func(q, q, q, dropout_p=1.0)


@pytest.mark.parametrize("varlen", [False, True])
def test_dropout_drops_and_keeps_the_expectation(varlen):
    """dropout_p > 0 (the kernels' dropout; the torch backend here): outputs differ per call, and
    the mean of many calls approaches the dropout-free output (inverted dropout is unbiased)."""
    generator = torch.Generator().manual_seed(9)
    if varlen:
        q, k, v = (torch.randn(9, 2, 8, generator=generator) for _ in range(3))
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        run = lambda p: flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, dropout_p=p, causal=True)  # noqa: E731
    else:
        q, k, v = (torch.randn(1, 6, 2, 8, generator=generator) for _ in range(3))
        run = lambda p: flash_attn_func(q, k, v, dropout_p=p, causal=True)  # noqa: E731
    exact = run(0.0)
    torch.manual_seed(0)
    samples = torch.stack([run(0.3) for _ in range(200)])
    assert not torch.equal(samples[0], samples[1]) and torch.isfinite(samples).all()
    assert rel_error(samples.mean(0), exact) < 0.1 < rel_error(samples[0], exact)


def test_dropout_runs_in_the_triton_kernels():
    generator = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    with vlkernels.use_backend("triton"):
        exact = flash_attn_func(q, k, v, causal=True)
        dropped = flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
        grads = torch.autograd.grad(dropped.sum(), [q, k, v])
    assert torch.isfinite(dropped).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel_error(dropped, exact) > 0.1
