"""Batched optimal transport for vision-language alignment: UNITER's IPOT, its word-region
alignment (WRA) distance, entropic Sinkhorn, and Gromov-Wasserstein (Graph Optimal Transport).

UNITER and ViLT run 50 IPOT iterations over a batch of small ragged text x region problems
every ITM step; the original is a Python loop of ~10 torch ops per iteration. Here one launch
solves the batch: one program (Triton) or thread block (CUDA) per problem keeps the problem's
matrices in registers / shared memory through all iterations; on the CPU, OpenMP threads take
the problems and SIMD loops sweep them (csrc/). The WRA kernels also form the cosine cost from
the embeddings (Triton: a tl.dot per tile; C++: register-blocked dot products of the valid
tokens), so the cost matrix never exists in memory.

Backends: ``triton`` (CUDA, or CPU tensors in the interpreter), ``cuda`` and ``cpp`` (the
compiled extension vlkernels._C), ``torch`` (the reference). ``auto`` runs Triton on CUDA
tensors (the CUDA kernel only at the tiles of AUTO_CUDA_TILES, where a GPU benchmark measured it faster;
none yet) and the C++ kernel on
CPU tensors. Every backend computes in fp32 (16-bit inputs are cast in); fp64 inputs run on the
torch backend in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from vlkernels import _backend, _extension
from vlkernels._backend import Implementation
from vlkernels.ops._checks import check_value, reads_on_host
from vlkernels.ops._variants import KernelVariant
from vlkernels.reference import optimal_transport as reference

try:
    from vlkernels.ops._optimal_transport_kernels import _ipot_kernel, _sinkhorn_kernel, _wra_kernel
except ImportError:  # no triton: the torch and C++ backends still work; the triton backend refuses with the reason
    pass

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORMALIZE_EPS = reference.NORMALIZE_EPS


# ----------------------------------------------------------------------------------------------
# Tile configurations (shared by the launchers and the sm_90a report)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int


_MIN_BLOCK = 16  # tl.dot's least tile side (the WRA kernel); the other kernels share the table
_MAX_BLOCK = 256  # longest side a tile takes (256 regions / tokens)
_MAX_TILE = 16384  # elements of a [BLOCK_M, BLOCK_N] tile: three fp32 tiles of it stay in registers at 16 warps
_WRA_MAX_BLOCK_M = 64  # the WRA kernel's text side (UNITER <= 60, ViLT <= 40 tokens)
# The fused WRA kernel's largest tile. Beyond it (ViLT's 40 x 200 word-patch alignment: 64 x 256)
# the dot's accumulator beside the iterations' tiles spills in 8 warps, so the cost comes from a
# batched GEMM and the plan from the IPOT kernel.
_WRA_MAX_FUSED_TILE = 8192
# Up to this many elements a tile holds the WRA cost through the iterations (KEEP_COST); larger
# ones form it again after them (the cost tile beside the iterations' would spill).
_WRA_MAX_KEPT_COST = 1024
_WRA_BLOCK_D = 64  # D chunk of the cost's tl.dot
_WRA_BLOCK_D_FP32 = 32  # fp32 operands take twice the registers / shared memory per chunk


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Warps per problem. A batch that leaves SMs idle runs each problem on a thread per 16 tile
# elements (its iterations are latency-bound reductions). A batch of several problems per SM
# runs the 4096-element tiles on half as many warps (32 elements a thread), so that twice as many
# problems are resident and each pays fewer block barriers; smaller tiles have 4 warps or fewer
# already, and the 8192- and 16384-element ones need their 8 warps for registers. At most 8 warps:
# every tile up to 16384 elements keeps its iteration tiles in registers there without spilling
# (vlkernels.report), where 16 warps cap a thread at 128 registers and spilled.
_LATENCY_ELEMENTS_PER_THREAD = 16
_THROUGHPUT_ELEMENTS_PER_THREAD = 32
_THROUGHPUT_MIN_WARPS = 4
_THROUGHPUT_PROBLEMS_PER_SM = 2  # from this many problems per SM on, the throughput regime
_MAX_WARPS = 8
_H100_SMS = 132  # the SM count assumed where the device has none (CPU tensors in the interpreter)


def tile_config(rows: int, cols: int, batch: int = 1, sm_count: int = _H100_SMS) -> TileConfig:
    """The tile (next powers of two, at least 16) and warps of a batch of rows x cols problems."""
    block_m, block_n = max(_MIN_BLOCK, _next_pow2(rows)), max(_MIN_BLOCK, _next_pow2(cols))
    tile = block_m * block_n
    warps = max(1, min(_MAX_WARPS, tile // (32 * _LATENCY_ELEMENTS_PER_THREAD)))
    if batch >= _THROUGHPUT_PROBLEMS_PER_SM * sm_count:
        warps = min(warps, max(_THROUGHPUT_MIN_WARPS, tile // (32 * _THROUGHPUT_ELEMENTS_PER_THREAD)))
    return TileConfig(block_m, block_n, warps)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _H100_SMS


def _launch_config(rows: int, cols: int, batch: int, device: torch.device) -> TileConfig:
    return tile_config(rows, cols, batch, _sm_count(device))


def _tile_refusal(rows: int, cols: int, max_block_m: int = _MAX_BLOCK) -> Optional[str]:
    cfg = tile_config(rows, cols)
    if cfg.block_m > max_block_m or cfg.block_n > _MAX_BLOCK or cfg.block_m * cfg.block_n > _MAX_TILE:
        return (f"a {rows} x {cols} problem needs a {cfg.block_m} x {cfg.block_n} register tile; the kernel holds "
                f"tiles up to {_MAX_TILE} elements, {max_block_m} rows and {_MAX_BLOCK} columns without spilling")
    return None


def all_tile_configs(max_block_m: int = _MAX_BLOCK) -> list[TileConfig]:
    """Every (tile, warps) a launcher can pick: each tile in both regimes (once where they agree)."""
    sides = [_MIN_BLOCK << i for i in range(5)]  # 16 .. 256
    configs = {}
    for m in sides:
        for n in sides:
            if m <= max_block_m and m * n <= _MAX_TILE:
                for batch in (1, _THROUGHPUT_PROBLEMS_PER_SM * _H100_SMS):
                    configs[tile_config(m, n, batch)] = None
    return list(configs)


def variant_label(cfg: TileConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}-w{cfg.num_warps}"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul flag, which governs UNITER's cost matmul (IEEE by default).
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def tile_lanes(block_n: int) -> int:
    """The last axis of the kernels' [BLOCK_M, BLOCK_N // LANES, LANES] tile (one warp's width)."""
    return min(32, block_n)


def _wra_block_d(dtype: torch.dtype, precision: str) -> int:
    if dtype != torch.float32:
        return _WRA_BLOCK_D
    # IEEE fp32 dots are FMA loops over operand chunks held in registers: 16-deep ones
    return _WRA_BLOCK_D_FP32 // 2 if precision == "ieee" else _WRA_BLOCK_D_FP32


def _wra_config(cfg: TileConfig, precision: str) -> TileConfig:
    # IEEE fp32 dots on one warp keep too many operands per thread (ptxas spills): two warps
    return TileConfig(cfg.block_m, cfg.block_n, 2) if precision == "ieee" and cfg.num_warps == 1 else cfg


# ptxas aims the 8-warp 4096-element tiles of the cost kernels at 80 registers (3 CTAs / SM) and
# spills there; a cap of 128 (2 CTAs / SM of 8 warps) leaves it room.
def _cost_kernel_max_registers(cfg: TileConfig) -> Optional[int]:
    return 128 if cfg.num_warps == _MAX_WARPS and cfg.block_m * cfg.block_n <= 4096 else None


# Likewise the WRA kernel's IEEE fp32 dots (FMA loops over operands held in registers): ptxas aims
# these tiles at an occupancy where they spill (sm_90a report); these caps (BLOCK_M, BLOCK_N,
# warps) -> registers leave them room.
_WRA_IEEE_MAX_REGISTERS = {(32, 128, 8): 168, (64, 64, 8): 168, (64, 16, 2): 200}


def _wra_max_registers(cfg: TileConfig, precision: str) -> Optional[int]:
    return _WRA_IEEE_MAX_REGISTERS.get((cfg.block_m, cfg.block_n, cfg.num_warps)) if precision == "ieee" else None


def launch_grid(batch: int) -> tuple[int]:
    """The launch grid of every OT kernel: one program per problem, on axis 0 (up to 2^31 - 1
    programs; CUDA's axes 1 and 2 stop at 65535, so nothing that grows with the data goes there)."""
    return (batch,)


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Triton launchers and custom ops
# ----------------------------------------------------------------------------------------------
def _launch_ipot(cost, x_mask, y_mask, beta, iters, k) -> torch.Tensor:
    batch, rows, cols = cost.shape
    cost = cost.float()  # 16-bit costs are cast in; fp32 passes through with its strides
    plan = torch.empty(batch, rows, cols, device=cost.device, dtype=torch.float32)
    cfg = _launch_config(rows, cols, batch, cost.device)
    if plan.numel() == 0:  # nothing to solve (and Triton takes no empty grid)
        return plan
    _ipot_kernel[launch_grid(batch)](cost, _as_bytes(x_mask), _as_bytes(y_mask), plan, rows, cols, *cost.stride(),
                           float(beta), int(iters), int(k), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           LANES=tile_lanes(cfg.block_n), num_warps=cfg.num_warps,
                           maxnreg=_cost_kernel_max_registers(cfg))
    return plan


def _launch_wra(txt, img, txt_mask, img_mask, beta, iters, k) -> tuple[torch.Tensor, torch.Tensor]:
    batch, rows, dim = txt.shape
    cols = img.shape[1]
    txt = txt if txt.stride(-1) == 1 else txt.contiguous()  # rows are read with unit stride along D
    img = img if img.stride(-1) == 1 else img.contiguous()
    plan = torch.empty(batch, rows, cols, device=txt.device, dtype=torch.float32)
    distance = torch.empty(batch, device=txt.device, dtype=torch.float32)
    precision = _dot_precision(txt.dtype)
    cfg = _wra_config(_launch_config(rows, cols, batch, txt.device), precision)
    if plan.numel() == 0:
        return distance.zero_(), plan
    if cfg.block_m * cfg.block_n > _WRA_MAX_FUSED_TILE:
        cost = reference.masked_cosine_cost(txt.float(), img.float(), txt_mask, img_mask)
        plan = _launch_ipot(cost, txt_mask, img_mask, beta, iters, k)
        return (cost * plan).sum((1, 2)), plan
    _wra_kernel[launch_grid(batch)](
        txt, img, _as_bytes(txt_mask), _as_bytes(img_mask), plan, distance, rows, cols, dim, txt.stride(0),
        txt.stride(1), img.stride(0), img.stride(1), float(beta), int(iters), int(k), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=_wra_block_d(txt.dtype, precision), LANES=tile_lanes(cfg.block_n),
        DOT_PRECISION=precision, KEEP_COST=cfg.block_m * cfg.block_n <= _WRA_MAX_KEPT_COST, num_warps=cfg.num_warps,
        maxnreg=_wra_max_registers(cfg, precision))
    return distance, plan


def _launch_sinkhorn(cost, a, b, reg, iters, tol, log_domain) -> torch.Tensor:
    batch, rows, cols = cost.shape
    cost = cost.float()
    plan = torch.empty(batch, rows, cols, device=cost.device, dtype=torch.float32)
    cfg = _launch_config(rows, cols, batch, cost.device)
    if plan.numel() == 0:
        return plan
    _sinkhorn_kernel[launch_grid(batch)](cost, a.contiguous(), b.contiguous(), plan, rows, cols, *cost.stride(), float(reg),
                               int(iters), float(tol), int(bool(log_domain)), BLOCK_M=cfg.block_m,
                               BLOCK_N=cfg.block_n, LANES=tile_lanes(cfg.block_n), num_warps=cfg.num_warps,
                               maxnreg=_cost_kernel_max_registers(cfg))
    return plan


@torch.library.custom_op("vlkernels::ipot_triton", mutates_args=())
def _ipot_triton_op(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, beta: float, iters: int,
                    k: int) -> torch.Tensor:
    return _launch_ipot(cost, x_mask, y_mask, beta, iters, k)


@_ipot_triton_op.register_fake
def _(cost, x_mask, y_mask, beta, iters, k):
    return cost.new_empty(cost.shape, dtype=torch.float32)


@torch.library.custom_op("vlkernels::sinkhorn_triton", mutates_args=())
def _sinkhorn_triton_op(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float, iters: int, tol: float,
                        log_domain: bool) -> torch.Tensor:
    return _launch_sinkhorn(cost, a, b, reg, iters, tol, log_domain)


@_sinkhorn_triton_op.register_fake
def _(cost, a, b, reg, iters, tol, log_domain):
    return cost.new_empty(cost.shape, dtype=torch.float32)


@torch.library.custom_op("vlkernels::wra_distance_triton", mutates_args=())
def _wra_triton_op(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor, img_mask: torch.Tensor, beta: float,
                   iters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_wra(txt, img, txt_mask, img_mask, beta, iters, k)


def _wra_fake(txt, img, txt_mask, img_mask, beta, iters, k):
    batch, rows, cols = txt.shape[0], txt.shape[1], img.shape[1]
    return txt.new_empty(batch, dtype=torch.float32), txt.new_empty(batch, rows, cols, dtype=torch.float32)


_wra_triton_op.register_fake(_wra_fake)


# ----------------------------------------------------------------------------------------------
# The compiled extension (csrc/): torch ops vlkernels::ot_ipot, ot_sinkhorn, ot_wra, ot_wra_backward
# ----------------------------------------------------------------------------------------------
_native_state: Optional[tuple] = None  # (torch.ops.vlkernels or None,) once decided; a plain global for torch.compile


def _native_ops():
    """torch.ops.vlkernels with the extension's OT ops (their fakes registered), or None."""
    global _native_state
    if _native_state is None:
        _native_state = (_load_native_ops(),)
    return _native_state[0]


def _load_native_ops():
    if _extension.extension() is None:
        return None
    ops = torch.ops.vlkernels
    if not hasattr(ops, "ot_ipot"):
        return None
    # The kernels take contiguous float32 tensors and return new contiguous float32 ones.
    torch.library.register_fake("vlkernels::ot_ipot")(lambda cost, *_: cost.new_empty(cost.shape))
    torch.library.register_fake("vlkernels::ot_sinkhorn")(lambda cost, *_: cost.new_empty(cost.shape))
    torch.library.register_fake("vlkernels::ot_wra")(
        lambda txt, img, *_: (txt.new_empty(txt.shape[0]), txt.new_empty(txt.shape[0], txt.shape[1], img.shape[1])))
    torch.library.register_fake("vlkernels::ot_wra_backward")(
        lambda txt, img, *_: (txt.new_empty(txt.shape), img.new_empty(img.shape)))
    return ops


# torch.compile takes the answer as a constant (it runs the function once while tracing): the
# extension's lazy loader (lru_cache, import) cannot be traced, and its answer does not change.
@torch.compiler.assume_constant_result
def _native_refusal(cuda: bool = False) -> Optional[str]:
    """Why the extension's OT ops cannot run (None when they can); cuda: its CUDA kernels are needed."""
    why = _extension.unavailable_reason()
    if why is None and _native_ops() is None:
        why = "vlkernels._C was built before the optimal-transport kernels existed; rebuild it"
    if why is None and cuda and not _extension.has_cuda_kernels():
        why = "vlkernels._C was built without CUDA"
    return why


def _dtype_refusal(dtype: torch.dtype) -> Optional[str]:
    return None if dtype in _KERNEL_DTYPES else f"the kernels compute in fp32; {dtype} runs on the torch backend"


# Where `auto` runs the CUDA kernel on CUDA tensors instead of Triton: per op, the tiles
# (BLOCK_M, BLOCK_N of tile_config) at which the GPU check's benchmark (bench/gpu_check.sh runs
# vlkernels/bench/optimal_transport.py, providers vlkernels[cuda] and vlkernels[triton]) measured
# the CUDA kernel faster. Empty until a GPU run has measured them: the CUDA kernel stays opt-in
# (VLKERNELS_BACKEND=cuda) and `auto` runs Triton.
AUTO_CUDA_TILES: dict[str, frozenset] = {"ipot": frozenset(), "sinkhorn": frozenset(), "wra_distance": frozenset()}


def auto_runs_cuda(op: str, rows: int, cols: int) -> bool:
    """Whether `auto` picks the CUDA kernel over Triton for a rows x cols problem of ``op``."""
    cfg = tile_config(rows, cols)
    return (cfg.block_m, cfg.block_n) in AUTO_CUDA_TILES[op]

# Floats of one problem's matrix a CUDA block holds (csrc/cuda/optimal_transport.h kMax*Tile).
_CUDA_MAX_TILE = {"ipot": 24576, "sinkhorn": 49152}


def _cuda_refusal(op: str, device: torch.device, dtype: torch.dtype, rows: int, cols: int,
                  max_tile: int) -> Optional[str]:
    # The cheap tests first: under auto (and torch.compile) the extension is never touched.
    if device.type != "cuda":
        return "not a CUDA tensor"
    if _backend.requested_backend() == "auto" and not auto_runs_cuda(op, rows, cols):
        return (f"auto runs the Triton kernel at this tile (AUTO_CUDA_TILES[{op!r}] names where the CUDA kernel "
                "measured faster); request backend 'cuda' for the CUDA kernel")
    if rows * (-(-cols // 32) * 32) > max_tile:
        return (f"a {rows} x {cols} problem needs more shared memory than a block has "
                f"(rows x cols rounded up to 32 must be <= {max_tile})")
    return _dtype_refusal(dtype) or _native_refusal(cuda=True)


def _cpp_refusal(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return "not a CPU tensor"
    return _dtype_refusal(dtype) or _native_refusal()


def _triton_refusal(device: torch.device, dtype: torch.dtype, rows: int, cols: int,
                    max_block_m: int = _MAX_BLOCK) -> Optional[str]:
    return _backend.triton_refusal(device) or _dtype_refusal(dtype) or _tile_refusal(rows, cols, max_block_m)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _cost_implementations(op: str, native, triton_op, torch_run) -> list[Implementation]:
    """The backends of an op whose first argument is the cost [B, M, N]."""
    return [
        Implementation("cuda", lambda cost, *_: _cuda_refusal(op, cost.device, cost.dtype, *cost.shape[1:],
                                                              _CUDA_MAX_TILE[op]), native),
        Implementation("triton", lambda cost, *_: _triton_refusal(cost.device, cost.dtype, *cost.shape[1:]), triton_op),
        Implementation("cpp", lambda cost, *_: _cpp_refusal(cost.device, cost.dtype), native),
        Implementation("torch", lambda *_: None, torch_run),
    ]


# ----------------------------------------------------------------------------------------------
# WRA autograd (shared by every kernel backend): d distance / d C = T, through the cosine cost
# ----------------------------------------------------------------------------------------------
def wra_input_grads(txt, img, plan, grad_distance, txt_mask, img_mask):
    """Gradients of distance = sum(C * plan) (plan fixed) w.r.t. txt [B, M, D] and img [B, N, D],
    C = 1 - x_hat y_hat^T with x_hat = x / max(|x|, eps), in fp32 (fp64 for fp64).

    With S = grad * plan / (max(|x_i|, eps) max(|y_j|, eps)):
      d/dx_i = -(S y)_i + [|x_i| > eps] ((S y)_i . x_i) x_i / max(|x_i|, eps)^2
    (the normalisation's Jacobian, folded so that neither x_hat nor y_hat is materialised and
    each gradient takes one GEMM and two passes), and likewise for y with S^T. Differentiable
    when grad mode is on (double backward, with the plan constant)."""
    acc = torch.float64 if txt.dtype == torch.float64 else torch.float32
    # padded tokens may hold anything (NaN): zeroed, they give 0 gradients and touch no valid one
    x = txt.to(acc).masked_fill(~txt_mask[..., None], 0)
    y = img.to(acc).masked_fill(~img_mask[..., None], 0)
    x_len, y_len = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    x_inv, y_inv = 1 / x_len.clamp_min(_NORMALIZE_EPS), 1 / y_len.clamp_min(_NORMALIZE_EPS)
    scaled = plan.to(acc) * (grad_distance.to(acc)[:, None, None] * x_inv[:, :, None]) * y_inv[:, None, :]

    # Under create_graph (double backward) the same formula out of place, so that autograd can
    # differentiate it (the plan stays a constant, as in the reference).
    differentiable = torch.is_grad_enabled()

    def gradient(weights, source, target, length, inv):
        grad = torch.bmm(weights, source)  # -d/d target_hat, already divided by max(|target|, eps)
        grad = -grad if differentiable else grad.neg_()
        radial = torch.where(length > _NORMALIZE_EPS, torch.linalg.vecdot(grad, target) * inv * inv, 0)
        if differentiable:
            return grad - target * radial[..., None]
        return grad.addcmul_(target, radial[..., None], value=-1)

    return (gradient(scaled, y, x, x_len, x_inv).to(txt.dtype),
            gradient(scaled.transpose(1, 2), x, y, y_len, y_inv).to(img.dtype))


def _wra_setup_context(ctx, inputs, output):
    txt, img, txt_mask, img_mask = inputs[:4]
    ctx.save_for_backward(txt, img, txt_mask, img_mask, output[1])
    ctx.mark_non_differentiable(output[1])  # the plan is detached, as in UNITER


def _wra_backward(ctx, grad_distance, grad_plan):
    txt, img, txt_mask, img_mask, plan = ctx.saved_tensors
    grad_txt = grad_img = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_txt, grad_img = wra_input_grads(txt, img, plan, grad_distance, txt_mask, img_mask)
    return grad_txt, grad_img, None, None, None, None, None


torch.library.register_autograd("vlkernels::wra_distance_triton", _wra_backward, setup_context=_wra_setup_context)


@torch.library.custom_op("vlkernels::wra_distance_native", mutates_args=())
def _wra_native_op(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor, img_mask: torch.Tensor, beta: float,
                   iters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # CPU: the kernel forms the cost of the valid entries itself (register-blocked dot products)
    # and runs IPOT on it; CUDA: the similarities come from cuBLAS, the kernel does the rest.
    return torch.ops.vlkernels.ot_wra(_f32(txt), _f32(img), txt_mask.contiguous(), img_mask.contiguous(),
                                      float(beta), int(iters), int(k))


def _wra_native_setup_context(ctx, inputs, output):
    txt, img, txt_mask, img_mask = inputs[:4]
    ctx.save_for_backward(txt, img, txt_mask, img_mask, output[1])
    ctx.mark_non_differentiable(output[1])  # the plan is detached, as in UNITER


def _wra_native_backward(ctx, grad_distance, grad_plan):
    txt, img, txt_mask, img_mask, plan = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None, None
    # the C++ kernel (valid rows only, fused normalisation); CUDA, and double backward (create_graph:
    # the C++ op has no derivative of its own), use torch's GEMMs
    if txt.device.type == "cpu" and not torch.is_grad_enabled():
        grad_txt, grad_img = torch.ops.vlkernels.ot_wra_backward(
            _f32(txt), _f32(img), txt_mask.contiguous(), img_mask.contiguous(), plan.contiguous(), _f32(grad_distance))
        grad_txt, grad_img = grad_txt.to(txt.dtype), grad_img.to(img.dtype)
    else:
        grad_txt, grad_img = wra_input_grads(txt, img, plan, grad_distance, txt_mask, img_mask)
    return grad_txt, grad_img, None, None, None, None, None


_wra_native_op.register_fake(_wra_fake)
torch.library.register_autograd("vlkernels::wra_distance_native", _wra_native_backward,
                                setup_context=_wra_native_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
# beta / reg below this: the kernels' fp32 cost / beta (and 1 / beta) would overflow or divide by
# a denormal. Down to it IPOT is exact (its log-domain iteration has no lower limit on beta).
_MIN_SCALE = 1e-30


def _check_positive(name: str, value: float) -> None:
    # value - value == 0 is math.isfinite (NaN and +-inf give NaN) without a math.* call, which
    # torch.compile(dynamic=True) cannot trace on a module's beta made a symbolic float.
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0 and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value < _MIN_SCALE:
        raise ValueError(f"{name} must be >= {_MIN_SCALE:g} (the kernels divide the cost by it in fp32), got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_mask(op: str, name: str, mask: Optional[torch.Tensor], shape: tuple, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor (True = valid), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the inputs are on {device}")
    return mask


def _check_cost(op: str, cost: torch.Tensor) -> None:
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3:
        raise ValueError(f"{op}: cost must be a [B, M, N] tensor, got "
                         f"{tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__}")
    if not cost.dtype.is_floating_point:
        raise TypeError(f"{op}: cost must be floating point, got {cost.dtype}")


def _check_finite_cost(op: str, cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor) -> None:
    # One device-side reduction: padding may hold anything, valid entries may not. Read on the
    # host only in strict mode; by default checked in place (vlkernels.ops._checks).
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    check_value((torch.isfinite(cost) | ~joint).all(),
                f"{op}: cost has non-finite (inf / nan) entries where both masks are valid")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _native_ipot(cost, x_mask, y_mask, beta, iters, k):
    return torch.ops.vlkernels.ot_ipot(_f32(cost), x_mask.contiguous(), y_mask.contiguous(), float(beta), int(iters),
                                       int(k))


_IPOT = _cost_implementations(
    "ipot", _native_ipot, _ipot_triton_op,
    lambda cost, x_mask, y_mask, beta, iters, k: reference.ipot(cost, x_mask, y_mask, beta=beta, iters=iters, k=k))


def ipot(cost: torch.Tensor, x_mask: Optional[torch.Tensor], y_mask: Optional[torch.Tensor], *, beta: float = 0.5,
         iters: int = 50, k: int = 1) -> torch.Tensor:
    """UNITER's IPOT (inexact proximal point OT), batched, in one launch.

    cost: [B, M, N] float (fp16 / bf16 are cast to fp32 in; fp64 runs on the torch backend);
    x_mask: [B, M], y_mask: [B, N] bool, True = valid (None = all valid).
    returns plan [B, M, N] float32 (float64 for float64 cost): UNITER's plan T transposed to the
    cost's [M, N] orientation, exactly its iteration (beta, iters, k inner rounds, sigma = 1/len
    on valid rows, pad penalties 1e4), zero on padding; all zero for a problem with no valid row
    or column. No gradient flows through the plan. Every backend subtracts each column's and
    then each row's minimum cost first (the same plan: the scalings absorb both), and iterates
    in the log domain where the shifted cost still exceeds 16 * beta, so any beta >= 1e-30 and
    any finite cost range give the float64 plan to fp32 rounding (no underflow to 0 / 0).
    A non-finite cost where both masks are valid is refused: by default checked on the device
    without a host read (RuntimeError with the message), in strict mode (VLKERNELS_VALUE_CHECKS
    / vlkernels.set_value_checks("host")) a ValueError before any launch.
    """
    _check_cost("ipot", cost)
    batch, rows, cols = cost.shape
    x_mask = _check_mask("ipot", "x_mask", x_mask, (batch, rows), cost.device)
    y_mask = _check_mask("ipot", "y_mask", y_mask, (batch, cols), cost.device)
    _check_positive("ipot: beta", beta)
    _check_count("ipot: iters", iters)
    _check_count("ipot: k", k)
    cost = cost.detach()
    _check_finite_cost("ipot", cost, x_mask, y_mask)
    with torch.no_grad():
        return _backend.dispatch("ipot", _IPOT, cost.device, cost, x_mask, y_mask, float(beta), iters, k)


_SCALING_FORM_MAX_EXPONENT = 50.0  # exp(+-50) and the scalings it implies stay well inside fp32


def _native_sinkhorn(cost, a, b, reg, iters, tol, log_domain):
    return torch.ops.vlkernels.ot_sinkhorn(_f32(cost), _f32(a), _f32(b), float(reg), int(iters), float(tol),
                                           bool(log_domain))


_SINKHORN = _cost_implementations(
    "sinkhorn", _native_sinkhorn, _sinkhorn_triton_op,
    lambda cost, a, b, reg, iters, tol, log_domain: reference.sinkhorn(
        cost, a, b, reg=reg, iters=iters, tol=None if tol < 0 else tol, log_domain=log_domain, stop_early=False))


def sinkhorn(cost: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *, reg: float,
             iters: int = 100, tol: Optional[float] = None, x_mask: Optional[torch.Tensor] = None,
             y_mask: Optional[torch.Tensor] = None, log_domain: bool = True) -> torch.Tensor:
    """Entropic optimal transport by Sinkhorn's iterations, batched, in one launch.

    cost: [B, M, N] float (16-bit cast to fp32 in; fp64 on the torch backend); a: [B, M] and
    b: [B, N] nonnegative marginals of equal mass per problem (default: uniform over the valid
    entries); x_mask [B, M] / y_mask [B, N] bool, True = valid (default all), padded entries'
    mass is ignored. reg > 0: the entropic regularisation.
    returns plan [B, M, N] float32 (float64 for float64 cost) minimising <P, C> - reg H(P) with
    P 1 = a, P^T 1 = b; zero off the support. On each problem it is POT's ``ot.sinkhorn(a, b, C,
    reg)`` (log_domain=False, the scaling iteration) or ``ot.sinkhorn_log`` (log_domain=True,
    stabilised in the log domain: use it for small reg), iterated alike: columns, then rows.
    log_domain=False holds exp(-cost / reg) in fp32 and refuses (see below) a cost with
    |cost| / reg > 50 on the support, where it would under/overflow.
    tol: stop a problem once the L2 norm of its column-marginal error is <= tol (checked after
    every iteration); None runs exactly ``iters`` iterations. No gradient flows.
    The value checks (finite cost on the support, finite nonnegative marginals of equal mass,
    the scaling form's |cost| / reg) run on the device by default, without a host read
    (RuntimeError with the message); strict mode (VLKERNELS_VALUE_CHECKS /
    vlkernels.set_value_checks("host")) raises their ValueError before any launch.
    """
    _check_cost("sinkhorn", cost)
    batch, rows, cols = cost.shape
    x_mask = _check_mask("sinkhorn", "x_mask", x_mask, (batch, rows), cost.device)
    y_mask = _check_mask("sinkhorn", "y_mask", y_mask, (batch, cols), cost.device)
    _check_positive("sinkhorn: reg", reg)
    _check_count("sinkhorn: iters", iters)
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"sinkhorn: tol must be None or a finite number >= 0, got {tol!r}")
    cost = cost.detach()
    for name, marginal, length in (("a", a, rows), ("b", b, cols)):
        if marginal is not None and (not isinstance(marginal, torch.Tensor) or tuple(marginal.shape) != (batch, length)
                                     or not marginal.dtype.is_floating_point or marginal.device != cost.device):
            got = tuple(marginal.shape) if isinstance(marginal, torch.Tensor) else type(marginal).__name__
            raise ValueError(f"sinkhorn: {name} must be a floating [{batch}, {length}] tensor on {cost.device}, "
                             f"got {got}")
    a, b, x_on, y_on = reference.sinkhorn_marginals(cost, a, b, x_mask, y_mask)
    joint = x_on[:, :, None] & y_on[:, None, :]
    # The data checks: non-finite cost on the support, negative or non-finite marginals, unequal
    # masses, a reg too small for the scaling form. By default each is checked in place (no
    # host read, RuntimeError); in strict mode the verdicts come to the host in one sync and the
    # first failing one raises its ValueError (vlkernels.ops._checks).
    mass_a, mass_b = a.sum(1), b.sum(1)
    flags = [(~torch.isfinite(cost) & joint).any(),
             ((a < 0) | ~torch.isfinite(a)).any() | ((b < 0) | ~torch.isfinite(b)).any(),
             ((mass_a > 0) & (mass_b > 0) & ((mass_a - mass_b).abs() > 1e-4 * torch.maximum(mass_a, mass_b))).any()]
    messages = ["sinkhorn: cost has non-finite (inf / nan) entries on the support",
                "sinkhorn: the marginals a and b must be finite and >= 0",
                "sinkhorn: a and b must carry the same mass in every problem (sum a = sum b over the valid entries)"]
    if not log_domain:
        # The scaling form holds exp(-C / reg) in fp32: beyond |C| / reg = 50 its kernel and
        # scalings leave fp32's range (NaN plans), where the log domain is exact.
        flags.append(((cost.abs() > _SCALING_FORM_MAX_EXPONENT * reg) & joint).any())
        messages.append(f"sinkhorn: reg={reg!r} is too small for log_domain=False on this cost: exp(-cost / reg) "
                        f"leaves fp32's range where |cost| / reg > {_SCALING_FORM_MAX_EXPONENT:g}; use "
                        "log_domain=True (the default, stable for any reg) or reg >= max |cost| / 50")
    verdicts = ~torch.stack(flags)
    if reads_on_host():
        verdicts = verdicts.cpu()  # the one sync of strict mode; check_value then reads host memory
    for ok, message in zip(verdicts, messages):
        check_value(ok, message)
    a, b = a.masked_fill(~x_on, 0), b.masked_fill(~y_on, 0)  # an empty problem has no support at all
    with torch.no_grad():
        return _backend.dispatch("sinkhorn", _SINKHORN, cost.device, cost, a, b, float(reg), iters,
                                 -1.0 if tol is None else float(tol), bool(log_domain))


def _wra_torch(txt, img, txt_mask, img_mask, beta, iters, k):
    cost = reference.masked_cosine_cost(txt, img, txt_mask, img_mask)
    plan = reference.ipot(cost.detach(), txt_mask, img_mask, beta=beta, iters=iters, k=k)
    return (cost * plan).sum((1, 2)), plan


def _wra_refusal_args(txt, img, *args):
    return txt.device, txt.dtype, txt.shape[1], img.shape[1]


_WRA = [
    Implementation("cuda", lambda *args: _cuda_refusal("wra_distance", *_wra_refusal_args(*args),
                                                       _CUDA_MAX_TILE["ipot"]),
                   _wra_native_op),
    Implementation("triton", lambda *args: _triton_refusal(*_wra_refusal_args(*args), max_block_m=_WRA_MAX_BLOCK_M),
                   _wra_triton_op),
    Implementation("cpp", lambda txt, *args: _cpp_refusal(txt.device, txt.dtype), _wra_native_op),
    Implementation("torch", lambda *args: None, _wra_torch),
]


def _check_embeddings(op: str, txt, img, txt_mask, img_mask):
    for name, t in (("txt", txt), ("img", img)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be a floating [B, L, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if txt.shape[0] != img.shape[0] or txt.shape[2] != img.shape[2]:
        raise ValueError(f"{op}: txt {list(txt.shape)} and img {list(img.shape)} must share B and D")
    if txt.dtype != img.dtype:
        raise TypeError(f"{op}: txt is {txt.dtype} but img is {img.dtype}; cast one of them")
    if txt.device != img.device:
        raise ValueError(f"{op}: txt is on {txt.device} but img is on {img.device}")
    txt_mask = _check_mask(op, "txt_mask", txt_mask, tuple(txt.shape[:2]), txt.device)
    img_mask = _check_mask(op, "img_mask", img_mask, tuple(img.shape[:2]), img.device)
    return txt_mask, img_mask


def wra_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: Optional[torch.Tensor],
                 img_mask: Optional[torch.Tensor], *, beta: float = 0.5, iters: int = 50, k: int = 1,
                 return_plan: bool = False):
    """UNITER's word-region alignment distance (optimal_transport_dist), fused.

    txt: [B, M, D], img: [B, N, D] (same float dtype; 16-bit cast to fp32 in, fp64 on the torch
    backend); txt_mask [B, M], img_mask [B, N] bool, True = valid token (None = all valid).
    returns distance [B] float32 (float64 for float64 inputs) = sum_ij C_ij T_ij with
    C = 1 - cos(txt_i, img_j) (L2-normalised with eps 1e-5, 0 on padding) and T the IPOT plan
    of C (beta, iters, k as UNITER); with return_plan, (distance, plan [B, M, N]). The Triton
    kernel forms C from the embeddings in registers and the C++ kernel per problem in cache,
    for the valid tokens only (C is never stored); the CUDA kernel takes the similarities from
    cuBLAS. Gradients reach txt and img through C only (T is detached, as in UNITER), computed
    by the C++ kernel on CPU tensors and by torch's batched GEMMs otherwise. A problem with no
    valid text or region gives 0 (and zero gradients).
    """
    txt_mask, img_mask = _check_embeddings("wra_distance", txt, img, txt_mask, img_mask)
    _check_positive("wra_distance: beta", beta)
    _check_count("wra_distance: iters", iters)
    _check_count("wra_distance: k", k)
    distance, plan = _backend.dispatch("wra_distance", _WRA, txt.device, txt, img, txt_mask, img_mask, float(beta),
                                       iters, k)
    return (distance, plan.detach()) if return_plan else distance


def gromov_wasserstein_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: Optional[torch.Tensor],
                                img_mask: Optional[torch.Tensor], *, beta: float = 0.1, iters: int = 5,
                                ot_iters: int = 20) -> torch.Tensor:
    """Graph Optimal Transport's Gromov-Wasserstein distance (GW_distance_uniform) with masks.

    txt: [B, M, D] (GOT's source X), img: [B, N, D]; masks [B, M] / [B, N] bool, True = valid.
    returns [B] float32 (float64 for float64 inputs). Intra-modal costs Cs = 1 - cos(txt, txt),
    Ct = 1 - cos(img, img); Cst = (Cs^2 p) 1^T + 1 (Ct^2 q)^T with p, q uniform over the valid
    tokens; gamma = p q^T, then ``iters`` rounds of C_g = Cst - 2 Cs gamma Ct^T solved by IPOT
    (``ot_iters`` iterations, beta; GOT scales the text rows first, so each round is vlkernels'
    ipot on C_g^T); distance = sum(C_g * gamma). The inner IPOTs run on the selected backend
    (one launch each); the small batched GEMMs are torch's. gamma is detached: gradients reach
    txt and img through Cs and Ct. Non-finite embeddings fail the inner ipot's value check
    (on the device by default, a ValueError in strict mode: VLKERNELS_VALUE_CHECKS /
    vlkernels.set_value_checks); no value is read on the host by default.
    """
    txt_mask, img_mask = _check_embeddings("gromov_wasserstein_distance", txt, img, txt_mask, img_mask)
    _check_positive("gromov_wasserstein_distance: beta", beta)
    _check_count("gromov_wasserstein_distance: iters", iters)
    _check_count("gromov_wasserstein_distance: ot_iters", ot_iters)
    return reference.gromov_wasserstein_distance(
        txt, img, txt_mask, img_mask, beta=beta, iters=iters, ot_iters=ot_iters,
        ipot_fn=lambda cost, x_mask, y_mask, beta, iters: ipot(cost, x_mask, y_mask, beta=beta, iters=iters))


# ----------------------------------------------------------------------------------------------
# sm_90a report
# ----------------------------------------------------------------------------------------------
def aot_variants():
    """Every tile configuration the launchers can pick, with UNITER-B's sizes (B=512 ITM pairs,
    M=60 words, N=100 regions, D=768), for the sm_90a report."""
    cost_sizes = dict(M=60, N=100, stride_cb=6000, stride_cm=100, stride_cn=1, beta=0.5, iters=50, k=1)
    variants = []
    for cfg in all_tile_configs():
        label = variant_label(cfg)
        tile = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, LANES=tile_lanes(cfg.block_n))
        options = dict(num_warps=cfg.num_warps, maxnreg=_cost_kernel_max_registers(cfg))
        variants.append(KernelVariant(
            _ipot_kernel, label, tile, {"cost": torch.float32, "x_mask": torch.uint8, "y_mask": torch.uint8,
                                        "plan": torch.float32}, cost_sizes, options))
        variants.append(KernelVariant(
            _sinkhorn_kernel, label, tile,
            {"cost": torch.float32, "a": torch.float32, "b": torch.float32, "plan": torch.float32},
            dict(cost_sizes, reg=0.05, tol=1e-6, log_domain=1), options))
    wra_sizes = dict(M=60, N=100, D=768, stride_tb=60 * 768, stride_tm=768, stride_ib=100 * 768, stride_in=768,
                     beta=0.5, iters=50, k=1)
    fused = [cfg for cfg in all_tile_configs(_WRA_MAX_BLOCK_M) if cfg.block_m * cfg.block_n <= _WRA_MAX_FUSED_TILE]
    for tile in fused:
        for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                                 (torch.float32, "ieee")):
            cfg = _wra_config(tile, precision)
            variants.append(KernelVariant(
                _wra_kernel, f"{variant_label(cfg)}-{str(dtype)[6:]}-{precision}",
                dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_wra_block_d(dtype, precision),
                     LANES=tile_lanes(cfg.block_n), DOT_PRECISION=precision,
                     KEEP_COST=cfg.block_m * cfg.block_n <= _WRA_MAX_KEPT_COST),
                {"txt": dtype, "img": dtype, "x_mask": torch.uint8, "y_mask": torch.uint8, "plan": torch.float32,
                 "distance": torch.float32}, wra_sizes,
                dict(num_warps=cfg.num_warps, maxnreg=_wra_max_registers(cfg, precision)),
                # a warpgroup MMA needs 64 rows and 4 warps; smaller tiles use mma.sync
                gemm_shaped=cfg.block_m >= 64 and cfg.num_warps >= 4))
    return variants
