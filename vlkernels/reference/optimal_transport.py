"""Reference optimal transport of vision-language alignment: UNITER's IPOT and word-region
alignment (WRA) distance, entropic Sinkhorn, and Graph-Optimal-Transport's Gromov-Wasserstein
distance. Pure torch, float64-capable: the spec, the CPU fallback and the tests' oracle.

Masks are True on valid (real) tokens. Everything is computed in fp32, or in fp64 when the
inputs are fp64; 16-bit inputs are cast up first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-5  # UNITER's F.normalize eps in cost_matrix_cosine
PAD_PENALTY = 1e4  # UNITER's x_mask / y_mask: added to the pads' denominators so their scalings stay ~1e-4


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (16-bit inputs compute in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cost_matrix_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """x: [B, M, D], y: [B, N, D] -> [B, M, N]: 1 - cos(x_i, y_j), both sides L2-normalised with eps."""
    acc = accumulation_dtype(x, y)
    x_hat = F.normalize(x.to(acc), p=2, dim=-1, eps=eps)
    y_hat = F.normalize(y.to(acc), p=2, dim=-1, eps=eps)
    return 1 - x_hat @ y_hat.transpose(1, 2)


def ipot_shifts(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor):
    """(shifted, row_shift): the cost with each column's minimum over its valid rows subtracted,
    then each row's minimum over its valid columns, on the joint-valid entries (0 elsewhere),
    and the row minima [B, M] (0 on padding). shifted >= 0 with a 0 in every valid row and column.

    IPOT's plan does not change: a column factor exp(m_j / beta) on A is absorbed by delta_j (the
    column scaling, recomputed from scratch every round), and a row factor exp(r_i / beta) by
    sigma_i once the initial sigma_i = 1/x_len is divided by it. What it changes is range: A has
    entries 1 in every row and column, so exp(-C / beta) cannot underflow a whole line (a
    constant cost of 100 no longer gives 0/0)."""
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=cost.device)
    column = torch.where(joint, cost, inf).amin(1, keepdim=True)  # inf for a column without valid rows
    column_shifted = torch.where(joint, cost - column, inf)
    row = torch.where(joint.any(2), column_shifted.amin(2), 0)
    return torch.where(joint, column_shifted - row[:, :, None], 0), row


# Where the plans' kernels switch from UNITER's scaling iteration to its log-domain form: the
# scaling form keeps T ~ A^t in fp32 and loses entries that underflow (below exp(-87)) but
# matter again later; with the shifted cost at most 16 * beta (exp(-16) = 1e-7) no such entry
# was found in fp32 against float64, beyond ~25 * beta there are. The log domain has no such limit.
LOG_DOMAIN_ABOVE = 16.0


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, *, beta: float = 0.5, iters: int = 50,
         k: int = 1) -> torch.Tensor:
    """UNITER's IPOT (model/ot.py), restated: cost [B, M, N], x_mask [B, M], y_mask [B, N] bool
    (True = valid) -> plan [B, M, N] (fp32, fp64 for fp64 cost), zero wherever a row or column is
    padding. No gradient.

    UNITER iterates on the transposed plan T [B, N, M], with sigma over the M rows, delta over
    the N columns, lengths len = L - pads and pad penalties 1e4:
        sigma = 1/x_len (0 on pads), T = 1, A = exp(-C^T / beta); T and A zero on joint padding
        repeat iters times:  Q = A * T
                             repeat k times: delta = 1 / (y_len * Q @ sigma + y_pen)
                                             sigma = 1 / (x_len * delta @ Q + x_pen)
                             T = delta^T * Q * sigma
        T zeroed on joint padding, returned here as plan = T^T.
    (UNITER reshapes sigma once per iteration, so its k > 1 fails on a shape error; the inner
    loop here reshapes every round, the evident intent.) Padding never moves the valid entries
    (A = 0 there), so the plan on them is this loop on the valid entries alone. It is evaluated
    exactly, in the log domain, on the shifted cost of ``ipot_shifts`` (the same plan): the
    scaling form underflows once cost / beta spans more than ~80 in fp32 (NaN or a wrong plan).
    A sample with no valid row or column ends all-zero, as in UNITER (its NaNs are masked away).
    """
    acc = accumulation_dtype(cost)
    cost = cost.detach().to(acc)
    x_valid, y_valid = x_mask.bool(), y_mask.bool()
    joint = x_valid[:, :, None] & y_valid[:, None, :]
    if cost.numel() == 0:
        return torch.zeros_like(cost)
    shifted, row_shift = ipot_shifts(cost, x_valid, y_valid)
    x_len = x_valid.sum(1, keepdim=True).to(acc)
    y_len = y_valid.sum(1, keepdim=True).to(acc)
    minus_inf = torch.tensor(float("-inf"), dtype=acc, device=cost.device)
    log_a = torch.where(joint, -shifted / beta, minus_inf)  # log A on the shifted cost
    log_t = torch.where(joint, 0, minus_inf)
    # log sigma; the row shift moves into the initial sigma (see ipot_shifts)
    log_sigma = torch.where(x_valid, -row_shift / beta - x_len.log(), minus_inf)
    for _ in range(iters):
        log_q = log_a + log_t
        for _ in range(k):
            log_delta = torch.where(y_valid, -y_len.log() - torch.logsumexp(log_q + log_sigma[:, :, None], 1),
                                    minus_inf)
            log_sigma = torch.where(x_valid, -x_len.log() - torch.logsumexp(log_q + log_delta[:, None, :], 2),
                                    minus_inf)
        log_t = log_delta[:, None, :] + log_q + log_sigma[:, :, None]
    # an empty problem's lines are -inf - (-inf) = nan: masked away with the padding
    return torch.where(joint, log_t.exp(), 0)


def ipot_scaling_form(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, *, beta: float = 0.5,
                      iters: int = 50, k: int = 1) -> torch.Tensor:
    """UNITER's loop literally (scaling form, unshifted cost): the tests' check that ``ipot``'s
    log-domain, shifted evaluation is the same function where UNITER's own loop is exact (float64,
    moderate cost / beta)."""
    acc = accumulation_dtype(cost)
    cost = cost.detach().to(acc)
    batch, m, n = cost.shape
    x_pad, y_pad = ~x_mask.bool(), ~y_mask.bool()
    joint_pad_t = (x_pad[:, :, None] | y_pad[:, None, :]).transpose(1, 2)  # [B, N, M]
    x_len = (m - x_pad.sum(1)).to(acc)
    y_len = (n - y_pad.sum(1)).to(acc)
    sigma = (torch.ones(batch, m, dtype=acc, device=cost.device) / x_len[:, None]).masked_fill(x_pad, 0)
    T = torch.ones(batch, n, m, dtype=acc, device=cost.device).masked_fill(joint_pad_t, 0)
    A = torch.exp(-cost.transpose(1, 2) / beta).masked_fill(joint_pad_t, 0)
    x_len, y_len = x_len[:, None, None], y_len[:, None, None]
    x_pen = (x_pad.to(acc) * PAD_PENALTY)[:, None, :]
    y_pen = (y_pad.to(acc) * PAD_PENALTY)[:, None, :]
    for _ in range(iters):
        Q = A * T
        for _ in range(k):
            delta = 1 / (y_len * Q.matmul(sigma.view(batch, m, 1)).view(batch, 1, n) + y_pen)
            sigma = 1 / (x_len * delta.matmul(Q) + x_pen)
        T = delta.view(batch, n, 1) * Q * sigma
    return T.masked_fill(joint_pad_t, 0).transpose(1, 2)


def _joint_pad(x_mask: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    return ~x_mask.bool()[:, :, None] | ~y_mask.bool()[:, None, :]


def masked_cosine_cost(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """cost_matrix_cosine(x, y), 0 on joint padding. Padded tokens are zeroed first: they may hold
    anything (NaN, inf), which then reaches neither the cost nor, through the matmul's backward,
    the valid tokens' gradients; their own gradients are 0, as the kernels give."""
    x = x.masked_fill(~x_mask.bool()[..., None], 0)
    y = y.masked_fill(~y_mask.bool()[..., None], 0)
    return cost_matrix_cosine(x, y).masked_fill(_joint_pad(x_mask, y_mask), 0)


