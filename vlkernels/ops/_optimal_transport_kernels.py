"""Triton kernels of the optimal-transport ops: one program per problem, the problem's whole
[BLOCK_M, BLOCK_N] tile (rows = text, columns = regions; next powers of two) held in registers
through every iteration, so one launch solves a batch.

_ipot_kernel: UNITER's IPOT on a given cost. _wra_kernel: the cosine cost from the embeddings
(a tl.dot over D per tile, never stored), IPOT, and sum(C * T). _sinkhorn_kernel: entropic OT,
log domain or scaling form by a runtime flag. All compute in fp32; padding (mask False, or
rows / columns past M / N) has A = 0, so it never moves the valid entries.

Concurrency rules (the interpreter cannot show a violation; every kernel here keeps them so):
- one writer per output element: program p writes only problem p's plan rows / columns and
  distance[p], each element once, at the end;
- no program reads what another program of the same launch writes: a program reads only its
  own problem's inputs (cost, embeddings, masks, marginals), never an output;
- no tile loaded in a pipelined tl.dot loop has a second, non-dot consumer (triton-lang/triton#6691):
  only _wra_kernel has a dot loop, and its x / y tiles feed the dot alone (the squared norms
  reload them in a separate loop without a dot); the other kernels have no dot;
- the grid is (B,) (launch_grid in optimal_transport.py): the problems on axis 0 (up to
  2^31 - 1), axes 1 and 2 unused, so CUDA's 65535 limit on them cannot be reached.
"""
import triton
import triton.language as tl


# Above this max(shifted cost) / beta a program iterates in the log domain
# (reference.LOG_DOMAIN_ABOVE, ot_step.h kIpotLogDomainAbove: the same switch on every backend).
IPOT_LOG_DOMAIN_ABOVE = tl.constexpr(16.0)


@triton.jit
def _ipot_iterations(A, sigma, x_valid, y_valid, x_len, y_len, steps, k):
    # UNITER's loop (reference.ipot) on the plan T [BLOCK_M, BLOCK_N] = UNITER's T transposed:
    # delta runs over the columns (regions), sigma over the rows (text). A is 0 off the
    # joint-valid entries, where T starts at 0 too; sigma starts at exp(-row shift / beta) / x_len.
    x_pen = tl.where(x_valid, 0.0, 1e4)  # UNITER's x_mask = x_pad * 1e4
    y_pen = tl.where(y_valid, 0.0, 1e4)
    delta = tl.zeros_like(y_pen)
    T = tl.where(A > 0.0, 1.0, 0.0)
    for _ in range(steps):
        Q = A * T
        for _ in range(k):
            delta = 1.0 / (y_len * tl.sum(Q * sigma[:, None], axis=0) + y_pen)
            sigma = 1.0 / (x_len * tl.sum(Q * delta[None, :], axis=1) + x_pen)
        T = delta[None, :] * Q * sigma[:, None]
    return T


@triton.jit
def _ipot_log_iterations(log_a, log_sigma, x_valid, y_valid, x_len, y_len, steps, k):
    # The same loop in the log domain (log A = -shifted cost / beta, -inf off the joint-valid
    # entries): delta and sigma from log-sum-exps, log T = log delta + log Q + log sigma.
    log_x_len = tl.log(tl.maximum(x_len, 1.0))
    log_y_len = tl.log(tl.maximum(y_len, 1.0))
    log_t = tl.where(log_a > float("-inf"), 0.0, float("-inf"))  # log T = 0 where A > 0, as T = 1
    log_delta = tl.where(y_valid, 0.0, float("-inf"))
    for _ in range(steps):
        log_q = log_a + log_t
        for _ in range(k):
            log_delta = tl.where(y_valid, -log_y_len - _lse_over_rows(log_q + log_sigma[:, None]), float("-inf"))
            log_sigma = tl.where(x_valid, -log_x_len - _lse_over_cols(log_q + log_delta[None, :]), float("-inf"))
        log_t = log_delta[None, :] + log_q + log_sigma[:, None]
    return tl.exp(log_t)  # 0 off the joint-valid entries (log Q = -inf there)


