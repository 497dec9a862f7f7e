"""patch_embed: the reference against an independent formula, the Triton kernels (interpreter or
GPU) against the float64 reference, forward and every gradient, and clear errors on bad input."""
import pytest
import torch

import vlkernels
from vlkernels.ops import patch_embed
from vlkernels.reference.patch_embed import patch_embed as reference
from vlkernels.testing import DEVICE, assert_matches_reference, dtype_id, kernel_dtypes, poisoned_allocations

# (B, C, H, W, P, D, cls, pos): pos is None, "shared" ([1, T, D]) or "per-image" ([B, T, D])
SHAPES = [
    (1, 3, 32, 32, 16, 96, True, "shared"),
    (3, 3, 28, 42, 14, 40, False, None),
    (2, 3, 64, 96, 32, 768, True, "shared"),
    (1, 1, 16, 48, 16, 33, False, "per-image"),
    (3, 2, 32, 16, 8, 24, True, "per-image"),
]


def shape_id(shape):
    b, c, h, w, p, d, cls, pos = shape
    return f"B{b}-C{c}-{h}x{w}-P{p}-D{d}" + ("-cls" if cls else "") + (f"-pos_{pos}" if pos else "")


def make_inputs(shape, dtype, device, generator, bias=True):
    b, c, h, w, p, d, cls, pos = shape
    tokens = (h // p) * (w // p) + cls

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=generator, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()

    return dict(
        images=rand(b, c, h, w),
        weight=rand(d, c, p, p, scale=(c * p * p) ** -0.5),
        bias=rand(d) if bias else None,
        pos_embed=None if pos is None else rand(1 if pos == "shared" else b, tokens, d),
        cls_token=rand(1, 1, d) if cls else None,
    )


def call(fn, inputs):
    return fn(inputs["images"], inputs["weight"], inputs["bias"],
              pos_embed=inputs["pos_embed"], cls_token=inputs["cls_token"])


def detached(inputs, dtype=None, device=None):
    return {k: None if v is None else v.detach().to(device=device or v.device, dtype=dtype or v.dtype).requires_grad_()
            for k, v in inputs.items()}


def independent_formula(images, weight, bias, pos_embed, cls_token):
    """Patch embedding by explicit unfold and einsum (no convolution)."""
    d, c, p, _ = weight.shape
    b, _, h, w = images.shape
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    tokens = torch.einsum("bnk,dk->bnd", patches, weight.reshape(d, -1))
    if bias is not None:
        tokens = tokens + bias
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(b, 1, d), tokens], 1)
    return tokens if pos_embed is None else tokens + pos_embed


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_independent_formula(shape):
    inputs = make_inputs(shape, torch.float64, "cpu", torch.Generator().manual_seed(1))
    expected = independent_formula(*inputs.values())
    torch.testing.assert_close(call(reference, inputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_float64_reference(shape, dtype):
    generator = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    inputs = make_inputs(shape, dtype, DEVICE, generator)
    names = [k for k, v in inputs.items() if v is not None]
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = call(patch_embed, inputs)
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)

    def run_reference(values):
        result = call(reference, values)
        return result, torch.autograd.grad(result, [values[k] for k in names], grad_out.to(result.dtype))

    out64, grads64 = run_reference(detached(inputs, torch.float64, "cpu"))
    out_torch, grads_torch = run_reference(detached(inputs))
    assert_matches_reference("out", out, out64, out_torch)
    for name, grad, grad64, grad_torch in zip(names, grads, grads64, grads_torch):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)


def test_triton_reads_strided_images():
    """A sliced (non-contiguous) batch and a channels-last one give the contiguous result."""
    generator = torch.Generator().manual_seed(7)
    shape = (2, 3, 32, 48, 16, 40, True, "shared")
    inputs = make_inputs(shape, torch.float32, DEVICE, generator)
    wide = torch.randn(2, 3, 32, 64, generator=generator).to(DEVICE)
    for images in (wide[:, :, :, 8:56], inputs["images"].detach().to(memory_format=torch.channels_last)):
        strided = dict(detached(inputs), images=images.requires_grad_())
        with vlkernels.use_backend("triton"):
            out = call(patch_embed, strided)
            (grad,) = torch.autograd.grad(out.sum(), strided["images"])
        dense = dict(detached(inputs, torch.float64, "cpu"), images=images.detach().cpu().double().requires_grad_())
        expected = call(reference, dense)
        (expected_grad,) = torch.autograd.grad(expected.sum(), dense["images"])
        assert_matches_reference("out", out, expected, out)
        assert_matches_reference("grad images", grad, expected_grad, grad)


