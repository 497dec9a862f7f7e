"""Triton kernels of the optimal-transport ops: one program per problem, the problem's whole
[BLOCK_M, BLOCK_N] tile (rows = text, columns = regions; next powers of two) held in registers
through every iteration, so one launch solves a batch.

The tile is held as [BLOCK_M, BLOCK_N // LANES, LANES] (column c = chunk * LANES + lane, LANES =
min(32, BLOCK_N)): Triton's layout puts a warp's threads on the last axis (the contiguous one)
and the warps on the rows (the chunk axis, equally contiguous, comes after them in its order),
so each thread holds a few rows of a few columns. A row vector (sigma, f; shape [BLOCK_M, 1, 1])
then costs BLOCK_M / warps registers and a column vector (delta, g; [1, chunks, LANES])
BLOCK_N / 32, where the plain 2-D tile put the warps on the columns and gave every thread whole
columns, so that every row vector cost as many registers as a tile. Sums along a row stay inside
a warp (no shared memory, no barrier); sums down a column cross the warps.

_ipot_kernel: UNITER's IPOT on a given cost. _wra_kernel: the cosine cost from the embeddings
(a tl.dot over D per tile, never stored), IPOT, and sum(C * T). _sinkhorn_kernel: entropic OT,
log domain or scaling form by a runtime flag. All compute in fp32, exponentials and logarithms
in base 2 (exp2 / log2, the hardware's units: costs are scaled by log2(e) / beta once); padding
(mask False, or rows / columns past M / N) has A = 0, so it never moves the valid entries.

Registers: the iterations keep two tiles (A and Q) and the two scalings live, no masks (an
invalid row has a zero sum, which stands for it) and no cost tile (WRA forms the cost again for
sum(C * T) at the end), so a 16384-element tile sits in 8 warps without spilling
(vlkernels.report).

Concurrency rules (the interpreter cannot show a violation; every kernel here keeps them so):
- one writer per output element: program p writes only problem p's plan rows / columns and
  distance[p], each element once, at the end;
- no program reads what another program of the same launch writes: a program reads only its
  own problem's inputs (cost, embeddings, masks, marginals) and, in _wra_kernel without
  KEEP_COST, its own plan after a block barrier (tl.debug_barrier) that makes the stores visible;
- no tile loaded in a pipelined tl.dot loop has a second, non-dot consumer (triton-lang/triton#6691):
  only _wra_kernel has dot loops (_cosine_cost), and their x / y tiles feed the dot alone (the
  squared norms reload them in a separate loop without a dot); the other kernels have no dot;
- the grid is (B,) (launch_grid in optimal_transport.py): the problems on axis 0 (up to
  2^31 - 1), axes 1 and 2 unused, so CUDA's 65535 limit on them cannot be reached.
"""
import triton
import triton.language as tl


# Above this max(shifted cost) / beta a program iterates in the log domain
# (reference.LOG_DOMAIN_ABOVE, ot_step.h kIpotLogDomainAbove: the same switch on every backend).
IPOT_LOG_DOMAIN_ABOVE = tl.constexpr(16.0)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log units to base-2 units


