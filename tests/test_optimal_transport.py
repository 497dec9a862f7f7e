"""Optimal transport on every backend: UNITER's IPOT and WRA distance against the float64
restatement of UNITER's loop, Sinkhorn against POT run to convergence, gradients against
autograd through the reference (plan detached), empty problems, bad inputs, the losses."""
import os

import ot
import pytest
import torch

import vlkernels
from vlkernels import _extension
from vlkernels._backend import Implementation, NoBackendError
from vlkernels.nn.optimal_transport import WPALoss, WRALoss
from vlkernels.ops import optimal_transport as ops
from vlkernels.reference import optimal_transport as reference
from vlkernels.testing import DEVICE, dtype_id, fp32_tolerance, kernel_dtypes, poisoned_allocations, rel_error

# cpp runs the C++ kernels on CPU tensors, cuda the CUDA kernels on CUDA tensors (GPU build only);
# torch and triton run on the device under test (triton in the interpreter on a CPU machine).
BACKENDS = ["torch", "triton", "cpp"]
if torch.cuda.is_available() and _extension.has_cuda_kernels():
    BACKENDS.append("cuda")
NO_EXTENSION = os.environ.get("VLKERNELS_NO_EXTENSION", "0") == "1"
# fp32 against float64: the kernels' dots are IEEE fp32 unless torch allows tf32 matmuls.
TOL = fp32_tolerance(uses_tf32_dot=torch.backends.cuda.matmul.allow_tf32)


def device_of(backend: str) -> torch.device:
    if backend == "cpp":
        if NO_EXTENSION:
            pytest.skip("VLKERNELS_NO_EXTENSION=1: the C++ kernels are deliberately not built")
        return torch.device("cpu")
    return torch.device("cuda") if backend == "cuda" else DEVICE


def random_masks(generator, batch, rows, cols, *, empty=False):
    """Ragged, non-prefix masks (fully padded rows and columns); with ``empty`` (batch >= 4),
    problem 1 has no text, 2 no regions, 3 neither."""
    x_mask = torch.rand(batch, rows, generator=generator) < 0.75
    y_mask = torch.rand(batch, cols, generator=generator) < 0.75
    x_mask[0], y_mask[0] = True, True  # one problem without padding
    if batch > 1:  # one problem with a single valid row and column (when it has any)
        x_mask[-1] = torch.arange(rows) == rows // 2
        y_mask[-1] = torch.arange(cols) == cols // 3
    if empty:
        x_mask[1] = False
        y_mask[2] = False
        x_mask[3], y_mask[3] = False, False
    return x_mask, y_mask


def random_cost(generator, batch, rows, cols, *, ties=False):
    cost = torch.rand(batch, rows, cols, generator=generator) * 2  # 1 - cos lies in [0, 2]
    return (cost * 4).round() / 4 if ties else cost  # ties: a handful of distinct values


# ----------------------------------------------------------------------------------------------
# IPOT
# ----------------------------------------------------------------------------------------------
IPOT_SIZES = [(1, 1, 1), (4, 7, 13), (2, 33, 97), (4, 60, 100), (2, 40, 200), (1, 64, 1)]


