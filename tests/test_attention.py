"""Attention ops: Triton kernels (interpreter or GPU) against the float64 reference, forward
and every gradient, with key padding, causal, PrefixLM, co-attention and varlen; errors."""
import pytest
import torch

import vlkernels
from vlkernels.ops import attention, attention_varlen, co_attention, pad_input, unpad_input
from vlkernels.reference import attention as reference
from vlkernels.testing import DEVICE, assert_matches_reference, dtype_id, kernel_dtypes, poisoned_allocations

# (B, H, Sq, Sk, Dh, key_mask, causal, prefix): prefix None, an int or "per-sample"
CASES = [
    (2, 2, 33, 33, 64, True, False, None),
    (1, 3, 7, 97, 32, True, False, None),
    (2, 1, 97, 7, 80, False, False, None),
    (2, 2, 40, 40, 96, True, True, None),
    (3, 1, 50, 50, 64, True, False, "per-sample"),
    (1, 2, 33, 33, 128, False, False, 9),
    (1, 1, 1, 3, 32, False, False, None),  # one query (one key would make dq exactly 0)
    (1, 1, 200, 200, 32, True, True, None),
    (2, 1, 150, 150, 32, True, False, 100),  # a prefix spanning several key and query blocks
]


def case_id(case):
    b, h, sq, sk, d, mask, causal, prefix = case
    return f"B{b}-H{h}-Sq{sq}-Sk{sk}-D{d}" + ("-mask" if mask else "") + ("-causal" if causal else "") + (
        f"-prefix_{prefix}" if prefix is not None else "")


def random_key_mask(generator, batch, keys):
    mask = torch.rand(batch, keys, generator=generator) < 0.7
    mask[0] = False  # a batch item with no real key: its queries must give zeros, not NaN
    if batch > 1:
        mask[1, : keys // 2] = True
    return mask


def reference_run(q, k, v, grad_out, dtype, device, **masks):
    inputs = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = reference.attention(*inputs, **masks)
    return out, torch.autograd.grad(out, inputs, grad_out.to(device, dtype))


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_matches_float64_reference(case, dtype):
    b, h, sq, sk, d, with_mask, causal, prefix = case
    generator = torch.Generator().manual_seed(sq * 131 + sk * 7 + d)
    q, k, v = (torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype).requires_grad_() for s in (sq, sk, sk))
    masks = dict(causal=causal)
    if with_mask:
        masks["key_mask"] = random_key_mask(generator, b, sk).to(DEVICE)
    if prefix == "per-sample":
        masks["prefix_len"] = torch.randint(0, sq + 1, (b,), generator=generator).to(DEVICE)
    elif prefix is not None:
        masks["prefix_len"] = prefix
    grad_out = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = attention(q, k, v, **masks)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    out64, grads64 = reference_run(q, k, v, grad_out, torch.float64, "cpu",
                                   **{n: m.cpu() if isinstance(m, torch.Tensor) else m for n, m in masks.items()})
    out_torch, grads_torch = reference_run(q, k, v, grad_out, dtype, DEVICE, **masks)
    assert_matches_reference("out", out, out64, out_torch)
    for name, grad, grad64, grad_torch in zip("qkv", grads, grads64, grads_torch):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)
    if with_mask:  # batch item 0 sees no key: exact zeros, and no gradient reaches q there
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


def test_strided_qkv_from_a_fused_projection():
    """q, k, v as views of one [B, S, 3, H, Dh] projection, transposed to [B, H, S, Dh]."""
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 45, 3, 2, 32, generator=generator).to(DEVICE).requires_grad_()
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with vlkernels.use_backend("triton"):
        out = attention(q, k, v, causal=True)
        (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    qkv64 = qkv.detach().cpu().double().requires_grad_()
    q64, k64, v64 = (t.transpose(1, 2) for t in qkv64.unbind(2))
    expected = reference.attention(q64, k64, v64, causal=True)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), qkv64)
    assert_matches_reference("out", out, expected, out)
    assert_matches_reference("grad qkv", grad, expected_grad, grad)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("lengths", [(20, 37), (97, 3), (36, 36)], ids=lambda s: "St{}-Si{}".format(*s))
