"""vlkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention: one grid of arguments
(batch_first both ways, masks of every kind, kdim/vdim, bias, add_bias_kv / add_zero_attn,
need_weights with average_attn_weights both ways, is_causal with attn_mask, train/eval with
dropout 0, unbatched input) drives both modules with the same weights (ours loads torch's state
dict); outputs, weights and the gradients of every input and parameter must match torch's module
run in float64. Each case also states whether it runs the kernels or torch's fallback."""
import inspect

import pytest
import torch
from torch import nn

import vlkernels
import vlkernels._coverage
import vlkernels.nn.multihead_attention as mha_module
from vlkernels.nn import MultiheadAttention, VLMultiheadAttention
from vlkernels.testing import DEVICE, fp32_tolerance, rel_error

E, H, L, S, N = 24, 3, 6, 9, 2  # embed dim, heads, query length, key length (cross), batch

# Options: bf (batch_first), cross ("kv": key is value, "kdim": kdim 16 / vdim 20), bias,
# bias_kv, zero_attn, kpm (key_padding_mask kind), attn (attn_mask kind), causal (is_causal),
# nw (need_weights), avg (average_attn_weights), unbatched, train.
CASES = {
    "self-seq-first-defaults": dict(),
    "self-batch-first-bool-kpm": dict(bf=True, kpm="bool", nw=False),
    "self-seq-first-bool-kpm": dict(kpm="bool", nw=False),
    "self-causal-bool-mask": dict(bf=True, attn="causal-bool", causal=True, nw=False),
    "self-causal-float-mask-bool-kpm": dict(attn="causal-float", causal=True, kpm="bool", nw=False),
    "self-causal-weights-per-head": dict(attn="causal-bool", causal=True, kpm="bool", avg=False),
    "cross-key-is-value-bool-kpm": dict(bf=True, cross="kv", kpm="bool", nw=False),
    "cross-kdim-vdim-bool-kpm": dict(cross="kdim", kpm="bool", nw=False),
    "cross-kdim-vdim-weights": dict(cross="kdim", bf=True),
    "no-bias-bool-kpm": dict(bias=False, kpm="bool", nw=False, bf=True),
    "no-bias-weights-per-head": dict(bias=False, avg=False),
    "float-kpm-additive": dict(kpm="float", nw=False),
    "float-kpm-inf": dict(kpm="float-inf", nw=False, bf=True),
    "bool-attn-mask-2d": dict(attn="bool2d", nw=False),
    "float-attn-mask-2d": dict(attn="float2d", nw=False, bf=True),
    "bool-attn-mask-3d-bool-kpm-weights": dict(attn="bool3d", kpm="bool"),
    "float-attn-mask-3d": dict(attn="float3d", nw=False),
    "add-bias-kv": dict(bias_kv=True, kpm="bool", nw=False, bf=True),
    "add-zero-attn-weights": dict(zero_attn=True, attn="float2d"),
    "bias-kv-zero-attn-cross": dict(bias_kv=True, zero_attn=True, cross="kdim", kpm="bool", nw=False),
    "zero-attn-self": dict(zero_attn=True, nw=False),
    "bias-kv-causal": dict(bias_kv=True, attn="causal-bool", causal=True, nw=False),
    "causal-cross-lengths": dict(cross="kv", attn="causal-bool", causal=True, nw=False),
    "unbatched-bool-kpm": dict(unbatched=True, kpm="bool", nw=False),
    "unbatched-attn-mask-3d-weights": dict(unbatched=True, attn="float3d", avg=False),
    "unbatched-causal": dict(unbatched=True, attn="causal-float", causal=True, nw=False),
    "train-dropout0-bool-kpm": dict(train=True, kpm="bool", nw=False, bf=True),
    "train-dropout0-weights": dict(train=True, cross="kdim"),
}


def kernel_path(case) -> bool:
    """Whether the module documents this call as running the kernels."""
    return (case.get("nw", True) is False and case.get("kpm") in (None, "bool") and
            (case.get("attn") is None or case.get("causal", False)) and
            not (case.get("causal") and (case.get("cross") or case.get("bias_kv") or case.get("zero_attn"))))


# The Triton kernels (interpreter here) on the kernel-path cases that differ in what reaches them.
TRITON_CASES = ["self-seq-first-bool-kpm", "self-causal-float-mask-bool-kpm", "cross-kdim-vdim-bool-kpm",
                "unbatched-bool-kpm", "bias-kv-zero-attn-cross"]