def wra_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor, img_mask: torch.Tensor, *,
                 beta: float = 0.5, iters: int = 50, k: int = 1) -> torch.Tensor:
    """UNITER's optimal_transport_dist: txt [B, M, D], img [B, N, D], masks [B, M] / [B, N]
    (True = valid) -> [B] = sum_ij C_ij T_ij with C = 1 - cos (0 on joint padding) and T the
    IPOT plan of C.detach(). Gradients reach txt and img through C only (T is detached)."""
    cost = masked_cosine_cost(txt, img, txt_mask, img_mask)
    plan = ipot(cost.detach(), txt_mask, img_mask, beta=beta, iters=iters, k=k)
    return (cost * plan).sum((1, 2))


def _valid(mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.bool()


def sinkhorn_marginals(cost, a, b, x_mask, y_mask):
    """(a, b, x_on, y_on): the marginals in the compute dtype, zero off the support, and the
    support: valid entries with positive mass, emptied for a problem with no such row or column.
    The default marginal is uniform over the valid entries."""
    acc = accumulation_dtype(cost)
    batch, m, n = cost.shape
    x_valid = _valid(x_mask, batch, m, cost.device)
    y_valid = _valid(y_mask, batch, n, cost.device)
    a = x_valid.to(acc) / x_valid.sum(1, keepdim=True).clamp_min(1) if a is None else a.to(acc) * x_valid
    b = y_valid.to(acc) / y_valid.sum(1, keepdim=True).clamp_min(1) if b is None else b.to(acc) * y_valid
    x_on, y_on = a > 0, b > 0
    nonempty = x_on.any(1, keepdim=True) & y_on.any(1, keepdim=True)
    return a, b, x_on & nonempty, y_on & nonempty


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *, reg: float,
             iters: int = 100, tol: Optional[float] = None, x_mask: Optional[torch.Tensor] = None,
             y_mask: Optional[torch.Tensor] = None, log_domain: bool = True, stop_early: bool = True) -> torch.Tensor:
    """Entropic OT by Sinkhorn's iterations, batched: cost [B, M, N], a [B, M], b [B, N]
    (default uniform over the valid entries), masks [B, M] / [B, N] (True = valid, default all)
    -> plan [B, M, N] minimising <P, C> - reg * H(P) with P 1 = a, P^T 1 = b; zero off the
    support (padding, or zero mass). No gradient.

    Each iteration updates the columns, then the rows (POT's order):
      log domain: g = log b - LSE_i(f_i - C_ij / reg); f = log a - LSE_j(g_j - C_ij / reg);
                  P = exp(f_i + g_j - C_ij / reg)   (POT's sinkhorn_log)
      otherwise:  v = b / (K^T u); u = a / (K v) with K = exp(-C / reg); P = u_i K_ij v_j
                  (POT's sinkhorn_knopp; underflows when C / reg is large)
    tol: a problem stops once its column marginals are within tol (L2 norm of P^T 1 - b) after
    a full iteration; None runs exactly ``iters`` iterations. (Eager leaves the loop once every
    problem has stopped; under torch.compile, which cannot branch on data, stopped problems stay
    frozen until ``iters``: the same plan.) Leaving the loop reads ``active`` on the host once
    per iteration; stop_early=False keeps stopped problems frozen instead (no host read: the
    torch backend of vlkernels.ops.sinkhorn, whose default mode reads no value on the host).
    """
    acc = accumulation_dtype(cost)
    cost = cost.detach().to(acc)
    a, b, x_on, y_on = sinkhorn_marginals(cost, a, b, x_mask, y_mask)
    joint = x_on[:, :, None] & y_on[:, None, :]
    active = torch.ones(cost.shape[0], 1, dtype=torch.bool, device=cost.device)
    if log_domain:
        log_kernel = torch.where(joint, -cost / reg, float("-inf"))
        log_a = torch.where(x_on, a.clamp_min(1e-300).log(), 0)
        log_b = torch.where(y_on, b.clamp_min(1e-300).log(), 0)
        f = torch.zeros_like(log_a)
        g = torch.zeros_like(log_b)
        for it in range(iters):
            lse_col = torch.logsumexp(log_kernel + f[:, :, None], dim=1)
            if tol is not None and it > 0:
                marginal = torch.where(y_on, torch.exp(g + lse_col), 0)
                active = active & ((marginal - b).norm(dim=1, keepdim=True) > tol)
                if stop_early and not torch.compiler.is_compiling() and not active.any():
                    break
            g_new = torch.where(y_on, log_b - lse_col, 0)
            f_new = torch.where(x_on, log_a - torch.logsumexp(log_kernel + g_new[:, None, :], dim=2), 0)
            f, g = torch.where(active, f_new, f), torch.where(active, g_new, g)
        return torch.where(joint, torch.exp(log_kernel + f[:, :, None] + g[:, None, :]), 0)
    kernel = torch.where(joint, torch.exp(-cost / reg), 0)
    u = x_on.to(acc)
    v = y_on.to(acc)
    for it in range(iters):
        col = (kernel * u[:, :, None]).sum(1)
        if tol is not None and it > 0:
            active = active & ((v * col - b).norm(dim=1, keepdim=True) > tol)
            if stop_early and not torch.compiler.is_compiling() and not active.any():
                break
        v_new = torch.where(y_on, b / col, 0)
        u_new = torch.where(x_on, a / (kernel * v_new[:, None, :]).sum(2), 0)
        u, v = torch.where(active, u_new, u), torch.where(active, v_new, v)
    return u[:, :, None] * kernel * v[:, None, :]