# Reductions of a [BLOCK_M, chunks, LANES] tile, keeping its rank: along a row gives a row
# vector [BLOCK_M, 1, 1], down a column a column vector [1, chunks, LANES].
@triton.jit
def _row_sum(X):
    return tl.sum(tl.sum(X, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _row_max(X):
    return tl.max(tl.max(X, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _row_min(X):
    return tl.min(tl.min(X, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _col_sum(X):
    return tl.sum(X, axis=0, keep_dims=True)


@triton.jit
def _col_max(X):
    return tl.max(X, axis=0, keep_dims=True)


@triton.jit
def _col_min(X):
    return tl.min(X, axis=0, keep_dims=True)


COLUMNS = tl.constexpr(0)  # _lse's axis: down each column, giving a column vector
ROWS = tl.constexpr(1)  # along each row, giving a row vector


@triton.jit
def _lse(Z, AXIS: tl.constexpr):
    # log2-sum-exp2 of Z down its columns (AXIS == COLUMNS) or along its rows (AXIS == ROWS);
    # -inf for a line of -inf
    if AXIS == COLUMNS:
        m = _col_max(Z)
    else:
        m = _row_max(Z)
    shift = tl.where(m == float("-inf"), 0.0, m)
    if AXIS == COLUMNS:
        total = _col_sum(tl.exp2(Z - shift))
    else:
        total = _row_sum(tl.exp2(Z - shift))
    return tl.where(total > 0.0, shift + tl.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))


@triton.jit
def _tile_index(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    # rows [BLOCK_M, 1, 1] and columns [1, BLOCK_N // LANES, LANES] of the tile
    rows = tl.arange(0, BLOCK_M)[:, None, None]
    cols = tl.arange(0, BLOCK_N // LANES)[None, :, None] * LANES + tl.arange(0, LANES)[None, None, :]
    return rows, cols


@triton.jit
def _ipot_iterations(A, sigma, y_valid, x_len, y_len, steps, k):
    # UNITER's loop (reference.ipot) on the plan T = UNITER's T transposed: delta runs over the
    # columns (regions), sigma over the rows (text). A is 0 off the joint-valid entries, where T
    # starts at 0 too; sigma starts at exp(-row shift / beta) / x_len. UNITER's pad penalty
    # (1e4 added to an invalid row's or column's sum, which is 0) is added where a row's sum is
    # 0: a valid row's sum is never 0 in this (linear) domain, the shift leaving a 1 of A in it.
    y_pen = tl.where(y_valid, 0.0, 1e4)  # a column vector: cheap to keep
    delta = tl.zeros_like(y_pen)
    Q = tl.where(A > 0.0, 1.0, 0.0)  # T = 1 on the joint-valid entries
    for _ in range(steps):
        Q = A * Q
        for _ in range(k):
            delta = 1.0 / (y_len * _col_sum(Q * sigma) + y_pen)
            row_sum = x_len * _row_sum(Q * delta)
            sigma = 1.0 / (row_sum + tl.where(row_sum == 0.0, 1e4, 0.0))
        Q = delta * Q * sigma  # the plan T of this step
    return Q


@triton.jit
def _ipot_log_iterations(log_a, log_sigma, log_delta, x_len, y_len, steps, k):
    # The same loop in the log domain, base 2 (log2 A = -shifted cost * log2(e) / beta, -inf off
    # the joint-valid entries): delta and sigma from log-sum-exps, log T = log delta + log Q +
    # log sigma. An invalid row or column has an LSE of -inf and keeps a scaling of -inf.
    log_x_len = tl.log2(tl.maximum(x_len, 1.0))
    log_y_len = tl.log2(tl.maximum(y_len, 1.0))
    log_q = tl.where(log_a > float("-inf"), 0.0, float("-inf"))  # log T = 0 where A > 0, as T = 1
    for _ in range(steps):
        log_q = log_a + log_q
        for _ in range(k):
            col = _lse(log_q + log_sigma, COLUMNS)
            log_delta = tl.where(col > float("-inf"), -log_y_len - col, float("-inf"))
            row = _lse(log_q + log_delta, ROWS)
            log_sigma = tl.where(row > float("-inf"), -log_x_len - row, float("-inf"))
        log_q = log_delta + log_q + log_sigma  # log T of this step
    return tl.exp2(log_q)  # 0 off the joint-valid entries (log Q = -inf there)


@triton.jit
def _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k):
    # IPOT's plan of the cost tile C (read on the joint-valid entries only), zero elsewhere.
    # The cost is shifted first (reference.ipot_shifts: each column's minimum, then each row's,
    # subtracted; the row shift moves into the initial sigma), which leaves the plan unchanged
    # and puts a 1 of A in every valid row and column; a tile whose shifted cost still spans
    # more than IPOT_LOG_DOMAIN_ABOVE * beta is iterated in the log domain.
    # Off the joint-valid entries the shifted cost is +inf (A = exp(-inf) = 0), so that the
    # mask tile need not outlive the shift.
    column = _col_min(tl.where(joint, C, float("inf")))
    shifted = tl.where(joint, C - column, float("inf"))
    row = _row_min(shifted)
    row = tl.where(row < float("inf"), row, 0.0)  # rows without a valid column
    shifted = shifted - row
    x_len = tl.sum(x_valid.to(tl.float32))
    y_len = tl.sum(y_valid.to(tl.float32))
    # An empty problem (no valid row or column) skips the loop and stays all-zero, as UNITER's
    # final masking leaves it (instead of iterating on 1/0).
    steps = tl.where((x_len > 0) & (y_len > 0), iters, 0)
    to_log2 = LOG2E / beta
    if tl.max(tl.where(shifted < float("inf"), shifted, 0.0)) / beta > IPOT_LOG_DOMAIN_ABOVE:
        log_sigma = tl.where(x_valid, -row * to_log2 - tl.log2(tl.maximum(x_len, 1.0)), float("-inf"))
        log_delta = tl.where(y_valid, 0.0, float("-inf"))
        T = _ipot_log_iterations(-shifted * to_log2, log_sigma, log_delta, x_len, y_len, steps, k)
    else:
        sigma = tl.where(x_valid, tl.exp2(-row * to_log2) / tl.maximum(x_len, 1.0), 0.0)
        T = _ipot_iterations(tl.exp2(-shifted * to_log2), sigma, y_valid, x_len, y_len, steps, k)
    return T  # zero off the joint-valid entries (A = 0 there)


@triton.jit
def _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    rows, cols = _tile_index(BLOCK_M, BLOCK_N, LANES)
    x_valid = tl.load(x_mask + problem * M + rows, mask=rows < M, other=0) != 0
    y_valid = tl.load(y_mask + problem * N + cols, mask=cols < N, other=0) != 0
    return rows, cols, x_valid, y_valid


@triton.jit
def _ipot_kernel(
    cost, x_mask, y_mask, plan,
    M, N, stride_cb, stride_cm, stride_cn,
    beta, iters, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # next powers of two of M and N: the register tile
    LANES: tl.constexpr,  # min(32, BLOCK_N): the tile's last axis (see the module's docstring)
):
    """IPOT plan of problem program_id(0) (grid (B,), launch_grid). Concurrency: it reads only
    its problem's cost and masks and writes only its problem's plan, each element once; no dot."""
    problem = tl.program_id(0).to(tl.int64)
    rows, cols, x_valid, y_valid = _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M, BLOCK_N, LANES)
    joint = x_valid & y_valid
    C = tl.load(cost + problem * stride_cb + rows * stride_cm + cols * stride_cn, mask=joint, other=0.0)
    T = _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k)  # zero off the joint-valid entries
    tl.store(plan + problem * M * N + rows * N + cols, T, mask=(rows < M) & (cols < N))


@triton.jit
def _cosine_cost(txt, img, x_mask, y_mask, problem, M, N, D, stride_tb, stride_tm, stride_ib, stride_in,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # C = 1 - <x, y> / (max(|x|, eps) max(|y|, eps)) of one problem's valid tokens, a plain
    # [BLOCK_M, BLOCK_N] tile (1 on padding: padded tokens are never read, their dot is 0).
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    x_valid = tl.load(x_mask + problem * M + rows, mask=rows < M, other=0) != 0
    y_valid = tl.load(y_mask + problem * N + cols, mask=cols < N, other=0) != 0
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
        x = tl.load(txt_rows + d[None, :], mask=x_valid[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(img_cols + d[:, None], mask=d_ok[:, None] & y_valid[None, :], other=0.0)
        dots = tl.dot(x, y, dots, input_precision=DOT_PRECISION)  # x and y feed the dot only
    x_inv = 1.0 / tl.maximum(tl.sqrt(x_sq), 1e-5)  # F.normalize's eps, as UNITER
    y_inv = 1.0 / tl.maximum(tl.sqrt(y_sq), 1e-5)
    return 1.0 - dots * x_inv[:, None] * y_inv[None, :], rows, cols


@triton.jit
def _wra_kernel(
    txt, img, x_mask, y_mask, plan, distance,
    M, N, D, stride_tb, stride_tm, stride_ib, stride_in,
    beta, iters, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LANES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """WRA distance of problem program_id(0) (grid (B,), launch_grid): cost C = 1 - <x, y> /
    (max(|x|, eps) max(|y|, eps)) from a tl.dot over D (fp32 accumulation; 16-bit operands are
    multiplied exactly), IPOT on it, then the plan (kept for the backward) and distance =
    sum(C * T). The cost is formed twice, before the iterations and after the plan is stored,
    for the sum with the plan read back: D-loops over the problem's embeddings and a reread of
    its plan instead of a cost tile held through the iterations and the plan through a dot.
    Concurrency: reads only its problem's embeddings and masks and, after a block barrier, the
    plan rows it wrote itself; writes only its problem's plan (each element once) and
    distance[problem]; the x / y tiles of the pipelined dot loops feed the dot alone (the norms
    reload them in their own loop, triton#6691)."""
    problem = tl.program_id(0).to(tl.int64)
    C, _, _ = _cosine_cost(txt, img, x_mask, y_mask, problem, M, N, D, stride_tb, stride_tm, stride_ib, stride_in,
                           BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    C = tl.reshape(C, (BLOCK_M, BLOCK_N // LANES, LANES))  # the iterations' tile shape
    rows, cols, x_valid, y_valid = _load_masks(x_mask, y_mask, problem, M, N, BLOCK_M, BLOCK_N, LANES)
    joint = x_valid & y_valid
    T = _ipot_plan(C, joint, x_valid, y_valid, beta, iters, k)
    problem_plan = plan + problem * M * N
    tl.store(problem_plan + rows * N + cols, T, mask=(rows < M) & (cols < N))
    tl.debug_barrier()  # the plan's stores are visible to every thread of the program
    C, rows2, cols2 = _cosine_cost(txt, img, x_mask, y_mask, problem, M, N, D, stride_tb, stride_tm, stride_ib,
                                   stride_in, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    T = tl.load(problem_plan + rows2[:, None] * N + cols2[None, :], mask=(rows2 < M)[:, None] & (cols2 < N)[None, :],
                other=0.0)
    tl.store(distance + problem, tl.sum(C * T))  # T = 0 off the joint-valid entries


@triton.jit
def _sinkhorn_kernel(
    cost, a, b, plan,
    M, N, stride_cb, stride_cm, stride_cn,
    reg, iters, tol,  # tol < 0: run every iteration, no marginal error computed
    log_domain,  # a runtime flag: one compiled kernel serves both iterations
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr,
):
    # Concurrency: one program per problem (grid (B,), launch_grid), reading only its problem's
    # cost and marginals, writing only its problem's plan, each element once; no dot.
    # Columns then rows per iteration (POT's order); a and b are zero off the support. In the
    # log domain the tile holds K = -C log2(e) / reg and f, g are base-2 potentials; otherwise
    # the tile holds exp(-C/reg) and f, g are the scalings u, v. Off the support K is -inf (0),
    # log a and log b are -inf (a, b are 0), so f and g are -inf (0) there and the plan is 0
    # without a mask. With tol >= 0 a problem stops once the L2 norm of its column-marginal
    # error is <= tol (it idles through the remaining iterations).
    problem = tl.program_id(0).to(tl.int64)
    rows, cols = _tile_index(BLOCK_M, BLOCK_N, LANES)
    mass_a = tl.load(a + problem * M + rows, mask=rows < M, other=0.0)
    mass_b = tl.load(b + problem * N + cols, mask=cols < N, other=0.0)
    joint = (mass_a > 0.0) & (mass_b > 0.0)
    C = tl.load(cost + problem * stride_cb + rows * stride_cm + cols * stride_cn, mask=joint, other=0.0)
    scaled = -C * (LOG2E / reg)
    if log_domain != 0:
        K = tl.where(joint, scaled, float("-inf"))
        row_mass = tl.log2(mass_a)  # -inf off the support (log2(0))
        col_mass = tl.log2(mass_b)
        f = tl.where(row_mass > float("-inf"), 0.0, float("-inf"))
        col = _lse(K + f, COLUMNS)  # LSE_i(K_ij + f_i)
    else:
        K = tl.where(joint, tl.exp2(scaled), 0.0)
        row_mass = mass_a
        col_mass = mass_b
        f = tl.where(mass_a > 0.0, 1.0, 0.0)
        col = _col_sum(K * f)  # sum_i K_ij u_i
    g = tl.zeros_like(col)
    err = float("inf")
    for _ in range(iters):
        if err > tol:
            if log_domain != 0:
                # -inf - (-inf) off the support: the maxima turn an LSE of -inf into the most
                # negative float, so the potential stays -inf there
                g = col_mass - tl.maximum(col, -3.0e38)
                f = row_mass - tl.maximum(_lse(K + g, ROWS), -3.0e38)
                col = _lse(K + f, COLUMNS)
            else:
                g = col_mass / tl.where(col_mass > 0.0, col, 1.0)
                row = _row_sum(K * g)
                f = row_mass / tl.where(row_mass > 0.0, row, 1.0)
                col = _col_sum(K * f)
            if tol >= 0:
                if log_domain != 0:
                    marginal = tl.exp2(g + col)
                else:
                    marginal = g * col
                err = tl.sqrt(tl.sum((marginal - mass_b) * (marginal - mass_b)))
    if log_domain != 0:
        result = tl.exp2(K + f + g)
    else:
        result = f * K * g
    tl.store(plan + problem * M * N + rows * N + cols, result, mask=(rows < M) & (cols < N))
