"""torch.compile(fullgraph=True) over every public op and every module of vlkernels.nn: no graph
break (fullgraph raises on one), forward and backward equal to eager, on each backend that
runs here: torch (the references), cpp (the C++ extension, for the ops that have it) and
triton (the Triton custom ops, in Triton's interpreter on CPU tensors).

The compiler backend is "aot_eager" (dynamo + AOT autograd, with the fakes and the registered
autograd of the custom ops) so that a test takes seconds on two cores; one test runs the
default inductor backend over a small module. ``check_compiles`` takes any module (or function)
and inputs: the full models of vlkernels.models can be checked with it once they exist.

Not covered: unpad_input (its packed length is the number of real tokens, data by nature) and
the ViLT helpers' sampling="vilt" (ViLT's data-dependent patch count and HF's exact draws, for
eager parity); no model path uses either. The ViLT helpers' default static sampling compiles
in one graph (tests/test_vilt_patches.py, dynamic shapes), and so does the ViLT model below.
"""
import copy

import pytest
import torch
from torch import nn

import vlkernels
from vlkernels import _extension, nn as vnn, ops
from vlkernels.testing import random_key_mask as _mask

# The backends that run on CPU tensors here; cpp only for the ops with C++ kernels.
BACKENDS = ["torch", "triton"]
CPP_BACKENDS = BACKENDS + ["cpp"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # fresh compiles per test: no cache hits from another test's graphs
    yield
    torch._dynamo.reset()


def _skip_unavailable(backend: str) -> None:
    if backend == "cpp" and _extension.unavailable_reason() is not None:
        pytest.skip(f"the C++ extension is unavailable: {_extension.unavailable_reason()}")


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _run(fn, inputs, params, cotangents=None):
    """(outputs, gradients of sum(out * cotangent) w.r.t. the inputs and params that require
    grad, cotangents): the cotangents are drawn once (fresh random) and reused for the compiled run."""
    outputs = _tensors(fn(*inputs))
    leaves = [t for t in _tensors(list(inputs)) if t.requires_grad] + [p for p in params if p.requires_grad]
    differentiable = [out for out in outputs if out.requires_grad]
    if cotangents is None:
        cotangents = [torch.randn_like(out) for out in differentiable]
    grads = []
    if differentiable:
        loss = sum((out * c).sum() for out, c in zip(differentiable, cotangents))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [out.detach() for out in outputs], grads, cotangents


def check_compiles(target, inputs, *, compiler="aot_eager"):
    """Compile ``target`` (a function or an nn.Module, e.g. a whole model) with fullgraph=True and
    check that its outputs, the gradients of every input and parameter that requires grad, and a
    module's buffers after the call (in-place updates) equal eager's. A module runs as two
    copies with the same initial state, one eager and one compiled."""
    compiled_target = copy.deepcopy(target) if isinstance(target, nn.Module) else target
    params = lambda module: list(module.parameters()) if isinstance(module, nn.Module) else []  # noqa: E731
    expected, expected_grads, cotangents = _run(target, inputs, params(target))
    compiled = torch.compile(compiled_target, fullgraph=True, backend=compiler)
    actual, actual_grads, _ = _run(compiled, inputs, params(compiled_target), cotangents)
    torch.testing.assert_close(actual, expected)
    assert [g is None for g in actual_grads] == [g is None for g in expected_grads]
    torch.testing.assert_close([g for g in actual_grads if g is not None],
                               [g for g in expected_grads if g is not None])
    if isinstance(target, nn.Module):
        torch.testing.assert_close(dict(compiled_target.named_buffers()), dict(target.named_buffers()))
    return actual


def _rand(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# Public ops: name -> (function, inputs builder, backends)
# ----------------------------------------------------------------------------------------------
def _mome_weights(experts=3, dim=8, hidden=16):
    return [_rand(experts, dim, hidden, grad=True), _rand(experts, hidden, grad=True),
            _rand(experts, hidden, dim, grad=True), _rand(experts, dim, grad=True),
            _rand(experts, dim, grad=True), _rand(experts, dim, grad=True)]


def _ot_inputs(grad):
    return [_rand(2, 5, 12, grad=grad), _rand(2, 7, 12, grad=grad), _mask(2, 5), _mask(2, 7)]


def _varlen_inputs():
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    return [_rand(11, 2, 16, grad=True), _rand(11, 2, 16, grad=True), _rand(11, 2, 16, grad=True), cu]


def _vd_update(codebook, cluster_size, embed_avg, x, index, mask):
    ops.vd_ema_update_(codebook, cluster_size, embed_avg, x, index, decay=0.4, mask=mask)
    return codebook, cluster_size, embed_avg


def _vd_inputs():
    return [_rand(5, 6), torch.rand(5), _rand(5, 6), _rand(9, 6), torch.randint(0, 5, (9,)), _mask(9)]


OP_CASES = {
    "patch_embed": (lambda im, w, b, pos, cls: ops.patch_embed(im, w, b, pos_embed=pos, cls_token=cls),
                    lambda: [_rand(2, 3, 8, 12, grad=True), _rand(16, 3, 4, 4, grad=True), _rand(16, grad=True),
                             _rand(1, 7, 16, grad=True), _rand(1, 1, 16, grad=True)], BACKENDS),
    "attention-mask-causal": (lambda q, k, v, m: ops.attention(q, k, v, key_mask=m, causal=True),
                              lambda: [_rand(2, 2, 9, 16, grad=True) for _ in range(3)] + [_mask(2, 9)], BACKENDS),
    "attention-prefix-tensor": (lambda q, k, v, p: ops.attention(q, k, v, prefix_len=p),
                                lambda: [_rand(2, 2, 9, 16, grad=True) for _ in range(3)] + [torch.tensor([3, 0])],
                                BACKENDS),
    "co_attention": (lambda *a: ops.co_attention(*a[:6], text_mask=a[6], image_mask=a[7]),
                     lambda: [_rand(2, 2, 5, 16, grad=True) for _ in range(3)]
                     + [_rand(2, 2, 9, 16, grad=True) for _ in range(3)] + [_mask(2, 5), _mask(2, 9)], BACKENDS),
    "attention_varlen-causal": (lambda q, k, v, cu: ops.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True),
                                _varlen_inputs, BACKENDS),
    # flash-attn's layout, GQA, bottom-right causal over longer keys (the dummy-query padding)
    "flash_attn_func-gqa-causal": (lambda q, k, v: vlkernels.flash_attn_func(q, k, v, causal=True),
                                   lambda: [_rand(2, 5, 4, 16, grad=True), _rand(2, 9, 2, 16, grad=True),
                                            _rand(2, 9, 2, 16, grad=True)], BACKENDS),
    "pad_input": (lambda packed, indices: ops.pad_input(packed, indices, 2, 5),
                  lambda: [_rand(6, 2, 4, grad=True), torch.tensor([0, 1, 2, 5, 6, 9])], ["torch"]),  # no backends
    "mome_ffn-index": (lambda x, idx, w1, b1, w2, b2, lnw, lnb: ops.mome_ffn(x, idx, w1, b1, w2, b2, ln_weight=lnw,
                                                                            ln_bias=lnb),
                       lambda: [_rand(2, 5, 8, grad=True), torch.randint(0, 3, (2, 5))] + _mome_weights(), BACKENDS),
    "mome_ffn-segments": (lambda x, w1, b1, w2, b2: ops.mome_ffn(x, None, w1, b1, w2, b2, segments=(2, 0, 1)),
                          lambda: [_rand(2, 5, 8, grad=True)] + _mome_weights()[:4], BACKENDS),
    "ipot": (lambda cost, xm, ym: ops.ipot(cost, xm, ym, iters=6),
             lambda: [torch.rand(2, 5, 7), _mask(2, 5), _mask(2, 7)], CPP_BACKENDS),
    "sinkhorn-tol": (lambda cost: ops.sinkhorn(cost, reg=0.5, iters=8, tol=1e-4),
                     lambda: [torch.rand(2, 5, 7)], CPP_BACKENDS),
    "wra_distance": (lambda txt, img, tm, im: ops.wra_distance(txt, img, tm, im, iters=6, return_plan=True),
                     lambda: _ot_inputs(True), CPP_BACKENDS),
    "gromov_wasserstein_distance": (lambda txt, img, tm, im: ops.gromov_wasserstein_distance(txt, img, tm, im, iters=2,
                                                                                             ot_iters=4),
                                    lambda: _ot_inputs(True), CPP_BACKENDS),
    "vd_nearest": (ops.vd_nearest, lambda: [_rand(9, 6), _rand(5, 6)], BACKENDS),
}
OP_PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}")
             for name, (_, _, backends) in OP_CASES.items() for backend in backends]


