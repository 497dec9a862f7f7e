"""vlkernels.nn.PatchEmbed: a drop-in for timm's PatchEmbed (signature, attributes, state dict,
outputs and gradients over a grid of its options, size errors). timm itself cannot be installed
here (it pulls torchvision), so its forward is restated below and run in float64."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlkernels
import vlkernels._coverage
import vlkernels.nn.patch_embed
from vlkernels.nn import PatchEmbed
from vlkernels.testing import DEVICE, assert_matches_reference, dtype_id, fp32_tolerance, kernel_dtypes, rel_error


def timm_style_forward(module: PatchEmbed, images: torch.Tensor) -> torch.Tensor:
    """timm's PatchEmbed.forward restated over the module's options and parameters: pad to whole
    patches (dynamic_img_pad), Conv2d(kernel = stride = patch), flatten or output_fmt, norm."""
    patch_h, patch_w = module.patch_size
    if module.dynamic_img_pad:
        height, width = images.shape[2:]
        images = F.pad(images, (0, -width % patch_w, 0, -height % patch_h))
    x = F.conv2d(images, module.proj.weight, module.proj.bias, stride=(patch_h, patch_w))  # [B, D, gh, gw]
    if module.flatten:
        x = x.flatten(2).transpose(1, 2)
    elif module.output_fmt == "NHWC":
        x = x.permute(0, 2, 3, 1)
    elif module.output_fmt == "NCL":
        x = x.flatten(2)
    elif module.output_fmt == "NLC":
        x = x.flatten(2).transpose(1, 2)
    return module.norm(x)


def test_state_dict_matches_timm_layout():
    module = PatchEmbed(img_size=384, patch_size=32, embed_dim=96, norm_layer=nn.LayerNorm)
    assert set(module.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert module.state_dict()["proj.weight"].shape == (96, 3, 32, 32)
    assert (module.grid_size, module.num_patches) == ((12, 12), 144)
    conv = nn.Conv2d(3, 96, 32, 32)
    missing = module.load_state_dict({"proj.weight": conv.weight, "proj.bias": conv.bias}, strict=False)
    assert missing.missing_keys == ["norm.weight", "norm.bias"] and not missing.unexpected_keys
    assert torch.equal(module.proj.weight, conv.weight)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_gradients_match_timm(backend, dtype):
    torch.manual_seed(11)
    module = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=40, norm_layer=nn.LayerNorm)
    module = module.to(DEVICE, dtype)
    images = torch.randn(3, 3, 32, 48, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(3, 6, 40, device=DEVICE, dtype=dtype)
    with vlkernels.use_backend(backend):
        out = module(images)
        grads = torch.autograd.grad(out, list(module.parameters()), grad_out)
    reference64 = PatchEmbed(img_size=(32, 48), patch_size=16, embed_dim=40, norm_layer=nn.LayerNorm).double()
    reference64.load_state_dict(module.state_dict())
    expected = timm_style_forward(reference64, images.cpu().double())
    expected_grads = torch.autograd.grad(expected, list(reference64.parameters()), grad_out.cpu().double())
    same_dtype = timm_style_forward(module, images)
    same_dtype_grads = torch.autograd.grad(same_dtype, list(module.parameters()), grad_out)
    assert_matches_reference("out", out, expected, same_dtype)
    for (name, _), grad, grad64, grad_torch in zip(module.named_parameters(), grads, expected_grads, same_dtype_grads):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_module_accumulates_gradients(backend):
    """A module moved to channels-last (its conv weight then has permuted storage) on channels-last
    images: two backwards accumulate twice timm's gradients, each parameter's in its own storage."""
    torch.manual_seed(13)
    module = PatchEmbed(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=40).to(DEVICE)
    module = module.to(memory_format=torch.channels_last)
    assert not module.proj.weight.is_contiguous()
    images = torch.randn(2, 3, 16, 24, device=DEVICE).to(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, 40, device=DEVICE)
    with vlkernels.use_backend(backend):
        for _ in range(2):
            (module(images) * grad_out).sum().backward()
    reference64 = PatchEmbed(img_size=(16, 24), patch_size=8, embed_dim=40).double()
    reference64.load_state_dict(module.state_dict())
    expected = torch.autograd.grad(timm_style_forward(reference64, images.cpu().double()),
                                   list(reference64.parameters()), grad_out.cpu().double())
    params = list(module.named_parameters())
    assert len({p.grad.untyped_storage().data_ptr() for _, p in params}) == len(params)
    for (name, param), grad64 in zip(params, expected):
        assert_matches_reference(f"grad {name}", param.grad, 2 * grad64, param.grad)


# (module options, image [H, W], whether the fused op runs)
OPTION_CASES = {
    "defaults-layernorm": (dict(img_size=(16, 24), patch_size=8, norm_layer=nn.LayerNorm), (16, 24), True),
    "no-flatten": (dict(img_size=16, patch_size=8, flatten=False, bias=False), (16, 16), True),
    "nchw-batchnorm2d": (dict(img_size=16, patch_size=8, output_fmt="NCHW", norm_layer=nn.BatchNorm2d), (16, 16),
                         True),
    "nhwc-layernorm": (dict(img_size=(16, 24), patch_size=8, output_fmt="NHWC", norm_layer=nn.LayerNorm), (16, 24),
                       True),
    "ncl-batchnorm1d": (dict(img_size=16, patch_size=8, output_fmt="NCL", norm_layer=nn.BatchNorm1d), (16, 16), True),
    "nlc-flatten-false-ignored": (dict(img_size=16, patch_size=8, flatten=False, output_fmt="NLC"), (16, 16), True),
    "dynamic-img-size-none": (dict(img_size=None, patch_size=8), (21, 30), True),  # drops the partial patches
    "not-strict-other-size": (dict(img_size=16, patch_size=8, strict_img_size=False), (24, 8), True),
    "dynamic-img-pad": (dict(img_size=16, patch_size=8, strict_img_size=False, dynamic_img_pad=True,
                             norm_layer=nn.LayerNorm), (21, 30), True),
    "img-size-not-a-multiple": (dict(img_size=(20, 27), patch_size=8), (20, 27), True),
    "non-square-patches": (dict(img_size=(16, 24), patch_size=(8, 12), norm_layer=nn.LayerNorm), (16, 24), False),
}
# The Triton kernels (interpreter here) on the cases whose fused call differs: layouts and crops.
OPTION_PARAMS = [(name, "torch") for name in OPTION_CASES] + [
    (name, "triton") for name in ("nhwc-layernorm", "dynamic-img-size-none", "dynamic-img-pad")]


@pytest.mark.parametrize("name, backend", OPTION_PARAMS)
def test_options_match_timm(name, backend, monkeypatch):
    options, (height, width), fused = OPTION_CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    module = PatchEmbed(in_chans=3, embed_dim=24, **options).to(DEVICE)
    with torch.no_grad():
        for parameter in module.parameters():  # norms away from their identity initialisation
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator).to(DEVICE))
    reference = PatchEmbed(in_chans=3, embed_dim=24, **options).double()
    reference.load_state_dict(module.state_dict())
    module.eval(), reference.eval()  # BatchNorm on running statistics: proj.bias then has a gradient
    images = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    fallbacks = []
    monkeypatch.setattr(vlkernels.nn.patch_embed, "_record_fallback", lambda op, reason: fallbacks.append(reason))
    leaves = [images.float().to(DEVICE).requires_grad_()]
    with vlkernels.use_backend(backend):
        out = module(leaves[0])
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves + list(module.parameters()), grad_out.float().to(DEVICE))
    assert bool(fallbacks) != fused, fallbacks
    leaves64 = [images.clone().requires_grad_()]
    expected = timm_style_forward(reference, leaves64[0])
    expected_grads = torch.autograd.grad(expected, leaves64 + list(reference.parameters()), grad_out)
    names = ["out", "grad images"] + [f"grad {n}" for n, _ in module.named_parameters()]
    for label, actual, wanted in zip(names, [out, *grads], [expected, *expected_grads]):
        assert actual.shape == wanted.shape, f"{label}: shape {tuple(actual.shape)}, expected {tuple(wanted.shape)}"
        error = rel_error(actual, wanted)
        assert error <= fp32_tolerance(uses_tf32_dot=True), f"{label}: relative error {error:.3e}"


TIMM_SIGNATURE = [("img_size", 224), ("patch_size", 16), ("in_chans", 3), ("embed_dim", 768), ("norm_layer", None),
                  ("flatten", True), ("output_fmt", None), ("bias", True), ("strict_img_size", True),
                  ("dynamic_img_pad", False), ("device", None), ("dtype", None)]


def test_signature_attributes_and_positional_order_are_timms():
    parameters = list(inspect.signature(PatchEmbed.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in parameters] == TIMM_SIGNATURE
    module = PatchEmbed(32, 8, 3, 16, nn.LayerNorm)  # the call: the norm is the 5th argument
    assert isinstance(module.norm, nn.LayerNorm) and module.proj.bias is not None
    assert (module.img_size, module.patch_size, module.grid_size, module.num_patches) == ((32, 32), (8, 8), (4, 4), 16)
    assert (module.flatten, module.output_fmt, module.strict_img_size, module.dynamic_img_pad) == (
        True, "NCHW", True, False)
    assert [k for k in module.state_dict()] == ["proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    dynamic = PatchEmbed(None, (8, 4), output_fmt="NHWC", dynamic_img_pad=True)
    assert (dynamic.img_size, dynamic.grid_size, dynamic.num_patches, dynamic.flatten) == (None, None, None, False)
    assert dynamic.output_fmt == "NHWC" and isinstance(dynamic.output_fmt, str)
    assert (dynamic.feat_ratio(), dynamic.feat_ratio(as_scalar=False), dynamic.dynamic_feat_size((17, 9))) == (
        8, (8, 4), (3, 3))
    typed = PatchEmbed(16, 8, embed_dim=8, norm_layer=nn.LayerNorm, dtype=torch.float64)
    assert typed.proj.weight.dtype == typed.norm.weight.dtype == torch.float64


def test_hooked_projection_runs_the_module(monkeypatch):
    """A forward hook on proj (an adapter, a probe) is honoured: the projection runs as a module,
    and the fallback is said once."""
    monkeypatch.setattr(vlkernels._coverage, "_WARNED", set())
    module = PatchEmbed(16, 8, 3, 24)
    images = torch.randn(2, 3, 16, 16)
    fused = module(images)
    calls = []
    handle = module.proj.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)) or out * 2)
    with pytest.warns(UserWarning, match="proj is not a plain nn.Conv2d without hooks"):
        hooked = module(images)
    handle.remove()
    assert calls == [(2, 24, 2, 2)]
    torch.testing.assert_close(hooked, 2 * fused, rtol=1e-5, atol=1e-5)


def test_bad_sizes_and_options_raise():
    with pytest.raises(ValueError, match=r"input height \(20\) doesn't match the model's img_size \(16\)"):
        PatchEmbed(16, 8)(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"input width \(20\) should be divisible by the patch size \(8\)"):
        PatchEmbed(16, 8, strict_img_size=False)(torch.randn(1, 3, 16, 20))
    with pytest.raises(ValueError, match="smaller than one patch"):
        PatchEmbed(None, 8)(torch.randn(1, 3, 4, 16))
    with pytest.raises(ValueError, match="output_fmt must be one of"):
        PatchEmbed(output_fmt="NWHC")
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        PatchEmbed(16, 8)(torch.randn(3, 16, 16))
