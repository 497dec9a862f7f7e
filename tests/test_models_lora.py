"""LoRA adapters (peft's own) on the fused modules: the adapted module computes what the same
module with the adapters merged into its weights computes, forward and backward.

Kernel path: a plain LoRA (no dropout) on qkv and the MoME experts keeps the fused kernels
(base weight + B @ A * scaling). Fallback: anything else that wraps or hooks a submodule whose
weight a kernel reads (LoRA dropout, a forward hook) makes the module call that submodule.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from vlkernels import kernel_coverage, use_backend
from vlkernels.nn import MoMEBlock, MoMEFFN, MultiheadAttention, PatchEmbed, VLMoAttention

peft = pytest.importorskip("peft")


def _lora(module: nn.Module, targets, dropout: float = 0.0, parameters=None) -> nn.Module:
    # init_lora_weights=False: B is random too, so the adapters change the output.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout,
                             init_lora_weights=False, target_parameters=parameters)
    return peft.get_peft_model(copy.deepcopy(module), config)


def _lora_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@contextlib.contextmanager
def _fallbacks():
    """Collects the (op, reason) of every fallback in the block (filled when it closes)."""
    seen = []
    with kernel_coverage() as coverage:
        yield seen
    seen.extend((entry.op, entry.reason) for entry in coverage.fallbacks)


def _check_against_merged(adapted: nn.Module, run, *, expect_fallback: bool) -> None:
    """run(model) -> (output tensor, inputs needing grad). Compares the output, the inputs'
    gradients and the adapters' gradients with those the merged model implies
    (dA = s B^T dW, dB = s dW A^T, dW the merged weight's gradient)."""
    merged = copy.deepcopy(adapted).merge_and_unload()
    layers = _lora_layers(adapted)
    merged_modules = dict(merged.named_modules())
    # A target_parameters adapter (peft's ParamWrapper) wraps the module owning the parameter, so
    # the adapted names gain ".base_layer" segments that merging removes.
    merged_weights = [getattr(merged_modules[name.removeprefix("base_model.model.").replace(".base_layer", "")],
                              getattr(layer, "parameter_name", "weight")) for name, layer in layers.items()]
    for weight in merged_weights:
        weight.requires_grad_(True)
    adapters = [p for layer in layers.values() for p in (layer.lora_A["default"].weight,
                                                         layer.lora_B["default"].weight)]
    with _fallbacks() as seen:
        out, inputs = run(adapted)
    assert bool(seen) == expect_fallback, seen
    expected, expected_inputs = run(merged)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, run(copy.deepcopy(adapted).unload())[0]), "the adapters changed nothing"
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs + adapters)
    expected_grads = torch.autograd.grad((expected * weights).sum(), expected_inputs + merged_weights)
    for g, e in zip(grads[:len(inputs)], expected_grads[:len(inputs)]):
        torch.testing.assert_close(g, e)
    lora_grads, weight_grads = grads[len(inputs):], expected_grads[len(inputs):]
    for (name, layer), d_weight, d_a, d_b in zip(layers.items(), weight_grads, lora_grads[0::2], lora_grads[1::2]):
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        d_weight = d_weight.flatten(1)  # a Conv2d's [out, in, kh, kw] weight as lora_B @ lora_A
        torch.testing.assert_close(d_a.flatten(1), s * b.flatten(1).T @ d_weight, msg=lambda m: f"{name} A: {m}")
        torch.testing.assert_close(d_b.flatten(1), s * d_weight @ a.flatten(1).T, msg=lambda m: f"{name} B: {m}")


def _input(*shape):
    return torch.randn(*shape, requires_grad=True)


MODULES = {
    "MoMEFFN-index": (lambda: MoMEFFN(16, 32, ("text", "image", "vl")), ["fc1", "fc2"],
                      lambda x: dict(expert_index=torch.randint(3, (2, 7)))),
    "MoMEFFN-joint": (lambda: MoMEFFN(16, 32, ("text", "image")), ["fc1", "fc2"], lambda x: dict(text_len=3)),
    "MoMEBlock": (lambda: MoMEBlock(16, 2, mlp_ratio=2.0, max_text_len=3), ["qkv", "fc1", "fc2"], lambda x: {}),
    "VLMoAttention": (lambda: VLMoAttention(16, 2), ["qkv"], lambda x: {}),
}


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["kernel-path", "fallback"])
@pytest.mark.parametrize("name", MODULES)
def test_lora_module_matches_merged(name, dropout):
    torch.manual_seed(0)
    build, targets, kwargs = MODULES[name]
    module = build()
    adapted = _lora(module, targets, dropout).eval()  # eval: LoRA dropout is the identity, yet a Dropout module
    x = _input(2, 7, 16)
    extra = kwargs(x)
    # Only MoMEFFN's experts fall back (VLMoAttention calls a wrapped qkv beside its attention kernel).
    expect = dropout > 0 and name != "VLMoAttention"
    _check_against_merged(adapted, lambda m: (m(x, **extra), [x]), expect_fallback=expect)


