"""Attention ops: Triton kernels (interpreter or GPU) against the float64 reference, forward
and every gradient, with key padding, causal, PrefixLM, co-attention and varlen; errors."""
import dataclasses
import importlib
import math

import pytest
import torch

import vlkernels
from vlkernels.ops import attention, attention_varlen, co_attention, pad_input, unpad_input
from vlkernels.reference import attention as reference
from vlkernels.testing import DEVICE, HostReads, assert_matches_reference, dtype_id, kernel_dtypes, poisoned_allocations

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


def _co_attention_and_reference(tensors, text_mask, image_mask, grads_out):
    """Triton co_attention's outputs and input gradients beside the reference's, in float64 and
    in the inputs' dtype: (outs, grads, outs64, grads64, outs_torch, grads_torch)."""
    with vlkernels.use_backend("triton"), poisoned_allocations():
        outs = co_attention(*tensors, text_mask=text_mask.to(DEVICE), image_mask=image_mask.to(DEVICE))
        grads = torch.autograd.grad(outs, tensors, grads_out)

    def run(target_dtype, device):
        inputs = [t.detach().to(device, target_dtype).requires_grad_() for t in tensors]
        results = reference.co_attention(*inputs, text_mask=text_mask.to(device), image_mask=image_mask.to(device))
        return results, torch.autograd.grad(results, inputs, [g.to(device, target_dtype) for g in grads_out])

    return (outs, grads, *run(torch.float64, "cpu"), *run(tensors[0].dtype, DEVICE))


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
    outs, grads, outs64, grads64, outs_torch, grads_torch = _co_attention_and_reference(
        tensors, text_mask, image_mask, grads_out)
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


def test_auto_backend_on_cpu_is_the_torch_backend():
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    with vlkernels.use_backend("auto"):
        auto = attention(q, k, v, causal=True)
    with vlkernels.use_backend("torch"):
        torch.testing.assert_close(auto, attention(q, k, v, causal=True), rtol=0, atol=0)
    assert_matches_reference("auto", auto, reference.attention(*(t.double() for t in (q, k, v)), causal=True), auto)


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


# ----------------------------------------------------------------------------------------------
# The test classes of issue 12, over every backend that runs here (torch; triton in the
# interpreter): (a) accumulated gradients and storage, (b) strided / expanded arguments,
# (c) sizes above every block, (d) empty and degenerate inputs, (e) NaN / Inf, (f) hypothesis.
# ----------------------------------------------------------------------------------------------
BACKENDS = ["torch", "triton"]
NAN, INF = float("nan"), float("inf")


def _leaf(*shape, generator, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype).requires_grad_()


def _float64(tensors):
    return [t.detach().cpu().double().requires_grad_() for t in tensors]


def _cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


class _Op:
    """One op of the family as the generic tests drive it: leaves (separate q, k, v or one
    packed qkv projection per stream), views of them as the op's q, k, v, and the call."""

    def __init__(self, name, generator, dtype=torch.float32):
        self.name, b, h, d = name, 2, 2, 16
        if name == "attention":  # 70 > BLOCK_M (64, fp32) and > 2 x BLOCK_N (32), with remainders
            self.streams = [(b, 70)]
            self.masks = dict(key_mask=random_key_mask(generator, b, 70).to(DEVICE),
                              prefix_len=torch.tensor([5, 0]).to(DEVICE), causal=True)
        elif name == "co_attention":
            self.streams = [(b, 37), (b, 70)]
            self.masks = dict(text_mask=random_key_mask(generator, b, 37).to(DEVICE),
                              image_mask=random_key_mask(generator, b, 70).to(DEVICE))
        else:
            self.lengths = [5, 0, 70, 33]
            self.streams = [(sum(self.lengths),)]
            self.masks = dict(causal=True)
        self.heads, self.head_dim, self.dtype, self.generator = h, d, dtype, generator

    def leaves(self, packed):
        h, d = self.heads, self.head_dim
        if packed:  # [B, S, 3, H, Dh] or [total, 3, H, Dh], as a fused qkv projection makes
            return [_leaf(*stream, 3, h, d, generator=self.generator, dtype=self.dtype) for stream in self.streams]
        if self.name == "attention_varlen":
            return [_leaf(*self.streams[0], h, d, generator=self.generator, dtype=self.dtype) for _ in range(3)]
        return [_leaf(b, h, s, d, generator=self.generator, dtype=self.dtype) for b, s in self.streams for _ in range(3)]

    def qkv(self, leaves, packed):
        if not packed:
            return list(leaves)
        dim = 1 if self.name == "attention_varlen" else 2
        views = [t for leaf in leaves for t in leaf.unbind(dim)]
        return views if self.name == "attention_varlen" else [t.transpose(1, 2) for t in views]

    def __call__(self, tensors, reference_run=False):
        masks = {n: _cpu(m) for n, m in self.masks.items()} if reference_run else self.masks
        if self.name == "attention":
            fn = reference.attention if reference_run else attention
            return [fn(*tensors, **masks)]
        if self.name == "co_attention":
            fn = reference.co_attention if reference_run else co_attention
            return list(fn(*tensors, **masks))
        cu = _cu(self.lengths)
        if reference_run:
            return [reference.attention_varlen(*tensors, cu.cpu(), cu.cpu(), **masks)]
        return [attention_varlen(*tensors, cu, cu, max(self.lengths), max(self.lengths), **masks)]


def _loss(outs, grads_out):
    return sum((out.double() * g.double()).sum() for out, g in zip(outs, grads_out))


OPS = ["attention", "co_attention", "attention_varlen"]


@pytest.mark.parametrize("packed", [False, True], ids=["separate-qkv", "packed-qkv"])
@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_accumulate_and_own_their_storage(backend, op_name, packed):
    """(a) Two backwards (retain_graph) accumulate twice the float64 gradient into every leaf,
    also when q, k, v are views of one packed projection; the gradients the op returns for
    q, k, v never share storage (an in-place update of one must not change another)."""
    generator = torch.Generator().manual_seed(OPS.index(op_name) * 2 + packed)
    op = _Op(op_name, generator)
    leaves = op.leaves(packed)
    with vlkernels.use_backend(backend):
        outs = op(op.qkv(leaves, packed))
        grads_out = [torch.randn(out.shape, generator=generator).to(DEVICE) for out in outs]
        loss = _loss(outs, grads_out)
        views = op.qkv(leaves, packed)
        if not packed:  # the op's own returned gradients: distinct storage
            grads = torch.autograd.grad(loss, leaves, retain_graph=True)
            pointers = {g.untyped_storage().data_ptr() for g in grads}
            assert len(pointers) == len(grads), "two returned gradients share storage"
        del views
        loss.backward(retain_graph=True)
        first = [leaf.grad.clone() for leaf in leaves]
        if not packed:
            assert len({leaf.grad.untyped_storage().data_ptr() for leaf in leaves}) == len(leaves)
        loss.backward()
    leaves64 = _float64(leaves)
    expected = torch.autograd.grad(_loss(op(op.qkv(leaves64, packed), reference_run=True), grads_out), leaves64)
    for index, (leaf, grad1, grad64) in enumerate(zip(leaves, first, expected)):
        assert_matches_reference(f"grad {index} (one backward)", grad1, grad64, grad1)
        assert_matches_reference(f"grad {index} (accumulated)", leaf.grad, 2 * grad64, leaf.grad)