PARAMS = [(name, "torch") for name in CASES] + [(name, "triton") for name in TRITON_CASES]


def make_masks(case, generator, batch, tgt, src, heads):
    """(key_padding_mask, attn_mask) in torch's conventions; no query row is left without a key."""
    kpm = attn = None
    ignore = torch.rand(batch, src, generator=generator) < 0.35
    ignore[:, 0] = False
    if case.get("kpm") == "bool":
        kpm = ignore
    elif case.get("kpm") == "float":
        kpm = torch.randn(batch, src, generator=generator, dtype=torch.float64)
    elif case.get("kpm") == "float-inf":
        kpm = torch.zeros(batch, src, dtype=torch.float64).masked_fill(ignore, float("-inf"))
    kind = case.get("attn")
    stacked = (heads if case.get("unbatched") else batch * heads, tgt, src)
    if kind in ("causal-bool", "causal-float"):
        above = torch.ones(tgt, src, dtype=torch.bool).triu(1)  # True = not allowed (top-left, as torch)
        attn = above if kind == "causal-bool" else torch.zeros(tgt, src, dtype=torch.float64).masked_fill(
            above, float("-inf"))
    elif kind in ("bool2d", "bool3d"):
        attn = torch.rand(*(stacked if kind == "bool3d" else stacked[1:]), generator=generator) < 0.3
        attn[..., 0] = False
    elif kind in ("float2d", "float3d"):
        attn = torch.randn(*(stacked if kind == "float3d" else stacked[1:]), generator=generator, dtype=torch.float64)
    if case.get("unbatched") and kpm is not None:
        kpm = kpm[0]
    return kpm, attn


def build(case, generator):
    """torch's module (float64, perturbed weights) and ours loaded from its state dict (fp32)."""
    kdim, vdim = (16, 20) if case.get("cross") == "kdim" else (None, None)
    args = dict(dropout=0.0, bias=case.get("bias", True), add_bias_kv=case.get("bias_kv", False),
                add_zero_attn=case.get("zero_attn", False), kdim=kdim, vdim=vdim, batch_first=case.get("bf", False))
    reference = nn.MultiheadAttention(E, H, **args, dtype=torch.float64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    ours = MultiheadAttention(E, H, **args, device=DEVICE)
    ours.load_state_dict(reference.state_dict())
    train = case.get("train", False)
    return reference.train(train), ours.train(train)


def make_inputs(case, generator):
    """Distinct input tensors and the (query, key, value) indices into them."""
    batch_first, unbatched = case.get("bf", False), case.get("unbatched", False)

    def stream(length, dim):
        shape = (length, dim) if unbatched else ((N, length, dim) if batch_first else (length, N, dim))
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query = stream(L, E)
    if case.get("cross") == "kv":
        return [query, stream(S, E)], (0, 1, 1)
    if case.get("cross") == "kdim":
        return [query, stream(S, 16), stream(S, 20)], (0, 1, 2)
    return [query], (0, 0, 0)


@pytest.mark.parametrize("name, backend", PARAMS)
def test_matches_torch_multihead_attention(name, backend, monkeypatch):
    case = CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    reference, ours = build(case, generator)
    inputs, (qi, ki, vi) = make_inputs(case, generator)
    src = S if case.get("cross") else L
    kpm, attn = make_masks(case, generator, N, L, src, H)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=case.get("causal", False))
    if "nw" in case:
        kwargs["need_weights"] = case["nw"]
    if "avg" in case:
        kwargs["average_attn_weights"] = case["avg"]
    fallbacks = []
    monkeypatch.setattr(mha_module, "_record_fallback", lambda op, reason: fallbacks.append(reason))

    def run(module, dtype, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in inputs]
        cast = {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                    v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        out, weights = module(leaves[qi], leaves[ki], leaves[vi], **cast)
        outs = [out] + ([] if weights is None else [weights])
        cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                      for i, o in enumerate(outs)]
        loss = sum((o * c.to(device, dtype)).sum() for o, c in zip(outs, cotangents))
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        return outs, grads

    with vlkernels.use_backend(backend):
        actual, actual_grads = run(ours, torch.float32, DEVICE)
    expected, expected_grads = run(reference, torch.float64, "cpu")
    assert bool(fallbacks) != kernel_path(case), f"fallback reasons {fallbacks}"
    assert len(actual) == len(expected), "need_weights: (output, weights) vs (output, None)"
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    names = ["output", "weights"][:len(expected)] + [f"grad input {i}" for i in range(len(inputs))] + [
        f"grad {n}" for n, _ in reference.named_parameters()]
    bound = fp32_tolerance(uses_tf32_dot=True)
    for label, a, e in zip(names, actual + list(actual_grads), expected + list(expected_grads)):
        assert a.shape == e.shape, f"{label}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), f"{label}: {a.dtype}, or non-finite values"
        error = rel_error(a, e)
        assert error <= bound, f"{label}: relative error {error:.3e} exceeds {bound:.1e}"


