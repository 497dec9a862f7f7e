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


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_skewed_routing_with_an_empty_expert(dtype):
    """5% / 0% / 95% of 400 tokens: the weight gradients take the chunked schedule (each
    expert's rows in fixed-size chunks, fp32 partials added per expert), the big expert over
    several chunks, the tiny one in one, the empty one with zero gradients."""
    generator = torch.Generator().manual_seed(21)
    t, d, f, e = 400, 24, 40, 3
    index = torch.full((t,), 2, dtype=torch.long)
    index[torch.randperm(t, generator=generator)[:20]] = 0
    for m_size, n_size in ((d, f), (f, d)):
        cfg = mome_module.WEIGHT_GRAD_CONFIGS[dtype, "tf32"]
        chunk_rows = mome_module._weight_grad_launch(t, m_size, n_size, e, cfg, mome_module._multiprocessors(DEVICE))[0]
        assert 0 < chunk_rows < 380, chunk_rows  # chunked, and the big expert spans several chunks
    inputs = make_inputs(t, d, f, e, True, dtype, DEVICE, generator)
    check_against_reference(inputs, index.to(DEVICE), dtype, generator)


@pytest.mark.parametrize("multiprocessors", [2, 16], ids=["one-slot", "chunked"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_every_reduction_is_balanced_by_tokens(dtype, multiprocessors, monkeypatch):
    """1 / 0 / 30 / 569 of 600 tokens (a tiny, an empty, a small and a big expert), D = 160 and
    F = 200 above every block: the weight gradients, the bias column sums and the LayerNorm
    backward all take the token-balanced schedule. With the interpreter's 2 multiprocessors each
    reduces an expert in one slot, stored in the gradient's dtype; as on a 16-SM device, each
    expert's rows in fixed-size chunks (the big expert over several, fp32 partials added per
    expert in order). Every gradient against the float64 reference."""
    monkeypatch.setattr(mome_module, "_multiprocessors", lambda device: multiprocessors)
    generator = torch.Generator().manual_seed(22)
    t, d, f, e = 600, 160, 200, 4
    index = torch.full((t,), 3, dtype=torch.long)
    picked = torch.randperm(t, generator=generator)
    index[picked[:1]] = 0
    index[picked[1:31]] = 2
    schedules = [mome_module._column_sum_launch(t, n_size, e, multiprocessors)[:2] for n_size in (d, f)]
    schedules.append(mome_module._ln_bwd_launch(t, d, e, multiprocessors)[2:4])
    for m_size, n_size in ((d, f), (f, d)):
        cfg = mome_module.WEIGHT_GRAD_CONFIGS[dtype, "tf32"]
        schedules.append(mome_module._weight_grad_launch(t, m_size, n_size, e, cfg, multiprocessors)[:2])
    for chunk_rows, slots in schedules:
        if multiprocessors == 2:
            assert (chunk_rows, slots) == (0, e)
        else:
            assert 0 < chunk_rows < 569 and slots == -(-t // chunk_rows) + e - 1, (chunk_rows, slots)
    inputs = make_inputs(t, d, f, e, True, dtype, DEVICE, generator)
    check_against_reference(inputs, index.to(DEVICE), dtype, generator)


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


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_custom_op_passes_opcheck(tma):
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs(13, 16, 24, 3, True, torch.float32, DEVICE, generator)
    order, offsets = expert_order(make_routing(13, 3, "empty", generator).to(DEVICE), 3)
    args = (inputs["x"], order, offsets, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"],
            inputs["ln_weight"], inputs["ln_bias"], 1e-6, "gelu", True, tma)
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


# ----------------------------------------------------------------------------------------------
# Issue 12's test classes, on every backend that runs here (torch; triton in the interpreter):
# (a) accumulation / retain_graph and owned gradient storage, (b) strided, transposed and
# expanded arguments, (c) hidden sizes above every block, (d) empty and degenerate routings,
# (e) NaN / Inf propagated as the float64 reference does, (f) hypothesis; plus the launch grids
# at huge sizes and integer-only segments.
# ----------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = ["torch", "triton"]
mome_module = importlib.import_module("vlkernels.ops.mome_ffn")
ARGS = ("x", "w1", "b1", "w2", "b2", "ln_weight", "ln_bias")


def backend_run(backend, leaves, views, expert_index, generator, **kwargs):
    """(out, grads of every leaf that requires grad, grad_out) of mome_ffn on ``backend``, its
    arguments built from ``leaves`` by ``views`` (identity: the leaves themselves)."""
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    with vlkernels.use_backend(backend), poisoned_allocations():
        out = call(mome_ffn, views(leaves), expert_index, **kwargs)
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out)
    return out, dict(zip(names, grads)), grad_out


def reference_run(leaves, views, expert_index, grad_out, dtype=torch.float64, **kwargs):
    values = detached(leaves, dtype, "cpu")
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    out = call(reference, views(values), None if expert_index is None else expert_index.cpu(), **kwargs)
    grads = torch.autograd.grad(out, [values[k] for k in names], grad_out.cpu().to(dtype))
    return out, dict(zip(names, grads))


def check_backend(backend, leaves, expert_index, generator, views=lambda v: v, **kwargs):
    """mome_ffn on ``backend``: output and every leaf gradient against the float64 reference."""
    out, grads, grad_out = backend_run(backend, leaves, views, expert_index, generator, **kwargs)
    dtype = out.dtype
    out64, grads64 = reference_run(leaves, views, expert_index, grad_out, **kwargs)
    out_same, grads_same = reference_run(leaves, views, expert_index, grad_out, dtype, **kwargs)
    assert_matches_reference("out", out, out64, out_same)
    for name, grad in grads.items():
        assert_matches_reference(f"grad {name}", grad, grads64[name], grads_same[name])
    return out, grads


def assert_own_storage(named_tensors):
    pointers = {}
    for name, tensor in named_tensors:
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel():
            assert pointer not in pointers, f"the gradients of {name} and {pointers.get(pointer)} share storage"
        pointers[pointer] = name


# (a) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["retain_graph", "two_forwards"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_accumulate_twice_and_own_their_storage(backend, mode):
    generator = torch.Generator().manual_seed(31)
    t, d, f, e = 23, 24, 40, 2
    inputs = make_inputs(t, d, f, e, True, torch.float32, DEVICE, generator)
    index = make_routing(t, e, "random", generator).to(DEVICE)
    grad_out = torch.randn(t, d, generator=generator).to(DEVICE)
    with vlkernels.use_backend(backend):
        out = call(mome_ffn, inputs, index)
        out.backward(grad_out, retain_graph=True)
        if mode == "retain_graph":
            out.backward(grad_out)
        else:
            call(mome_ffn, inputs, index).backward(grad_out)
    _, grads64 = reference_run(inputs, lambda v: v, index, grad_out)
    _, grads32 = reference_run(inputs, lambda v: v, index, grad_out, torch.float32)
    for name in ARGS:
        assert_matches_reference(f"2 x grad {name}", inputs[name].grad, 2 * grads64[name], 2 * grads32[name])
    assert_own_storage((name, inputs[name].grad) for name in ARGS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_returned_gradients_never_share_storage(backend):
    """The op's gradients (torch.autograd.grad, before any accumulation) are distinct storages,
    also with w1 a transposed view and b1 expanded (their gradients come back through the views)."""
    generator = torch.Generator().manual_seed(32)
    inputs = make_inputs(9, 16, 24, 2, True, torch.float32, DEVICE, generator)
    _, grads, _ = backend_run(backend, inputs, lambda v: v, make_routing(9, 2, "random", generator).to(DEVICE),
                              generator)
    assert_own_storage(grads.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_moffn_parameter_gradients_accumulate_and_own_their_storage(backend):
    """MoMEFFN stacks its experts' parameters for the op: every parameter's .grad must own its
    storage (torch.stack's backward would hand out views of one tensor) and accumulate to 2x."""
    from vlkernels.nn.mome import MoMEFFN

    torch.manual_seed(33)
    module = MoMEFFN(16, 24, ("text", "image")).to(DEVICE)
    for p in module.parameters():
        p.data.normal_(0.0, 0.3)
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    with vlkernels.use_backend(backend):
        out = module(x, text_len=3)
        out.square().sum().backward(retain_graph=True)
        out.square().sum().backward()
    module64 = MoMEFFN(16, 24, ("text", "image")).double()
    module64.load_state_dict(module.state_dict())
    x64 = x.detach().cpu().double().requires_grad_()
    vlmo_ffn_split = torch.cat([vlmo_ffn(module64, x64[:, :3], "text"), vlmo_ffn(module64, x64[:, 3:], "imag")], 1)
    vlmo_ffn_split.square().sum().backward()
    named = [("x", x), *module.named_parameters()]
    for (name, tensor), reference_tensor in zip(named, [x64, *module64.parameters()]):
        assert_matches_reference(f"2 x grad {name}", tensor.grad, 2 * reference_tensor.grad, tensor.grad)
    assert_own_storage((name, tensor.grad) for name, tensor in named)


# (b) -------------------------------------------------------------------------------------------
def strided_views(values):
    """Every argument non-contiguous: x a column slice, w1 a transpose view (nn.Linear layout),
    b1 expanded from [1, F], w2 a strided slice, b2 a transpose view, ln_weight a strided slice,
    ln_bias expanded from [E, 1]."""
    return dict(x=values["x"][:, ::2], w1=values["w1"].transpose(1, 2), b1=values["b1"].expand(3, -1),
                w2=values["w2"][:, :, 1::2], b2=values["b2"].t(), ln_weight=values["ln_weight"][:, ::3],
                ln_bias=values["ln_bias"].expand(-1, 24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_transposed_and_expanded_arguments(backend):
    generator = torch.Generator().manual_seed(34)
    t, d, f, e = 19, 24, 40, 3

    def leaf(*size, scale=1.0, shift=0.0):
        return (torch.randn(size, generator=generator) * scale + shift).to(DEVICE).requires_grad_()

    leaves = dict(x=leaf(t, 2 * d), w1=leaf(e, f, d, scale=d ** -0.5), b1=leaf(1, f, scale=0.5),
                  w2=leaf(e, f, 2 * d, scale=f ** -0.5), b2=leaf(d, e, scale=0.5),
                  ln_weight=leaf(e, 3 * d, scale=0.5, shift=1.0), ln_bias=leaf(e, 1, scale=0.5))
    index = torch.randint(0, e, (2 * t,), generator=generator).to(DEVICE)[::2]  # strided ids too
    args = strided_views(leaves)
    assert not any(args[name].is_contiguous() for name in ARGS)
    out, _ = check_backend(backend, leaves, index, generator, views=strided_views)
    with vlkernels.use_backend(backend), torch.no_grad():  # the contiguous call gives the same result
        contiguous = call(mome_ffn, {k: v.contiguous() for k, v in args.items()}, index.contiguous())
    torch.testing.assert_close(out, contiguous, rtol=1e-6, atol=1e-6)


# (c) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ln", [True, False], ids=["ln", "no-ln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_sizes_above_every_block(backend, ln):
    """D = 300, F = 200: two or more 128-column tiles with a remainder and K loops of 32/64 with a
    remainder in every GEMM, the LayerNorm backward's BLOCK_D (512) with a remainder, and the
    bias column sums' 128-column tiles with a remainder."""
    generator = torch.Generator().manual_seed(35)
    t, d, f, e = 21, 300, 200, 1 if ln else 2  # one expert with the LayerNorm (its prologue triples FC1's loop)
    inputs = make_inputs(t, d, f, e, ln, torch.float32, DEVICE, generator)
    check_backend(backend, inputs, make_routing(t, e, "random", generator).to(DEVICE), generator)


@pytest.mark.parametrize("layout", ["stacked", "linear"])
@pytest.mark.parametrize("ln", [True, False], ids=["ln", "no-ln"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_tma_row_gemms_match_float64_reference(dtype, ln, layout, monkeypatch):
    """The row GEMMs over sorted A rows through TMA descriptors (TMA_ROW_GEMMS), with the op's
    stacked [E, D, F] / [E, F, D] weights and with MoMEFFN's stacked nn.Linear weights (read
    transposed): 10 / 0 / 290 tokens, so A tiles run past an expert's end into the next expert's
    rows and past T; D = 136, F = 200 give K remainders in every GEMM and N remainders. Each
    launch takes the load the rules give it (FC1 over the normalised rows, FC2 and d(normalised
    x); gathered rows by pointers; fp32 never from a weight stored [K, N]); every gradient is right."""
    kernels = mome_module.kernels
    monkeypatch.setattr(mome_module, "TMA_ROW_GEMMS", frozenset(kernel_dtypes()))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # fp32's tensor-core dots (IEEE has no TMA)
    modes = []
    choose = mome_module._tma_descriptors

    def recording(*args, **kwargs):
        chosen = choose(*args, **kwargs)
        modes.append(chosen[0])
        return chosen

    monkeypatch.setattr(mome_module, "_tma_descriptors", recording)
    generator = torch.Generator().manual_seed(37)
    t, d, f, e = 300, 136, 200, 3
    index = torch.full((t,), 2, dtype=torch.long)
    index[torch.randperm(t, generator=generator)[:10]] = 0
    inputs = make_inputs(t, d, f, e, ln, dtype, DEVICE, generator)
    if layout == "linear":  # fc1.weight [F, D] and fc2.weight [D, F] of each expert, stacked and transposed
        for name in ("w1", "w2"):
            inputs[name] = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    check_against_reference(inputs, index.to(DEVICE), dtype, generator)
    forward_weight, backward_weight = ((kernels.TMA_WEIGHT_KN, kernels.TMA_WEIGHT_NK) if layout == "stacked" else
                                       (kernels.TMA_WEIGHT_NK, kernels.TMA_WEIGHT_KN))
    def allowed(mode):  # fp32 never from a weight stored [K, N]
        return kernels.TMA_NONE if dtype == torch.float32 and mode == kernels.TMA_WEIGHT_KN else mode

    # FC1, FC2, dz (gathered dY rows), d(normalised x)
    expected = [allowed(forward_weight) if ln else kernels.TMA_NONE, allowed(forward_weight), kernels.TMA_NONE,
                allowed(backward_weight)]
    assert modes == expected


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
def test_tma_descriptors_only_where_the_rules_allow(dtype):
    cfg = mome_module.GEMM_CONFIGS[dtype]
    kernels = mome_module.kernels

    def mode(k_size, n_size, offset=0, layout="nk", gather_a=False, tma=True, precision="tf32"):
        a = torch.empty(64 * k_size + offset, dtype=dtype)[offset:].view(64, k_size)
        weight = {"nk": torch.empty(3, n_size, k_size, dtype=dtype).transpose(1, 2),
                  "kn": torch.empty(3, k_size, n_size, dtype=dtype),
                  "expanded": torch.empty(1, n_size, k_size, dtype=dtype).expand(3, -1, -1).transpose(1, 2),
                  "strided": torch.empty(3, n_size, 2 * k_size, dtype=dtype)[:, :, ::2].transpose(1, 2)}[layout]
        return mome_module._tma_descriptors(a, weight, k_size, n_size, cfg, precision, tma=tma, gather_a=gather_a,
                                            weight_kn_strides=(weight.stride(1), weight.stride(2)))[0]

    assert mode(136, 200) == kernels.TMA_WEIGHT_NK
    assert mode(136, 200, layout="kn") == (kernels.TMA_NONE if dtype == torch.float32 else kernels.TMA_WEIGHT_KN)
    assert mode(130, 200) == kernels.TMA_NONE  # A's rows 260 (fp32: 520) bytes apart
    assert mode(136, 200, offset=1) == kernels.TMA_NONE  # A's base off 16 bytes
    assert mode(136, 200, layout="expanded") == kernels.TMA_NONE  # one weight for every expert (stride 0)
    assert mode(136, 200, layout="strided") == kernels.TMA_NONE  # no unit stride in the weight
    assert mode(136, 200, gather_a=True) == kernels.TMA_NONE  # gathered rows
    assert mode(136, 200, precision="ieee") == kernels.TMA_NONE  # no tensor cores
    assert mode(136, 200, tma=False) == kernels.TMA_NONE  # the default: TMA_ROW_GEMMS is empty


def test_a_call_takes_tma_for_its_forward_and_backward_alike(monkeypatch):
    """The choice is made once, when the forward runs: the backward follows it even after
    TMA_ROW_GEMMS changed (as the benchmark's vlkernels[tma] provider restores it)."""
    calls = []
    choose = mome_module._tma_descriptors

    def recording(*args, **kwargs):
        calls.append(kwargs["tma"])
        return choose(*args, **kwargs)

    monkeypatch.setattr(mome_module, "_tma_descriptors", recording)
    generator = torch.Generator().manual_seed(38)
    inputs = make_inputs(20, 16, 32, 2, True, torch.float32, DEVICE, generator)
    index = make_routing(20, 2, "random", generator).to(DEVICE)
    for switched in (True, False):
        calls.clear()
        monkeypatch.setattr(mome_module, "TMA_ROW_GEMMS", frozenset({torch.float32}) if switched else frozenset())
        with vlkernels.use_backend("triton"):
            out = call(mome_ffn, inputs, index)
        monkeypatch.setattr(mome_module, "TMA_ROW_GEMMS", frozenset() if switched else frozenset({torch.float32}))
        out.sum().backward()
        assert calls == [switched] * 4  # FC1, FC2, dz, d(normalised x)


def test_split_reductions_match_torch():
    """The weight-gradient and bias column-sum kernels with each expert's rows in chunks (the path
    large batches take), an empty expert included, stored in the gradient's dtype."""
    generator = torch.Generator().manual_seed(36)
    cfg = mome_module.GEMM_CONFIGS[torch.float32]
    index = torch.randint(0, 2, (400,), generator=generator) * 2  # expert 1 gets no token
    order, offsets = expert_order(index.to(DEVICE), 3)
    counts = torch.bincount(index, minlength=3).tolist()
    assert mome_module._column_sum_launch(400, 40, 3, mome_module._multiprocessors(DEVICE))[0] > 0
    b = torch.randn(400, 40, generator=generator)
    for dtype, gather in ((torch.float32, True), (torch.float16, True), (torch.float32, False)):
        rows = b.to(dtype)[order.long().cpu() if gather else torch.arange(400)]
        expected = torch.stack([r.double().sum(0) for r in rows.split(counts)])
        same_dtype = torch.stack([r.sum(0) for r in rows.split(counts)])
        with poisoned_allocations():
            sums = mome_module._launch_column_sum(b.to(DEVICE, dtype), order, offsets, gather=gather)
        assert_matches_reference("column sums", sums, expected, same_dtype)  # in B's dtype

    a = torch.randn(260, 8, generator=generator).to(DEVICE)
    b = torch.randn(260, 12, generator=generator).to(DEVICE)
    one = torch.tensor([0, 260], dtype=torch.int32, device=DEVICE)
    order = torch.randperm(260, generator=generator).to(DEVICE, torch.int32)
    assert mome_module._weight_grad_launch(260, 8, 12, 1, cfg, mome_module._multiprocessors(a.device))[0] > 1
    with poisoned_allocations():
        grad = mome_module._launch_weight_grad(a, b, order, one, gather_a=True, gather_b=False)
    expected = (a.double().cpu()[order.long().cpu()].T @ b.double().cpu())[None]
    assert_matches_reference("weight grad", grad, expected, grad, uses_tf32_dot=True)


# (d) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_gives_an_empty_output_in_the_graph(backend):
    """T = 0 (ids or segments with S = 0): an empty output that is part of the graph, and
    gradients that are zeros of the right shapes for x and every parameter."""
    generator = torch.Generator().manual_seed(37)
    for x_shape, index, segments in (((0, 16), torch.zeros(0, dtype=torch.long), None),
                                     ((2, 0, 16), None, (0, 0, 1))):
        inputs = make_inputs(1, 16, 24, 3, True, torch.float32, DEVICE, generator)
        inputs["x"] = torch.randn(x_shape, device=DEVICE).requires_grad_()
        with vlkernels.use_backend(backend), poisoned_allocations():
            out = call(mome_ffn, inputs, None if index is None else index.to(DEVICE), segments=segments)
            assert out.shape == x_shape and out.requires_grad
            grads = torch.autograd.grad(out.sum(), [inputs[k] for k in ARGS])
        for name, grad in zip(ARGS, grads):
            assert grad.shape == inputs[name].shape and torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one-expert", "all-to-one", "segments-all-text", "segments-all-image",
                                  "segments-same-expert", "one-token"])
def test_degenerate_routings(backend, case):
    """One expert, every token to one expert of three (the others get 0 tokens: zero gradients),
    segments that route everything to one expert, a single token."""
    generator = torch.Generator().manual_seed(38)
    experts = 1 if case == "one-expert" else 3
    tokens = 1 if case == "one-token" else 12
    inputs = make_inputs(tokens, 16, 24, experts, True, torch.float32, DEVICE, generator)
    segments = {"segments-all-text": (4, 2, 0), "segments-all-image": (0, 0, 1), "segments-same-expert": (1, 1, 1)}
    if case in segments:
        inputs["x"] = inputs["x"].detach().reshape(3, 4, 16).requires_grad_()
        check_backend(backend, inputs, None, generator, segments=segments[case])
        return
    index = torch.full((tokens,), experts - 1, dtype=torch.long) if case == "all-to-one" else \
        torch.randint(0, experts, (tokens,), generator=generator)
    _, grads = check_backend(backend, inputs, index.to(DEVICE), generator)
    if case == "all-to-one":  # experts 0 and 1 saw no token: exactly zero gradients there
        for name in ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias"):
            assert not grads[name][:2].any(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_x_raises_a_clear_error(backend):
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(1, 8, 12, 3, False, torch.float32, DEVICE, generator)
    inputs["x"] = torch.tensor(1.0, device=DEVICE)
    with vlkernels.use_backend(backend), pytest.raises(ValueError, match=r"mome_ffn: x must be \[..., D\]"):
        call(mome_ffn, inputs, torch.tensor(0, device=DEVICE))


# Integer-only segments (issue 12, item 7) -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [(2.5, 0, 1), (2.0, 0, 1), (True, 0, 1), (2, 0.0, 1), (2, 0, True),
                                      (torch.tensor(2.0), 0, 1), (torch.tensor(True), 0, 1), (2, 0, torch.tensor(1.0))],
                         ids=["float-2.5", "float-2.0", "bool", "float-id", "bool-id", "float-tensor", "bool-tensor",
                              "float-tensor-id"])
def test_segments_refuse_floats_and_bools(backend, segments, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(10, 8, 12, 3, False, torch.float32, DEVICE, generator)
    inputs["x"] = inputs["x"].detach().reshape(2, 5, 8)
    monkeypatch.setattr(mome_module, "_launch_fwd", lambda *a, **k: pytest.fail("launched"))
    with vlkernels.use_backend(backend), pytest.raises(TypeError, match=r"mome_ffn: segments \w+ must be an integer"):
        call(mome_ffn, inputs, None, segments=segments)


def test_segments_refuse_bad_containers_and_tensor_values():
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(10, 8, 12, 3, False, torch.float32, DEVICE, generator)
    inputs["x"] = inputs["x"].detach().reshape(2, 5, 8)
    for segments, error, match in (((2, 0), ValueError, r"segments must be \(text_len"),
                                   (2, ValueError, r"segments must be \(text_len"),
                                   ((torch.tensor([2]), 0, 1), TypeError, r"text_len must be an integer"),
                                   ((torch.tensor(6), 0, 1), ValueError, r"text_len 6 outside \[0, 5\]"),
                                   ((2, torch.tensor(3), 1), ValueError, r"expert id 3 outside \[0, 3\)")):
        with pytest.raises(error, match=match):
            call(mome_ffn, inputs, None, segments=segments)
    from vlkernels.nn.mome import MoMEFFN

    with pytest.raises(TypeError, match=r"text_len must be an integer"):
        MoMEFFN(8, 12, ("text", "image"))(inputs["x"], text_len=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_integer_kinds_route_alike(backend):
    """An int, a numpy integer and a 0-dim integer tensor route the same tokens, on every backend,
    as the explicit per-token ids do."""
    np = pytest.importorskip("numpy")
    generator = torch.Generator().manual_seed(39)
    inputs = make_inputs(12, 8, 12, 3, True, torch.float32, DEVICE, generator)
    x = inputs["x"].detach().reshape(3, 4, 8)
    inputs["x"] = x
    index = segments_expert_index(3, 4, (3, 2, 0)).reshape(3, 4).to(DEVICE)
    with torch.no_grad():
        expected = call(reference, detached(inputs, torch.float64, "cpu"), index.cpu())
        for segments in ((3, 2, 0), (np.int64(3), np.int32(2), 0), (torch.tensor(3), torch.tensor(2, dtype=torch.int32), 0)):
            with vlkernels.use_backend(backend):
                out = call(mome_ffn, inputs, None, segments=segments)
            assert_matches_reference(f"segments {segments}", out, expected, out)


@given(batch=st.integers(0, 4), seq_len=st.integers(0, 9), experts=st.integers(1, 4), data=st.data())
def test_segments_order_is_the_stable_sort_of_its_ids(batch, seq_len, experts, data):
    """The arithmetic (order, offsets) of segments routing equals the stable sort of its ids, for
    any text_len, any expert pair (equal ones too), as ints or as 0-dim tensors."""
    text_len = data.draw(st.integers(0, seq_len))
    first, rest = data.draw(st.integers(0, experts - 1)), data.draw(st.integers(0, experts - 1))
    as_tensor = data.draw(st.booleans())
    segments = tuple(torch.tensor(v) if as_tensor else v for v in (text_len, first, rest))
    order, offsets = segments_order(batch, seq_len, segments, experts, "cpu")
    expected_order, expected_offsets = expert_order(segments_expert_index(batch, seq_len, (text_len, first, rest)),
                                                    experts)
    assert torch.equal(order, expected_order) and torch.equal(offsets, expected_offsets)


# (e) -------------------------------------------------------------------------------------------
def nonfinite_pattern(tensor):
    tensor = tensor.detach().double().cpu()
    return torch.isnan(tensor), torch.isposinf(tensor), torch.isneginf(tensor)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nan-x", "inf-x", "inf-x-no-ln", "nan-w1", "inf-w2", "nan-ln-weight", "inf-b1"])
def test_nan_and_inf_propagate_as_the_reference(backend, case):
    """A NaN / Inf in x or a weight reaches exactly the outputs and gradients the float64
    reference gives NaN / +-Inf, on every backend: never replaced, never spread further."""
    generator = torch.Generator().manual_seed(40)
    t, d, f, e = 17, 16, 24, 3
    inputs = make_inputs(t, d, f, e, case != "inf-x-no-ln", torch.float32, DEVICE, generator)
    index = make_routing(t, e, "random", generator)
    index[:2] = torch.tensor([1, 0])
    name, position, value = {"nan-x": ("x", (0, 3), float("nan")), "inf-x": ("x", (1, 5), float("inf")),
                             "inf-x-no-ln": ("x", (1, 5), float("inf")), "nan-w1": ("w1", (1, 2, 7), float("nan")),
                             "inf-w2": ("w2", (0, 4, 2), float("-inf")),
                             "nan-ln-weight": ("ln_weight", (1, 3), float("nan")),
                             "inf-b1": ("b1", (0, 5), float("inf"))}[case]
    with torch.no_grad():
        inputs[name][position] = value
    out, grads, grad_out = backend_run(backend, inputs, lambda v: v, index.to(DEVICE), generator)
    out64, grads64 = reference_run(inputs, lambda v: v, index, grad_out)
    assert not torch.isfinite(out64).all(), "the case must feed a non-finite value through"
    for what, actual, expected in [("out", out, out64)] + [(f"grad {k}", grads[k], grads64[k]) for k in grads]:
        for kind, got, want in zip(("NaN", "+Inf", "-Inf"), nonfinite_pattern(actual), nonfinite_pattern(expected)):
            assert torch.equal(got, want), f"{what}: {kind} at {got.sum()} places, the reference has {want.sum()}"
        finite = torch.isfinite(expected)
        assert_matches_reference(f"{what} (finite part)", actual.detach().cpu()[finite], expected[finite],
                                 actual.detach().cpu()[finite])


# (f) -------------------------------------------------------------------------------------------
@st.composite
def mome_problems(draw):
    experts = draw(st.integers(1, 4))
    batch, seq_len = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    dim, hidden = draw(st.integers(1, 40)), draw(st.integers(1, 48))
    routing = draw(st.sampled_from(["ids", "segments"]))
    if routing == "segments":
        text_len = draw(st.integers(0, seq_len))
        ids = draw(st.lists(st.integers(0, experts - 1), min_size=2, max_size=2))
        routing = (text_len, *ids)
    else:
        routing = draw(st.lists(st.integers(0, experts - 1), min_size=batch * seq_len, max_size=batch * seq_len))
    # A LayerNorm over D <= 2 features is constant (xhat = 0 or +-1): its exact gradient to x is 0,
    # where a relative error measures rounding noise only.
    return dict(experts=experts, batch=batch, seq_len=seq_len, dim=dim, hidden=hidden, routing=routing,
                ln=dim > 2 and draw(st.booleans()), transposed_x=draw(st.booleans()), activation=draw(st.sampled_from(["gelu", "relu"])),
                seed=draw(st.integers(0, 2**16)))


def _check_problem(backend, problem):
    p = problem
    generator = torch.Generator().manual_seed(p["seed"])
    inputs = make_inputs(p["batch"] * p["seq_len"], p["dim"], p["hidden"], p["experts"], p["ln"], torch.float32,
                         DEVICE, generator)
    x = inputs["x"].detach().reshape(p["batch"], p["seq_len"], p["dim"])
    if p["transposed_x"]:  # a [B, S, D] view of a [D, S, B] tensor: no unit stride along D
        x = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    inputs["x"] = x.requires_grad_()
    if isinstance(p["routing"], tuple):
        check_backend(backend, inputs, None, generator, segments=p["routing"], activation=p["activation"])
    else:
        index = torch.tensor(p["routing"]).reshape(p["batch"], p["seq_len"]).to(DEVICE)
        check_backend(backend, inputs, index, generator, activation=p["activation"])


@given(problem=mome_problems())
def test_hypothesis_torch_matches_float64_reference(problem):
    _check_problem("torch", problem)


@settings(max_examples=4)  # each example runs up to 8 Triton launches in the interpreter (~3-5 s)
@given(problem=mome_problems())
def test_hypothesis_triton_matches_float64_reference(problem):
    _check_problem("triton", problem)


# Launch grids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 10**6, 2**31 - 1])
@pytest.mark.parametrize("experts", [1, 3, 64])
def test_launch_grids_stay_within_cuda_limits(tokens, experts):
    """Every launch shape, computed (not launched) at huge sizes: axis 0 under 2**31, axes 1 and
    2 under 65536, and the rows grid covers every row tile of any routing. A call whose rows
    grid would pass 2**31 programs (a many-terabyte x) is refused by the triton backend."""
    for dtype in (torch.float16, torch.float32):
        cfg = mome_module.GEMM_CONFIGS[dtype]
        for n_size, m_size, sms in ((768, 3072, 132), (3072, 768, 132), (100_000, 300, 1000)):
            grids = [mome_module._rows_grid(tokens, n_size, experts, cfg),
                     mome_module._weight_grad_launch(tokens, m_size, n_size, experts, cfg, sms)[2],
                     mome_module._column_sum_launch(tokens, n_size, experts, sms)[2],
                     mome_module._ln_bwd_launch(tokens, m_size, experts, sms)[4]]
            if grids[0][0] >= 2**31:
                x = torch.empty(1, 1, dtype=dtype).expand(tokens, m_size)  # sizes only, no memory
                w1 = torch.empty(1, 1, 1, dtype=dtype).expand(experts, m_size, n_size)
                assert "programs" in mome_module._triton_refusal(x, None, w1)
                grids = grids[1:]
            for grid in grids:
                assert 1 <= len(grid) <= 3 and 0 < grid[0] < 2**31, grid
                assert all(0 < g <= 65535 for g in grid[1:]), grid
            rows_grid = mome_module._rows_grid(tokens, n_size, experts, cfg)
            assert rows_grid[0] >= -(-n_size // cfg.block_n) * (-(-tokens // cfg.block_m))


def test_more_tokens_than_int32_are_refused():
    x = torch.empty(1, 8).expand(2**31, 8)  # no memory behind it: only the refusal is checked
    assert "int32" in mome_module._triton_refusal(x, None, torch.empty(3, 8, 12))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_value_checks_in_both_modes(backend):
    """A bad expert id, or a tensor segment out of range: the library's ValueError before any
    launch in the strict (host) mode, a RuntimeError with the same message in the default mode."""
    x, w1, b1, w2, b2 = torch.randn(2, 5, 8), torch.randn(2, 8, 6), torch.randn(2, 6), torch.randn(2, 6, 8), torch.randn(2, 8)
    bad_ids = dict(expert_index=torch.tensor([[0, 1, 2, 0, 1], [1, 1, 0, 0, 0]]))
    bad_segment = dict(expert_index=None, segments=(torch.tensor(9), 0, 1))
    for kwargs, message in ((bad_ids, r"expert ids must be in \[0, 2\)"), (bad_segment, r"segments text_len")):
        with vlkernels.use_backend(backend):
            with vlkernels.value_checks("host"), pytest.raises(ValueError, match=message):
                mome_ffn(x, kwargs["expert_index"], w1, b1, w2, b2, segments=kwargs.get("segments"))
            with vlkernels.value_checks("device"), pytest.raises(RuntimeError, match=message):
                mome_ffn(x, kwargs["expert_index"], w1, b1, w2, b2, segments=kwargs.get("segments"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_segments_take_symints_and_tensors(backend):
    """Under torch.compile(fullgraph, dynamic): text_len as a traced int (a SymInt) or a 0-dim
    tensor routes as in eager; an out-of-range tensor text_len fails in the graph, not silently."""
    generator = torch.Generator().manual_seed(41)
    inputs = make_inputs(10, 8, 12, 3, False, torch.float32, DEVICE, generator)
    x = inputs["x"].detach().reshape(2, 5, 8).requires_grad_()
    weights = [inputs[k] for k in ("w1", "b1", "w2", "b2")]

    def ffn(x, text_len):
        return mome_ffn(x, None, *weights, segments=(text_len, 0, 1))

    torch._dynamo.reset()
    compiled = torch.compile(ffn, fullgraph=True, dynamic=True, backend="aot_eager")
    with vlkernels.use_backend(backend):
        for text_len in (2, 3, torch.tensor(4)):
            out = compiled(x, text_len)
            expected = ffn(x, text_len)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0],
                                       rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"mome_ffn: segments text_len outside \[0, S = x.shape\[1\]\]"):
            compiled(x.detach(), torch.tensor(6))
    torch._dynamo.reset()