def _noncontiguous(t, generator, how):
    """t's values in a non-contiguous layout: "strided" (every other element of a wider last
    dim), "transposed" (stored [B, S, H, Dh]) or "expanded" (one batch item broadcast)."""
    if how == "strided":
        wide = torch.randn(*t.shape[:-1], 2 * t.shape[-1], generator=generator).to(t.device, t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t[:1].expand(t.shape)


@pytest.mark.parametrize("how", ["strided", "transposed", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_arguments_give_the_contiguous_result(backend, how):
    """(b) q, k, v, the key mask and a prefix_len tensor passed strided, transposed or
    expanded give what their contiguous copies give (forward and every gradient), for
    attention and co_attention; and both match the float64 reference."""
    generator = torch.Generator().manual_seed(["strided", "transposed", "expanded"].index(how))
    b, h, s, d = 2, 2, 45, 16
    base = [torch.randn(b, h, s, d, generator=generator).to(DEVICE) for _ in range(3)]
    mask = random_key_mask(generator, b, s).to(DEVICE)
    prefix = torch.tensor([7, 50]).to(DEVICE)
    if how == "expanded":  # an expanded input has one batch item: make every argument so
        base = [t[:1].expand(t.shape).contiguous() for t in base]
        mask = mask[:1].expand(b, s).contiguous()
        prefix = prefix[:1].expand(b).contiguous()
    odd = [_noncontiguous(t, generator, how).requires_grad_() for t in base]
    odd_mask = (mask[:1].expand(b, s) if how == "expanded" else
                torch.stack([mask, mask], -1).flatten(1)[:, ::2])
    odd_prefix = prefix[:1].expand(b) if how == "expanded" else torch.stack([prefix, prefix], -1).flatten()[::2]
    assert not any(t.is_contiguous() for t in odd) and not odd_mask.is_contiguous() and not odd_prefix.is_contiguous()
    grad_out = torch.randn(b, h, s, d, generator=generator).to(DEVICE)
    with vlkernels.use_backend(backend):
        def run(tensors, mask, prefix):
            tensors = [t.detach().requires_grad_() if t.is_leaf else t for t in tensors]
            leaves = [t for t in tensors if t.requires_grad]
            out = attention(*tensors, key_mask=mask, prefix_len=prefix)
            co_t, co_i = co_attention(*tensors, *tensors, text_mask=mask, image_mask=mask)
            loss = _loss([out, co_t, co_i], [grad_out] * 3)
            return [out, co_t, co_i, *torch.autograd.grad(loss, leaves)]

        results_odd = run(odd, odd_mask, odd_prefix)
        results = run([t.detach().contiguous() for t in odd], mask, prefix)
    for got, want in zip(results_odd, results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q64, k64, v64 = _float64(base)
    out64 = reference.attention(q64, k64, v64, key_mask=mask.cpu(), prefix_len=prefix.cpu())
    assert_matches_reference("out", results_odd[0], out64, results_odd[0])


# (c) Sizes above every block of every kernel config: fp32 tiles are 64 x 32, fp16 forward
# 128 x 64 and backward 64 x 64; head dims 80 and 96 leave a remainder in BLOCK_D = 128.
BIG_CASES = [
    (1, 1, 261, 133, 80, True, False, None),  # Sq = 2 x 128 + 5, Sk = 2 x 64 + 5
    (1, 1, 197, 197, 96, True, False, "per-sample"),  # causal prefix over three fp16 query blocks
]


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("case", BIG_CASES, ids=case_id)
def test_attention_above_every_block_size(case, dtype):
    test_attention_matches_float64_reference(case, dtype)


def test_co_attention_and_varlen_above_every_block_size():
    """(c) co_attention with both streams above two forward query blocks (fp16: 128) and
    varlen with a sequence above two blocks plus a remainder, fp16 (the larger tiles)."""
    for dtype in kernel_dtypes()[:2]:
        generator = torch.Generator().manual_seed(11)
        tensors = [_leaf(1, 1, s, 80, generator=generator, dtype=dtype) for s in (261, 261, 261, 133, 133, 133)]
        with vlkernels.use_backend("triton"):
            outs = co_attention(*tensors)
            grads = torch.autograd.grad(outs, tensors, [torch.ones_like(o) for o in outs])
        ref64 = reference.co_attention(*_float64(tensors))
        ref_same = reference.co_attention(*tensors)
        for out, out64, same in zip(outs, ref64, ref_same):
            assert_matches_reference("co out", out, out64, same)
        leaves64 = _float64(tensors)
        grads64 = torch.autograd.grad(reference.co_attention(*leaves64), leaves64,
                                      [torch.ones(o.shape, dtype=torch.float64) for o in outs])
        grads_same = torch.autograd.grad(reference.co_attention(*tensors), tensors, [torch.ones_like(o) for o in outs])
        for index, (grad, grad64, same) in enumerate(zip(grads, grads64, grads_same)):
            assert_matches_reference(f"co grad {index}", grad, grad64, same)


def _both_backends(fn):
    results = {}
    for backend in BACKENDS:
        with vlkernels.use_backend(backend):
            results[backend] = fn()
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_keys_give_zeros_not_an_index_error(backend):
    """(d) A key mask of zero keys ([B, 0]) is the fully masked case: zeros and zero gradients,
    on attention and co_attention (both directions), not a raw IndexError from amax."""
    generator = torch.Generator().manual_seed(2)
    q = _leaf(2, 2, 5, 16, generator=generator)
    k, v = (_leaf(2, 2, 0, 16, generator=generator) for _ in range(2))
    empty_mask = torch.zeros(2, 0, dtype=torch.bool, device=DEVICE)
    with vlkernels.use_backend(backend), poisoned_allocations():
        out = attention(q, k, v, key_mask=empty_mask)
        out_nomask = attention(q, k, v)
        grads = torch.autograd.grad((out + out_nomask).sum(), (q, k, v))
        co_t, co_i = co_attention(q, q, q, k, k, v, text_mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE),
                                  image_mask=empty_mask)
        co_grads = torch.autograd.grad((co_t.sum() + co_i.sum()), (q, k, v))
    for t in (out, out_nomask, co_t, *grads, *co_grads):
        assert torch.equal(t, torch.zeros_like(t)), t.shape
    assert co_i.shape == (2, 2, 0, 16) and grads[1].shape == (2, 2, 0, 16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN / Inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes(backend):
    """(d) One query, one key, zero queries, a batch of zero, fully masked rows whose q holds
    NaN (zeros all the same: a row that sees nothing ignores its values)."""
    generator = torch.Generator().manual_seed(4)
    with vlkernels.use_backend(backend), poisoned_allocations():
        for sq, sk in ((1, 1), (1, 40), (0, 7), (7, 1)):
            q, k, v = (_leaf(2, 1, s, 8, generator=generator) for s in (sq, sk, sk))
            out = attention(q, k, v)
            (grad_q,) = torch.autograd.grad(out.square().sum(), (q,))
            q64, k64, v64 = _float64((q, k, v))
            out64 = reference.attention(q64, k64, v64)
            torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
            assert grad_q.shape == q.shape and bool(grad_q.isfinite().all())
        for b in (0,):
            q = _leaf(b, 2, 5, 8, generator=generator)
            assert attention(q, q, q).shape == (0, 2, 5, 8)
        q, k, v = (_leaf(2, 2, 9, 8, generator=generator) for _ in range(3))
        with torch.no_grad():
            q[0, :, 3] = NAN
        mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
        mask[0] = False
        out = attention(q, k, v, key_mask=mask)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    assert bool(out[1].isfinite().all())


@pytest.mark.parametrize("prefix", [2 ** 31 + 5, 2 ** 40, 2 ** 70, "tensor-2**31+5", "tensor-2**40"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_len_beyond_int32_is_fully_bidirectional(backend, prefix):
    """Item 7: a prefix longer than the sequence (here past int32) covers every key: the
    result is unmasked attention, not a prefix wrapped by an int32 narrowing."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (_leaf(2, 2, 40, 16, generator=generator) for _ in range(3))
    if isinstance(prefix, str):
        prefix = torch.tensor([int(eval(prefix.split("-")[1])), 3], device=DEVICE)  # a second, short prefix
    with vlkernels.use_backend(backend):
        out = attention(q, k, v, prefix_len=prefix)
        full = attention(q, k, v)
    q64, k64, v64 = _float64((q, k, v))
    expected = reference.attention(q64, k64, v64, prefix_len=_cpu(prefix))
    assert_matches_reference("out", out, expected, out)
    torch.testing.assert_close(out[0], full[0], rtol=1e-6, atol=1e-6)
    if not isinstance(prefix, torch.Tensor):
        torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)
    else:  # the short prefix of item 1 still masks
        assert (out[1] - full[1]).abs().max() > 1e-3


def test_launch_grids_keep_axes_1_and_2_small_at_huge_sizes():
    """Grid audit: B * H and the blocks of each head share axis 0 (up to 2**31 - 1 programs);
    axis 1 is 1 and axis 2 at most 2 however large B * H gets (65535 is CUDA's limit there).
    Computed without launching; a launch over the axis-0 limit is refused clearly."""
    module = importlib.import_module("vlkernels.ops.attention")  # vlkernels.ops.attention is the function

    for dtype in (torch.float32, torch.float16):
        for batch_heads in (200_000, 65_536 * 3):
            grid, per_head = module._fwd_grid("attention", 300, batch_heads, dtype, 64)
            assert grid[1:] == (1, 1) and grid[0] == batch_heads * per_head and per_head >= 3
            grid, per_head = module._bwd_grid("attention", 300, 290, batch_heads, dtype, 64)
            assert grid[1:] == (1, 1) and grid[0] == batch_heads * per_head
            grid, _ = module._fwd_grid("co_attention", 300, batch_heads, dtype, 64, directions=2)
            assert grid[1:] == (1, 2)
            grid, _ = module._bwd_grid("co_attention", 300, 290, batch_heads, dtype, 64, directions=2)
            assert grid[1:] == (1, 2)
    with pytest.raises(ValueError, match="attention: .* programs, over the"):
        module._fwd_grid("attention", 2 ** 22, 2 ** 16, torch.float32, 64)  # 2**32 programs


def test_launchers_use_the_audited_grids(monkeypatch):
    """Every launch (forward, backward, co-attention both passes, varlen) gets its grid from
    _grid, so the audit above covers them."""
    module = importlib.import_module("vlkernels.ops.attention")  # vlkernels.ops.attention is the function

    shapes = []
    real_grid = module._grid
    monkeypatch.setattr(module, "_grid", lambda *args, **kwargs: shapes.append(args[0]) or real_grid(*args, **kwargs))
    generator = torch.Generator().manual_seed(9)
    q, k, v = (_leaf(2, 2, 9, 8, generator=generator) for _ in range(3))
    with vlkernels.use_backend("triton"):
        torch.autograd.grad(attention(q, k, v, causal=True).sum(), (q, k, v))
        torch.autograd.grad(sum(o.sum() for o in co_attention(q, k, v, q, k, v)), (q, k, v))
        packed = q[0].transpose(0, 1).detach().requires_grad_()
        cu = _cu([4, 5])
        torch.autograd.grad(attention_varlen(packed, packed, packed, cu, cu, 5, 5).sum(), (packed,))
    # forward 1, backward 2 (dK/dV and dQ); co-attention's backward sizes each role for both streams
    assert shapes == ["attention"] * 3 + ["co_attention"] * 5 + ["attention"] * 3


def _poisoned_inputs(generator, b=2, h=2, s=40, d=16):
    """q, k, v [B, H, S, Dh] and a key mask, with NaN / Inf stored at padded keys (batch 0,
    keys 5 and 30..39) and fed in at visible places: q[1, 0, 7] (one query row), k[1, 1, 12]
    (+Inf: every row that sees key 12) and v[0, 1, 0] (-Inf at a key every row sees)."""
    q, k, v = (torch.randn(b, h, s, d, generator=generator) for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 30:] = False
    mask[0, 5] = False
    for t, value in ((k, NAN), (v, INF)):
        t[0, :, 5] = value
        t[0, :, 35] = value
    padding_only = [t.clone() for t in (q, k, v)]
    q[1, 0, 7, 3] = NAN
    k[1, 1, 12, 0] = INF
    v[0, 1, 0, 2] = -INF
    return (q, k, v), padding_only, mask


def _same_nonfinite(name, actual, expected):
    """actual has NaN, +Inf, -Inf exactly where expected does, and matches it elsewhere."""
    actual = actual.detach().cpu().double()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(actual), kind(expected)), f"{name}: {kind.__name__} pattern differs"
    finite = expected.isfinite()
    if bool(finite.any()):
        torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


def _same_nonfinite_slabs(name, actual, expected):
    """Each [B, H] slab of actual holds a non-finite value exactly when expected's does, and
    the two match wherever both are finite."""
    actual = actual.detach().cpu().double()
    assert torch.equal((~actual.isfinite()).flatten(2).any(-1), (~expected.isfinite()).flatten(2).any(-1)), \
        f"{name}: the slabs reached by NaN / Inf differ"
    both = actual.isfinite() & expected.isfinite()
    torch.testing.assert_close(actual[both], expected[both], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN / Inf
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_and_padding_is_excluded(backend, causal):
    """(e) Item 5: NaN / Inf fed in through q or a visible k / v reach exactly the rows (and
    gradients) that the float64 reference says, on both backends (no nan_to_num erasing
    them); NaN / Inf stored at padded keys reach nothing: with only those, output and
    gradients are finite and equal the clean reference, and the padded keys' dk, dv are 0."""
    generator = torch.Generator().manual_seed(12 + causal)
    inputs, padding_only, mask = _poisoned_inputs(generator)
    grad_out = torch.randn(inputs[0].shape, generator=generator)
    for tensors, clean in ((inputs, False), (padding_only, True)):
        leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
        with vlkernels.use_backend(backend):
            out = attention(*leaves, key_mask=mask.to(DEVICE), causal=causal)
            grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
        leaves64 = [t.double().requires_grad_() for t in tensors]
        if clean:  # the reference on the same inputs with the padding zeroed: finite everywhere
            leaves64 = [leaves64[0]] + [t.detach().masked_fill(~mask[:, None, :, None], 0).requires_grad_()
                                        for t in leaves64[1:]]
        out64 = reference.attention(*leaves64, key_mask=mask, causal=causal)
        grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
        if clean:
            assert bool(out.isfinite().all()) and all(bool(g.isfinite().all()) for g in grads)
            assert_matches_reference("out", out, out64, out)
            for name, grad, grad64 in zip("qkv", grads, grads64):
                assert_matches_reference(f"grad {name}", grad, grad64, grad)
            for grad in grads[1:]:
                assert torch.equal(grad[0, :, 30:], torch.zeros_like(grad[0, :, 30:]))
        else:
            assert bool(out[1, 0, 7].isnan().all()) and bool(out.isnan().any()) and bool(out.isinf().any())
            _same_nonfinite("out", out, out64)
            # The torch backend's SDPA backward recomputes probabilities from its logsumexp, so a row
            # with an Inf score spreads NaN to other keys' dk / dv than the float64 softmax does:
            # there the (batch, head) slabs reached by non-finite values are compared. Under causal,
            # the reference's dense dS^T q also takes 0 * NaN from a NaN query row into the dk of
            # keys hidden from it; the kernels reach those keys only where a dK/dV program's query
            # tiles cover the row (it depends on the tiles): dk is compared by slabs there too.
            for name, grad, grad64 in zip("qkv", grads, grads64):
                exact = name == "q" or (backend == "triton" and not (causal and name == "k"))
                (_same_nonfinite if exact else _same_nonfinite_slabs)(f"grad {name}", grad, grad64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN / Inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_stream_and_sequence(backend):
    """(e) co_attention: a NaN in the image's v reaches the text rows that see it and nothing
    of the other batch item; varlen: a NaN in one sequence's k and v reaches only that
    sequence's rows, on both backends (the torch backend's padded path excludes the others'
    keys exactly), and matches the float64 per-sequence reference."""
    generator = torch.Generator().manual_seed(21)
    tensors = [torch.randn(2, 2, s, 16, generator=generator) for s in (9, 9, 9, 40, 40, 40)]
    tensors[5][0, 1, 33, 4] = NAN  # image v of batch 0, head 1, key 33
    tensors[0][1, 0, 2, 0] = INF  # text q of batch 1
    image_mask = torch.ones(2, 40, dtype=torch.bool)
    with vlkernels.use_backend(backend):
        outs = co_attention(*(t.to(DEVICE) for t in tensors), image_mask=image_mask.to(DEVICE))
    expected = reference.co_attention(*(t.double() for t in tensors), image_mask=image_mask)
    for name, out, out64 in zip(("out_t", "out_i"), outs, expected):
        _same_nonfinite(name, out, out64)
    assert bool(outs[0][0, 1, :, 4].isnan().all()) and bool(outs[0][0, 0].isfinite().all())

    lengths = [5, 40, 0, 33]
    cu = _cu(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=generator) for _ in range(3))
    k[6, 1, 0] = NAN  # sequence 1's second key (row 5 + 1), head 1
    v[44, 0, 3] = -INF  # sequence 1, head 0
    for causal in (False, True):
        with vlkernels.use_backend(backend):
            out = attention_varlen(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cu, cu, 40, 40, causal=causal)
        out64 = reference.attention_varlen(q.double(), k.double(), v.double(), cu.cpu(), cu.cpu(), causal=causal)
        _same_nonfinite(f"varlen causal={causal}", out, out64)
        others = torch.cat([out[:5], out[45:]])
        assert bool(others.isfinite().all()) and bool(out[5:45].isnan().any())


def test_pad_input_refuses_bad_indices_clearly():
    """pad_input: out-of-range or negative indices, a count that differs from the packed rows
    and non-integer indices raise pad_input's own ValueError, not a raw index_copy_ error."""
    packed = torch.randn(4, 2, 3, device=DEVICE)
    good = torch.tensor([0, 1, 5, 6], device=DEVICE)
    assert pad_input(packed, good, 2, 4).shape == (2, 4, 2, 3)
    bad = {
        "out-of-range": (torch.tensor([0, 1, 5, 8], device=DEVICE), r"indices must be in \[0, batch \* seqlen = 8\)"),
        "negative": (torch.tensor([0, -1, 5, 6], device=DEVICE), r"indices must be in \[0, .*, got values in \[-1, 6\]"),
        "count": (torch.tensor([0, 1, 5], device=DEVICE), "3 indices for 4 packed rows"),
        "float": (good.float(), "indices must be a 1-D integer tensor"),
        "2-d": (good[None], "indices must be a 1-D integer tensor"),
    }
    for name, (indices, message) in bad.items():
        with pytest.raises(ValueError, match=f"^pad_input: {message}"):
            pad_input(packed, indices, 2, 4)
    with pytest.raises(ValueError, match="^pad_input: seqlen must be a non-negative int"):
        pad_input(packed, good, 2, -4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_prefix_len_types_raise(backend):
    q = torch.randn(2, 1, 5, 8, device=DEVICE)
    for prefix in (True, torch.tensor([True, False], device=DEVICE), torch.tensor([1.5, 2.0], device=DEVICE), 2.0):
        with vlkernels.use_backend(backend), pytest.raises(ValueError, match="^attention: prefix_len must be"):
            attention(q, q, q, prefix_len=prefix)


# (f) Property-based: random shapes, masks (fully masked rows included), causal / PrefixLM and
# layouts against the float64 reference, forward and every gradient, on both backends.
from hypothesis import example, given, settings, strategies as st  # noqa: E402


def _random_layout(t, layout):
    if layout == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        return torch.cat([t, torch.randn_like(t)], -1)[..., : t.shape[-1]]  # rows with a gap after each
    return t


def _check_grad(name, grad, grad64):
    """A gradient against float64; within 1e-5 absolutely where it is 0 analytically (every key
    masked, or one visible key per row: a constant softmax), where float64 gives 0 or ~1e-17
    and fp32 rounding ~1e-8, so no relative error is meaningful; else the usual rule."""
    if grad64.norm() < 1e-9:
        torch.testing.assert_close(grad.double().cpu(), grad64, rtol=0, atol=1e-5)
    else:
        assert_matches_reference(name, grad, grad64, grad)


@settings(max_examples=10)
@given(b=st.integers(1, 2), h=st.integers(1, 2), sq=st.integers(1, 70), sk=st.integers(1, 70),
       d=st.sampled_from([8, 16, 24, 40, 64, 80]), masked=st.booleans(), mode=st.sampled_from(["none", "causal",
       "prefix-int", "prefix-tensor"]), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       seed=st.integers(0, 2 ** 16), backend=st.sampled_from(BACKENDS))
@example(b=1, h=1, sq=1, sk=1, d=8, masked=False, mode="none", layout="contiguous", seed=0, backend="triton")
@example(b=2, h=1, sq=65, sk=65, d=80, masked=True, mode="prefix-tensor", layout="strided", seed=1, backend="triton")
def test_attention_property(b, h, sq, sk, d, masked, mode, layout, seed, backend):
    generator = torch.Generator().manual_seed(seed)
    if mode != "none":
        sk = sq
    base = [torch.randn(b, h, s, d, generator=generator) for s in (sq, sk, sk)]
    options = {}
    if masked:  # any pattern, fully masked rows included
        options["key_mask"] = torch.rand(b, sk, generator=generator) < 0.6
    if mode == "causal":
        options["causal"] = True
    elif mode == "prefix-int":
        options["prefix_len"] = int(torch.randint(0, sq + 3, (), generator=generator))
    elif mode == "prefix-tensor":
        options["prefix_len"] = torch.randint(0, sq + 3, (b,), generator=generator)
    grad_out = torch.randn(b, h, sq, d, generator=generator)
    leaves = [_random_layout(t.to(DEVICE), layout).requires_grad_() for t in base]
    with vlkernels.use_backend(backend):
        out = attention(*leaves, **{n: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for n, m in options.items()})
        grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
    leaves64 = _float64(base)
    out64 = reference.attention(*leaves64, **options)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    assert_matches_reference("out", out, out64, out)
    for name, grad, grad64 in zip("qkv", grads, grads64):
        _check_grad(f"grad {name}", grad, grad64)
    masks = {n: m for n, m in options.items() if n != "causal"}
    empty = ~reference.visibility(b, sq, sk, "cpu", causal=mode == "causal", **masks).any(-1)  # [B, 1, Sq]
    empty = empty.expand(b, h, sq).to(DEVICE)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "a row that sees no key is not exactly 0"
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty])), "its dq is not exactly 0"


@settings(max_examples=6)
@given(b=st.integers(1, 2), st_len=st.integers(1, 50), si_len=st.integers(1, 50), d=st.sampled_from([8, 32, 48]),
       masked=st.booleans(), seed=st.integers(0, 2 ** 16), backend=st.sampled_from(BACKENDS))
def test_co_attention_property(b, st_len, si_len, d, masked, seed, backend):
    generator = torch.Generator().manual_seed(seed)
    base = [torch.randn(b, 2, s, d, generator=generator) for s in (st_len,) * 3 + (si_len,) * 3]
    masks = {}
    if masked:
        masks = dict(text_mask=torch.rand(b, st_len, generator=generator) < 0.6,
                     image_mask=torch.rand(b, si_len, generator=generator) < 0.6)
    leaves = [t.to(DEVICE).requires_grad_() for t in base]
    with vlkernels.use_backend(backend):
        outs = co_attention(*leaves, **{n: m.to(DEVICE) for n, m in masks.items()})
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    leaves64 = _float64(base)
    outs64 = reference.co_attention(*leaves64, **masks)
    grads64 = torch.autograd.grad(outs64, leaves64, [torch.ones_like(o) for o in outs64])
    for out, out64 in zip(outs, outs64):
        assert_matches_reference("out", out, out64, out)
    for index, (grad, grad64) in enumerate(zip(grads, grads64)):
        _check_grad(f"grad {index}", grad, grad64)


@settings(max_examples=6)
@given(lengths=st.lists(st.integers(0, 45), min_size=1, max_size=4), d=st.sampled_from([8, 32]),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16), backend=st.sampled_from(BACKENDS))
def test_varlen_property(lengths, d, causal, seed, backend):
    generator = torch.Generator().manual_seed(seed)
    total, longest = sum(lengths), max(lengths)
    cu = _cu(lengths)
    base = [torch.randn(total, 2, d, generator=generator) for _ in range(3)]
    leaves = [t.to(DEVICE).requires_grad_() for t in base]
    with vlkernels.use_backend(backend):
        out = attention_varlen(*leaves, cu, cu, longest + 3, longest, causal=causal)  # a loose max_q bound
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    leaves64 = _float64(base)
    out64 = reference.attention_varlen(*leaves64, cu.cpu(), cu.cpu(), causal=causal)
    if total == 0:
        assert out.shape == (0, 2, d)
        return
    grads64 = torch.autograd.grad(out64, leaves64, torch.ones_like(out64))
    assert_matches_reference("out", out, out64, out)
    for name, grad, grad64 in zip("qkv", grads, grads64):
        _check_grad(f"grad {name}", grad, grad64)


# ----------------------------------------------------------------------------------------------
# Issue 13: value checks without host reads. Strict mode (the suite's, VLKERNELS_VALUE_CHECKS=host)
# raises the op's ValueError before any launch; the default device mode raises RuntimeError with
# the op's message from torch._assert_async, and no call reads a value on the host.
# ----------------------------------------------------------------------------------------------
import re  # noqa: E402



def _bad_value_calls():
    """name -> (the call, the message both modes give)."""
    packed = torch.randn(10, 2, 32, device=DEVICE)
    dense = torch.randn(2, 1, 9, 8, device=DEVICE)
    cu = _cu([4, 6])

    def varlen(cu_q, cu_k, max_q=6, max_k=6, causal=False):
        return lambda: attention_varlen(packed, packed, packed, cu_q, cu_k, max_q, max_k, causal=causal)
    return {
        "negative-prefix_len": (lambda: attention(dense, dense, dense, prefix_len=torch.tensor([3, -1], device=DEVICE)),
                                "attention: prefix_len must be non-negative"),
        "cu_q-start": (varlen(cu - 1, cu), "attention_varlen: cu_seqlens_q must rise from 0 to 10"),
        "cu_k-end": (varlen(cu, _cu([4, 5])), "attention_varlen: cu_seqlens_k must rise from 0 to 10"),
        "cu-decreasing": (varlen(_cu([6, -2, 6]), _cu([6, -2, 6])),
                          "attention_varlen: cu_seqlens_q must rise from 0 to 10"),
        "over-max_seqlen_q": (varlen(cu, cu, max_q=5), "exceeds max_seqlen_q=5"),
        "over-max_seqlen_k": (varlen(cu, cu, max_k=5), "exceeds max_seqlen_k=5"),
        "causal-unequal": (varlen(cu, _cu([5, 5]), causal=True),
                           "attention_varlen: causal attention needs each sequence's q and k lengths equal"),
        "pad_input-range": (lambda: pad_input(torch.randn(3, 2, device=DEVICE), torch.tensor([0, 5, 8], device=DEVICE),
                                              2, 4), "pad_input: indices must be in [0, batch * seqlen = 8)"),
        "pad_input-negative": (lambda: pad_input(torch.randn(2, 2, device=DEVICE), torch.tensor([-1, 3], device=DEVICE),
                                                 2, 4), "pad_input: indices must be in [0, batch * seqlen = 8)"),
    }


@pytest.mark.parametrize("mode", ["host", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_value_calls()))
def test_value_checks_in_both_modes(case, backend, mode):
    call, message = _bad_value_calls()[case]
    error = ValueError if mode == "host" else RuntimeError
    with vlkernels.use_backend(backend), vlkernels.value_checks(mode), pytest.raises(error, match=re.escape(message)):
        call()


def test_strict_messages_name_the_bad_values():
    """Strict mode's messages name what was seen (read on the host only once a check failed)."""
    packed = torch.randn(10, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="a sequence of 6 rows exceeds max_seqlen_q=5"):
        attention_varlen(packed, packed, packed, _cu([4, 6]), _cu([4, 6]), 5, 6)
    with pytest.raises(ValueError, match=re.escape("= 8), got values in [-1, 3]")):
        pad_input(torch.randn(2, 2, device=DEVICE), torch.tensor([-1, 3], device=DEVICE), 2, 4)


def _host_read_calls(g):
    """name -> a function of fresh leaves giving the outputs; sizes above the fp32 blocks."""
    cu = _cu([70, 5, 0, 33])
    dense = [_leaf(2, 2, 70, 40, generator=g) for _ in range(3)]
    text = [_leaf(2, 2, 20, 40, generator=g) for _ in range(3)]
    packed = [_leaf(108, 2, 40, generator=g) for _ in range(3)]
    key_mask = random_key_mask(g, 2, 70).to(DEVICE)
    text_mask = random_key_mask(g, 2, 20).to(DEVICE)
    indices = torch.randperm(2 * 70, generator=g)[:108].to(DEVICE)
    prefix = torch.tensor([9, 70], device=DEVICE)
    return {
        "attention-key_mask": (dense, lambda q, k, v: attention(q, k, v, key_mask=key_mask)),
        "attention-causal": (dense, lambda q, k, v: attention(q, k, v, causal=True)),
        "attention-prefix_len": (dense, lambda q, k, v: attention(q, k, v, prefix_len=prefix, key_mask=key_mask)),
        "co_attention": (text + dense, lambda *t: co_attention(*t, text_mask=text_mask, image_mask=key_mask)),
        "attention_varlen": (packed, lambda q, k, v: attention_varlen(q, k, v, cu, cu, 70, 70)),
        "attention_varlen-causal": (packed, lambda q, k, v: attention_varlen(q, k, v, cu, cu, 70, 70, causal=True)),
        "pad_input": (packed[:1], lambda x: pad_input(x, indices, 2, 70)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_host_read_calls(torch.Generator().manual_seed(0))))
def test_no_host_reads_in_the_default_mode(case, backend):
    """Default (device) mode, warm: no value read on the host, forward or backward."""
    def run(leaves, call):
        outs = call(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    with vlkernels.use_backend(backend), vlkernels.value_checks("device"):
        run(*_host_read_calls(torch.Generator().manual_seed(1))[case])  # warm: first-call caches may read
        leaves, call = _host_read_calls(torch.Generator().manual_seed(2))[case]  # inputs made outside the count
        with HostReads() as counter:
            run(leaves, call)
    assert counter.reads == 0, f"{case}: {counter.reads} host read(s)"


# ----------------------------------------------------------------------------------------------
# Attention dropout (dropout_p) and additive bias
# ----------------------------------------------------------------------------------------------
_ops_module = importlib.import_module("vlkernels.ops.attention")  # vlkernels.ops.attention is the function


def _kernel_keep_mask(seed, batch_heads, seq_q, seq_k, p, stream=0):
    """The keep mask a Triton dropout call made right after torch.manual_seed(seed): the same
    (seed, offset) draw, run through the kernels' RNG into a tensor (the debug path)."""
    torch.manual_seed(seed)
    return _ops_module._dropout_keep_mask(_ops_module._rng(DEVICE), batch_heads, seq_q, seq_k, p, stream).cpu()


def _grads_vs_reference(name, outs, grads, outs64, grads64, outs_torch, grads_torch):
    for index, (out, out64, out_torch) in enumerate(zip(outs, outs64, outs_torch)):
        assert_matches_reference(f"{name} out {index}", out, out64, out_torch)
    for index, (grad, grad64, grad_torch) in enumerate(zip(grads, grads64, grads_torch)):
        assert_matches_reference(f"{name} grad {index}", grad, grad64, grad_torch)


DROPOUT_CASES = [  # (B, H, Sq, Sk, Dh, key_mask, causal): above the 64 x 32 fp32 tiles
    (2, 1, 70, 70, 32, True, True),
    (2, 1, 33, 140, 16, True, False),  # (random_key_mask leaves batch item 0 without keys)
]


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "B{}-H{}-Sq{}-Sk{}-D{}".format(*c[:5]))
def test_dropout_matches_the_reference_with_the_kernels_mask(case, dtype):
    """Forward and every gradient of the Triton dropout path equal the float64 reference run
    with the keep mask the kernels drew (the debug path regenerates it), so the backward
    regenerates exactly the forward's mask."""
    b, h, sq, sk, d, with_mask, causal = case
    p = 0.3
    generator = torch.Generator().manual_seed(sq + sk)
    q, k, v = (torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype).requires_grad_() for s in (sq, sk, sk))
    masks = dict(causal=causal)
    if with_mask:
        masks["key_mask"] = random_key_mask(generator, b, sk).to(DEVICE)
    grad_out = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype)
    torch.manual_seed(11)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = attention(q, k, v, dropout_p=p, **masks)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    keep = _kernel_keep_mask(11, b * h, sq, sk, p).view(b, h, sq, sk)
    assert 0.6 < keep.float().mean() < 0.8
    cpu_masks = {n: _cpu(m) for n, m in masks.items()}
    out64, grads64 = reference_run(q, k, v, grad_out, torch.float64, "cpu", dropout_p=p, keep_mask=keep, **cpu_masks)
    out_t, grads_t = reference_run(q, k, v, grad_out, dtype, DEVICE, dropout_p=p, keep_mask=keep.to(DEVICE), **masks)
    _grads_vs_reference("dropout", [out], grads, [out64], grads64, [out_t], grads_t)
    # the mask matters: without it the reference is far off
    no_drop = reference.attention(*_float64((q, k, v)), **cpu_masks)
    assert (out.double().cpu() - no_drop).abs().max() > 0.1


def test_dropout_is_reproducible_under_manual_seed_and_fresh_per_call():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=generator).to(DEVICE) for _ in range(3))
    with vlkernels.use_backend("triton"):
        torch.manual_seed(7)
        first, second = attention(q, k, v, dropout_p=0.2), attention(q, k, v, dropout_p=0.2)
        torch.manual_seed(7)
        again = attention(q, k, v, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)  # the next step draws a new mask