@triton.jit
def _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k):
    # IPOT's plan of the cost tile C (read on the joint-valid entries only), zero elsewhere.
    # The cost is shifted first (reference.ipot_shifts: each column's minimum, then each row's,
    # subtracted; the row shift moves into the initial sigma), which leaves the plan unchanged
    # and puts a 1 of A in every valid row and column; a tile whose shifted cost still spans
    # more than IPOT_LOG_DOMAIN_ABOVE * beta is iterated in the log domain.
    column = tl.min(tl.where(joint, C, float("inf")), axis=0)
    column_shifted = tl.where(joint, C - column[None, :], float("inf"))
    row = tl.min(column_shifted, axis=1)
    row = tl.where(row < float("inf"), row, 0.0)  # rows without a valid column
    shifted = tl.where(joint, column_shifted - row[:, None], 0.0)
    x_len = tl.sum(x_valid.to(tl.float32), axis=0)
    y_len = tl.sum(y_valid.to(tl.float32), axis=0)
    # An empty problem (no valid row or column) skips the loop and stays all-zero, as UNITER's
    # final masking leaves it (instead of iterating on 1/0).
    steps = tl.where((x_len > 0) & (y_len > 0), iters, 0)
    if tl.max(tl.max(shifted, axis=1), axis=0) / beta > IPOT_LOG_DOMAIN_ABOVE:
        log_sigma = tl.where(x_valid, -row / beta - tl.log(tl.maximum(x_len, 1.0)), float("-inf"))
        T = _ipot_log_iterations(tl.where(joint, -shifted / beta, float("-inf")), log_sigma, x_valid, y_valid,
                                 x_len, y_len, steps, k)
    else:
        sigma = tl.where(x_valid, tl.exp(-row / beta) / tl.maximum(x_len, 1.0), 0.0)
        T = _ipot_iterations(tl.where(joint, tl.exp(-shifted / beta), 0.0), sigma, x_valid, y_valid, x_len, y_len,
                             steps, k)
    return T  # zero off the joint-valid entries already (A = 0 there); the callers mask again


@triton.jit
def _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    x_valid = tl.load(x_mask + problem * M + rows, mask=rows < M, other=0) != 0
    y_valid = tl.load(y_mask + problem * N + cols, mask=cols < N, other=0) != 0
    return rows, cols, x_valid, y_valid


@triton.jit
def _ipot_kernel(
    cost, x_mask, y_mask, plan,
    M, N, stride_cb, stride_cm, stride_cn,
    beta, iters, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # next powers of two of M and N: the register tile
):
    """IPOT plan of problem program_id(0) (grid (B,), launch_grid). Concurrency: it reads only
    its problem's cost and masks and writes only its problem's plan, each element once; no dot."""
    problem = tl.program_id(0).to(tl.int64)
    rows, cols, x_valid, y_valid = _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M, BLOCK_N)
    joint = x_valid[:, None] & y_valid[None, :]
    C = tl.load(cost + problem * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                mask=joint, other=0.0)
    T = _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k)  # zero off the joint-valid entries
    out = plan + problem * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, T, mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _wra_kernel(
    txt, img, x_mask, y_mask, plan, distance,
    M, N, D, stride_tb, stride_tm, stride_ib, stride_in,
    beta, iters, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """WRA distance of problem program_id(0) (grid (B,), launch_grid): cost C = 1 - <x, y> /
    (max(|x|, eps) max(|y|, eps)) from a tl.dot over D (fp32 accumulation; 16-bit operands are
    multiplied exactly), IPOT on it, then distance = sum(C * T) and the plan (kept for the
    backward). Concurrency: reads only its problem's embeddings and masks, writes only its
    problem's plan (each element once) and distance[problem]; the x / y tiles of the pipelined
    dot loop feed the dot alone (the norms reload them in their own loop, triton#6691)."""
    problem = tl.program_id(0).to(tl.int64)
    rows, cols, x_valid, y_valid = _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M, BLOCK_N)
    joint = x_valid[:, None] & y_valid[None, :]
    txt_rows = txt + problem * stride_tb + rows[:, None] * stride_tm
    img_cols = img + problem * stride_ib + cols[None, :] * stride_in
    # The squared norms take their own pass over D, apart from the dot loop: a tile loaded in a
    # pipelined tl.dot loop must have no second (register-side) consumer (triton-lang/triton#6691:
    # the pipeliner may then recycle its shared-memory buffer while the MMA still reads it). This
    # loop has no dot, so nothing in it is pipelined through shared memory.
    x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    y_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xf = tl.load(txt_rows + d[None, :], mask=x_valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        yf = tl.load(img_cols + d[:, None], mask=d_ok[:, None] & y_valid[None, :], other=0.0).to(tl.float32)
        x_sq += tl.sum(xf * xf, axis=1)
        y_sq += tl.sum(yf * yf, axis=0)
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        # padded tokens are never read: their rows / columns of C are masked anyway
        x = tl.load(txt_rows + d[None, :], mask=x_valid[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(img_cols + d[:, None], mask=d_ok[:, None] & y_valid[None, :], other=0.0)
        dots = tl.dot(x, y, dots, input_precision=DOT_PRECISION)  # x and y feed the dot only
    x_norm = tl.maximum(tl.sqrt(x_sq), 1e-5)  # F.normalize's eps, as UNITER
    y_norm = tl.maximum(tl.sqrt(y_sq), 1e-5)
    C = tl.where(joint, 1.0 - dots / (x_norm[:, None] * y_norm[None, :]), 0.0)
    T = _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k)
    out = plan + problem * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, T, mask=(rows < M)[:, None] & (cols < N)[None, :])
    tl.store(distance + problem, tl.sum(tl.sum(C * T, axis=1), axis=0))


@triton.jit
def _lse_over_rows(Z):
    # log-sum-exp down each column of Z [BLOCK_M, BLOCK_N] (-inf for a column of -inf)
    m = tl.max(Z, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(Z - shift[None, :]), axis=0)
    return tl.where(total > 0.0, shift + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))