def _masked_self_cost(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_cosine_cost(x, x, mask, mask)


def gromov_wasserstein_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor,
                                img_mask: torch.Tensor, *, beta: float = 0.1, iters: int = 5,
                                ot_iters: int = 20, ipot_fn=None) -> torch.Tensor:
    """Graph-Optimal-Transport's Gromov-Wasserstein distance (GW_distance_uniform), with
    UNITER-style masks: txt [B, M, D] (GOT's source X), img [B, N, D], masks True = valid -> [B].

    Cs = 1 - cos(txt, txt) [B, M, M], Ct = 1 - cos(img, img) [B, N, N] (0 on padding);
    p, q uniform over the valid tokens; Cst = (Cs^2 p) 1^T + 1 (Ct^2 q)^T;
    gamma = p q^T, then ``iters`` times: C_g = Cst - 2 Cs gamma Ct^T, gamma = IPOT(C_g) with
    ``ot_iters`` iterations, GOT's orientation (its rows, the text, are scaled first: the
    UNITER loop on C_g^T); the distance is sum(C_g * gamma) for the final C_g. gamma carries
    no gradient (GOT's returned plan is detached); gradients reach txt and img through Cs, Ct.
    ``ipot_fn`` (cost, x_mask, y_mask, beta=, iters=) -> plan solves the inner problems
    (default: the reference ipot).
    """
    ipot_fn = ipot_fn or (lambda cost, xm, ym, beta, iters: ipot(cost, xm, ym, beta=beta, iters=iters))
    txt_mask, img_mask = txt_mask.bool(), img_mask.bool()
    acc = accumulation_dtype(txt, img)
    cost_s = _masked_self_cost(txt, txt_mask)
    cost_t = _masked_self_cost(img, img_mask)
    p = txt_mask.to(acc) / txt_mask.sum(1, keepdim=True).clamp_min(1)
    q = img_mask.to(acc) / img_mask.sum(1, keepdim=True).clamp_min(1)
    cost_st = (cost_s.square() @ p[:, :, None]) + (cost_t.square() @ q[:, :, None]).transpose(1, 2)
    gamma = p[:, :, None] * q[:, None, :]
    with torch.no_grad():
        cs, ct, cst = cost_s.detach(), cost_t.detach(), cost_st.detach()
        for _ in range(iters):
            cost_g = cst - 2 * cs @ gamma @ ct.transpose(1, 2)
            gamma = ipot_fn(cost_g.transpose(1, 2), img_mask, txt_mask, beta=beta, iters=ot_iters).transpose(1, 2)
        gamma = gamma.to(acc)
    cost_g = cost_st - 2 * cost_s @ gamma @ cost_t.transpose(1, 2)
    return (cost_g * gamma).sum((1, 2))


