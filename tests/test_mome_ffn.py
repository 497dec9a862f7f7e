"""mome_ffn: the reference against an independent dense formula, the Triton kernels (interpreter or
GPU) against the float64 reference, forward and every gradient, over random routings (empty
experts, one expert, T = 1, D/F not powers of two), the segments fast path, and clear errors."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.ops.mome_ffn import expert_order, mome_ffn, segments_order
from vlkernels.reference.mome_ffn import mome_ffn as reference
from vlkernels.reference.mome_ffn import segments_expert_index
from vlkernels.testing import DEVICE, assert_matches_reference, dtype_id, kernel_dtypes, poisoned_allocations

# (T, D, F, E, routing, ln): routing "random", "empty" (expert 1 gets none), "one" (all to the last)
SHAPES = [
    (1, 24, 40, 3, "random", True),
    (7, 33, 65, 3, "empty", True),
    (97, 24, 40, 3, "random", True),
    (33, 40, 24, 2, "one", False),
    (130, 16, 48, 4, "random", True),  # rows of one expert span more than one 128-row tile
    (40, 544, 2176, 3, "random", True),  # VLMo base_plus D/F
]


def shape_id(shape):
    t, d, f, e, routing, ln = shape
    return f"T{t}-D{d}-F{f}-E{e}-{routing}" + ("-ln" if ln else "")


def make_routing(t, e, routing, generator):
    if routing == "random":
        return torch.randint(0, e, (t,), generator=generator)
    if routing == "empty":
        return torch.tensor([0, 2], dtype=torch.long)[torch.randint(0, 2, (t,), generator=generator)]
    return torch.full((t,), e - 1, dtype=torch.long)


def make_inputs(t, d, f, e, ln, dtype, device, generator, mean=0.0):
    def rand(*size, scale=1.0, shift=0.0):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale + shift
        return values.to(device, dtype).requires_grad_()

    return dict(x=rand(t, d, shift=mean), w1=rand(e, d, f, scale=d ** -0.5), b1=rand(e, f, scale=0.5),
                w2=rand(e, f, d, scale=f ** -0.5), b2=rand(e, d, scale=0.5),
                ln_weight=rand(e, d, scale=0.5, shift=1.0) if ln else None, ln_bias=rand(e, d, scale=0.5) if ln else None)


def call(fn, inputs, expert_index, **kwargs):
    return fn(inputs["x"], expert_index, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"],
              ln_weight=inputs["ln_weight"], ln_bias=inputs["ln_bias"], **kwargs)


def detached(inputs, dtype=None, device=None):
    return {k: None if v is None else v.detach().to(device=device or v.device, dtype=dtype or v.dtype).requires_grad_()
            for k, v in inputs.items()}


def dense_formula(x, expert_index, w1, b1, w2, b2, ln_weight, ln_bias, eps=1e-6):
    """Every token through every expert (einsum), then the routed result picked per token."""
    outs = []
    for e in range(w1.shape[0]):
        h = x if ln_weight is None else F.layer_norm(x, x.shape[-1:], ln_weight[e], ln_bias[e], eps)
        outs.append(F.gelu(torch.einsum("td,df->tf", h, w1[e]) + b1[e]) @ w2[e] + b2[e])
    return torch.stack(outs)[expert_index, torch.arange(x.shape[0])]


def check_against_reference(inputs, expert_index, dtype, generator, **kwargs):
    names = [k for k, v in inputs.items() if v is not None]
    with vlkernels.use_backend("triton"), poisoned_allocations():
        out = call(mome_ffn, inputs, expert_index, **kwargs)
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)

    def run_reference(values, index):
        result = call(reference, values, index, **kwargs)
        return result, torch.autograd.grad(result, [values[k] for k in names], grad_out.to(result.dtype).to(result.device))

    index_cpu = None if expert_index is None else expert_index.cpu()
    out64, grads64 = run_reference(detached(inputs, torch.float64, "cpu"), index_cpu)
    out_torch, grads_torch = run_reference(detached(inputs), expert_index)
    assert_matches_reference("out", out, out64, out_torch)
    for name, grad, grad64, grad_torch in zip(names, grads, grads64, grads_torch):
        assert_matches_reference(f"grad {name}", grad, grad64, grad_torch)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
def test_reference_matches_dense_formula(shape):
    t, d, f, e, routing, ln = shape
    generator = torch.Generator().manual_seed(1)
    inputs = make_inputs(t, d, f, e, ln, torch.float64, "cpu", generator)
    index = make_routing(t, e, routing, generator)
    expected = dense_formula(inputs["x"], index, *(inputs[k] for k in ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias")))
    torch.testing.assert_close(call(reference, inputs, index), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_float64_reference(shape, dtype):
    t, d, f, e, routing, ln = shape
    if d * f > 10_000 and dtype != torch.float32 and DEVICE.type == "cpu":
        pytest.skip("the VLMo base_plus size runs once (fp32) in the interpreter, to keep the file fast")
    generator = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    inputs = make_inputs(t, d, f, e, ln, dtype, DEVICE, generator)
    check_against_reference(inputs, make_routing(t, e, routing, generator).to(DEVICE), dtype, generator)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("segments", [(5, 0, 1), (5, 1, 0), (0, 0, 1), (9, 2, 2)], ids=lambda s: "L{}-{}-{}".format(*s))
def test_segments_fast_path(segments, dtype):
    """VLMo's joint input (first L tokens to one expert, the rest to another) without a sort."""
    generator = torch.Generator().manual_seed(11)
    batch, seq_len, d, f = 3, 9, 24, 40
    inputs = make_inputs(batch * seq_len, d, f, 3, True, dtype, DEVICE, generator)
    inputs["x"] = inputs["x"].detach().reshape(batch, seq_len, d).requires_grad_()
    check_against_reference(inputs, None, dtype, generator, segments=segments)