def test_hooked_expert_is_called():
    """A forward hook on an expert's fc1 takes effect (the fused op would skip it)."""
    torch.manual_seed(0)
    module = MoMEFFN(16, 32, ("text", "image"))
    x = torch.randn(2, 5, 16)
    plain = module(x, text_len=2)
    module.mlp_text.fc1.register_forward_hook(lambda m, args, out: out * 0.0)
    with _fallbacks() as seen:
        hooked = module(x, text_len=2)
    assert seen == [("MoMEFFN", "an expert's fc1/fc2 is wrapped (other than a plain LoRA) or hooked")]
    expected = plain.clone()
    expected[:, :2] = module.mlp_text.fc2.bias  # fc1's output zeroed: fc2(gelu(0)) = its bias
    torch.testing.assert_close(hooked, expected)


def test_lora_triton_kernel_path():
    """The kernel path on the Triton backend (the interpreter on CPU), small sizes."""
    from vlkernels import _backend
    why = _backend.triton_refusal(torch.device("cpu"))
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    adapted = _lora(MoMEFFN(16, 32, ("text", "image")), ["fc1", "fc2"])
    x = _input(2, 5, 16)
    with use_backend("triton"):
        _check_against_merged(adapted, lambda m: (m(x, text_len=2), [x]), expect_fallback=False)


def test_lora_vlmo_model_matches_merged():
    from vlkernels.models import build_model
    torch.manual_seed(0)
    model = build_model("vlmo", "tiny", relative_position_bias=True)
    # "proj" adapts attn.proj (called as a module) and patch_embed.proj (a Conv2d the patch op reads).
    adapted = _lora(model, ["qkv", "fc1", "fc2", "proj"]).eval()
    batch = model.synthetic_batch(2, generator=torch.Generator().manual_seed(1))
    batch["itm"] = False  # ITM draws its negatives at random; ITC and MLM are deterministic
    pixels = batch.pop("pixel_values").requires_grad_(True)

    def run(m):
        return m(pixel_values=pixels, **batch).loss, [pixels]
    # the patch projection falls back (a LoRA Conv2d); qkv and the experts keep their kernels
    _check_against_merged(adapted, run, expect_fallback=True)


def test_lora_patch_embed_matches_merged():
    """timm-style PatchEmbed with a LoRA Conv2d projection: the module calls it (a counted
    fallback), so the adapters reach the output."""
    torch.manual_seed(0)
    adapted = _lora(PatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16), ["proj"]).eval()
    images = _input(2, 3, 16, 16)
    _check_against_merged(adapted, lambda m: (m(images), [images]), expect_fallback=True)


def test_lora_vilt_model_matches_merged():
    from vlkernels.models import build_model
    torch.manual_seed(0)
    model = build_model("vilt", "tiny")
    # ViLT's attention projections (VLMultiheadAttention's out_proj) and MLPs (called as modules),
    # and its patch projection (a LoRA Conv2d the patch op would skip: a counted fallback)
    adapted = _lora(model, ["out_proj", "fc1", "fc2", "patch_embed.proj"]).eval()
    batch = model.synthetic_batch(2, generator=torch.Generator().manual_seed(1))  # ITM's pairing is in the batch
    pixels = batch.pop("pixel_values").requires_grad_(True)

    def run(m):
        torch.manual_seed(2)  # the patch sampling alike in every run
        return m(pixel_values=pixels, **batch).loss, [pixels]
    _check_against_merged(adapted, run, expect_fallback=True)


@pytest.mark.parametrize("name", ["meter", "simvlm"])
def test_lora_on_a_models_patch_projection_matches_merged(name):
    """METER's and SimVLM's patch projections with a LoRA Conv2d: the model calls it."""
    from vlkernels.models import build_model
    torch.manual_seed(0)
    adapted = _lora(build_model(name, "tiny"), ["patch_embed.proj"]).eval()
    batch = adapted.synthetic_batch(2, generator=torch.Generator().manual_seed(1))
    pixels = batch.pop("pixel_values").requires_grad_(True)

    def run(m):
        torch.manual_seed(2)  # any draw (ITM negatives) alike in every run
        return m(pixel_values=pixels, **batch).loss, [pixels]
    _check_against_merged(adapted, run, expect_fallback=True)