def test_co_attention_matches_both_directions(lengths, dtype):
    text, image = lengths
    generator = torch.Generator().manual_seed(text * 100 + image)
    b, h, d = 3, 2, 64
    tensors = [torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype).requires_grad_()
               for s in (text, text, text, image, image, image)]
    text_mask = random_key_mask(generator, b, text).to(DEVICE)
    image_mask = random_key_mask(generator, b, image).to(DEVICE)
    image_mask[0] = True  # text-only padding in item 0: image queries there see nothing
    grads_out = [torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype) for s in (text, image)]
    with vlkernels.use_backend("triton"), poisoned_allocations():
        outs = co_attention(*tensors, text_mask=text_mask, image_mask=image_mask)
        grads = torch.autograd.grad(outs, tensors, grads_out)

    def run(target_dtype, device):
        inputs = [t.detach().to(device, target_dtype).requires_grad_() for t in tensors]
        results = reference.co_attention(*inputs, text_mask=text_mask.to(device), image_mask=image_mask.to(device))
        return results, torch.autograd.grad(results, inputs, [g.to(device, target_dtype) for g in grads_out])

    outs64, grads64 = run(torch.float64, "cpu")
    outs_torch, grads_torch = run(dtype, DEVICE)
    for name, out, out64, out_torch in zip(("out_t", "out_i"), outs, outs64, outs_torch):
        assert_matches_reference(name, out, out64, out_torch)
    names = ("q_t", "k_t", "v_t", "q_i", "k_i", "v_i")
    for name, grad, grad64, grad_torch in zip(names, grads, grads64, grads_torch):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_varlen_matches_per_sequence_reference(dtype, causal):
    generator = torch.Generator().manual_seed(3 + causal)
    lengths = [5, 0, 70, 33, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total, h, d = int(cu[-1]), 2, 64
    q, k, v = (torch.randn(total, h, d, generator=generator).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(total, h, d, generator=generator).to(DEVICE, dtype)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = attention_varlen(q, k, v, cu.to(DEVICE), cu.to(DEVICE), 70, 70, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def run(target_dtype, device):
        inputs = [t.detach().to(device, target_dtype).requires_grad_() for t in (q, k, v)]
        result = reference.attention_varlen(*inputs, cu.to(device), cu.to(device), causal=causal)
        return result, torch.autograd.grad(result, inputs, grad_out.to(device, target_dtype))

    out64, grads64 = run(torch.float64, "cpu")
    out_torch, grads_torch = run(dtype, DEVICE)
    assert_matches_reference("out", out, out64, out_torch)
    for name, grad, grad64, grad_torch in zip("qkv", grads, grads64, grads_torch):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)


def test_unpad_and_pad_round_trip_and_match_dense_masked_attention():
    generator = torch.Generator().manual_seed(8)
    b, s, h, d = 3, 21, 2, 32
    x = torch.randn(b, s, h, d, generator=generator).to(DEVICE)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for row, length in enumerate((21, 4, 13)):
        mask[row, :length] = True
    mask = mask.to(DEVICE)
    packed, indices, cu, longest = unpad_input(x, mask)
    assert (cu.tolist(), longest) == ([0, 21, 25, 38], 21)
    assert torch.equal(pad_input(packed, indices, b, s), x * mask[..., None, None])
    with vlkernels.use_backend("triton"):
        packed_out = attention_varlen(packed, packed, packed, cu, cu, longest, longest)
        dense_out = attention(*(x.transpose(1, 2),) * 3, key_mask=mask).transpose(1, 2)
    torch.testing.assert_close(pad_input(packed_out, indices, b, s), dense_out * mask[..., None, None],
                               rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    with vlkernels.use_backend("auto"):
        torch.testing.assert_close(attention(q, k, v, causal=True), reference.attention(q, k, v, causal=True),
                                   rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    from vlkernels.ops.attention import _attention_fwd_op, _co_attention_fwd_op

    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, s, 32, generator=generator).to(DEVICE).requires_grad_() for s in (9, 13, 13))
    mask = (torch.rand(1, 13, generator=generator) < 0.8).to(DEVICE)
    prefix = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(_attention_fwd_op, (q, k, v, mask, None, None, None, 9, 13, False, 0.2))
    q2, k2, v2 = (torch.randn(1, 2, 9, 32, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    torch.library.opcheck(_attention_fwd_op, (q2, k2, v2, None, prefix, None, None, 9, 9, True, 0.2))
    torch.library.opcheck(_co_attention_fwd_op, (q, q, q, k, k, v, None, mask, 0.2))


def test_compiles_without_graph_breaks():
    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 16, device=DEVICE) < 0.8

    def step(q, k, v):
        return attention(q, k, v, key_mask=mask).sum()

    with vlkernels.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(q, k, v)
        loss.backward()
    torch.testing.assert_close(loss, reference.attention(q, k, v, key_mask=mask).sum(), rtol=1e-5, atol=1e-5)


BAD = {
    "rank": (dict(q=(2, 9, 32)), ValueError, r"q must be \[B, H, S, Dh\]"),
    "kv-shape": (dict(v=(2, 2, 10, 32)), ValueError, "k and v must have one shape"),
    "heads": (dict(k=(2, 3, 11, 32), v=(2, 3, 11, 32)), ValueError, "must agree in batch, heads and head dim"),
    "mask-shape": (dict(key_mask=(2, 10)), ValueError, r"key_mask must be a bool tensor \[2, 11\]"),
    "causal-cross": (dict(causal=True), ValueError, "need Sq == Sk"),
    "negative-prefix": (dict(prefix_len=-1, k=(2, 2, 9, 32), v=(2, 2, 9, 32)), ValueError, "non-negative"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend, case):
    overrides, error, message = BAD[case]
    shapes = dict(q=(2, 2, 9, 32), k=(2, 2, 11, 32), v=(2, 2, 11, 32), key_mask=None)
    shapes.update(overrides)
    tensors = {n: torch.randn(shapes[n], device=DEVICE) for n in "qkv"}
    options = {n: overrides[n] for n in ("causal", "prefix_len") if n in overrides}
    if shapes["key_mask"] is not None:
        options["key_mask"] = torch.ones(shapes["key_mask"], dtype=torch.bool, device=DEVICE)
    with vlkernels.use_backend(backend), pytest.raises(error, match=message):
        attention(tensors["q"], tensors["k"], tensors["v"], **options)


def test_bad_varlen_and_dtype_inputs_raise():
    q = torch.randn(10, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="must rise from 0 to 10"):
        attention_varlen(q, q, q, cu - 1, cu, 6, 6)
    with pytest.raises(ValueError, match="exceeds max_seqlen_q=5"):
        attention_varlen(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="int32"):
        attention_varlen(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(TypeError, match="share one floating dtype"):
        attention(*(torch.randn(1, 1, 4, 8),) * 2, torch.randn(1, 1, 4, 8).half())
    with vlkernels.use_backend("triton"), pytest.raises(vlkernels.NoBackendError, match="head dim 160 is over 128"):
        attention(*(torch.randn(1, 1, 4, 160, device=DEVICE),) * 3)