@triton.jit
def _lse_over_cols(Z):
    m = tl.max(Z, axis=1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(Z - shift[:, None]), axis=1)
    return tl.where(total > 0.0, shift + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))


@triton.jit
def _sinkhorn_kernel(
    cost, a, b, plan,
    M, N, stride_cb, stride_cm, stride_cn,
    reg, iters, tol,  # tol < 0: run every iteration
    log_domain,  # a runtime flag: one compiled kernel serves both iterations
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Concurrency: one program per problem (grid (B,), launch_grid), reading only its problem's
    # cost and marginals, writing only its problem's plan, each element once; no dot.
    # Columns then rows per iteration (POT's order); a and b are zero off the support. In the
    # log domain the tile holds K = -C/reg and f, g are potentials; otherwise the tile holds
    # exp(-C/reg) and f, g are the scalings u, v. A problem stops once the L2 norm of its
    # column-marginal error is <= tol (it idles through the remaining iterations).
    problem = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mass_a = tl.load(a + problem * M + rows, mask=rows < M, other=0.0)
    mass_b = tl.load(b + problem * N + cols, mask=cols < N, other=0.0)
    x_on = mass_a > 0.0
    y_on = mass_b > 0.0
    joint = x_on[:, None] & y_on[None, :]
    C = tl.load(cost + problem * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                mask=joint, other=0.0)
    scaled = -C / reg
    K = tl.where(joint, scaled, float("-inf"))
    if log_domain == 0:
        K = tl.where(joint, tl.exp(scaled), 0.0)
    log_a = tl.where(x_on, tl.log(tl.where(x_on, mass_a, 1.0)), 0.0)
    log_b = tl.where(y_on, tl.log(tl.where(y_on, mass_b, 1.0)), 0.0)
    f = tl.where(x_on & (log_domain == 0), 1.0, 0.0)
    g = tl.where(y_on & (log_domain == 0), 1.0, 0.0)
    if log_domain != 0:
        col = _lse_over_rows(K + f[:, None])  # LSE_i(K_ij + f_i)
    else:
        col = tl.sum(K * f[:, None], axis=0)  # sum_i K_ij u_i
    err = float("inf")
    for _ in range(iters):
        if err > tol:
            if log_domain != 0:
                g = tl.where(y_on, log_b - col, 0.0)
                f = tl.where(x_on, log_a - _lse_over_cols(K + g[None, :]), 0.0)
                col = _lse_over_rows(K + f[:, None])
                marginal = tl.where(y_on, tl.exp(g + col), 0.0)
            else:
                g = tl.where(y_on, mass_b / tl.where(y_on, col, 1.0), 0.0)
                row = tl.sum(K * g[None, :], axis=1)
                f = tl.where(x_on, mass_a / tl.where(x_on, row, 1.0), 0.0)
                col = tl.sum(K * f[:, None], axis=0)
                marginal = g * col
            err = tl.sqrt(tl.sum((marginal - mass_b) * (marginal - mass_b), axis=0))
    if log_domain != 0:
        result = tl.exp(K + f[:, None] + g[None, :])
    else:
        result = f[:, None] * K * g[None, :]
    out = plan + problem * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, tl.where(joint, result, 0.0), mask=(rows < M)[:, None] & (cols < N)[None, :])