class _Holder(nn.Module):
    """peft adapts parameters of submodules only: MultiheadAttention as a model's child."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, **kwargs):
        return self.attn(x, x, x, **kwargs)[0]


# out_proj through target_modules (a LoRA Linear that must be called), the in-projection through
# target_parameters (a parametrization read through self.in_proj_weight), and both.
MHA_ADAPTERS = {"out_proj": (["out_proj"], None), "in_proj": ([], ["in_proj_weight"]),
                "both": (["out_proj"], ["in_proj_weight"])}
MHA_CALLS = ["kernel-path", "need-weights", "float-mask"]


@pytest.mark.parametrize("call", MHA_CALLS)
@pytest.mark.parametrize("adapters", MHA_ADAPTERS)
def test_lora_multihead_attention_matches_merged(adapters, call):
    torch.manual_seed(0)
    targets, parameters = MHA_ADAPTERS[adapters]
    adapted = _lora(_Holder(), targets, parameters=parameters).eval()
    x = _input(2, 37, 16)
    float_mask = torch.randn(37, 37, requires_grad=True)
    kwargs = {"kernel-path": dict(need_weights=False), "need-weights": {},
              "float-mask": dict(need_weights=False, attn_mask=float_mask)}[call]
    inputs = [x, float_mask] if call == "float-mask" else [x]
    # need_weights / a float mask run torch's math: a counted fallback that still calls out_proj
    _check_against_merged(adapted, lambda m: (m(x, **kwargs), inputs), expect_fallback=call != "kernel-path")


def test_lora_multihead_attention_triton_kernel_path():
    """Both adapters on the Triton attention kernel (the interpreter on CPU)."""
    from vlkernels import _backend
    why = _backend.triton_refusal(torch.device("cpu"))
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    adapted = _lora(_Holder(), ["out_proj"], parameters=["in_proj_weight"]).eval()
    x = _input(2, 37, 16)
    with use_backend("triton"):
        _check_against_merged(adapted, lambda m: (m(x, need_weights=False), [x]), expect_fallback=False)


@pytest.mark.parametrize("need_weights", [False, True], ids=["kernel-path", "need-weights"])
def test_hooked_out_proj_is_called(need_weights):
    """A forward hook on MultiheadAttention's out_proj takes effect on both paths."""
    torch.manual_seed(0)
    module = MultiheadAttention(16, 2)
    x = torch.randn(7, 2, 16)
    module.out_proj.register_forward_hook(lambda m, args, out: out * 0.0)
    out, _ = module(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_global_hook_makes_patch_embed_call_its_conv():
    """A global module forward hook sees PatchEmbed's proj called (the fused op would skip it)."""
    module = PatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        with _fallbacks() as fallbacks:
            module(torch.randn(2, 3, 16, 16))
    finally:
        handle.remove()
    assert nn.Conv2d in seen
    assert fallbacks == [("PatchEmbed", "proj is not a plain nn.Conv2d without hooks")]


@pytest.mark.parametrize("name", ["vilt", "soho"])
def test_lora_on_a_models_embedding_rows_matches_merged(name):
    """A LoRA nn.Embedding on the token-type (ViLT) or mask (SOHO) embedding that the models add
    by row: the model calls it, so the output and the gradients are the merged model's."""
    from vlkernels.models import build_model
    torch.manual_seed(0)
    target = {"vilt": "token_type_embeddings", "soho": "mask_embedding"}[name]
    adapted = peft.get_peft_model(build_model(name, "tiny"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)).eval()
    merged = copy.deepcopy(adapted).merge_and_unload()
    batch = adapted.synthetic_batch(2, generator=torch.Generator().manual_seed(1))
    key = "pixel_values" if name == "vilt" else "grid_features"
    features = batch.pop(key).requires_grad_(True)

    def run(m):
        torch.manual_seed(2)  # the model's draws (patch sampling, masked visual modeling) alike
        return m(**{key: features}, **batch).loss
    out = run(adapted)
    torch.testing.assert_close(out, run(merged))
    assert not torch.equal(out, run(copy.deepcopy(adapted).unload())), "the adapters changed nothing"
    torch.testing.assert_close(torch.autograd.grad(out, features)[0],
                               torch.autograd.grad(run(merged), features)[0])