def test_dropout_keep_masks_have_the_rate_and_independence_of_bernoulli_draws():
    """Keep rate within 5 sigma of 1 - p; the masks of different heads, rows and steps
    agree as often as independent Bernoulli draws do (p^2 + (1 - p)^2), not more."""
    p, bh, sq, sk = 0.1, 4, 70, 40
    first = _kernel_keep_mask(1, bh, sq, sk, p).float()
    step2 = _ops_module._dropout_keep_mask(_ops_module._rng(DEVICE), bh, sq, sk, p).cpu().float()  # next call
    other_stream = _kernel_keep_mask(1, bh, sq, sk, p, stream=1).float()
    n = first.numel()
    for mask in (first, step2, other_stream):
        assert abs(mask.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    agree = p * p + (1 - p) ** 2
    pairs = {"heads": (first[0], first[1]), "rows": (first[:, :-1], first[:, 1:]),
             "keys": (first[:, :, :-1], first[:, :, 1:]), "steps": (first, step2), "streams": (first, other_stream)}
    for name, (a, b) in pairs.items():
        m = a.numel()
        rate = (a == b).float().mean().item()
        assert abs(rate - agree) < 5 * (agree * (1 - agree) / m) ** 0.5, f"{name}: agreement {rate:.4f}"
    # the same seed gives the same mask
    assert torch.equal(first, _kernel_keep_mask(1, bh, sq, sk, p).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_unbiased(backend):
    """All query rows equal: every output row is an independent dropout sample of the same
    expectation, the output without dropout; their mean is within 5 sigma of it."""
    generator = torch.Generator().manual_seed(4)
    p, rows, keys, d = 0.25, 256, 48, 16
    q = torch.randn(1, 1, 1, d, generator=generator).expand(1, 1, rows, d).contiguous().to(DEVICE)
    k, v = (torch.randn(1, 1, keys, d, generator=generator).to(DEVICE) for _ in range(2))
    with vlkernels.use_backend(backend):
        torch.manual_seed(0)
        out = attention(q, k, v, dropout_p=p)[0, 0].double().cpu()
    weights = torch.softmax((q[0, 0, :1].double() @ k[0, 0].double().T).cpu() * d ** -0.5, -1)[0]
    expected = weights @ v[0, 0].double().cpu()
    sigma = ((p / (1 - p)) * (weights[:, None] ** 2 * v[0, 0].double().cpu() ** 2).sum(0) / rows).sqrt()
    assert ((out.mean(0) - expected).abs() < 5 * sigma).all()
    assert out.std(0).min() > 0  # and the rows did differ


def test_dropout_gradients_match_finite_differences_of_the_seeded_forward():
    """Directional derivatives of the seeded forward (same mask each evaluation) equal the
    backward's gradients: the backward differentiates the function the forward computed."""
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    directions = [torch.randn(t.shape, generator=generator).to(DEVICE) for t in (q, k, v)]
    weight = torch.randn(1, 2, 37, 16, generator=generator).to(DEVICE)

    def loss(*tensors):
        torch.manual_seed(21)
        return (attention(*tensors, dropout_p=0.4, causal=True) * weight).sum()

    with vlkernels.use_backend("triton"):
        grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
        eps = 1e-2
        with torch.no_grad():
            plus = loss(*(t + eps * dt for t, dt in zip((q, k, v), directions)))
            minus = loss(*(t - eps * dt for t, dt in zip((q, k, v), directions)))
    numeric = ((plus - minus) / (2 * eps)).item()
    analytic = sum((g * dt).sum() for g, dt in zip(grads, directions)).item()
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_is_the_plain_path_and_draws_nothing(backend):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=generator).to(DEVICE) for _ in range(3))
    with vlkernels.use_backend(backend):
        state = torch.get_rng_state()
        plain = attention(q, k, v, causal=True)
        zero = attention(q, k, v, causal=True, dropout_p=0.0)
        co = co_attention(q, k, v, q, k, v, dropout_p=0.0)
        assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws no seed
        co_plain = co_attention(q, k, v, q, k, v)
    assert torch.equal(plain, zero)
    assert torch.equal(co[0], co_plain[0]) and torch.equal(co[1], co_plain[1])