def test_segments_order_matches_a_stable_sort():
    index = segments_expert_index(4, 7, (3, 2, 0))
    order, offsets = segments_order(4, 7, (3, 2, 0), 3, "cpu")
    expected_order, expected_offsets = expert_order(index, 3)
    assert torch.equal(order, expected_order) and torch.equal(offsets, expected_offsets)


def test_triton_large_row_mean_and_relu():
    """Rows with a large mean (LayerNorm statistics must not cancel) and the relu activation."""
    generator = torch.Generator().manual_seed(4)
    inputs = make_inputs(33, 40, 24, 3, True, torch.float32, DEVICE, generator, mean=30.0)
    check_against_reference(inputs, make_routing(33, 3, "random", generator).to(DEVICE), torch.float32, generator,
                            activation="relu")


def test_triton_weight_layouts_and_partial_gradients():
    """nn.Linear weights stacked [E, F, D] and viewed as [E, D, F] are read in place; only the
    requested gradients come back, right."""
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs(21, 24, 40, 3, False, torch.float32, DEVICE, generator)
    inputs["w1"] = inputs["w1"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    inputs["x"].requires_grad_(False)
    index = make_routing(21, 3, "random", generator).to(DEVICE)
    with vlkernels.use_backend("triton"):
        out = call(mome_ffn, inputs, index)
        (grad_w1,) = torch.autograd.grad(out.square().sum(), inputs["w1"])
    values = detached(inputs, torch.float64, "cpu")
    (expected,) = torch.autograd.grad(call(reference, values, index.cpu()).square().sum(), values["w1"])
    assert_matches_reference("grad w1", grad_w1, expected, grad_w1)


def test_triton_no_grad_forward():
    generator = torch.Generator().manual_seed(5)
    inputs = make_inputs(17, 24, 40, 3, True, torch.float32, DEVICE, generator)
    index = make_routing(17, 3, "random", generator).to(DEVICE)
    with vlkernels.use_backend("triton"), torch.no_grad(), poisoned_allocations():
        out = call(mome_ffn, inputs, index)
    assert_matches_reference("out", out, call(reference, detached(inputs, torch.float64, "cpu"), index.cpu()), out)


def test_auto_backend_on_cpu_is_the_reference():
    generator = torch.Generator().manual_seed(6)
    inputs = make_inputs(9, 8, 12, 3, True, torch.float32, "cpu", generator)
    index = make_routing(9, 3, "random", generator)
    with vlkernels.use_backend("auto"):
        torch.testing.assert_close(call(mome_ffn, inputs, index), call(reference, inputs, index), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 3, 100])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_expert_ids_raise_before_launch(bad, backend, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(6, 8, 12, 3, True, torch.float32, DEVICE, generator)
    index = torch.tensor([0, 1, 2, bad, 0, 1], device=DEVICE)
    module = importlib.import_module("vlkernels.ops.mome_ffn")  # the module: vlkernels.ops.mome_ffn is the function

    def no_launch(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(module, "_launch_fwd", no_launch)
    with vlkernels.use_backend(backend), pytest.raises(ValueError, match=r"expert ids must be in \[0, 3\)"):
        call(mome_ffn, inputs, index)


@pytest.mark.parametrize("change, error, match", [
    (dict(w1=torch.zeros(3, 9, 12)), ValueError, r"x must be \[..., D\] with D = 9"),
    (dict(b1=torch.zeros(3, 11)), ValueError, r"b1 must have shape \[3, 12\]"),
    (dict(w2=torch.zeros(2, 12, 8)), ValueError, r"w2 must have shape \[3, 12, 8\]"),
    (dict(b2=torch.zeros(3, 8, dtype=torch.float64)), TypeError, r"b2 is torch.float64"),
    (dict(ln_weight=torch.zeros(3, 7)), ValueError, r"ln_weight must have shape \[3, 8\]"),
    (dict(index=torch.zeros(5, dtype=torch.long)), ValueError, r"expert_index must have shape \[6\]"),
    (dict(index=torch.zeros(6)), TypeError, r"expert_index must be an integer tensor"),
    (dict(activation="swish"), ValueError, r"activation must be one of"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(6, 8, 12, 3, True, torch.float32, "cpu", generator)
    index = change.pop("index", torch.zeros(6, dtype=torch.long))
    activation = change.pop("activation", "gelu")
    inputs.update(change)
    with pytest.raises(error, match=match):
        call(mome_ffn, inputs, index, activation=activation)


def test_bad_segments_raise():
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(6, 8, 12, 3, False, torch.float32, "cpu", generator)
    inputs["x"] = inputs["x"].detach().reshape(2, 3, 8)
    with pytest.raises(ValueError, match=r"segments expert id 3 outside"):
        call(mome_ffn, inputs, None, segments=(1, 0, 3))
    with pytest.raises(ValueError, match=r"text_len 4 outside"):
        call(mome_ffn, inputs, None, segments=(4, 0, 1))


def test_unsupported_dtype_names_every_backend_tried():
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(4, 8, 12, 3, False, torch.float64, DEVICE, generator)
    index = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with vlkernels.use_backend("triton"), pytest.raises(vlkernels.NoBackendError, match=r"triton: dtype torch.float64"):
        call(mome_ffn, inputs, index)


def test_custom_op_passes_opcheck():
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs(13, 16, 24, 3, True, torch.float32, DEVICE, generator)
    order, offsets = expert_order(make_routing(13, 3, "empty", generator).to(DEVICE), 3)
    args = (inputs["x"], order, offsets, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"],
            inputs["ln_weight"], inputs["ln_bias"], 1e-6, "gelu", True)
    torch.library.opcheck(torch.ops.vlkernels.mome_ffn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------
# vlkernels.nn.MoMEFFN
# ----------------------------------------------------------------------------------------------
def vlmo_ffn(module, x, route):
    """VLMo's Block FFN branch, written as VLMo does: mlp_e(norm2_e(x)) on the chosen tokens."""
    def expert(suffix, tokens):
        norm, mlp = getattr(module, f"norm2_{suffix}"), getattr(module, f"mlp_{suffix}")
        return mlp.fc2(F.gelu(mlp.fc1(norm(tokens))))

    if route == "joint-split":
        return torch.cat([expert("text", x[:, :5]), expert("imag", x[:, 5:])], dim=1)
    return expert(route, x)


def test_moffn_state_dict_mirrors_vlmo():
    from vlkernels.nn.mome import MoMEFFN

    keys = set(MoMEFFN(8, 16).state_dict())
    expected = {f"{p}_{s}.{w}" for s in ("text", "imag", "vl") for p, w in
                [("norm2", "weight"), ("norm2", "bias"), ("mlp", "fc1.weight"), ("mlp", "fc1.bias"),
                 ("mlp", "fc2.weight"), ("mlp", "fc2.bias")]}
    assert keys == expected


@pytest.mark.parametrize("route", ["text", "image", "vl", "joint-vl", "joint-split", "per-token"])
def test_moffn_matches_vlmo_formulation(route):
    from vlkernels.nn.mome import MoMEFFN

    torch.manual_seed(0)
    experts = ("text", "image") if route == "joint-split" else ("text", "image", "vl")
    module = MoMEFFN(24, 40, experts).to(DEVICE)
    for p in module.parameters():  # non-trivial LayerNorm parameters
        p.data.normal_(0.0, 0.3).add_(1.0 if p.dim() == 1 and p.shape[0] == 24 else 0.0)
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    with vlkernels.use_backend("triton"):
        if route == "per-token":
            index = torch.randint(0, 3, (2, 9), device=DEVICE)
            out = module(x, index)
        elif route.startswith("joint"):
            out = module(x, text_len=5)
        else:
            out = module(x, modality_type=route)
        grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()], allow_unused=True)
    module64 = MoMEFFN(24, 40, experts).double()
    module64.load_state_dict(module.state_dict())
    x64 = x.detach().cpu().double().requires_grad_()
    if route == "per-token":
        outs = torch.stack([vlmo_ffn(module64, x64, s) for s in ("text", "imag", "vl")])
        expected = torch.gather(outs, 0, index.cpu()[None, :, :, None].expand(1, 2, 9, 24))[0]
    else:
        expected = vlmo_ffn(module64, x64, {"image": "imag", "joint-vl": "vl"}.get(route, route))
    grads64 = torch.autograd.grad(expected.square().sum(), [x64, *module64.parameters()], allow_unused=True)
    assert_matches_reference("out", out, expected, out)
    for (name, _), grad, grad64 in zip([("x", None), *module.named_parameters()], grads, grads64):
        if grad64 is None or not grad64.any():
            assert grad is None or not grad.any(), name
            continue
        assert_matches_reference(f"grad {name}", grad, grad64, grad)


def vlmo_block_restated(sd, x, mask, modality_type, bias, heads, max_text_len, eps=1e-6):
    """VLMo's multiway Block in plain torch (float64), over its own state-dict keys."""
    def layer_norm(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def mlp(t, name):
        hidden = F.gelu(F.linear(t, sd[f"mlp_{name}.fc1.weight"], sd[f"mlp_{name}.fc1.bias"]))
        return F.linear(hidden, sd[f"mlp_{name}.fc2.weight"], sd[f"mlp_{name}.fc2.bias"])

    h = layer_norm(x, "norm1")
    qkv_bias = torch.cat([sd["attn.q_bias"], torch.zeros_like(sd["attn.v_bias"]), sd["attn.v_bias"]])
    q, k, v = F.linear(h, sd["attn.qkv.weight"], qkv_bias).reshape(x.shape[0], x.shape[1], 3, heads, -1).permute(
        2, 0, 3, 1, 4)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    x = x + sd["gamma_1"] * F.linear(attended, sd["attn.proj.weight"], sd["attn.proj.bias"])
    if modality_type in ("text", "image"):
        name = "text" if modality_type == "text" else "imag"
        return x + sd["gamma_2"] * mlp(layer_norm(x, f"norm2_{name}"), name)
    if "mlp_vl.fc1.weight" in sd:
        return x + sd["gamma_2"] * mlp(layer_norm(x, "norm2_vl"), "vl")
    text, image = x[:, :max_text_len], x[:, max_text_len:]
    return torch.cat([text + sd["gamma_2"] * mlp(layer_norm(text, "norm2_text"), "text"),
                      image + sd["gamma_2"] * mlp(layer_norm(image, "norm2_imag"), "imag")], 1)


@pytest.mark.parametrize("case", ["joint-split", "joint-vl", "text", "image", "relative-bias"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mome_block_matches_vlmo_and_loads_its_keys(backend, case):
    from vlkernels.nn.mome import MoMEBlock

    torch.manual_seed(21)
    dim, heads, text_len, seq = 24, 2, 5, 13
    vlmo_keys = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                 "attn.q_bias": (dim,), "attn.v_bias": (dim,), "attn.proj.weight": (dim, dim),
                 "attn.proj.bias": (dim,), "gamma_1": (dim,), "gamma_2": (dim,)}
    experts = ["text", "imag"] + (["vl"] if case == "joint-vl" else [])
    for name in experts:
        vlmo_keys.update({f"norm2_{name}.weight": (dim,), f"norm2_{name}.bias": (dim,),
                          f"mlp_{name}.fc1.weight": (4 * dim, dim), f"mlp_{name}.fc1.bias": (4 * dim,),
                          f"mlp_{name}.fc2.weight": (dim, 4 * dim), f"mlp_{name}.fc2.bias": (dim,)})
    checkpoint = {k: torch.randn(shape, dtype=torch.float64) * 0.3 for k, shape in vlmo_keys.items()}
    block = MoMEBlock(dim, heads, with_vlffn=case == "joint-vl", max_text_len=text_len).to(DEVICE)
    block.load_state_dict({k: v.float() for k, v in checkpoint.items()})
    x = torch.randn(3, seq, dim, dtype=torch.float64)
    mask = torch.rand(3, seq) < 0.8
    mask[:, 0] = True
    bias = torch.randn(heads, seq, seq, dtype=torch.float64) if case == "relative-bias" else None
    modality = case if case in ("text", "image") else None
    with vlkernels.use_backend(backend):
        out = block(x.float().to(DEVICE), mask.to(DEVICE), modality,
                    None if bias is None else bias.float().to(DEVICE))
    expected = vlmo_block_restated(checkpoint, x, mask, modality, bias, heads, text_len)
    assert_matches_reference("block", out, expected, out)