def test_signature_defaults_and_attributes_are_torchs():
    for ours, theirs in ((MultiheadAttention.__init__, nn.MultiheadAttention.__init__),
                         (MultiheadAttention.forward, nn.MultiheadAttention.forward)):
        ours_params = [(p.name, p.default, p.kind) for p in inspect.signature(ours).parameters.values()]
        theirs_params = [(p.name, p.default, p.kind) for p in inspect.signature(theirs).parameters.values()]
        assert ours_params == theirs_params
    positional = (E, H, 0.1, False, True, True, 16, 20, True)  # every argument by position, in torch's order
    ours, theirs = MultiheadAttention(*positional), nn.MultiheadAttention(*positional)
    for attribute in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "kdim", "vdim",
                      "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.in_proj_bias is None and ours.out_proj.bias is None and ours.bias_k.shape == theirs.bias_k.shape
    plain = MultiheadAttention(E, H)
    assert (plain.batch_first, plain.dropout, plain.bias_k, plain.bias_v, plain.add_zero_attn) == (
        False, 0.0, None, None, False)


@pytest.mark.parametrize("options", [dict(), dict(bias=False), dict(kdim=16, vdim=20), dict(add_bias_kv=True),
                                     dict(add_bias_kv=True, kdim=16, vdim=16, bias=False)], ids=str)
def test_state_dict_keys_order_and_round_trip_are_torchs(options):
    theirs = nn.MultiheadAttention(E, H, **options)
    ours = MultiheadAttention(E, H, **options)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, **options)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    copied = MultiheadAttention.from_torch(theirs.double().eval())
    assert not copied.training and (copied.bias_k is None) == (theirs.bias_k is None)
    for key, value in theirs.state_dict().items():
        assert torch.equal(copied.state_dict()[key], value), key


def test_from_torch_copies_arguments_and_mode():
    theirs = nn.MultiheadAttention(E, H, dropout=0.25, add_bias_kv=True, add_zero_attn=True, kdim=16, vdim=20,
                                   batch_first=True, dtype=torch.float64)
    copied = MultiheadAttention.from_torch(theirs)
    assert (copied.dropout, copied.batch_first, copied.add_zero_attn, copied.kdim, copied.vdim, copied.training,
            copied.q_proj_weight.dtype) == (0.25, True, True, 16, 20, True, torch.float64)
    assert copied.bias_k is not None and torch.equal(copied.bias_k, theirs.bias_k)


def test_attention_dropout_in_training():
    """need_weights=True runs torch's path: with the same seed, torch's dropped probabilities
    exactly. need_weights=False runs the kernels' dropout: outputs differ per call and their mean
    approaches the eval output (inverted dropout is unbiased); eval drops nothing."""
    generator = torch.Generator().manual_seed(4)
    theirs = nn.MultiheadAttention(E, H, dropout=0.4, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(N, L, E, generator=generator)
    torch.manual_seed(11)
    expected = theirs(x, x, x)
    torch.manual_seed(11)
    torch.testing.assert_close(ours(x, x, x), expected, rtol=0, atol=0)
    exact = ours.eval()(x, x, x, need_weights=False)[0]
    ours.train()
    torch.manual_seed(12)
    samples = torch.stack([ours(x, x, x, need_weights=False)[0] for _ in range(200)])
    assert not torch.equal(samples[0], samples[1]) and torch.isfinite(samples).all()
    assert rel_error(samples.mean(0), exact) < 0.1 < rel_error(samples[0], exact)
    with vlkernels.use_backend("triton"):
        dropped = ours(x, x, x, need_weights=False)[0]
    assert torch.isfinite(dropped).all() and rel_error(dropped, exact) > 0.1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_padded_sample_matches_torch_kernel_path(backend):
    """All keys of a sample ignored: zero attention output on the kernel path, as torch's own
    need_weights=False path gives (only out_proj's bias is left), never NaN."""
    generator = torch.Generator().manual_seed(5)
    theirs = nn.MultiheadAttention(E, H)
    with torch.no_grad():
        theirs.out_proj.bias.normal_(generator=generator)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(L, N, E, generator=generator)
    ignore = torch.zeros(N, L, dtype=torch.bool)
    ignore[1] = True
    expected, _ = theirs(x, x, x, key_padding_mask=ignore, need_weights=False)
    with vlkernels.use_backend(backend):
        actual, _ = ours(x.to(DEVICE), x.to(DEVICE), x.to(DEVICE), key_padding_mask=ignore.to(DEVICE),
                         need_weights=False)
    torch.testing.assert_close(actual[:, 1].cpu(), theirs.out_proj.bias.expand(L, E), rtol=0, atol=0)
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-6)