@pytest.mark.parametrize("name, backend", OP_PARAMS)
def test_op_compiles_without_graph_breaks(name, backend):
    _skip_unavailable(backend)
    fn, make_inputs, _ = OP_CASES[name]
    torch.manual_seed(0)
    with vlkernels.use_backend(backend):
        check_compiles(fn, make_inputs())


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_in_place_vd_update_compiles(backend):
    _skip_unavailable(backend)
    torch.manual_seed(0)
    inputs = _vd_inputs()
    eager_state = [t.clone() for t in inputs[:3]]
    with vlkernels.use_backend(backend):
        _vd_update(*eager_state, *inputs[3:])
        torch.compile(_vd_update, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(inputs[:3], eager_state)


# ----------------------------------------------------------------------------------------------
# nn modules: name -> (module factory, inputs builder, backends)
# ----------------------------------------------------------------------------------------------
class _Call(nn.Module):
    """Calls ``module(*args[:positional], **dict(zip(keywords, args[positional:])), **fixed)``:
    masks and other keyword tensors become positional, so that check_compiles can pass them."""

    def __init__(self, module: nn.Module, positional: int, keywords=(), **fixed) -> None:
        super().__init__()
        self.module, self.positional, self.keywords, self.fixed = module, positional, keywords, fixed

    def forward(self, *args):
        keywords = dict(zip(self.keywords, args[self.positional:]))
        return self.module(*args[:self.positional], **keywords, **self.fixed)


def _two_streams(text_dim=16, image_dim=16):
    """text [2, 5, text_dim], image [2, 9, image_dim], text mask, image mask."""
    return [_rand(2, 5, text_dim, grad=True), _rand(2, 9, image_dim, grad=True), _mask(2, 5), _mask(2, 9)]


def _visual_dictionary(training: bool):
    torch.manual_seed(1)  # the same dictionary for the eager and the compiled copy
    return vnn.VisualDictionary(num_embeddings=7, dim=6).train(training)


def _targets():
    return torch.tensor([1, 0, 1])


MODULE_CASES = {
    "PatchEmbed": (lambda: vnn.PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=16),
                   lambda: [_rand(2, 3, 8, 12, grad=True)], BACKENDS),
    "PatchEmbed-dynamic-pad-nhwc": (lambda: vnn.PatchEmbed(None, 4, 3, 16, output_fmt="NHWC", dynamic_img_pad=True),
                                    lambda: [_rand(2, 3, 9, 14, grad=True)], BACKENDS),
    "VLMultiheadAttention-cross": (lambda: _Call(vnn.VLMultiheadAttention(16, 2), 2, ["key_padding_mask"]),
                                   lambda: [_rand(2, 5, 16, grad=True), _rand(2, 9, 16, grad=True), _mask(2, 9)],
                                   BACKENDS),
    "VLMultiheadAttention-prefix": (lambda: _Call(vnn.VLMultiheadAttention(16, 2), 1, ["prefix_len"]),
                                    lambda: [_rand(2, 9, 16, grad=True), torch.tensor([4, 1])], BACKENDS),
    # torch's signature and masks (True = ignore), sequence-first, on the kernel path (need_weights=False)
    "MultiheadAttention-torch-kpm": (lambda: _Call(vnn.MultiheadAttention(16, 2), 3, ["key_padding_mask"],
                                                   need_weights=False),
                                     lambda: [_rand(5, 2, 16, grad=True), _rand(9, 2, 16, grad=True),
                                              _rand(9, 2, 16, grad=True), ~_mask(2, 9)], BACKENDS),
    "PostLNAttention": (lambda: _Call(vnn.PostLNAttention(16, 2), 1, ["key_padding_mask"]),
                        lambda: [_rand(2, 9, 16, grad=True), _mask(2, 9)], BACKENDS),
    "PostLNFeedForward": (lambda: vnn.PostLNFeedForward(16, 32), lambda: [_rand(2, 9, 16, grad=True)], ["torch"]),
    "LXMERTCrossLayer": (lambda: _Call(vnn.LXMERTCrossLayer(16, 2, 32, dropout=0.0), 2,
                                       ["lang_mask", "visn_mask"]), _two_streams, BACKENDS),
    "METERCrossLayer": (lambda: _Call(vnn.METERCrossLayer(16, 2, 32, dropout=0.0), 2, ["text_mask", "image_mask"]),
                        _two_streams, BACKENDS),
    "ViLBERTCoLayer": (lambda: _Call(vnn.ViLBERTCoLayer(16, 12, 16, 2, 32, 24, dropout=0.0), 2,
                                     ["text_mask", "image_mask"]), lambda: _two_streams(16, 12), BACKENDS),
    "MoMEFFN-index": (lambda: vnn.MoMEFFN(8, 16), lambda: [_rand(2, 5, 8, grad=True), torch.randint(0, 3, (2, 5))],
                      BACKENDS),
    "MoMEFFN-text-image": (lambda: _Call(vnn.MoMEFFN(8, 16, ("text", "image")), 1, text_len=2),
                           lambda: [_rand(2, 5, 8, grad=True)], BACKENDS),
    "MoMEBlock": (lambda: _Call(vnn.MoMEBlock(16, 2, max_text_len=3), 1, ["mask"]),
                  lambda: [_rand(2, 7, 16, grad=True), _mask(2, 7)], BACKENDS),
    "VisualDictionary-eval": (lambda: _visual_dictionary(False), lambda: [_rand(2, 3, 6, grad=True), _mask(2, 3)],
                              BACKENDS),
    "WRALoss": (lambda: vnn.WRALoss(iters=6), lambda: [*_ot_inputs(True)[:2], *_ot_inputs(False)[2:], _targets()[:2]],
                CPP_BACKENDS),
    "WPALoss": (lambda: vnn.WPALoss(iters=6),
                lambda: [_rand(3, 6, 12, grad=True), _rand(3, 8, 12, grad=True), _mask(3, 6), _mask(3, 8), _targets()],
                CPP_BACKENDS),
}
MODULE_PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}")
                 for name, (_, _, backends) in MODULE_CASES.items() for backend in backends]