@pytest.mark.parametrize("p, error", [(math.nextafter(1.0, 2.0), ValueError), (-0.1, ValueError),
                                      (math.nextafter(0.0, -1.0), ValueError), (float("nan"), ValueError),
                                      (1.5, ValueError), (True, TypeError), ("0.1", TypeError),
                                      (torch.tensor(0.1), TypeError)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dropout_p_is_refused(backend, p, error):
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with vlkernels.use_backend(backend):
        for call in (lambda: attention(q, q, q, dropout_p=p), lambda: co_attention(q, q, q, q, q, q, dropout_p=p),
                     lambda: attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu,
                                              4, 4, dropout_p=p)):
            with pytest.raises(error, match="dropout_p"):
                call()


def test_reference_with_a_keep_mask_at_dropout_one_drops_everything():
    """The reference's given-mask dropout (the oracle of the kernels' dropout) at p = 1: zeros, as
    F.dropout gives, not a ZeroDivisionError from the keep scale 1 / (1 - p)."""
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(2, 3, 9, 9) < 0.5
    out = reference.attention(q, k, v, dropout_p=1.0, keep_mask=keep)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(out, reference.attention(q, k, v, dropout_p=1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_drops_everything_as_sdpa(backend):
    """dropout_p = 1 (SDPA takes it): every probability is dropped, so the outputs and every
    gradient (q, k, v, bias) equal SDPA's, exactly: zeros, no NaN from the keep scale 1 / 0,
    on every op and without a fallback. Sizes above every block (64-row, 64-key tiles)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(5)
    b, h, sq, sk, d = 2, 2, 70, 140, 32

    def leaves(*shapes):
        return [torch.randn(shape, generator=generator).to(DEVICE).requires_grad_() for shape in shapes]

    def sdpa(q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=1.0)

    key_mask = torch.rand(b, sk, generator=generator) < 0.7
    key_mask[:, 0] = True  # every query sees a key (SDPA gives NaN to one that sees none)
    key_mask = key_mask.to(DEVICE)
    cu = _cu([30, 70])
    cases = {  # name: (leaves, the op's call, SDPA's call)
        "mask+bias": (leaves((b, h, sq, d), (b, h, sk, d), (b, h, sk, d), (1, h, sq, sk)),
                      lambda q, k, v, bias: [attention(q, k, v, key_mask=key_mask, bias=bias, dropout_p=1.0)],
                      lambda q, k, v, bias: [sdpa(q, k, v, bias.masked_fill(~key_mask[:, None, None], -math.inf))]),
        "causal": (leaves((b, h, sq, d), (b, h, sq, d), (b, h, sq, d)),
                   lambda q, k, v: [attention(q, k, v, causal=True, dropout_p=1.0)],
                   lambda q, k, v: [sdpa(q, k, v, causal=True)]),
        "co_attention": (leaves(*[(b, h, s, d) for s in (20, 20, 20, sk, sk, sk)]),
                         lambda *qkv: list(co_attention(*qkv, image_mask=key_mask, dropout_p=1.0)),
                         lambda q_t, k_t, v_t, q_i, k_i, v_i: [sdpa(q_t, k_i, v_i, key_mask[:, None, None]),
                                                               sdpa(q_i, k_t, v_t)]),
        "varlen": (leaves((100, h, d), (100, h, d), (100, h, d)),
                   lambda q, k, v: [attention_varlen(q, k, v, cu, cu, 70, 70, causal=True, dropout_p=1.0)],
                   lambda q, k, v: [torch.cat([sdpa(*(t[a:e].transpose(0, 1) for t in (q, k, v)), causal=True)
                                               .transpose(0, 1) for a, e in ((0, 30), (30, 100))])]),
    }
    for name, (inputs, run, run_sdpa) in cases.items():
        expected = run_sdpa(*inputs)
        expected_grads = torch.autograd.grad(expected, inputs, [torch.ones_like(t) for t in expected])
        with vlkernels.use_backend(backend), vlkernels.kernel_coverage() as coverage, poisoned_allocations():
            outs = run(*inputs)
            grads = torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs])
        assert not coverage.fallbacks and {call.backend for call in coverage.calls} == {backend}, name
        for index, (actual, want) in enumerate(zip([*outs, *grads], [*expected, *expected_grads])):
            assert want.abs().max() == 0, f"{name} {index}: SDPA's dropout 1 is not all zeros"
            torch.testing.assert_close(actual, want, rtol=0, atol=0, msg=f"{name} {index}")


def test_co_attention_dropout_matches_the_reference_with_both_masks():
    generator = torch.Generator().manual_seed(6)
    b, h, st, si, d, p = 2, 1, 20, 70, 16, 0.2
    text = [torch.randn(b, h, st, d, generator=generator).to(DEVICE).requires_grad_() for _ in range(3)]
    image = [torch.randn(b, h, si, d, generator=generator).to(DEVICE).requires_grad_() for _ in range(3)]
    text_mask, image_mask = random_key_mask(generator, b, st).to(DEVICE), random_key_mask(generator, b, si).to(DEVICE)
    grads_out = [torch.randn(b, h, s, d, generator=generator).to(DEVICE) for s in (st, si)]
    torch.manual_seed(13)
    with vlkernels.use_backend("triton"):
        outs = co_attention(*text, *image, text_mask=text_mask, image_mask=image_mask, dropout_p=p)
        grads = torch.autograd.grad(outs, (*text, *image), grads_out)
    keep_t = _kernel_keep_mask(13, b * h, st, si, p, stream=0).view(b, h, st, si)
    keep_i = _kernel_keep_mask(13, b * h, si, st, p, stream=1).view(b, h, si, st)
    inputs64 = _float64((*text, *image))
    outs64 = reference.co_attention(*inputs64, text_mask=text_mask.cpu(), image_mask=image_mask.cpu(), dropout_p=p,
                                    keep_masks=(keep_t, keep_i))
    grads64 = torch.autograd.grad(outs64, inputs64, [g.double().cpu() for g in grads_out])
    for index, (actual, expected) in enumerate(zip([*outs, *grads], [*outs64, *grads64])):
        assert_matches_reference(f"co_attention dropout {index}", actual, expected, actual)


def test_varlen_dropout_matches_the_reference_with_the_padded_mask():
    causal = True
    generator = torch.Generator().manual_seed(10)
    lengths, h, d, p = [30, 0, 70], 1, 16, 0.3
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    grad_out = torch.randn(total, h, d, generator=generator).to(DEVICE)
    cu = _cu(lengths)
    torch.manual_seed(17)
    with vlkernels.use_backend("triton"):
        out = attention_varlen(q, k, v, cu, cu, 70, 70, causal=causal, dropout_p=p)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    keep = _kernel_keep_mask(17, len(lengths) * h, 70, 70, p).view(len(lengths), h, 70, 70)
    inputs64 = _float64((q, k, v))
    out64 = reference.attention_varlen(*inputs64, cu.cpu(), cu.cpu(), causal=causal, dropout_p=p, keep_mask=keep)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double().cpu())
    for index, (actual, expected) in enumerate(zip([out, *grads], [out64, *grads64])):
        assert_matches_reference(f"varlen dropout {index}", actual, expected, actual)


def test_dropout_and_bias_compile_without_graph_breaks_and_pass_opcheck():
    from vlkernels.ops.attention import _attention_fwd_op, _co_attention_fwd_op

    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    bias = torch.randn(1, 2, 16, 16, generator=generator).to(DEVICE).requires_grad_()

    def step(q, k, v, bias):
        return attention(q, k, v, bias=bias, dropout_p=0.1).sum()

    with vlkernels.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)
        loss = compiled(q, k, v, bias)
        loss.backward()
        torch.manual_seed(5)
        eager = step(q, k, v, bias)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    assert bias.grad is not None and bias.grad.shape == bias.shape
    rng = _ops_module._rng(DEVICE)
    checks = ("test_schema", "test_faketensor")  # the compile above covers autograd and aot
    torch.library.opcheck(_attention_fwd_op, (q, k, v, None, None, None, None, 16, 16, False, 0.25, bias, rng, 0.2),
                          test_utils=checks)
    torch.library.opcheck(_co_attention_fwd_op, (q, k, v, q, k, v, None, None, 0.25, rng, 0.2), test_utils=checks)


BIAS_SHAPES = {  # bias shape for (B, H, Sq, Sk) = (2, 2, 70, 45)
    "relative-position-1HSS": (1, 2, 70, 45),
    "per-key-B11S": (2, 1, 1, 45),
    "full-BHSS": (2, 2, 70, 45),
    "keys-only-S": (45,),
    "per-head-key-H1S": (2, 1, 45),  # (a per-query bias has a zero gradient: softmax ignores row shifts)
}


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=list(BIAS_SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_and_its_gradient_match_float64(backend, shape, dtype):
    """The bias (requiring grad) in each broadcast shape, with a key mask: forward and the
    gradients of q, k, v and of the bias (in its own shape and dtype) vs float64."""
    if shape != "relative-position-1HSS" and (backend == "torch" or dtype != torch.float32):
        pytest.skip("CI time: the torch backend (the reference) and 16-bit dtypes on one shape")
    generator = torch.Generator().manual_seed(len(shape))
    b, h, sq, sk, d = 2, 2, 70, 45, 16
    q = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(b, h, sk, d, generator=generator).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    bias = (2 * torch.randn(BIAS_SHAPES[shape], generator=generator)).to(DEVICE, dtype).requires_grad_()
    key_mask = random_key_mask(generator, b, sk).to(DEVICE)
    grad_out = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype)
    with vlkernels.use_backend(backend), poisoned_allocations():
        out = attention(q, k, v, key_mask=key_mask, bias=bias)
        grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype

    def run(device, run_dtype):
        inputs = [t.detach().to(device, run_dtype).requires_grad_() for t in (q, k, v, bias)]
        result = reference.attention(*inputs[:3], key_mask=key_mask.to(device), bias=inputs[3])
        return result, torch.autograd.grad(result, inputs, grad_out.to(device, run_dtype))

    out64, grads64 = run("cpu", torch.float64)
    out_t, grads_t = run(DEVICE, dtype)
    _grads_vs_reference("bias", [out], grads, [out64], grads64, [out_t], grads_t)
    # padded keys (and the batch item without keys) get exactly zero bias gradient
    if shape == "full-BHSS":
        assert torch.equal(grads[3][0], torch.zeros_like(grads[3][0]))
        assert torch.equal(grads[3][1][..., ~key_mask[1]], torch.zeros_like(grads[3][1][..., ~key_mask[1]]))


def test_bias_with_causal_dropout_and_fp32_bias_for_fp16_inputs():
    """Bias, causal mask and dropout together (VLMo's PrefixLM-free path with attention dropout);
    an fp32 bias table on fp16 activations gets an fp32 gradient. Run-to-run bit-identical."""
    generator = torch.Generator().manual_seed(14)
    b, h, s, d, p = 1, 1, 70, 16, 0.1
    q, k, v = (torch.randn(b, h, s, d, generator=generator).to(DEVICE, torch.float16).requires_grad_()
               for _ in range(3))
    bias = torch.randn(1, h, s, s, generator=generator).to(DEVICE).requires_grad_()
    grad_out = torch.randn(b, h, s, d, generator=generator).to(DEVICE, torch.float16)
    runs = []
    for _ in range(2):
        torch.manual_seed(19)
        with vlkernels.use_backend("triton"):
            out = attention(q, k, v, causal=True, bias=bias, dropout_p=p)
            runs.append((out, *torch.autograd.grad(out, (q, k, v, bias), grad_out)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert runs[0][4].dtype == torch.float32
    keep = _kernel_keep_mask(19, b * h, s, s, p).view(b, h, s, s)
    inputs64 = _float64((q, k, v, bias))
    out64 = reference.attention(*inputs64[:3], causal=True, bias=inputs64[3], dropout_p=p, keep_mask=keep)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double().cpu())
    # the same-dtype torch run is all fp16 (the bias too): the bias gradient's accuracy is
    # bounded by the fp16 activations it comes from, whatever the table's dtype
    inputs16 = [t.detach().half().requires_grad_() for t in (q, k, v, bias)]
    out16 = reference.attention(*inputs16[:3], causal=True, bias=inputs16[3], dropout_p=p, keep_mask=keep.to(DEVICE))
    grads16 = torch.autograd.grad(out16, inputs16, grad_out)
    _grads_vs_reference("bias+dropout", [runs[0][0]], runs[0][1:4], [out64], grads64[:3], [out16], grads16[:3])
    assert_matches_reference("bias+dropout grad bias", runs[0][4].half(), grads64[3], grads16[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_at_the_most_negative_float_stays_finite(backend):
    """HF's padding value finfo(fp32).min as a bias: keys carrying it get no weight, and a row
    that is finfo.min throughout is a softmax of equal scores (fp32 torch: the mean of v) —
    never the NaN of an overflow to -inf. Gradients stay finite too."""
    generator = torch.Generator().manual_seed(23)
    b, h, sq, sk, d = 1, 2, 70, 45, 16
    q, k, v = (torch.randn(b, h, s, d, generator=generator).to(DEVICE).requires_grad_() for s in (sq, sk, sk))
    bias = torch.zeros(b, 1, sq, sk)
    low = torch.finfo(torch.float32).min
    bias[..., 30:] = low  # the last keys padded on every row
    bias[..., 5, :] = low  # query 5 sees every key through the same bias
    bias = bias.to(DEVICE)
    with vlkernels.use_backend(backend):
        out = attention(q, k, v, bias=bias)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out[:, :, 5], v.detach().mean(dim=2), rtol=1e-5, atol=1e-5)
    rows = [i for i in range(sq) if i != 5]
    key_mask = torch.zeros(b, sk, dtype=torch.bool)
    key_mask[:, :30] = True
    out64 = reference.attention(*_float64((q, k, v)), key_mask=key_mask)
    assert_matches_reference("finfo.min bias", out[:, :, rows], out64[:, :, rows],
                             reference.attention(q.detach(), k.detach(), v.detach(),
                                                 key_mask=key_mask.to(DEVICE))[:, :, rows])


BAD_BIAS = {
    "too-long": (torch.zeros(2, 3, 9, 12), ValueError, r"does not broadcast to \[B, H, Sq, Sk\]"),
    "five-dims": (torch.zeros(1, 2, 3, 9, 11), ValueError, "does not broadcast"),
    "bool": (torch.zeros(1, 1, 9, 11, dtype=torch.bool), TypeError, "floating tensor .* use key_mask"),
    "int": (torch.zeros(11, dtype=torch.int64), TypeError, "floating tensor"),
    "not-a-tensor": (0.5, TypeError, "bias must be a tensor"),
}


@pytest.mark.parametrize("case", BAD_BIAS, ids=list(BAD_BIAS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_bias_is_refused_clearly(backend, case):
    bias, error, message = BAD_BIAS[case]
    q, k = torch.randn(2, 3, 9, 8, device=DEVICE), torch.randn(2, 3, 11, 8, device=DEVICE)
    if isinstance(bias, torch.Tensor):
        bias = bias.to(DEVICE)
    with vlkernels.use_backend(backend), pytest.raises(error, match=message):
        attention(q, k, k, bias=bias)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_right_padded_and_holed_key_masks(dtype):
    """Key masks the kernels read through their limits only (right-padded, one all-real row)
    and masks with holes after a long real run (the blocks past the run read the mask bytes):
    forward and gradients vs float64, above the key block sizes."""
    generator = torch.Generator().manual_seed(15)
    b, h, s, d = 4, 1, 150, 16
    q, k, v = (torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 70:] = False          # right-padded, the limit inside a block
    mask[1, 41] = False           # a hole after a run spanning a block boundary
    mask[2, 100:120] = False      # a gap, then real keys again to the end
    grad_out = torch.randn(b, h, s, d, generator=generator).to(DEVICE, dtype)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = attention(q, k, v, key_mask=mask.to(DEVICE), causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    out64, grads64 = reference_run(q, k, v, grad_out, torch.float64, "cpu", key_mask=mask, causal=True)
    out_t, grads_t = reference_run(q, k, v, grad_out, dtype, DEVICE, key_mask=mask.to(DEVICE), causal=True)
    _grads_vs_reference("masks", [out], grads, [out64], grads64, [out_t], grads_t)


# Key positions on, one before and one after the tile edges of every kernel configuration here
# (key tiles of 16, 32 and 64, query tiles of 64): one batch item per position.
TILE_EDGES = (63, 64, 65, 128, 129)


def _edge_key_mask(kind, keys):
    """[len(TILE_EDGES), keys] bool: item i right-padded at edge i ("right-padded"), with a
    one-key hole at edge i ("holes"), or with edge i leading padded keys ("leading")."""
    mask = torch.full((len(TILE_EDGES), keys), kind != "right-padded")
    for item, edge in enumerate(TILE_EDGES):
        edge = min(edge, keys - 1)
        if kind == "right-padded":
            mask[item, :edge] = True
        elif kind == "holes":
            mask[item, edge] = False
        else:
            mask[item, :edge] = False
    return mask


# (Sq, Sk, key mask kind or None, causal, PrefixLM prefixes at the tile edges)
TILE_CLASS_CASES = [
    (65, 129, "right-padded", False, False),
    (65, 129, "holes", False, False),
    (63, 200, "leading", False, False),
    (129, 129, None, True, False),
    (129, 129, None, True, True),
    (200, 200, "right-padded", True, False),
    (64, 64, "holes", True, True),
    (129, 129, "leading", True, False),  # rows before an item's first real key see nothing: zeros
]


def _backward_tile_classes(monkeypatch, on: bool):
    """Every backward row of the configuration table with tile_classes = on (the forward's rows
    unchanged), so both backward paths run whatever rows the table splits."""
    from vlkernels.ops import _attention_configs as configs

    monkeypatch.setattr(configs, "CONFIGS", {
        key: dataclasses.replace(cfg, tile_classes=on) if key.pass_ != "fwd" else cfg
        for key, cfg in configs.CONFIGS.items()})


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("backward", ["one-loop", "tile-classes"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("case", TILE_CLASS_CASES, ids=lambda c: f"Sq{c[0]}-Sk{c[1]}-{c[2]}" + (
    "-causal" if c[3] else "") + ("-prefix" if c[4] else ""))
def test_tile_classes_with_mask_edges_at_block_edges(case, dtype, backward, with_bias, monkeypatch):
    """The forward splits each query block's key tiles into fully visible ones (no mask work),
    partial ones (the mask evaluated) and empty ones (skipped), from the key limits, causal and
    prefix_len; the backward does too where its row has tile_classes (dQ over a query block's
    key tiles, dK/dV over a key block's query tiles), and evaluates the mask on every tile
    otherwise: both backward paths are run here, with and without a bias (its gradient is where
    a dK/dV tile wrongly taken as fully visible shows: dS of a hidden pair must be 0). Masks
    whose class boundaries fall on, before and after the tile edges give the reference's output
    and every gradient (a tile taken as fully visible that is not would let a hidden key through)."""
    _backward_tile_classes(monkeypatch, backward == "tile-classes")
    sq, sk, mask_kind, causal, with_prefix = case
    b, h, d = len(TILE_EDGES), 1, 16
    generator = torch.Generator().manual_seed(sq * 1000 + sk)
    q = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(b, h, sk, d, generator=generator).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    inputs = [q, k, v]
    if with_bias:  # one [Sq, Sk] table for the batch (VLMo's relative position bias is [1, H, S, S])
        inputs.append(torch.randn(1, h, sq, sk, generator=generator).to(DEVICE, dtype).requires_grad_())
    masks = dict(causal=causal)
    if mask_kind is not None:
        masks["key_mask"] = _edge_key_mask(mask_kind, sk)
    if with_prefix:
        masks["prefix_len"] = torch.tensor(TILE_EDGES)
    grad_out = torch.randn(b, h, sq, d, generator=generator).to(DEVICE, dtype)
    on_device = {name: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for name, m in masks.items()}

    def run(tensors, **kwargs):
        out = (reference.attention if tensors is not inputs else attention)(
            *tensors[:3], bias=tensors[3] if with_bias else None, **kwargs)
        return out, torch.autograd.grad(out, tensors, grad_out.to(out.device, out.dtype))

    def reference_inputs(to_dtype, device):
        return [t.detach().to(device, to_dtype).requires_grad_() for t in inputs]

    with vlkernels.use_backend("triton"), poisoned_allocations():
        out, grads = run(inputs, **on_device)
    out64, grads64 = run(reference_inputs(torch.float64, "cpu"), **masks)
    out_t, grads_t = run(reference_inputs(dtype, DEVICE), **on_device)
    _grads_vs_reference(case, [out], grads, [out64], grads64, [out_t], grads_t)
    if mask_kind == "leading" and causal:  # item i's rows before its first real key are exactly 0
        for item, edge in enumerate(TILE_EDGES):
            first = min(edge, sk - 1)
            assert torch.equal(out[item, :, :first], torch.zeros_like(out[item, :, :first]))


@pytest.mark.parametrize("backward", ["one-loop", "tile-classes"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["right-padded", "holes"])
def test_co_attention_tile_classes_with_mask_edges_at_block_edges(mask_kind, dtype, backward, monkeypatch):
    """co_attention's backward runs the same loops by tile class in both directions: text and
    image masks with their edges before, on and after the tile edges (129 text, 200 image
    tokens, above every block) give every gradient of the reference, in both backward paths."""
    _backward_tile_classes(monkeypatch, backward == "tile-classes")
    text, image, h, d = 129, 200, 1, 16
    generator = torch.Generator().manual_seed(text + image)
    tensors = [torch.randn(len(TILE_EDGES), h, s, d, generator=generator).to(DEVICE, dtype).requires_grad_()
               for s in (text,) * 3 + (image,) * 3]
    text_mask, image_mask = _edge_key_mask(mask_kind, text), _edge_key_mask(mask_kind, image)
    grads_out = [torch.randn(len(TILE_EDGES), h, s, d, generator=generator).to(DEVICE, dtype) for s in (text, image)]
    _grads_vs_reference(mask_kind, *_co_attention_and_reference(tensors, text_mask, image_mask, grads_out))


# ----------------------------------------------------------------------------------------------
# The torch backend runs SDPA's fused kernel, not the reference
# ----------------------------------------------------------------------------------------------
def _largest_allocation(fn) -> int:
    """The largest block of CPU memory any op inside fn allocated (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([event.cpu_memory_usage for event in prof.events()] + [0])


def test_torch_backend_forward_and_backward_never_form_the_score_matrix(monkeypatch):
    """On CPU the torch backend's attention, co_attention and attention_varlen run SDPA's flash
    kernel (SDPA restricted to it raises otherwise), never the reference, and no op inside
    allocates a float32 [B, H, Sq, Sk] block; the reference itself does (the probe can fail)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(31)
    b, h, s, d = 2, 4, 96, 16
    scores_bytes = b * h * s * s * 4
    q, k, v = (torch.randn(b, h, s, d, generator=generator).requires_grad_() for _ in range(3))
    mask = random_key_mask(generator, b, s)
    bias = torch.randn(1, h, s, s, generator=generator)  # VLMo's relative position bias (no grad: flash)
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    calls = {
        "plain": lambda: attention(q, k, v),
        "key_mask": lambda: attention(q, k, v, key_mask=mask),
        "causal": lambda: attention(q, k, v, causal=True),
        "causal+key_mask": lambda: attention(q, k, v, key_mask=mask, causal=True),
        "prefix+key_mask": lambda: attention(q, k, v, key_mask=mask, prefix_len=torch.tensor([10, 60])),
        "bias": lambda: attention(q, k, v, bias=bias),
        "co_attention": lambda: sum(co_attention(q, k, v, q, k, v, text_mask=mask, image_mask=mask)),
        "varlen": lambda: attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                           cu, cu, 56, 56, causal=True),
    }
    assert _largest_allocation(lambda: reference.attention(q, k, v)) >= scores_bytes
    for name in ("attention", "masked_softmax"):
        monkeypatch.setattr(reference, name, lambda *args, **kwargs: pytest.fail("the reference ran"))
    with vlkernels.use_backend("torch"), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for name, call in calls.items():
            largest = _largest_allocation(lambda: call().square().sum().backward())
            assert largest < scores_bytes, f"{name}: an op allocated {largest} bytes (scores: {scores_bytes})"


# ----------------------------------------------------------------------------------------------
# The launch-configuration table (issue 14 item 5)
# ----------------------------------------------------------------------------------------------
def test_the_report_compiles_every_row_of_the_configuration_table_and_nothing_else():
    from vlkernels.ops import _attention_configs as configs

    module = importlib.import_module("vlkernels.ops.attention")
    rows, _ = module.table_variants()
    assert {key for key, _ in rows} == set(configs.CONFIGS)
    for key, variant in rows:
        cfg = configs.CONFIGS[key]
        launch = (variant.constexprs["BLOCK_M"], variant.constexprs["BLOCK_N"], variant.options["num_warps"],
                  variant.options["num_stages"])
        assert launch == (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages), (key, variant.label)
        if "DQ" in variant.constexprs:  # a backward launch: its loops by tile class as the row says
            assert (variant.constexprs["TILE_CLASSES"], variant.constexprs["PARTIAL_PIPELINED"]) == (
                cfg.tile_classes, cfg.partial_pipelined), (key, variant.label)
        # the launchers would pick this row for the variant's dtype, head dim and features
        dtype = variant.pointers["q"]
        extras = variant.constexprs.get("DROPOUT", False)
        length = {"short": 40, "long": 577}.get(key.length, 185)
        pass_ = "fwd" if "DQ" not in variant.constexprs else ("dq" if variant.constexprs["DQ"] else "dkdv")
        assert configs.key_for(dtype, variant.constexprs["BLOCK_D"], pass_, length, extras,
                               allow_tf32=variant.constexprs["DOT_PRECISION"] == "tf32") == key, variant.label
    fwd_kernels = {kernel.__name__ for kernel in (module.kernels._attention_fwd_kernel, module.kernels._attention_bwd_kernel,
                                                  module.kernels._co_attention_fwd_kernel,
                                                  module.kernels._co_attention_bwd_kernel)}
    table_labels = {(variant.name, variant.label) for _, variant in rows}
    reported = {(v.name, v.label) for v in module.aot_variants() if v.name in fwd_kernels}
    assert reported == table_labels


def test_launch_configurations_follow_the_length_classes():
    """UNITER (~60 tokens) and LXMERT (20 x 36) in one 64-row block, ViLT / VLMo (185-240) in
    64-row blocks (96% of the rows filled at 185), SimVLM (512) / METER (577) in 128-row blocks;
    the backward's rows do not depend on the length (co-attention's directions share one)."""
    from vlkernels.ops import _attention_configs as configs

    forward = {length: configs.config(torch.bfloat16, 64, "fwd", length).block_m
               for length in (36, 60, 185, 240, 512, 577)}
    assert forward == {36: 64, 60: 64, 185: 64, 240: 64, 512: 128, 577: 128}
    assert all(key.length == "any" for key in configs.CONFIGS if key.pass_ != "fwd")
    assert configs.key_for(torch.float16, 64, "fwd", 185, True).extras  # bias / dropout get their row
    assert configs.key_for(torch.float32, 128, "fwd", 185, True, allow_tf32=True) == configs.ConfigKey("fwd", "tf32",
                                                                                                         "d128")
    # a backward launch takes its own row where it has one, else the row both launches share
    assert configs.key_for(torch.float16, 64, "dkdv", 185, True) == configs.ConfigKey("dkdv", "16bit", "d64",
                                                                                       extras=True)
    assert configs.key_for(torch.float16, 64, "dq", 185, False) == configs.ConfigKey("bwd", "16bit", "d64")
    assert configs.key_for(torch.float16, 64, "dq", 185, True) == configs.ConfigKey("dq", "16bit", "d64", extras=True)
    with pytest.raises(ValueError, match="pass_ must be one of"):
        configs.key_for(torch.float16, 64, "bwd", 185, False)
