"""SOHO's visual dictionary: fused nearest-entry search and the moving-average update.

vd_nearest streams the codebook through a GEMM tile by tile and keeps a running minimum per
row, so the N x K distance matrix never exists in memory. vd_ema_update_ sorts the rows by
their entry and sums each entry's rows in one program (a segmented reduction: no atomics,
so it is deterministic), updates the cluster sizes and their total (torch, a launch of their
own), then applies SOHO's decay, Laplace smoothing and normalisation in one elementwise pass
that only reads them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from vlkernels import _backend, _extension
from vlkernels._backend import Implementation
from vlkernels.ops._checks import check_value, reads_on_host
from vlkernels.ops._variants import KernelVariant
from vlkernels.reference import visual_dictionary as reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; the triton backend refuses with the reason
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _vd_nearest_kernel(
        x, codebook, code_sqnorm, index_out, sqdist_out,
        rows, entries, dim, stride_x, stride_code,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Nearest entry of BLOCK_N rows of x, streaming the codebook BLOCK_K entries at a time.

        One loop runs over (codebook tile, feature chunk) pairs, so the software pipeliner keeps
        its loads in flight across codebook tiles: the next tile's first chunks arrive while a
        tile's running minimum is updated (a loop nest would drain and refill the pipeline once
        per codebook tile). The x chunk of each step comes from L2 again: a [BLOCK_N, D] x tile
        held on chip does not fit beside a pipelined codebook stream (see DESIGN_NOTES).

        Distance: |x|^2 + (|e|^2 - 2 x.e), the reference's expression, so NaN and inf arise in the
        same places; a NaN distance wins (the first NaN entry, distance NaN), else the lowest
        index of the minimum (torch.min's rule).

        Concurrency: program i alone writes rows [i*BLOCK_N, (i+1)*BLOCK_N) of index_out and
        sqdist_out and reads only x, codebook and code_sqnorm, which no program writes. The
        tiles loaded in the pipelined dot loop (a, e) feed tl.dot only: |x|^2 comes from its own
        loop before it and |e|^2 from code_sqnorm (triton-lang/triton#6691). Grid: 1-D,
        cdiv(N, BLOCK_N) programs on axis 0.
        """
        row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = row < rows
        x_rows = x + row.to(tl.int64)[:, None] * stride_x

        # |x|^2 in a loop of its own (no dot in it), so the dot loop's x tiles have one consumer.
        x_sqnorm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            tile = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & (d < dim)[None, :], other=0.0).to(tl.float32)
            x_sqnorm += tl.sum(tile * tile, axis=1)

        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
        first_nan = tl.zeros((BLOCK_N,), dtype=tl.int32) + entries  # entries = no NaN distance seen
        # At least one chunk per tile: with D = 0 every distance is |e|^2 = 0 (a tile of zero dots).
        chunks = tl.maximum(tl.cdiv(dim, BLOCK_D), 1)
        dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for step in range(0, tl.cdiv(entries, BLOCK_K) * chunks):
            chunk = step % chunks
            k = (step // chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = k < entries
            d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            a = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # int64 entry offsets: K * D may pass 2**31
            e = tl.load(codebook + k.to(tl.int64)[None, :] * stride_code + d[:, None],
                        mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            dots = tl.dot(a, e, dots, input_precision=DOT_PRECISION)
            if chunk == chunks - 1:  # the tile's dots are complete: fold them into the running minimum
                norms = tl.load(code_sqnorm + k, mask=k_ok, other=0.0)
                sqdist = x_sqnorm[:, None] + (norms[None, :] - 2.0 * dots)
                # NaN handled apart: tl.min and tl.argmin do not agree on it.
                is_nan = (sqdist != sqdist) & k_ok[None, :]
                first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, k[None, :], entries), axis=1))
                clean = tl.where(is_nan | ~k_ok[None, :], float("inf"), sqdist)
                tile_best = tl.min(clean, axis=1)
                # The first column at the tile's minimum (column k0, a real entry, when all are inf).
                tile_index = tl.min(tl.where(clean == tile_best[:, None], k[None, :], entries), axis=1)
                better = tile_best < best  # strict: an equal distance in a later tile keeps the lower index
                best = tl.where(better, tile_best, best)
                best_index = tl.where(better, tile_index, best_index)
                dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        has_nan = first_nan < entries
        tl.store(index_out + row, tl.where(has_nan, first_nan, best_index).to(tl.int64), mask=row_ok)
        tl.store(sqdist_out + row, tl.where(has_nan, float("nan"), best), mask=row_ok)

    @triton.jit
    def _vd_cluster_sums_kernel(
        x, order, offsets, sums, dim, stride_x,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Entry k's rows are order[offsets[k]:offsets[k+1]] (rows sorted by entry): their sum over
        BLOCK_D slices of the features, in a fixed order (deterministic, no atomics).

        Concurrency: program (k, j) alone writes sums[k, slices j, j + G, j + 2G, ...] (G =
        programs on axis 1) and reads only x, order and offsets, which no program writes. No
        tl.dot. Grid: (K, min(cdiv(D, BLOCK_D), 65535)), see _entry_grid.
        """
        entry = tl.program_id(0)
        begin = tl.load(offsets + entry)
        end = tl.load(offsets + entry + 1)
        for d0 in range(tl.program_id(1) * BLOCK_D, dim, tl.num_programs(1) * BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for r0 in range(begin, end, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < end
                source = tl.load(order + r, mask=r_ok, other=0)
                tile = tl.load(x + source[:, None] * stride_x + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                               other=0.0)
                acc += tl.sum(tile.to(tl.float32), axis=0)
            tl.store(sums + entry.to(tl.int64) * dim + d, acc, mask=d_ok)

    @triton.jit
    def _vd_apply_statistics_kernel(
        codebook, cluster_size, embed_avg, sums, cluster_total,
        entries, dim, decay, eps,
        BLOCK_D: tl.constexpr,
    ):
        """SOHO's step for entry k, given its new cluster_size[k] and their sum cluster_total
        (both written by earlier launches): embed_avg <- decay*embed_avg + (1-decay)*sums, and
        codebook = embed_avg / smoothed, except where smoothed is 0 (no row counted in any
        entry yet: total 0), where the codebook entry is kept (not written).

        Concurrency: program (k, j) alone reads and writes embed_avg / codebook[k, slices j,
        j + G, ...] (G = programs on axis 1); cluster_size, cluster_total and sums are only read,
        and no program of this launch writes them (the new cluster sizes are a separate launch:
        one program writing cluster_size[k] while another reads it was the double decay of
        issue 12). No tl.dot. Grid: (K, min(cdiv(D, BLOCK_D), 65535)), see _entry_grid.
        """
        entry = tl.program_id(0)
        size = tl.load(cluster_size + entry).to(tl.float32)
        total = tl.load(cluster_total).to(tl.float32)
        smoothed = (size + eps) / (total + entries * eps) * total
        for d0 in range(tl.program_id(1) * BLOCK_D, dim, tl.num_programs(1) * BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            offset = entry.to(tl.int64) * dim + d
            average = decay * tl.load(embed_avg + offset, mask=d_ok) + (1.0 - decay) * tl.load(sums + offset, mask=d_ok)
            tl.store(embed_avg + offset, average.to(embed_avg.dtype.element_ty), mask=d_ok)
            if smoothed != 0:  # also true for NaN: a NaN state propagates into the codebook
                tl.store(codebook + offset, (average / smoothed).to(codebook.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class NearestConfig:
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


# 128 rows x 128 entries per tile feed a Hopper warpgroup MMA; fp32 halves BLOCK_D for shared memory.
_NEAREST_CONFIGS = {
    torch.float16: NearestConfig(128, 128, 64, 8, 3),
    torch.bfloat16: NearestConfig(128, 128, 64, 8, 3),
    torch.float32: NearestConfig(128, 128, 32, 8, 3),
}
# IEEE fp32 dots run on the FMA units with the operands in registers: a 128 x 128 tile sits at
# 255 registers in the sm_90a report, 128 x 64 at 170.
_NEAREST_IEEE_FP32 = NearestConfig(128, 64, 32, 8, 3)


def _nearest_config(dtype: torch.dtype, precision: str) -> NearestConfig:
    return _NEAREST_IEEE_FP32 if dtype == torch.float32 and precision == "ieee" else _NEAREST_CONFIGS[dtype]

_SUMS_BLOCK_R, _SUMS_BLOCK_D, _SUMS_WARPS = 16, 256, 4
_APPLY_BLOCK_D, _APPLY_WARPS = 256, 4
# CUDA's launch limits: grid axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535.
_MAX_GRID_AXIS_0, _MAX_GRID_AXIS_1 = 2**31 - 1, 65535


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nearest_grid(rows: int, block_n: int) -> tuple[int]:
    """vd_nearest's launch grid: row blocks on axis 0 (the triton refusal keeps them under its limit)."""
    return (_cdiv(rows, block_n),)


def _entry_grid(entries: int, dim: int, block_d: int) -> tuple[int, int]:
    """The update kernels' grid: one entry per program on axis 0 (the triton refusal bounds K), feature
    slices on axis 1, at most 65535 of them; a program loops over every 65535th slice beyond that."""
    return (entries, min(_cdiv(dim, block_d), _MAX_GRID_AXIS_1))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows the flag of the torch matmul SOHO computes the distances with (IEEE by
    # default); 16-bit operands ignore it.
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


# The codebook's squared norms |e|^2 (fp32, [K]) of recent calls, so that a step's vd_nearest
# calls between two updates compute them once. Keyed by the codebook's memory (address, dtype,
# shape, strides, device); an entry is used only while the codebook's storage is alive (a weak
# reference: the cache never keeps a dropped codebook's memory, and memory freed and reused by
# another tensor cannot match a stale entry) and its version counter (tensor._version, shared by
# its views and detached aliases, bumped by every in-place torch op) is the one it was computed
# at. vd_ema_update_ drops the entry of the codebook it writes (its kernels write memory without
# a version bump). Writes that bypass torch (a user's own kernel on the raw pointer) are not seen:
# such code must call clear_codebook_norms(). A few entries at most, the oldest dropped first.
_NORMS_CACHE: "OrderedDict[tuple, tuple[StorageWeakRef, int, torch.Tensor]]" = OrderedDict()
_NORMS_CACHE_ENTRIES = 4


def _norms_key(codebook: torch.Tensor) -> tuple:
    return (codebook.data_ptr(), codebook.dtype, tuple(codebook.shape), codebook.stride(), codebook.device)


def codebook_sqnorms(codebook: torch.Tensor) -> torch.Tensor:
    """|e|^2 of every entry in fp32, from the cache while the codebook is unchanged. Never cached
    while a CUDA graph is being captured (a replay must recompute them)."""
    capturing = codebook.is_cuda and torch.cuda.is_current_stream_capturing()
    key = _norms_key(codebook)
    cached = None if capturing else _NORMS_CACHE.get(key)
    if cached is not None and not cached[0].expired() and cached[1] == codebook._version:
        _NORMS_CACHE.move_to_end(key)
        return cached[2]
    norms = codebook.float().square().sum(1)
    if not capturing:
        _NORMS_CACHE[key] = (StorageWeakRef(codebook.untyped_storage()), codebook._version, norms)
        _NORMS_CACHE.move_to_end(key)
        while len(_NORMS_CACHE) > _NORMS_CACHE_ENTRIES:
            _NORMS_CACHE.popitem(last=False)
    return norms


def clear_codebook_norms(codebook: Optional[torch.Tensor] = None) -> None:
    """Forget the cached squared norms of ``codebook`` (of every codebook when None)."""
    if codebook is None:
        _NORMS_CACHE.clear()
    else:
        _NORMS_CACHE.pop(_norms_key(codebook), None)


def _launch_nearest(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = x.shape
    entries = codebook.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    codebook = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    code_sqnorm = codebook_sqnorms(codebook)
    index = torch.empty(rows, device=x.device, dtype=torch.int64)
    sqdist = torch.empty(rows, device=x.device, dtype=torch.float32)
    precision = _dot_precision(x.dtype)
    cfg = _nearest_config(x.dtype, precision)
    if rows:  # no launch of an empty grid
        _vd_nearest_kernel[_nearest_grid(rows, cfg.block_n)](
            x, codebook, code_sqnorm, index, sqdist, rows, entries, dim, x.stride(0), codebook.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return index, sqdist


def _launch_cluster_statistics(x, index, entries, mask) -> tuple[torch.Tensor, torch.Tensor]:
    dim = x.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    bucket = index if mask is None else torch.where(mask, index, entries)  # masked rows go to a last bucket
    sorted_bucket, order = torch.sort(bucket, stable=True)  # stable: each entry sums its rows in input order
    # Entry k's rows are order[offsets[k]:offsets[k+1]]. searchsorted, not bincount: CUDA's
    # bincount reads the largest id on the host to size its output (a sync every step).
    bounds = torch.arange(entries + 1, device=x.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_bucket, bounds)
    counts = offsets.diff()
    sums = torch.empty(entries, dim, device=x.device, dtype=torch.float32)
    if dim:
        _vd_cluster_sums_kernel[_entry_grid(entries, dim, _SUMS_BLOCK_D)](
            x, order, offsets, sums, dim, x.stride(0), BLOCK_R=_SUMS_BLOCK_R, BLOCK_D=_SUMS_BLOCK_D,
            num_warps=_SUMS_WARPS,
        )
    return counts.float(), sums


def _launch_apply_statistics(codebook, cluster_size, embed_avg, counts, sums, decay, eps) -> None:
    entries, dim = codebook.shape
    # The new cluster sizes and their total first, in launches of their own: the kernel only
    # reads them (every feature slice of an entry needs its new size).
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    total = cluster_size.sum().reshape(1)
    if dim:
        _vd_apply_statistics_kernel[_entry_grid(entries, dim, _APPLY_BLOCK_D)](
            codebook, cluster_size, embed_avg, sums, total, entries, dim, float(decay), float(eps),
            BLOCK_D=_APPLY_BLOCK_D, num_warps=_APPLY_WARPS,
        )


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vlkernels::vd_nearest", mutates_args=())
def _nearest_op(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_nearest(x, codebook)


@_nearest_op.register_fake
def _(x, codebook):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("vlkernels::vd_cluster_statistics", mutates_args=())
def _cluster_statistics_op(
    x: torch.Tensor, index: torch.Tensor, entries: int, mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_cluster_statistics(x, index, entries, mask)


@_cluster_statistics_op.register_fake
def _cluster_statistics_fake(x, index, entries, mask):
    return x.new_empty(entries, dtype=torch.float32), x.new_empty(entries, x.shape[1], dtype=torch.float32)


@torch.library.custom_op("vlkernels::vd_apply_statistics_", mutates_args=("codebook", "cluster_size", "embed_avg"))
def _apply_statistics_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float,
) -> None:
    _launch_apply_statistics(codebook, cluster_size, embed_avg, counts, sums, decay, eps)


# The C++ kernels (vlkernels._C, pybind11 functions) wrapped as custom ops, so that torch.compile
# sees ops with fakes instead of opaque Python calls (a graph break).
@torch.library.custom_op("vlkernels::vd_cluster_statistics_cpp", mutates_args=())
def _cpp_cluster_statistics_op(
    x: torch.Tensor, index: torch.Tensor, entries: int, mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _extension.extension().vd_cluster_statistics(x.float().contiguous(), index.contiguous(), entries,
                                                        None if mask is None else mask.contiguous())


_cpp_cluster_statistics_op.register_fake(_cluster_statistics_fake)


@torch.library.custom_op("vlkernels::vd_apply_statistics_cpp_", mutates_args=("codebook", "cluster_size", "embed_avg"))
def _cpp_apply_statistics_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float,
) -> None:
    # The kernel takes contiguous float32 state (the cpp refusal guarantees it) and statistics.
    _extension.extension().vd_apply_statistics_(codebook, cluster_size, embed_avg, counts.contiguous(),
                                                sums.contiguous(), decay, eps)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")


def _triton_dtype_refusal(*tensors: torch.Tensor) -> Optional[str]:
    why = _backend.triton_refusal(tensors[0].device)
    for tensor in tensors:
        if why is None and tensor.dtype not in _SUPPORTED_DTYPES:
            why = f"dtype {tensor.dtype} is not one of float32, float16, bfloat16"
    return why


def _triton_nearest_refusal(x: torch.Tensor, codebook: torch.Tensor) -> Optional[str]:
    why = _triton_dtype_refusal(x, codebook)
    if why is None:
        block_n = _nearest_config(x.dtype, _dot_precision(x.dtype)).block_n
        if _nearest_grid(x.shape[0], block_n)[0] > _MAX_GRID_AXIS_0:
            why = f"{x.shape[0]} rows need more row blocks than a launch grid holds"
        elif codebook.shape[0] > 2**31 - 1:  # the kernel keeps entry indices in int32
            why = f"{codebook.shape[0]} entries exceed the kernel's int32 entry index"
    return why


_NEAREST = [
    Implementation("triton", _triton_nearest_refusal, _nearest_op),
    Implementation("torch", lambda *args: None, reference.vd_nearest),
]


def vd_nearest(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest dictionary entry of each feature by squared L2 distance.

    x: [N, D], codebook: [K, D] (same dtype and device)
    returns (index [N] int64, lowest index on ties; sqdist [N] float32, |x - codebook[index]|^2
    accumulated in fp32). The N x K distance matrix is never stored. No gradient flows (both
    outputs are detached from x and the codebook).

    Non-finite inputs propagate as torch.min does, on every backend: the distance is computed
    as |x|^2 + (|e|^2 - 2 x.e), and a row with a NaN distance to some entry (a NaN in the row
    or in the entry, or inf - inf from infinite values) gets the first such entry and sqdist
    NaN; a row whose distances are all +inf gets entry 0 and sqdist inf.
    """
    _check_matrix("vd_nearest: x", x)
    _check_matrix("vd_nearest: codebook", codebook)
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"vd_nearest: x has {x.shape[1]} features but the codebook has {codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("vd_nearest: the codebook is empty")
    if x.dtype != codebook.dtype:
        raise TypeError(f"vd_nearest: x is {x.dtype} but the codebook is {codebook.dtype}; cast one of them")
    if x.device != codebook.device:
        raise ValueError(f"vd_nearest: x is on {x.device} but the codebook is on {codebook.device}")
    x, codebook = x.detach(), codebook.detach()
    return _backend.dispatch("vd_nearest", _NEAREST, x.device, x, codebook)


def _triton_update(codebook, cluster_size, embed_avg, x, index, decay, eps, mask, sync, process_group):
    counts, sums = _cluster_statistics_op(x, index, codebook.shape[0], mask)
    reference.sum_across_processes(counts, sums, sync, process_group)
    _apply_statistics_op(codebook, cluster_size, embed_avg, counts, sums, decay, eps)


# torch.compile takes the answer as a constant (it runs the function once while tracing): the
# extension's lazy loader (lru_cache, import) cannot be traced, and its answer does not change.
@torch.compiler.assume_constant_result
def _extension_refusal() -> Optional[str]:
    return _extension.unavailable_reason()


def _triton_update_refusal(codebook, cluster_size, embed_avg, x, *rest) -> Optional[str]:
    why = _triton_dtype_refusal(codebook, x)
    if why is None and codebook.shape[0] > _MAX_GRID_AXIS_0:  # one entry per program on grid axis 0
        why = f"{codebook.shape[0]} entries exceed the launch grid's {_MAX_GRID_AXIS_0} programs"
    return why


def _cpp_refusal(codebook, cluster_size, embed_avg, x, *rest) -> Optional[str]:
    why = _extension_refusal()
    if why is None and codebook.device.type != "cpu":
        why = "the C++ kernels take CPU tensors"
    if why is None and any(t.dtype != torch.float32 for t in (codebook, cluster_size, embed_avg)):
        why = "the C++ kernels keep a float32 codebook, cluster_size and embed_avg"
    return why


def _cpp_update(codebook, cluster_size, embed_avg, x, index, decay, eps, mask, sync, process_group):
    counts, sums = _cpp_cluster_statistics_op(x, index, codebook.shape[0], mask)
    reference.sum_across_processes(counts, sums, sync, process_group)
    _cpp_apply_statistics_op(codebook, cluster_size, embed_avg, counts, sums, decay, eps)


_UPDATE = [
    Implementation("cpp", _cpp_refusal, _cpp_update),
    Implementation("triton", _triton_update_refusal, _triton_update),
    Implementation("torch", lambda *args: None,
                   lambda codebook, cluster_size, embed_avg, x, index, decay, eps, mask, sync, process_group:
                   reference.vd_ema_update_(codebook, cluster_size, embed_avg, x, index, decay=decay, eps=eps,
                                            mask=mask, sync=sync, process_group=process_group)),
]


def vd_ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    decay: float,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    sync: bool = True,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> None:
    """SOHO's moving-average dictionary update, in place.

    codebook: [K, D], cluster_size: [K] float32, embed_avg: [K, D] float32 (updated in place);
    x: [N, D] features, index: [N] int64 their entries (from vd_nearest), mask: [N] bool rows
    to count (None = all). With counts c and sums s of this step's rows per entry:
    cluster_size = d*cluster_size + (1-d)*c; embed_avg = d*embed_avg + (1-d)*s;
    codebook = embed_avg / n, n = (cluster_size + eps) / (sum(cluster_size) + K*eps) * sum(cluster_size).
    When torch.distributed is initialised and ``sync`` is True, c and s are all-reduced first over
    ``process_group`` (None: the default group), so every process of the group updates its
    dictionary from the statistics of the group's whole batch; ``sync=False`` keeps each
    process's update its own.

    Where n is 0 the codebook entry is kept as it was (every backend and the reference). n is 0
    exactly when sum(cluster_size) is 0: no row has been counted in any entry yet (a fresh state
    after a step with N = 0 or every row masked, or decay 1 on a fresh state). The division
    would give 0/0 = NaN for every entry, forever after; there is no data to estimate an entry
    from, so it keeps its initial value (a zero codebook instead would make every entry tie).
    cluster_size and embed_avg follow the formulas above in every case. A NaN or inf fed in
    (x in a counted row, the state) propagates; masked-out rows are not read (their index need
    not lie in range, their values may be anything).

    The state may be any strided layout without overlapping elements (a transposed codebook,
    say); an expanded view is refused, since it cannot be written in place.

    The index values of counted rows must lie in [0, K). By default this is checked on the
    device without a host read (a violation raises RuntimeError with the message, on CUDA a
    device-side assert; the triton kernels never use an id as an address: an out-of-range one
    falls outside every entry's segment); with VLKERNELS_VALUE_CHECKS=host / vlkernels.set_value_checks("host") it
    raises IndexError before any launch. No other value is read on the host.
    """
    _check_matrix("vd_ema_update_: codebook", codebook)
    _check_matrix("vd_ema_update_: x", x)
    entries, dim = codebook.shape
    if x.shape[1] != dim:
        raise ValueError(f"vd_ema_update_: x has {x.shape[1]} features but the codebook has {dim}")
    if tuple(cluster_size.shape) != (entries,) or tuple(embed_avg.shape) != (entries, dim):
        raise ValueError(f"vd_ema_update_: cluster_size must be [{entries}] and embed_avg [{entries}, {dim}], "
                         f"got {list(cluster_size.shape)} and {list(embed_avg.shape)}")
    if entries == 0:
        raise ValueError("vd_ema_update_: the codebook is empty")
    for name, state in (("cluster_size", cluster_size), ("embed_avg", embed_avg)):
        if state.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"vd_ema_update_: {name} must be a float32 (or float64) tensor, got {state.dtype}")
    for name, state in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_avg", embed_avg)):
        if _overlaps(state):
            raise ValueError(f"vd_ema_update_: {name} has elements sharing memory (an expanded view?); "
                             "it is written in place")
    if index.dtype != torch.int64 or tuple(index.shape) != (x.shape[0],):
        raise ValueError(f"vd_ema_update_: index must be int64 of shape [{x.shape[0]}], "
                         f"got {index.dtype} {list(index.shape)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0],)):
        raise ValueError(f"vd_ema_update_: mask must be bool of shape [{x.shape[0]}]")
    if not 0.0 <= decay <= 1.0 or eps <= 0:
        raise ValueError(f"vd_ema_update_: need 0 <= decay <= 1 and eps > 0, got decay={decay}, eps={eps}")
    tensors = (codebook, cluster_size, embed_avg, x, index) + ((mask,) if mask is not None else ())
    if any(t.device != codebook.device for t in tensors):
        raise ValueError("vd_ema_update_: all tensors must be on one device")
    # The ids of counted rows in range: a device-side assert by default, the IndexError before any
    # launch in strict mode (see vlkernels.ops._checks). Masked rows are not read, so not checked.
    in_range = (index >= 0) & (index < entries)
    ok = (in_range if mask is None else in_range | ~mask).all()
    message = f"vd_ema_update_: index values must lie in [0, {entries})"
    if reads_on_host():  # strict mode: one sync, and on failure the offending range in the message
        if not bool(ok):
            low, high = (int(v) for v in torch.aminmax(index if mask is None else index[mask]))
            raise IndexError(f"{message}, got [{low}, {high}]")
    else:
        check_value(ok, message, IndexError)
    clear_codebook_norms(codebook)  # the kernels below rewrite it without a version bump
    with torch.no_grad():
        # The kernels write contiguous state: a strided one is updated through a contiguous copy.
        state = tuple(t if t.is_contiguous() else t.contiguous() for t in (codebook, cluster_size, embed_avg))
        _backend.dispatch("vd_ema_update_", _UPDATE, codebook.device, *state, x.detach(), index, float(decay),
                          float(eps), mask, bool(sync), process_group)
        for target, updated in zip((codebook, cluster_size, embed_avg), state):
            if updated is not target:
                target.copy_(updated)


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share an address (expanded / overlapping views):
    taken by stride, each dimension must step over the whole extent of the ones before it."""
    extent = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def aot_variants():
    """Every kernel configuration the launchers above can pick, with SOHO's sizes
    (N = 64 x 24 x 24 grid cells, K = 2048, D = 768), for the sm_90a report."""
    sizes = dict(rows=64 * 24 * 24, entries=2048, dim=768, stride_x=768, stride_code=768)
    variants = []
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        cfg = _nearest_config(dtype, precision)
        variants.append(KernelVariant(
            _vd_nearest_kernel, f"{str(dtype)[6:]}-{precision}",
            dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, DOT_PRECISION=precision),
            {"x": dtype, "codebook": dtype, "code_sqnorm": torch.float32, "index_out": torch.int64,
             "sqdist_out": torch.float32}, sizes, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            gemm_shaped=True))
    for dtype in _SUPPORTED_DTYPES:
        variants.append(KernelVariant(
            _vd_cluster_sums_kernel, str(dtype)[6:], dict(BLOCK_R=_SUMS_BLOCK_R, BLOCK_D=_SUMS_BLOCK_D),
            {"x": dtype, "order": torch.int64, "offsets": torch.int64, "sums": torch.float32}, sizes,
            dict(num_warps=_SUMS_WARPS)))
        variants.append(KernelVariant(
            _vd_apply_statistics_kernel, str(dtype)[6:], dict(BLOCK_D=_APPLY_BLOCK_D),
            {"codebook": dtype, "cluster_size": torch.float32, "embed_avg": torch.float32,
             "sums": torch.float32, "cluster_total": torch.float32},
            dict(sizes, decay=0.4, eps=1e-5), dict(num_warps=_APPLY_WARPS)))
    return variants