@pytest.mark.parametrize("name, backend", MODULE_PARAMS)
def test_module_compiles_without_graph_breaks(name, backend):
    _skip_unavailable(backend)
    make_module, make_inputs, _ = MODULE_CASES[name]
    torch.manual_seed(0)
    module = make_module()
    with vlkernels.use_backend(backend):
        check_compiles(module, make_inputs())


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_visual_dictionary_training_compiles(backend):
    """Training mode updates the dictionary in place (the EMA step) before quantising. auto on
    CPU: the nearest search on the torch reference (it has no C++ kernel), the update in C++."""
    _skip_unavailable(backend)
    torch.manual_seed(0)
    with vlkernels.use_backend(backend):
        check_compiles(_visual_dictionary(True), [_rand(2, 3, 6, grad=True), _mask(2, 3)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiles_a_module(backend):
    """The default inductor backend (generated C++ on CPU) over VLMultiheadAttention: the
    attention reference traced into inductor's kernels (torch), or the Triton custom ops called
    from inductor's code (triton), forward and backward."""
    torch.manual_seed(0)
    module = _Call(vnn.VLMultiheadAttention(16, 2), 2, ["key_padding_mask"])
    with vlkernels.use_backend(backend):
        check_compiles(module, [_rand(2, 5, 16, grad=True), _rand(2, 9, 16, grad=True), _mask(2, 9)],
                       compiler="inductor")


def test_compiled_checks_still_reject_bad_values():
    """Under torch.compile the value checks run in the graph: a bad expert id fails, not a wrong answer."""
    x, weights = _rand(2, 5, 8), _mome_weights()
    compiled = torch.compile(lambda x, idx: ops.mome_ffn(x, idx, *weights[:4]), fullgraph=True, backend="aot_eager")
    with vlkernels.use_backend("torch"):
        compiled(x, torch.randint(0, 3, (2, 5)))
        with pytest.raises(RuntimeError, match="expert ids must be in"):
            compiled(x, torch.tensor([[0, 1, 2, 3, 0], [0, 0, 0, 0, 0]]))


# ----------------------------------------------------------------------------------------------
# Whole reference models: one pretraining step (every objective) compiled in one graph
# ----------------------------------------------------------------------------------------------
class _PretrainingLoss(nn.Module):
    """model(**batch).loss with the batch's tensors as positional inputs (what torch.compile traces)."""

    def __init__(self, model: nn.Module, keys) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, *values):
        return self.model(**dict(zip(self.keys, values))).loss


# Every model, ViLT with its default static patch sampling (patch_sampling="vilt", HF's exact
# draws, is eager only).
MODEL_PARAMS = [(name, "torch") for name in ("lxmert", "meter", "oscar", "simvlm", "soho", "uniter", "vilbert",
                                             "vilt", "visualbert", "vlmo")] + [("lxmert", "triton")]


@pytest.mark.parametrize("name, backend", MODEL_PARAMS)
def test_tiny_model_training_step_compiles_without_graph_breaks(name, backend):
    from vlkernels.models import build_model

    torch.manual_seed(0)
    model = build_model(name, "tiny").train()
    batch = model.synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    eager, compiled = _PretrainingLoss(model, batch), _PretrainingLoss(copy.deepcopy(model), batch)
    results = []
    with vlkernels.use_backend(backend):
        for module, fn in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager"))):
            torch.manual_seed(1)  # the same draws inside the model (negatives, MVM masks, prefixes)
            loss = fn(*batch.values())
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected)
    assert actual_grads.keys() == expected_grads.keys()
    torch.testing.assert_close(actual_grads, expected_grads)