def test_triton_skips_unneeded_gradients():
    """Pixels usually need no gradient: only the requested ones come back, and they are right."""
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs((2, 3, 32, 32, 16, 64, True, "shared"), torch.float32, DEVICE, generator)
    inputs["images"].requires_grad_(False)
    with vlkernels.use_backend("triton"):
        out = call(patch_embed, inputs)
        (grad_weight,) = torch.autograd.grad(out.square().sum(), inputs["weight"])
    values = detached(inputs, torch.float64, "cpu")
    (expected,) = torch.autograd.grad(call(reference, values).square().sum(), values["weight"])
    assert_matches_reference("grad weight", grad_weight, expected, grad_weight)


def test_auto_backend_on_cpu_is_the_reference():
    inputs = make_inputs((2, 3, 32, 32, 16, 24, True, "shared"), torch.float32, "cpu", torch.Generator().manual_seed(5))
    with vlkernels.use_backend("auto"):
        torch.testing.assert_close(call(patch_embed, inputs), call(reference, inputs), rtol=0, atol=0)


def test_autocast_casts_like_conv2d():
    inputs = make_inputs((2, 3, 32, 32, 16, 24, True, "shared"), torch.float32, "cpu", torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(patch_embed, inputs)
    assert out.dtype == torch.bfloat16
    assert_matches_reference("out", out, call(reference, detached(inputs, torch.float64)),
                             call(reference, detached(inputs, torch.bfloat16)))


def test_unsupported_dtype_names_every_backend_tried():
    inputs = make_inputs((1, 3, 16, 16, 16, 8, False, None), torch.float64, DEVICE, torch.Generator().manual_seed(0))
    with vlkernels.use_backend("triton"), pytest.raises(vlkernels.NoBackendError, match=r"triton: dtype torch.float64"):
        call(patch_embed, inputs)
    with vlkernels.use_backend("cuda"), pytest.raises(vlkernels.NoBackendError, match=r"cuda: patch_embed has no cuda"):
        call(patch_embed, inputs)


def test_custom_op_passes_opcheck():
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs((2, 3, 32, 16, 16, 24, True, "shared"), torch.float32, DEVICE, generator)
    from vlkernels.ops.patch_embed import _patch_embed_op

    torch.library.opcheck(_patch_embed_op, tuple(inputs.values()))


BAD_INPUTS = {
    "channels": (dict(images=(2, 4, 32, 32)), ValueError, "4 channels but weight expects 3"),
    "not-a-multiple": (dict(images=(2, 3, 30, 32)), ValueError, "multiple of the patch size 16"),
    "3d-images": (dict(images=(3, 32, 32)), ValueError, r"images must be \[B, C, H, W\]"),
    "non-square-kernel": (dict(weight=(8, 3, 16, 8)), ValueError, r"weight must be \[D, C, P, P\]"),
    "bias": (dict(bias=(9,)), ValueError, r"bias must have shape \[8\]"),
    "cls": (dict(cls_token=(1, 8)), ValueError, r"cls_token must have shape \[1, 1, 8\]"),
    "pos": (dict(pos_embed=(1, 4, 8)), ValueError, r"pos_embed must have shape \[1, 5, 8\] or \[2, 5, 8\]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_shapes_raise_clear_errors(case, backend):
    overrides, error, message = BAD_INPUTS[case]
    shapes = dict(images=(2, 3, 32, 32), weight=(8, 3, 16, 16), bias=(8,), pos_embed=(1, 5, 8), cls_token=(1, 1, 8))
    shapes.update(overrides)
    inputs = {k: torch.randn(v, device=DEVICE) for k, v in shapes.items()}
    with vlkernels.use_backend(backend), pytest.raises(error, match=message):
        call(patch_embed, inputs)


def test_mismatched_dtype_and_device_raise_clear_errors():
    images, weight = torch.randn(1, 3, 16, 16, device=DEVICE), torch.randn(8, 3, 16, 16, device=DEVICE)
    with pytest.raises(TypeError, match="weight is torch.float16 but images are torch.float32"):
        patch_embed(images, weight.half())
    with pytest.raises(ValueError, match="bias is on meta"):
        patch_embed(images, weight, torch.randn(8, device="meta"))
    with pytest.raises(TypeError, match="images must be floating point"):
        patch_embed(images.long(), weight.long())