def wpa_masks(text_mask: torch.Tensor, image_mask: torch.Tensor, *, image_skip: int = 1):
    """ViLT's word-patch alignment token selection: text_mask [B, M], image_mask [B, N] (True =
    real token) -> (txt_mask, img_mask) without the text's [CLS] (position 0) and last real
    token ([SEP]), and without the image's first ``image_skip`` tokens ([CLS]; DeiT backbones
    also drop their distillation token: image_skip=2)."""
    txt = text_mask.bool().clone()
    img = image_mask.bool().clone()
    last = (txt.sum(1) - 1).clamp_min(0)
    txt[torch.arange(txt.shape[0], device=txt.device), last] = False
    txt[:, 0] = False
    img[:, :image_skip] = False
    return txt, img


def ot_loss(distance: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """UNITER's ot_loss from per-pair distances [B] and ITM targets [B] (1 = matched pair, 0 =
    negative): (sum of positive distances - sum of negative distances) / (n_pos + n_neg).
    Masked sums rather than selections: shapes that do not depend on the targets, for torch.compile."""
    pos, neg = targets == 1, targets == 0
    zero = distance.new_zeros(())
    return (torch.where(pos, distance, zero).sum() - torch.where(neg, distance, zero).sum()) / (pos | neg).sum()