@pytest.mark.parametrize("size", IPOT_SIZES, ids=lambda s: "B{}-M{}-N{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ipot_follows_uniters_loop(backend, size):
    batch, rows, cols = size
    device = device_of(backend)
    generator = torch.Generator().manual_seed(rows * 1000 + cols)
    cost = random_cost(generator, batch, rows, cols, ties=rows == 7)
    x_mask, y_mask = random_masks(generator, batch, rows, cols, empty=batch >= 4)
    with vlkernels.use_backend(backend), poisoned_allocations():
        plan = ops.ipot(cost.to(device), x_mask.to(device), y_mask.to(device))
    expected = reference.ipot(cost.double(), x_mask, y_mask)
    assert plan.dtype == torch.float32 and plan.shape == cost.shape
    assert torch.isfinite(plan).all()
    assert rel_error(plan, expected) <= TOL, rel_error(plan, expected)
    padding = ~(x_mask[:, :, None] & y_mask[:, None, :])
    assert (plan.cpu()[padding] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipot_inner_rounds_half_precision_and_strided_cost(backend):
    device = device_of(backend)
    generator = torch.Generator().manual_seed(3)
    cost = random_cost(generator, 3, 21, 35)
    x_mask, y_mask = random_masks(generator, 3, 21, 35)
    for dtype in [d for d in kernel_dtypes() if d != torch.float32]:
        rounded = cost.to(dtype)
        with vlkernels.use_backend(backend):
            plan = ops.ipot(rounded.to(device), x_mask.to(device), y_mask.to(device), beta=0.3, iters=20, k=3)
        # 16-bit costs are cast in: fp32 compute on exactly the rounded values
        expected = reference.ipot(rounded.double(), x_mask, y_mask, beta=0.3, iters=20, k=3)
        assert rel_error(plan, expected) <= TOL, dtype
    # a transposed (non-contiguous) cost, as gromov_wasserstein_distance passes
    strided = cost.transpose(1, 2).contiguous().transpose(1, 2)
    with vlkernels.use_backend(backend):
        plan = ops.ipot(strided.to(device), x_mask.to(device), y_mask.to(device))
    assert rel_error(plan, reference.ipot(cost.double(), x_mask, y_mask)) <= TOL


# ----------------------------------------------------------------------------------------------
# Sinkhorn
# ----------------------------------------------------------------------------------------------
SINKHORN_CASES = {  # (B, M, N, reg, ties)
    "B1-M64-N200": (1, 64, 200, 0.05, False),
    "B1-M1-N1": (1, 1, 1, 0.1, False),
    "B3-M17-N45-padded": (3, 17, 45, 0.05, False),
    "B2-M5-N1": (2, 5, 1, 0.1, False),
    "B2-M12-N30-ties": (2, 12, 30, 0.1, True),
}


@pytest.mark.parametrize("log_domain", [True, False], ids=["log", "scaling"])
@pytest.mark.parametrize("case", SINKHORN_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_agrees_with_pot_per_problem(backend, case, log_domain):
    batch, rows, cols, reg, ties = SINKHORN_CASES[case]
    device = device_of(backend)
    generator = torch.Generator().manual_seed(rows * 7 + cols)
    cost = random_cost(generator, batch, rows, cols, ties=ties) / 2
    x_mask, y_mask = random_masks(generator, batch, rows, cols)
    with vlkernels.use_backend(backend), poisoned_allocations():
        plan = ops.sinkhorn(cost.to(device), reg=reg, iters=3000, tol=1e-7, x_mask=x_mask.to(device),
                            y_mask=y_mask.to(device), log_domain=log_domain).cpu()
    assert torch.isfinite(plan).all()
    for i in range(batch):
        valid_cost = cost[i][x_mask[i]][:, y_mask[i]].double()
        a = torch.full((valid_cost.shape[0],), 1 / valid_cost.shape[0], dtype=torch.float64)
        b = torch.full((valid_cost.shape[1],), 1 / valid_cost.shape[1], dtype=torch.float64)
        method = "sinkhorn_log" if log_domain else "sinkhorn"
        expected = ot.sinkhorn(a, b, valid_cost, reg, method=method, stopThr=1e-14, numItermax=100000)
        assert rel_error(plan[i][x_mask[i]][:, y_mask[i]], expected) <= TOL, (i, method)
        assert (plan[i][~x_mask[i]] == 0).all() and (plan[i][:, ~y_mask[i]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_iterates_like_the_reference_with_given_marginals(backend):
    """Fixed iteration counts (no tol) and non-uniform marginals with zero-mass entries:
    iteration for iteration the float64 reference, in both domains."""
    device = device_of(backend)
    generator = torch.Generator().manual_seed(11)
    cost = random_cost(generator, 3, 19, 41)
    a = torch.rand(3, 19, generator=generator) * (torch.rand(3, 19, generator=generator) < 0.9)
    b = torch.rand(3, 41, generator=generator)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    x_mask, y_mask = random_masks(generator, 3, 19, 41)
    b = b * y_mask / (b * y_mask).sum(1, keepdim=True) * (a * x_mask).sum(1, keepdim=True)  # equal masses
    for log_domain in (True, False):
        kwargs = dict(reg=0.2, iters=25, x_mask=x_mask, y_mask=y_mask, log_domain=log_domain)
        with vlkernels.use_backend(backend), poisoned_allocations():
            plan = ops.sinkhorn(cost.to(device), a.to(device), b.to(device),
                                **{**kwargs, "x_mask": x_mask.to(device), "y_mask": y_mask.to(device)})
        expected = reference.sinkhorn(cost.double(), a.double(), b.double(), **kwargs)
        assert rel_error(plan, expected) <= TOL, log_domain


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_stops_each_problem_at_its_tolerance(backend):
    device = device_of(backend)
    generator = torch.Generator().manual_seed(12)
    cost = random_cost(generator, 3, 9, 23)
    cost[0] *= 3  # a slower problem beside faster ones
    with vlkernels.use_backend(backend):
        plan = ops.sinkhorn(cost.to(device), reg=0.1, iters=5000, tol=1e-4).cpu().double()
    expected = reference.sinkhorn(cost.double(), reg=0.1, iters=5000, tol=1e-4)
    assert rel_error(plan, expected) <= TOL  # every problem stopped at the reference's iteration
    column_error = (plan.sum(1) - 1 / 23).norm(dim=1)
    assert (column_error <= 1e-4 + 1e-7).all() and (column_error > 1e-5).all()  # stopped early, within tol
    torch.testing.assert_close(plan.sum(2), torch.full((3, 9), 1 / 9, dtype=torch.float64), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_domain_sinkhorn_survives_extreme_costs(backend):
    """-C/reg spans [-600, 200]: exp(-C/reg) over- and underflows fp32, the log domain does
    not (the C++ and CUDA kernels' shifted sums fall back to exact log-sum-exps there)."""
    device = device_of(backend)
    generator = torch.Generator().manual_seed(13)
    cost = torch.rand(2, 9, 23, generator=generator) * 40 - 10
    with vlkernels.use_backend(backend):
        plan = ops.sinkhorn(cost.to(device), reg=0.05, iters=50)
    assert torch.isfinite(plan).all()
    assert rel_error(plan, reference.sinkhorn(cost.double(), reg=0.05, iters=50)) <= TOL


# ----------------------------------------------------------------------------------------------
# WRA distance and Gromov-Wasserstein: forward and gradients
# ----------------------------------------------------------------------------------------------
WRA_SIZES = [(1, 1, 1, 16), (4, 7, 13, 40), (2, 33, 97, 96), (2, 60, 100, 64)]


def embeddings(generator, batch, rows, cols, dim, dtype):
    txt = torch.randn(batch, rows, dim, generator=generator)
    img = torch.randn(batch, cols, dim, generator=generator) + 0.3 * txt.mean(1, keepdim=True)  # correlated
    return txt.to(dtype), img.to(dtype)


def reference_grads(fn, txt, img, grad_out, *args, **kwargs):
    """(value, grad txt, grad img) of fn in float64 on the (already rounded) inputs."""
    txt64, img64 = txt.double().requires_grad_(), img.double().requires_grad_()
    value = fn(txt64, img64, *args, **kwargs)
    grads = torch.autograd.grad(value, (txt64, img64), grad_out.double())
    return value.detach(), *grads


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("size", WRA_SIZES, ids=lambda s: "B{}-M{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_wra_distance_and_gradients(backend, size, dtype):
    if dtype != torch.float32 and size[2] > 50:
        pytest.skip("16-bit inputs are covered on the smaller shapes")
    batch, rows, cols, dim = size
    device = device_of(backend)
    generator = torch.Generator().manual_seed(rows + dim)
    txt, img = embeddings(generator, batch, rows, cols, dim, dtype)
    x_mask, y_mask = random_masks(generator, batch, rows, cols, empty=batch >= 4)
    grad_out = torch.randn(batch, generator=generator)
    expected, grad_txt64, grad_img64 = reference_grads(reference.wra_distance, txt, img, grad_out, x_mask, y_mask)

    txt_d, img_d = txt.to(device).requires_grad_(), img.to(device).requires_grad_()
    with vlkernels.use_backend(backend), poisoned_allocations():
        distance, plan = ops.wra_distance(txt_d, img_d, x_mask.to(device), y_mask.to(device), return_plan=True)
        grad_txt, grad_img = torch.autograd.grad(distance, (txt_d, img_d), grad_out.to(device))
    assert distance.dtype == torch.float32 and distance.shape == (batch,)
    assert rel_error(distance, expected) <= TOL, rel_error(distance, expected)
    cost64 = reference.cost_matrix_cosine(txt.double(), img.double()).masked_fill(
        ~(x_mask[:, :, None] & y_mask[:, None, :]), 0)
    assert rel_error(plan, reference.ipot(cost64, x_mask, y_mask)) <= TOL
    assert grad_txt.dtype == dtype and grad_img.dtype == dtype
    if dtype == torch.float32:
        bounds = (TOL, TOL)
    else:  # gradients come back in 16 bits: at most twice the rounding of the same-dtype torch run
        txt_t, img_t = txt.to(device).requires_grad_(), img.to(device).requires_grad_()
        with vlkernels.use_backend("torch"):
            same = torch.autograd.grad(ops.wra_distance(txt_t, img_t, x_mask.to(device), y_mask.to(device)),
                                       (txt_t, img_t), grad_out.to(device))
        bounds = tuple(2 * rel_error(g, e) + 1e-6 for g, e in zip(same, (grad_txt64, grad_img64)))
    assert rel_error(grad_txt, grad_txt64) <= bounds[0], rel_error(grad_txt, grad_txt64)
    assert rel_error(grad_img, grad_img64) <= bounds[1], rel_error(grad_img, grad_img64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_problems_give_zero_distance_and_no_nan(backend):
    device = device_of(backend)
    generator = torch.Generator().manual_seed(5)
    txt, img = embeddings(generator, 4, 6, 9, 16, torch.float32)
    x_mask, y_mask = random_masks(generator, 4, 6, 9, empty=True)
    txt_d, img_d = txt.to(device).requires_grad_(), img.to(device).requires_grad_()
    x_mask, y_mask = x_mask.to(device), y_mask.to(device)
    with vlkernels.use_backend(backend):
        distance = ops.wra_distance(txt_d, img_d, x_mask, y_mask)
        distance.sum().backward()
        plan = ops.ipot(torch.rand(4, 6, 9, device=device), x_mask, y_mask)
        entropic = ops.sinkhorn(torch.rand(4, 6, 9, device=device), reg=0.1, x_mask=x_mask, y_mask=y_mask)
        gw = ops.gromov_wasserstein_distance(txt.to(device), img.to(device), x_mask, y_mask)
    assert distance[0] > 0 and (distance[1:] == 0).all()
    for t in (txt_d.grad, img_d.grad, plan, entropic, gw):
        assert torch.isfinite(t).all()
    assert (txt_d.grad[1:] == 0).all() and (img_d.grad[1:] == 0).all()
    assert (plan[1:] == 0).all() and (entropic[1:] == 0).all() and (gw[1:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gromov_wasserstein_distance_and_gradients(backend):
    device = device_of(backend)
    generator = torch.Generator().manual_seed(6)
    txt, img = embeddings(generator, 3, 9, 14, 24, torch.float32)
    x_mask, y_mask = random_masks(generator, 3, 9, 14)
    grad_out = torch.randn(3, generator=generator)
    expected, grad_txt64, grad_img64 = reference_grads(reference.gromov_wasserstein_distance, txt, img, grad_out,
                                                       x_mask, y_mask)
    txt_d, img_d = txt.to(device).requires_grad_(), img.to(device).requires_grad_()
    with vlkernels.use_backend(backend):
        distance = ops.gromov_wasserstein_distance(txt_d, img_d, x_mask.to(device), y_mask.to(device))
        grads = torch.autograd.grad(distance, (txt_d, img_d), grad_out.to(device))
    assert rel_error(distance, expected) <= TOL
    # GW's gradient is a difference of nearly cancelling terms (Cst against 2 Cs gamma Ct^T):
    # in fp32 even the torch reference misses 1e-5, so the bound is the fp32 rule or twice the
    # error of the same computation by torch in fp32, whichever is larger.
    txt_t, img_t = txt.to(device).requires_grad_(), img.to(device).requires_grad_()
    with vlkernels.use_backend("torch"):
        same = torch.autograd.grad(ops.gromov_wasserstein_distance(txt_t, img_t, x_mask.to(device), y_mask.to(device)),
                                   (txt_t, img_t), grad_out.to(device))
    for grad, exact, fp32 in zip(grads, (grad_txt64, grad_img64), same):
        assert rel_error(grad, exact) <= max(TOL, 2 * rel_error(fp32, exact)), rel_error(grad, exact)


# ----------------------------------------------------------------------------------------------
# Backend selection, refusals, bad inputs
# ----------------------------------------------------------------------------------------------
def test_auto_runs_the_cpp_kernels_on_cpu_tensors(monkeypatch):
    if NO_EXTENSION:
        pytest.skip("VLKERNELS_NO_EXTENSION=1")
    calls = []

    def recording(impl):
        if impl.backend != "cpp":
            return impl
        return Implementation("cpp", impl.refuse, lambda *args: calls.append(impl.run) or impl.run(*args))

    for table in ("_IPOT", "_SINKHORN", "_WRA"):
        monkeypatch.setattr(ops, table, [recording(impl) for impl in getattr(ops, table)])
    cost, mask = torch.rand(2, 5, 7), torch.ones(2, 5, dtype=torch.bool)
    with vlkernels.use_backend("auto"):
        ops.ipot(cost, mask, None)
        ops.sinkhorn(cost, reg=0.1)
        ops.wra_distance(torch.randn(2, 5, 8), torch.randn(2, 7, 8), None, None)
    assert len(calls) == 3


def test_triton_refuses_tiles_it_cannot_hold_and_auto_falls_back():
    cost = torch.rand(1, 300, 5)
    mask = torch.ones(1, 300, dtype=torch.bool)
    with vlkernels.use_backend("triton"), pytest.raises(NoBackendError, match="512 x 16 register tile"):
        ops.ipot(cost.to(DEVICE), mask.to(DEVICE), None)
    txt, img = torch.randn(1, 100, 8), torch.randn(1, 20, 8)
    with vlkernels.use_backend("triton"), pytest.raises(NoBackendError, match="128 x 32 register tile"):
        ops.wra_distance(txt.to(DEVICE), img.to(DEVICE), None, None)
    if DEVICE.type == "cpu" and not NO_EXTENSION:
        plan = ops.ipot(cost, mask, None)  # auto: the C++ kernel has no tile limit
        assert rel_error(plan, reference.ipot(cost.double(), mask, torch.ones(1, 5, dtype=torch.bool))) <= TOL


def test_fp64_runs_on_the_torch_backend():
    cost = torch.rand(2, 4, 6, dtype=torch.float64)
    plan = ops.ipot(cost, None, None)
    assert plan.dtype == torch.float64
    with vlkernels.use_backend("triton"), pytest.raises(NoBackendError, match="torch.float64 runs on the torch"):
        ops.ipot(cost.to(DEVICE), None, None)


def test_padding_may_hold_inf_cost():
    cost = torch.rand(1, 3, 4)
    cost[0, 2] = float("inf")
    x_mask = torch.tensor([[True, True, False]])
    plan = ops.ipot(cost.to(DEVICE), x_mask.to(DEVICE), None)
    assert torch.isfinite(plan).all() and (plan[0, 2] == 0).all()


def _bad(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


def test_bad_inputs_raise_clear_errors():
    cost, x_mask, y_mask = torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    nan_cost = cost.clone()
    nan_cost[1, 0, 0] = float("nan")
    txt, img = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    _bad(lambda: ops.ipot(cost, x_mask[:, :2], y_mask), ValueError, r"x_mask must have shape \[2, 3\], got \[2, 2\]")
    _bad(lambda: ops.ipot(cost, x_mask, y_mask.float()), TypeError, "y_mask must be a bool tensor")
    _bad(lambda: ops.ipot(cost, x_mask, y_mask, beta=0), ValueError, "beta must be a finite number > 0")
    _bad(lambda: ops.ipot(cost, x_mask, y_mask, iters=0), ValueError, "iters must be an int >= 1")
    _bad(lambda: ops.ipot(cost[0], x_mask, y_mask), ValueError, r"cost must be a \[B, M, N\] tensor")
    _bad(lambda: ops.ipot(nan_cost, x_mask, y_mask), ValueError, "non-finite")
    _bad(lambda: ops.sinkhorn(cost, reg=-0.1), ValueError, "reg must be a finite number > 0")
    _bad(lambda: ops.sinkhorn(nan_cost, reg=0.1), ValueError, "non-finite")
    _bad(lambda: ops.sinkhorn(cost, torch.full((2, 3), 0.5), reg=0.1), ValueError, "same mass")
    _bad(lambda: ops.sinkhorn(cost, -torch.ones(2, 3) / 3, reg=0.1), ValueError, "finite and >= 0")
    _bad(lambda: ops.sinkhorn(cost, torch.ones(2, 4) / 4, reg=0.1), ValueError, r"a must be a floating \[2, 3\]")
    _bad(lambda: ops.sinkhorn(cost, reg=0.1, tol=-1.0), ValueError, "tol must be None or")
    _bad(lambda: ops.sinkhorn(cost, reg=0.1, y_mask=y_mask[:1]), ValueError, "y_mask must have shape")
    _bad(lambda: ops.wra_distance(txt, img[..., :7], x_mask, y_mask), ValueError, "must share B and D")
    _bad(lambda: ops.wra_distance(txt, img.half(), x_mask, y_mask), TypeError, "cast one of them")
    _bad(lambda: ops.wra_distance(txt, img, y_mask, x_mask), ValueError, "txt_mask must have shape")
    _bad(lambda: ops.gromov_wasserstein_distance(txt, img, x_mask, y_mask, ot_iters=0), ValueError, "ot_iters")


def test_custom_ops_pass_opcheck():
    generator = torch.Generator().manual_seed(8)
    cost = torch.rand(2, 5, 7, generator=generator).to(DEVICE)
    x_mask, y_mask = (m.to(DEVICE) for m in random_masks(generator, 2, 5, 7))
    txt, img = (t.to(DEVICE).requires_grad_() for t in embeddings(generator, 2, 5, 7, 16, torch.float32))
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops._ipot_triton_op, (cost, x_mask, y_mask, 0.5, 5, 1), test_utils=checks)
    torch.library.opcheck(ops._sinkhorn_triton_op, (cost, torch.full((2, 5), 1 / 5, device=DEVICE),
                                                    torch.full((2, 7), 1 / 7, device=DEVICE), 0.5, 5, -1.0, True),
                          test_utils=checks)
    torch.library.opcheck(ops._wra_triton_op, (txt, img, x_mask, y_mask, 0.5, 5, 1), test_utils=checks)
    if not NO_EXTENSION:
        cpu = [t.detach().cpu() for t in (cost, txt, img)]
        torch.library.opcheck(torch.ops.vlkernels.ot_ipot.default, (cpu[0], x_mask.cpu(), y_mask.cpu(), 0.5, 5, 1),
                              test_utils=checks)
        torch.library.opcheck(ops._wra_native_op, (cpu[1].requires_grad_(), cpu[2].requires_grad_(), x_mask.cpu(),
                                                   y_mask.cpu(), 0.5, 5, 1), test_utils=checks)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def test_wra_loss_is_uniters_ot_loss():
    generator = torch.Generator().manual_seed(9)
    txt, img = embeddings(generator, 6, 8, 11, 16, torch.float32)
    x_mask, y_mask = random_masks(generator, 6, 8, 11)
    targets = torch.tensor([1, 0, 1, 1, 0, 0])
    loss = WRALoss()(txt.to(DEVICE), img.to(DEVICE), x_mask.to(DEVICE), y_mask.to(DEVICE), targets.to(DEVICE))
    distance = reference.wra_distance(txt.double(), img.double(), x_mask, y_mask)
    expected = 0.1 * (distance[targets == 1].sum() - distance[targets == 0].sum()) / 6
    assert abs(loss.item() - expected.item()) <= TOL * abs(expected.item())
    with pytest.raises(ValueError, match=r"targets must have shape \[6\]"):
        WRALoss()(txt, img, x_mask, y_mask, targets[:5])


def test_wpa_loss_selects_vilts_tokens():
    generator = torch.Generator().manual_seed(10)
    text_feats, image_feats = embeddings(generator, 4, 10, 17, 16, torch.float32)
    lengths = torch.tensor([10, 6, 3, 8])
    text_masks = (torch.arange(10)[None] < lengths[:, None]).long()
    image_masks = torch.rand(4, 17, generator=generator) < 0.8
    labels = torch.tensor([1, 0, 0, 1])
    # ViLT's compute_itm_wpa token selection, restated
    txt_mask, img_mask = text_masks.bool().clone(), image_masks.clone()
    for i, length in enumerate(txt_mask.sum(dim=1)):
        txt_mask[i, length - 1] = False
    txt_mask[:, 0] = False
    img_mask[:, 0] = False
    distance = reference.wra_distance(text_feats.double(), image_feats.double(), txt_mask, img_mask)
    expected = 0.1 * (distance[labels == 1].sum() - distance[labels == 0].sum()) / 4
    loss = WPALoss()(text_feats.to(DEVICE), image_feats.to(DEVICE), text_masks.to(DEVICE), image_masks.to(DEVICE),
                     labels.to(DEVICE))
    assert abs(loss.item() - expected.item()) <= TOL * abs(expected.item())
