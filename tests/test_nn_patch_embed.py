"""vlkernels.nn.PatchEmbed: a drop-in for timm's PatchEmbed (state dict, outputs, options)."""
import pytest
import torch
from torch import nn

import vlkernels
from vlkernels.nn import PatchEmbed
from vlkernels.testing import DEVICE, assert_matches_reference, dtype_id, kernel_dtypes


def timm_style_forward(module: PatchEmbed, images: torch.Tensor) -> torch.Tensor:
    """What timm's PatchEmbed computes with the same parameters: conv, flatten, norm."""
    return module.norm(module.proj(images).flatten(2).transpose(1, 2))


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


def test_unflattened_output_is_the_conv_layout():
    torch.manual_seed(12)
    module = PatchEmbed(img_size=64, patch_size=16, embed_dim=24, flatten=False, bias=False)
    images = torch.randn(2, 3, 64, 32)
    out = module(images)
    assert module.proj.bias is None
    torch.testing.assert_close(out, module.proj(images), rtol=1e-5, atol=1e-5)


def test_bad_patch_and_image_sizes_raise():
    with pytest.raises(ValueError, match="square patches"):
        PatchEmbed(patch_size=(16, 8))
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        PatchEmbed(embed_dim=8)(torch.randn(1, 3, 40, 32))


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
