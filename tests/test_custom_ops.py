"""torch.library hygiene of every op vlkernels registers (namespace ``vlkernels``): each one,
Python custom op or native op of the C++ extension, passes ``torch.library.opcheck`` (schema,
autograd registration, fake tensor, AOT dispatch with gradients) on sample inputs; and the set
of registered ops equals the set with samples here, so a new op without a sample fails.

Triton ops run on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the native ops need the extension (skipped, and left out of the expected set, without it).
"""
import importlib
import pkgutil

import pytest
import torch

from vlkernels import _backend, _extension

# import_module: vlkernels.ops re-exports functions under the modules' names (mome_ffn, attention)
mome_ops = importlib.import_module("vlkernels.ops.mome_ffn")
ot_ops = importlib.import_module("vlkernels.ops.optimal_transport")

CPU = torch.device("cpu")


def _rand(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _mask(*shape, p=0.7):
    mask = torch.rand(*shape) < p
    mask[..., 0] = True  # every row keeps a real token, so no sample is degenerate everywhere
    return mask


# ----------------------------------------------------------------------------------------------
# Samples: op name -> function returning a list of argument tuples (fresh random tensors; small
# odd sizes so the interpreter stays fast). Tensors that would carry gradients require grad.
# ----------------------------------------------------------------------------------------------
def _patch_embed():
    images, weight = _rand(2, 3, 8, 12, grad=True), _rand(16, 3, 4, 4, grad=True)
    shared = (images, weight, _rand(16, grad=True), _rand(1, 7, 16, grad=True), _rand(1, 1, 16, grad=True))
    per_image = (_rand(2, 3, 8, 8, grad=True), _rand(5, 3, 4, 4, grad=True), None, _rand(2, 4, 5, grad=True), None)
    return [shared, per_image]


def _patch_embed_bwd(has_cls):
    images, weight = _rand(2, 3, 8, 12), _rand(16, 3, 4, 4)
    return [(_rand(2, 6 + has_cls, 16), images, weight, has_cls)]


def _attention_fwd_args(grad=False):
    q, k, v = (_rand(2, 2, 9, 16, grad=grad) for _ in range(3))
    prefix = torch.tensor([3, 0], dtype=torch.int32)
    dense = (q, k, v, _mask(2, 9), prefix, None, None, 9, 9, True, 0.25)
    cross = (_rand(2, 2, 5, 16, grad=grad), k, v, _mask(2, 9), None, None, None, 5, 9, False, 0.25)
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    packed = (_rand(11, 2, 16, grad=grad), _rand(11, 2, 16, grad=grad), _rand(11, 2, 16, grad=grad), None,
              torch.zeros(3, dtype=torch.int32), cu, cu, 7, 7, True, 0.25)
    return [dense, cross, packed]


def _attention_bwd():
    samples = []
    for args in _attention_fwd_args():
        q, k, v = args[:3]
        out, lse = torch.ops.vlkernels.attention_fwd(*args)
        samples.append((torch.randn_like(out), q, k, v, out, lse, *args[3:]))
    # q, k, v as the views a fused qkv projection makes (strided, with gaps between heads).
    qkv = _rand(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    args = (qkv[0], qkv[1], qkv[2], None, None, None, None, 9, 9, False, 0.25)
    out, lse = torch.ops.vlkernels.attention_fwd(*args)
    samples.append((torch.randn_like(out), *args[:3], out, lse, *args[3:]))
    return samples


def _co_attention_fwd_args(grad=False):
    text = [_rand(2, 2, 5, 16, grad=grad) for _ in range(3)]
    image = [_rand(2, 2, 9, 16, grad=grad) for _ in range(3)]
    return [(*text, *image, _mask(2, 5), _mask(2, 9), 0.25), (*text, *image, None, None, 0.3)]


def _co_attention_bwd():
    samples = []
    for args in _co_attention_fwd_args():
        out_t, lse_t, out_i, lse_i = torch.ops.vlkernels.co_attention_fwd(*args)
        samples.append((torch.randn_like(out_t), torch.randn_like(out_i), *args[:6], out_t, lse_t, out_i, lse_i,
                        *args[6:]))
    return samples


def _mome_fwd_args(grad=False):
    experts, dim, hidden, tokens = 3, 8, 16, 7
    order, offsets = mome_ops.expert_order(torch.tensor([2, 0, 2, 2, 1, 0, 2]), experts)
    x = _rand(tokens, dim, grad=grad)
    # w1 and w2 as MoMEFFN passes them: stacked nn.Linear weights viewed with .transpose(1, 2).
    w1 = _rand(experts, hidden, dim).transpose(1, 2).requires_grad_(grad)
    w2 = _rand(experts, dim, hidden).transpose(1, 2).requires_grad_(grad)
    b1, b2 = _rand(experts, hidden, grad=grad), _rand(experts, dim, grad=grad)
    lnw, lnb = _rand(experts, dim, grad=grad), _rand(experts, dim, grad=grad)
    # the last argument: the row GEMMs through TMA descriptors where they allow them (mome_ffn.TMA_ROW_GEMMS)
    return [(x, order, offsets, w1, b1, w2, b2, lnw, lnb, 1e-6, "gelu", grad, False),
            (x, order, offsets, w1, b1, w2, b2, None, None, 1e-6, "relu", grad, True)]


def _mome_bwd():
    samples = []
    for args in _mome_fwd_args():
        x, order, offsets, w1, b1, w2, b2, lnw, lnb, eps, activation, _, tma = args
        out, h, pre, mean, rstd, normed = torch.ops.vlkernels.mome_ffn_fwd(*args[:-2], True, tma)
        for need_x, need_weights in ((True, True), (True, False), (False, True)):
            samples.append((torch.randn_like(out), x, order, offsets, w1, w2, h, pre, mean, rstd, normed, lnw,
                            activation, need_x, need_weights, tma))
    return samples


def _ot_problem():
    return torch.rand(2, 5, 7), _mask(2, 5), _mask(2, 7)


def _sinkhorn_args():
    cost, x_mask, y_mask = _ot_problem()
    a, b = (torch.rand(2, n) for n in (5, 7))
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return [(cost, a, b, 0.5, 7, -1.0, True), (cost, a, b, 0.5, 7, 1e-3, False)]


def _wra_args(grad):
    txt, img = _rand(2, 5, 12, grad=grad), _rand(2, 7, 12, grad=grad)
    return [(txt, img, _mask(2, 5), _mask(2, 7), 0.5, 6, 1), (txt, img, _mask(2, 5), _mask(2, 7), 0.5, 4, 2)]


def _wra_backward():
    samples = []
    for txt, img, txt_mask, img_mask, beta, iters, k in _wra_args(False):
        _, plan = torch.ops.vlkernels.ot_wra(txt, img, txt_mask, img_mask, beta, iters, k)
        samples.append((txt, img, txt_mask, img_mask, plan, torch.randn(2)))
    return samples


def _vd_statistics_args():
    x, index = _rand(9, 6), torch.randint(0, 4, (9,))
    return [(x, index, 4, None), (x, index, 4, _mask(9))]


def _vd_apply_args():
    counts, sums = torch.rand(4) * 3, _rand(4, 6)
    return [(_rand(4, 6), torch.rand(4), _rand(4, 6), counts, sums, 0.4, 1e-5)]


TRITON_SAMPLES = {
    "patch_embed": _patch_embed,
    "patch_embed_bwd_images": lambda: _patch_embed_bwd(True) + _patch_embed_bwd(False),
    "patch_embed_bwd_weight": lambda: _patch_embed_bwd(True) + _patch_embed_bwd(False),
    "batch_sum": lambda: [(_rand(3, 5, 7), 5), (_rand(3, 5, 7), 1)],
    "attention_fwd": lambda: _attention_fwd_args(grad=True),
    "attention_bwd": _attention_bwd,
    "co_attention_fwd": lambda: _co_attention_fwd_args(grad=True),
    "co_attention_bwd": _co_attention_bwd,
    "mome_ffn_fwd": lambda: _mome_fwd_args(grad=True) + _mome_fwd_args(grad=False),
    "mome_ffn_bwd": _mome_bwd,
    "ipot_triton": lambda: [(*_ot_problem(), 0.5, 6, 1), (*_ot_problem(), 0.5, 3, 2)],
    "sinkhorn_triton": _sinkhorn_args,
    "wra_distance_triton": lambda: _wra_args(True),
    "vd_nearest": lambda: [(_rand(9, 6), _rand(5, 6)), (_rand(3, 20), _rand(33, 20))],
    "vd_cluster_statistics": _vd_statistics_args,
    "vd_apply_statistics_": _vd_apply_args,
}
# Python custom ops over the C++ extension, and the extension's own native ops.
EXTENSION_SAMPLES = {
    "wra_distance_native": lambda: _wra_args(True),
    "vd_cluster_statistics_cpp": _vd_statistics_args,
    "vd_apply_statistics_cpp_": _vd_apply_args,
    "ot_ipot": lambda: [(*_ot_problem(), 0.5, 6, 1)],
    "ot_sinkhorn": _sinkhorn_args,
    "ot_wra": lambda: _wra_args(False),
    "ot_wra_backward": _wra_backward,
}
SAMPLES = {**TRITON_SAMPLES, **EXTENSION_SAMPLES}
# Defined by the extension itself (TORCH_LIBRARY_FRAGMENT in python_bindings/): registered only once it loads.
NATIVE_OPS = {"ot_ipot", "ot_sinkhorn", "ot_wra", "ot_wra_backward"}


def _import_all_op_modules():
    """Import every module of the layers that may define ops, so that all of them register."""
    for package_name in ("vlkernels.ops", "vlkernels.nn", "vlkernels.reference"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            importlib.import_module(info.name)
    ot_ops._native_ops()  # the native ops' fakes are registered once the extension loads


def registered_ops() -> set[str]:
    _import_all_op_modules()
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("vlkernels::")}


def test_every_registered_op_has_a_sample():
    registered = registered_ops()
    expected = set(SAMPLES) if _extension.unavailable_reason() is None else set(SAMPLES) - NATIVE_OPS
    assert registered == expected, (f"ops without an opcheck sample: {sorted(registered - expected)}; "
                                    f"samples of unregistered ops: {sorted(expected - registered)}")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    if name in EXTENSION_SAMPLES and _extension.unavailable_reason() is not None:
        pytest.skip(f"the C++ extension is unavailable: {_extension.unavailable_reason()}")
    if name in TRITON_SAMPLES and _backend.triton_refusal(CPU) is not None:
        pytest.skip(f"Triton cannot run here: {_backend.triton_refusal(CPU)}")
    registered_ops()
    torch.manual_seed(0)
    op = getattr(torch.ops.vlkernels, name).default
    for args in SAMPLES[name]():
        torch.library.opcheck(op, args)