def test_fallback_says_so_once_per_reason(monkeypatch):
    monkeypatch.setattr(vlkernels._coverage, "_WARNED", set())
    module = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.warns(UserWarning, match="need_weights=True") as record:
        module(x, x, x)
        module(x, x, x)
    assert len([w for w in record if "need_weights" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="float key_padding_mask"):
        module(x, x, x, key_padding_mask=torch.zeros(N, L), need_weights=False)


def test_bad_inputs_raise_the_modules_errors():
    module = MultiheadAttention(E, H, kdim=16, vdim=16)
    q, kv = torch.randn(L, N, E), torch.randn(S, N, 16)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0|multiple of num_heads"):
        MultiheadAttention(E, 5)
    with pytest.raises(ValueError, match="MultiheadAttention: key's last dim must be 16"):
        module(q, q, q)
    with pytest.raises(ValueError, match="all be 3-D .batched. or all 2-D"):
        module(q, kv[0], kv[0])
    with pytest.raises(ValueError, match="share the batch size"):
        module(q, torch.randn(S, N + 1, 16), torch.randn(S, N + 1, 16))
    with pytest.raises(ValueError, match="key and value must have one length"):
        module(q, kv, torch.randn(S + 1, N, 16))
    with pytest.raises(ValueError, match=r"key_padding_mask must be .* shape \[2, 9\]"):
        module(q, kv, kv, key_padding_mask=torch.zeros(S, N, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating tensor"):
        module(q, kv, kv, key_padding_mask=torch.zeros(N, S, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"attn_mask must be .* \[6, 9\] or \[6, 6, 9\]"):
        module(q, kv, kv, attn_mask=torch.zeros(S, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal=True is a hint"):
        module(q, kv, kv, is_causal=True)


def test_vl_form_keeps_its_own_name_and_conventions():
    """VLMultiheadAttention: batch first, True = a real token, a tensor returned."""
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    vl = VLMultiheadAttention.from_torch(theirs)
    assert type(vl) is VLMultiheadAttention and vl.batch_first
    x = torch.randn(N, L, E)
    real = torch.ones(N, L, dtype=torch.bool)
    real[0, 3:] = False
    expected, _ = theirs(x, x, x, key_padding_mask=~real, need_weights=False)
    torch.testing.assert_close(vl(x, key_padding_mask=real), expected, rtol=1e-5, atol=1e-6)


def test_swaps_into_torch_transformer_encoder_layer(monkeypatch):
    """A drop-in inside torch's own layers: TransformerEncoderLayer calls self_attn with torch's
    keywords (need_weights=False, is_causal with the causal attn_mask; its key_padding_mask
    arrives as an additive float mask, which runs torch's path)."""
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).train()
    swapped = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).train()
    swapped.load_state_dict(layer.state_dict())
    swapped.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    x = torch.randn(N, L, E)
    ignore = torch.zeros(N, L, dtype=torch.bool)
    ignore[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    fallbacks = []
    monkeypatch.setattr(mha_module, "_record_fallback", lambda op, reason: fallbacks.append(reason))
    for kwargs in (dict(src_mask=causal, is_causal=True), dict(src_key_padding_mask=ignore)):
        torch.testing.assert_close(swapped(x, **kwargs), layer(x, **kwargs), rtol=1e-5, atol=1e-5)
        if "src_mask" in kwargs:
            assert fallbacks == [], "the causal call runs the kernels"
    assert fallbacks == ["a float key_padding_mask"]
