"""Fused patch embedding: Conv2d(kernel=stride=P) + flatten + cls token + pos-embed as one GEMM.

Forward: out[b, t, :] = cls + pos[t] for the cls row (t = 0 when cls_token is given), else
patches[b, n, :] @ W^T + bias + pos[t]. The patches are read straight from the image (the
im2col happens in the load addresses; no unfold tensor is ever written), and bias, pos-embed
and the cls row are added in the GEMM epilogue.

Backward: patches do not overlap (stride = kernel), so d(images) is a GEMM whose tiles are
stored straight back to pixel addresses (col2im without atomics); d(weight) is a GEMM that
reads the patches the same way, split over the patch rows for parallelism (fp32 partials
added up by one kernel that writes the gradient's dtype; no partials without a split); d(bias),
d(pos_embed) and d(cls_token) come from one batch sum of the output gradient (d(bias) is not
summed inside the d(weight) loop: a tile feeding both tl.dot and a sum is the pipeliner hazard
of triton-lang/triton#6691). Every gradient returned owns its storage.

Every kernel keeps the concurrency rules (its docstring says how): each output element has one
writer; no program reads what another program of the same launch writes; no tile loaded in a
pipelined dot loop has a second consumer; what grows with the data is on grid axis 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from vlkernels import _backend
from vlkernels._backend import Implementation
from vlkernels.ops._gemm import GEMM_CONFIGS, WEIGHT_GRAD_CONFIGS, GemmConfig
from vlkernels.ops._variants import KernelVariant
from vlkernels.reference import patch_embed as reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; the triton backend refuses with the reason
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _patch_pixel_offsets(patch_index, batch_index, grid_w, stride_b, stride_h, PATCH: tl.constexpr):
        # Offset of each patch's top-left pixel; int64 because B*C*H*W can pass 2**31.
        # Images are contiguous along W (the launchers ensure it): with unit stride the compiler
        # sees runs of PATCH contiguous pixels and issues vector, pipelined loads.
        patch_row = patch_index // grid_w
        patch_col = patch_index % grid_w
        return batch_index.to(tl.int64) * stride_b + (patch_row * PATCH).to(tl.int64) * stride_h + patch_col * PATCH

    @triton.jit
    def _patch_inner_offsets(k, stride_c, stride_h, PATCH: tl.constexpr):
        # Offset of element k = (c, i, j) of a flattened [C, P, P] patch from its top-left pixel.
        channel = k // (PATCH * PATCH)
        within = k % (PATCH * PATCH)
        return channel * stride_c + (within // PATCH) * stride_h + within % PATCH

    @triton.jit
    def _patch_embed_fwd_kernel(
        images, weight, bias, pos, cls, out,
        rows, tokens, embed_dim, grid_w,
        stride_b, stride_c, stride_h,
        bias_stride, cls_stride,  # stride of bias [D] and of cls_token [1, 1, D] along D (any strides)
        pos_stride_b, pos_stride_t, pos_stride_d,  # pos_stride_b is 0 when pos_embed is shared ([1, T, D])
        CHANNELS: tl.constexpr, PATCH: tl.constexpr,  # constexpr: K = C*P*P fixes the loop and the index math
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """out[B*T, D] tile by tile: (im2col patches [BLOCK_M, K] @ weight^T [K, BLOCK_N]) + epilogue.

        Concurrency: a 1-D grid (axis 0 holds up to 2**31 - 1 programs; see _fwd_grid) over
        (row block, column tile); each program writes only its own [BLOCK_M, BLOCK_N] tile of
        `out` (one writer per element) and reads only the inputs, never `out`. The two tiles
        loaded in the pipelined K loop (pixels, weight) have the tl.dot as their only consumer;
        bias, cls and pos are loaded after the loop, in the epilogue.
        """
        K: tl.constexpr = CHANNELS * PATCH * PATCH
        # The column tiles of one row block are consecutive programs (launched together), so the
        # programs that read the same pixels run together and read them from L2, not HBM.
        col_tiles = tl.cdiv(embed_dim, BLOCK_N)
        col = (tl.program_id(0) % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # embedding channel
        row = (tl.program_id(0) // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # output row b*T + t
        row_ok = row < rows
        col_ok = col < embed_dim
        batch = row // tokens
        token = row % tokens
        patch = token - HAS_CLS
        is_patch = row_ok & (patch >= 0)  # the cls row reads no pixels
        pixel_base = _patch_pixel_offsets(tl.maximum(patch, 0), batch, grid_w, stride_b, stride_h, PATCH)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            inner = _patch_inner_offsets(k, stride_c, stride_h, PATCH)
            a = tl.load(images + pixel_base[:, None] + inner[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight + col[None, :] * K + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias + col * bias_stride, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_CLS:
            # The cls row's value is cls_token (+ pos) alone: replace what the loop and the bias
            # left there. Adding to it would keep 0 * weight, NaN where the weight is NaN or Inf,
            # which the reference's cls row never meets.
            cls_row = tl.load(cls + col * cls_stride, mask=col_ok, other=0.0).to(tl.float32)
            acc = tl.where(is_patch[:, None], acc, cls_row[None, :])  # not is_patch: the cls row (or unstored)
        if HAS_POS:
            pos_offset = (batch.to(tl.int64) * pos_stride_b + token.to(tl.int64) * pos_stride_t)[:, None] \
                + col.to(tl.int64)[None, :] * pos_stride_d
            acc += tl.load(pos + pos_offset, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        out_offset = row.to(tl.int64)[:, None] * embed_dim + col[None, :]
        tl.store(out + out_offset, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _patch_embed_bwd_images_kernel(
        grad_out, weight, grad_images,
        patch_rows, patches_per_image, tokens, embed_dim, grid_w,
        stride_b, stride_c, stride_h,
        CHANNELS: tl.constexpr, PATCH: tl.constexpr, HAS_CLS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """grad_patches[M, K] = grad_out_patches[M, D] @ weight[D, K], stored at the pixels it came from.

        Concurrency: a 1-D grid (see _bwd_images_grid) over (patch-row block, patch-element tile);
        patches do not overlap (stride = kernel) and tile the image (H, W multiples of P), so each
        pixel of grad_images is written by exactly one program, once. Programs read only
        grad_out and weight. The two tiles loaded in the pipelined D loop feed only the tl.dot.
        """
        K: tl.constexpr = CHANNELS * PATCH * PATCH
        k_tiles = tl.cdiv(K, BLOCK_N)
        k = (tl.program_id(0) % k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # patch element (c, i, j), fastest as above
        m = (tl.program_id(0) // k_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # patch row b*N + n
        m_ok = m < patch_rows
        k_ok = k < K
        batch = m // patches_per_image
        patch = m % patches_per_image
        out_row = (batch * tokens + HAS_CLS + patch).to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, embed_dim, BLOCK_K):
            d = d0 + tl.arange(0, BLOCK_K)
            d_ok = d < embed_dim
            g = tl.load(grad_out + out_row[:, None] * embed_dim + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(weight + d[:, None] * K + k[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

        pixel_base = _patch_pixel_offsets(patch, batch, grid_w, stride_b, stride_h, PATCH)
        inner = _patch_inner_offsets(k, stride_c, stride_h, PATCH)
        tl.store(grad_images + pixel_base[:, None] + inner[None, :], acc.to(grad_images.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _patch_embed_bwd_weight_kernel(
        grad_out, images, grad_weight,
        patch_rows, rows_per_split, patches_per_image, tokens, embed_dim, grid_w,
        stride_b, stride_c, stride_h,
        CHANNELS: tl.constexpr, PATCH: tl.constexpr, HAS_CLS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Split s of grad_weight[D, K] = grad_out_patches^T[D, M] @ patches[M, K] over the rows
        [s*rows_per_split, (s+1)*rows_per_split), stored in slot s of grad_weight: the
        gradient itself (its dtype) when there is one split, else fp32 partials that
        _split_sum_kernel adds up.

        Concurrency: axis 0 holds the (D tile, K tile) pairs, axis 1 the splits, at most
        2 * multiprocessors (see _bwd_weight_launch); program (tile, s) alone writes its tile of
        slot s. Programs read only grad_out and images. The two tiles loaded in the pipelined
        row loop feed only the tl.dot: d(bias), which once summed the grad_out tile on the side
        (a second consumer, triton-lang/triton#6691), is a batch sum of its own (_backward).
        """
        K: tl.constexpr = CHANNELS * PATCH * PATCH
        d_tiles = tl.cdiv(embed_dim, BLOCK_M)
        d = (tl.program_id(0) % d_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        k = (tl.program_id(0) // d_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        d_ok = d < embed_dim
        k_ok = k < K
        inner = _patch_inner_offsets(k, stride_c, stride_h, PATCH)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_begin = split * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, patch_rows)
        for m0 in range(row_begin, row_end, BLOCK_K):
            m = m0 + tl.arange(0, BLOCK_K)
            m_ok = m < row_end
            batch = m // patches_per_image
            patch = m % patches_per_image
            out_row = (batch * tokens + HAS_CLS + patch).to(tl.int64)
            g = tl.load(grad_out + out_row[None, :] * embed_dim + d[:, None], mask=d_ok[:, None] & m_ok[None, :], other=0.0)
            pixel_base = _patch_pixel_offsets(patch, batch, grid_w, stride_b, stride_h, PATCH)
            a = tl.load(images + pixel_base[:, None] + inner[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=DOT_PRECISION)

        part = split.to(tl.int64) * embed_dim * K
        tl.store(grad_weight + part + d[:, None] * K + k[None, :], acc.to(grad_weight.dtype.element_ty),
                 mask=d_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _split_sum_kernel(parts, out, splits, numel, BLOCK: tl.constexpr):
        """out[i] = sum_s parts[s, i] (fp32 partial sums) in out's dtype.

        Concurrency: a 1-D grid; program p alone writes out[p*BLOCK : (p+1)*BLOCK] and reads only
        parts (written by an earlier launch). No dot. The slots are added in order: deterministic.
        """
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        slot = parts + i
        for _ in range(splits):
            acc += tl.load(slot, mask=ok, other=0.0)
            slot += numel  # pointer arithmetic is 64-bit: no int32 overflow over the slots
        tl.store(out + i, acc.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _batch_sum_kernel(x, out, batch, batch_stride, numel, BLOCK: tl.constexpr):
        """out[i] = sum_b x[b * batch_stride + i] in fp32, for i < numel: grads of batch-broadcast inputs.

        Concurrency: a 1-D grid; program p alone writes out[p*BLOCK : (p+1)*BLOCK] and reads only
        x. There is no tl.dot: the loaded values feed the sum only. The sum runs over b in order,
        so the result is deterministic.
        """
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        rows = x + i
        for _ in range(batch):
            acc += tl.load(rows, mask=ok, other=0.0).to(tl.float32)
            rows += batch_stride  # pointer arithmetic is 64-bit: no int32 overflow over the batch
        tl.store(out + i, acc, mask=ok)


# ----------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and the sm_90a report, so the report covers
# exactly the configurations a call can pick)
# ----------------------------------------------------------------------------------------------
_BATCH_SUM_BLOCK = 1024
_BATCH_SUM_WARPS = 4
# The forward: its epilogue (pos-embed tile, cls row) lifts a 128 x 128 tile on 8 warps to 164
# registers (1 CTA/SM on sm_90a, nothing to overlap one CTA's epilogue with another's K loop,
# which is only K / BLOCK_K = 12 steps for ViT-B/16); 128 x 64 on one warpgroup keeps 168
# registers for 4 warps: 3 CTAs/SM (2 in fp32), no spill. To be confirmed on a GPU.
_FWD_CONFIGS = {
    torch.float16: GemmConfig(128, 64, 64, 4, 3),
    torch.bfloat16: GemmConfig(128, 64, 64, 4, 3),
    torch.float32: GemmConfig(128, 64, 32, 4, 3),
}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows the flag that governs nn.Conv2d (which this op replaces): tf32 unless disabled.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _grid_shape(images: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    patch = weight.shape[-1]
    grid_h, grid_w = images.shape[2] // patch, images.shape[3] // patch
    return grid_h, grid_w, grid_h * grid_w


def _unit_stride_width(images: torch.Tensor) -> torch.Tensor:
    # The kernels read rows of pixels with unit stride (any B, C, H strides); others are copied.
    return images if images.stride(-1) == 1 else images.contiguous()


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests cover the split path


# CUDA limits grid axes 1 and 2 to 65535 programs, axis 0 to 2**31 - 1. Whatever grows with the
# data (rows of the batch) is folded into axis 0; axis 1 of the weight gradient is bounded below.
_MAX_GRID_AXIS_0 = 2**31 - 1
_MAX_GRID_AXIS_12 = 65535


def _fwd_grid(rows: int, embed_dim: int, cfg) -> tuple[int]:
    """One program per (row block of the B*T output rows, column tile of D), all on axis 0."""
    return (triton.cdiv(embed_dim, cfg.block_n) * triton.cdiv(rows, cfg.block_m),)


def _bwd_images_grid(patch_rows: int, k_size: int, cfg) -> tuple[int]:
    """One program per (row block of the B*N patch rows, tile of the K = C*P*P patch elements)."""
    return (triton.cdiv(k_size, cfg.block_n) * triton.cdiv(patch_rows, cfg.block_m),)


def _bwd_weight_launch(patch_rows: int, embed_dim: int, k_size: int, cfg, multiprocessors: int):
    """(grid, rows_per_split) of the weight gradient: axis 0 the [D, K] tiles, axis 1 the splits.

    The long reduction over patch rows is split until the grid covers the device about twice,
    keeping at least four row blocks per split; so splits <= 2 * multiprocessors (and capped at
    the axis limit besides), and every split gets at least one row.
    """
    tiles = triton.cdiv(embed_dim, cfg.block_m) * triton.cdiv(k_size, cfg.block_n)
    splits = max(1, min(triton.cdiv(2 * multiprocessors, tiles), patch_rows // (4 * cfg.block_k), _MAX_GRID_AXIS_12))
    rows_per_split = triton.cdiv(triton.cdiv(patch_rows, splits), cfg.block_k) * cfg.block_k
    return (tiles, triton.cdiv(patch_rows, rows_per_split)), rows_per_split


def _batch_sum_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _BATCH_SUM_BLOCK),)


def _launch_fwd(images, weight, bias, pos_embed, cls_token) -> torch.Tensor:
    batch, channels = images.shape[:2]
    embed_dim, patch = weight.shape[0], weight.shape[-1]
    _, grid_w, patches = _grid_shape(images, weight)
    tokens = patches + (cls_token is not None)
    images = _unit_stride_width(images)
    weight = weight.contiguous()  # any layout (channels-last, permuted): the kernel reads it as [D, K]
    out = torch.empty(batch, tokens, embed_dim, device=images.device, dtype=images.dtype)
    cfg = _FWD_CONFIGS[images.dtype]
    rows = batch * tokens
    # bias, cls_token and pos_embed are read through their strides (a view of any layout, an
    # expanded batch); a shared pos_embed [1, T, D] gets batch stride 0.
    pos_strides = (0, 0, 0) if pos_embed is None else (
        0 if pos_embed.shape[0] == 1 else pos_embed.stride(0), pos_embed.stride(1), pos_embed.stride(2))
    _patch_embed_fwd_kernel[_fwd_grid(rows, embed_dim, cfg)](
        images, weight,
        bias if bias is not None else weight,  # unread placeholders when a term is absent
        pos_embed if pos_embed is not None else weight,
        cls_token if cls_token is not None else weight,
        out, rows, tokens, embed_dim, grid_w, *images.stride()[:3],
        bias.stride(0) if bias is not None else 0, cls_token.stride(2) if cls_token is not None else 0, *pos_strides,
        CHANNELS=channels, PATCH=patch,
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_CLS=cls_token is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(images.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _launch_bwd_images(grad_out, images, weight, has_cls) -> torch.Tensor:
    channels, patch = images.shape[1], weight.shape[-1]
    embed_dim = weight.shape[0]
    _, grid_w, patches = _grid_shape(images, weight)
    grad_images = torch.empty(images.shape, device=images.device, dtype=images.dtype)
    patch_rows = images.shape[0] * patches
    cfg = GEMM_CONFIGS[images.dtype]
    _patch_embed_bwd_images_kernel[_bwd_images_grid(patch_rows, channels * patch * patch, cfg)](
        grad_out.contiguous(), weight.contiguous(), grad_images,
        patch_rows, patches, grad_out.shape[1], embed_dim, grid_w, *grad_images.stride()[:3],
        CHANNELS=channels, PATCH=patch, HAS_CLS=has_cls,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(images.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return grad_images


def _launch_bwd_weight(grad_out, images, weight, has_cls) -> torch.Tensor:
    channels, patch = images.shape[1], weight.shape[-1]
    embed_dim = weight.shape[0]
    k_size = channels * patch * patch
    images = _unit_stride_width(images)
    _, grid_w, patches = _grid_shape(images, weight)
    patch_rows = images.shape[0] * patches
    precision = _dot_precision(images.dtype)
    cfg = WEIGHT_GRAD_CONFIGS[images.dtype, precision]
    grid, rows_per_split = _bwd_weight_launch(patch_rows, embed_dim, k_size, cfg, _multiprocessors(images.device))
    splits = grid[1]
    grad_weight = torch.empty(weight.shape, device=images.device, dtype=weight.dtype)
    # One split: the kernel stores the gradient itself; else fp32 partials, added by one more kernel.
    target = grad_weight if splits == 1 else torch.empty(splits, embed_dim, k_size, device=images.device,
                                                          dtype=torch.float32)
    _patch_embed_bwd_weight_kernel[grid](
        grad_out.contiguous(), images, target,
        patch_rows, rows_per_split, patches, grad_out.shape[1], embed_dim, grid_w, *images.stride()[:3],
        CHANNELS=channels, PATCH=patch, HAS_CLS=has_cls,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        numel = embed_dim * k_size
        _split_sum_kernel[_batch_sum_grid(numel)](target, grad_weight, splits, numel, BLOCK=_BATCH_SUM_BLOCK,
                                                  num_warps=_BATCH_SUM_WARPS)
    return grad_weight


def _launch_batch_sum(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x: [B, T, D] -> [rows, D] fp32, the sum over B of the first `rows` rows."""
    x = x.contiguous()
    numel = rows * x.shape[2]
    out = torch.empty(rows, x.shape[2], device=x.device, dtype=torch.float32)
    _batch_sum_kernel[_batch_sum_grid(numel)](
        x, out, x.shape[0], x.shape[1] * x.shape[2], numel, BLOCK=_BATCH_SUM_BLOCK, num_warps=_BATCH_SUM_WARPS
    )
    return out


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (with fake implementations) and autograd-aware
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vlkernels::patch_embed", mutates_args=())
def _patch_embed_op(
    images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch_fwd(images, weight, bias, pos_embed, cls_token)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token):
    patches = (images.shape[2] // weight.shape[-1]) * (images.shape[3] // weight.shape[-1])
    return images.new_empty(images.shape[0], patches + (cls_token is not None), weight.shape[0])


@torch.library.custom_op("vlkernels::patch_embed_bwd_images", mutates_args=())
def _bwd_images_op(grad_out: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, has_cls: bool) -> torch.Tensor:
    return _launch_bwd_images(grad_out, images, weight, has_cls)


@_bwd_images_op.register_fake
def _(grad_out, images, weight, has_cls):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


@torch.library.custom_op("vlkernels::patch_embed_bwd_weight", mutates_args=())
def _bwd_weight_op(grad_out: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, has_cls: bool) -> torch.Tensor:
    return _launch_bwd_weight(grad_out, images, weight, has_cls)


@_bwd_weight_op.register_fake
def _(grad_out, images, weight, has_cls):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("vlkernels::batch_sum", mutates_args=())
def _batch_sum_op(x: torch.Tensor, rows: int) -> torch.Tensor:
    return _launch_batch_sum(x, rows)


@_batch_sum_op.register_fake
def _(x, rows):
    return x.new_empty(rows, x.shape[2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_cls = cls_token is not None
    ctx.pos_shared = pos_embed is not None and pos_embed.shape[0] == 1


def _backward(ctx, grad_out):
    """Every gradient returned owns its storage (none is grad_out, a view of it or of another
    gradient): autograd hands them on as they are, and accumulation into .grad, clipping or any
    in-place update of one must not change another."""
    images, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    need_images, need_weight, need_bias, need_pos, need_cls = ctx.needs_input_grad
    need_pos_sum = need_pos and ctx.pos_shared
    grad_images = grad_weight = grad_bias = grad_pos = grad_cls = None
    if need_images:
        grad_images = _bwd_images_op(grad_out, images, weight, ctx.has_cls)
    if need_weight:
        grad_weight = _bwd_weight_op(grad_out, images, weight, ctx.has_cls)
    if need_pos and not ctx.pos_shared:
        # A per-sample pos_embed [B, T, D] receives the output gradient, copied: grad_out may be
        # another tensor's gradient as well (the other operand of an add, say).
        grad_pos = grad_out.clone()
    if need_bias or need_pos_sum or need_cls:
        # One batch sum [rows, D] in fp32 serves the three: d(pos) is all of it, d(cls) its row 0,
        # d(bias) the sum of its patch rows (a fixed-order reduction: deterministic, no atomics).
        summed = _batch_sum_op(grad_out, grad_out.shape[1] if need_bias or need_pos_sum else 1)
        if need_bias:
            grad_bias = summed[int(ctx.has_cls):].sum(0).to(grad_out.dtype)
        if need_cls:
            grad_cls = summed[:1].unsqueeze(0).to(grad_out.dtype, copy=True)  # not a view of grad_pos
        if need_pos_sum:
            grad_pos = summed.unsqueeze(0).to(grad_out.dtype)  # the only gradient left on `summed`
    return grad_images, grad_weight, grad_bias, grad_pos, grad_cls


torch.library.register_autograd("vlkernels::patch_embed", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _validate(images, weight, bias, pos_embed, cls_token) -> None:
    if images.dim() != 4:
        raise ValueError(f"patch_embed: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"patch_embed: weight must be [D, C, P, P] (nn.Conv2d layout), got shape {tuple(weight.shape)}")
    batch, channels, height, width = images.shape
    embed_dim, patch = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != channels:
        raise ValueError(f"patch_embed: images have {channels} channels but weight expects {weight.shape[1]}")
    if patch == 0:
        raise ValueError(f"patch_embed: the patch size must be positive, got weight shape {tuple(weight.shape)}")
    if height % patch or width % patch or height == 0 or width == 0:
        raise ValueError(f"patch_embed: image size {height}x{width} must be a positive multiple of the patch size {patch}")
    if batch == 0 or channels == 0 or embed_dim == 0:
        raise ValueError(f"patch_embed: empty input (batch {batch}, channels {channels}, embed_dim {embed_dim})")
    tokens = (height // patch) * (width // patch) + (cls_token is not None)
    expected = {
        "bias": (bias, [(embed_dim,)]),
        "cls_token": (cls_token, [(1, 1, embed_dim)]),
        "pos_embed": (pos_embed, [(1, tokens, embed_dim), (batch, tokens, embed_dim)]),
    }
    for name, (tensor, shapes) in expected.items():
        # dim by dim (not tuple(shape) in shapes, which dynamo misjudges for symbolic image sizes)
        if tensor is not None and not any(
                tensor.dim() == len(shape) and all(a == b for a, b in zip(tensor.shape, shape)) for shape in shapes):
            allowed = " or ".join(str(list(s)) for s in shapes)
            raise ValueError(f"patch_embed: {name} must have shape {allowed}, got {list(tensor.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed), ("cls_token", cls_token)):
        if tensor is None:
            continue
        if tensor.dtype != images.dtype:
            raise TypeError(f"patch_embed: {name} is {tensor.dtype} but images are {images.dtype}; use one dtype "
                            "(or torch.autocast)")
        if tensor.device != images.device:
            raise ValueError(f"patch_embed: {name} is on {tensor.device} but images are on {images.device}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"patch_embed: images must be floating point, got {images.dtype}")


def _triton_refusal(images, weight, bias, pos_embed, cls_token) -> Optional[str]:
    why = _backend.triton_refusal(images.device)
    if why is None and images.dtype not in _SUPPORTED_DTYPES:
        why = f"dtype {images.dtype} is not one of float32, float16, bfloat16"
    return why


class _CopiedGradient(torch.autograd.Function):
    """Identity whose backward returns a copy of the gradient."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _torch_patch_embed(images, weight, bias, pos_embed, cls_token):
    # Through the reference's add and cat, autograd hands pos_embed (when it has the output's
    # shape) grad_out itself, and cls_token (batch 1) a view of it: the gradients would share
    # storage with each other and with grad_out. Copy those two so every gradient owns its own.
    if pos_embed is not None:
        pos_embed = _CopiedGradient.apply(pos_embed)
    if cls_token is not None:
        cls_token = _CopiedGradient.apply(cls_token)
    return reference.patch_embed(images, weight, bias, pos_embed=pos_embed, cls_token=cls_token)


_IMPLEMENTATIONS = [
    Implementation("triton", _triton_refusal, _patch_embed_op),
    Implementation("torch", lambda *args: None, _torch_patch_embed),
]


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    cls_token: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Patch embedding of ViT-style models: nn.Conv2d(kernel=stride=P), flatten, cls token, pos-embed.

    images: [B, C, H, W] (H and W multiples of P; read in place when W has unit stride, else copied)
    weight: [D, C, P, P] (nn.Conv2d layout), bias: [D]
    cls_token: [1, 1, D], prepended as token 0 when given
    pos_embed: [1, T, D] shared by the batch or [B, T, D] per image, T = N (+1 with cls_token)
    returns: [B, T, D], the N = (H/P)*(W/P) patches in row-major order after the cls token.

    Under torch.autocast every input is cast to the autocast dtype, as nn.Conv2d's are.
    On the Triton backend fp32 uses tf32 dots unless torch.backends.cudnn.allow_tf32 is False.
    """
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        images, weight, bias, pos_embed, cls_token = (
            t.to(dtype) if t is not None and t.is_floating_point() else t
            for t in (images, weight, bias, pos_embed, cls_token)
        )
    _validate(images, weight, bias, pos_embed, cls_token)
    return _backend.dispatch("patch_embed", _IMPLEMENTATIONS, images.device, images, weight, bias, pos_embed, cls_token)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants for the sm_90a report (python -m vlkernels.report)
# ----------------------------------------------------------------------------------------------
def _example_scalars(batch: int, size: int, patch: int, embed_dim: int = 768, channels: int = 3) -> dict:
    """The runtime integers the launchers pass for a square image batch with a cls token and shared pos."""
    grid = size // patch
    tokens = grid * grid + 1
    patch_rows = batch * grid * grid
    return dict(rows=batch * tokens, tokens=tokens, embed_dim=embed_dim, grid_w=grid, stride_b=channels * size * size,
                stride_c=size * size, stride_h=size, pos_stride_b=0, pos_stride_t=embed_dim, patch_rows=patch_rows,
                patches_per_image=grid * grid, rows_per_split=patch_rows // 4, batch=batch,
                batch_stride=tokens * embed_dim, numel=tokens * embed_dim)


def aot_variants():
    """Every kernel configuration the launchers above can pick, as report.KernelVariant entries,
    with the runtime integers of a real preset (ViT-B/16 at 224, ViLT-B/32 at 384; batch 64)."""
    variants = []
    cases = [(torch.bfloat16, 224, 16, "tf32"), (torch.bfloat16, 384, 32, "tf32"), (torch.float16, 224, 16, "tf32"),
             (torch.float32, 224, 16, "tf32"), (torch.float32, 224, 16, "ieee")]
    for dtype, size, patch, precision in cases:
        cfg = GEMM_CONFIGS[dtype]
        gemm = dict(CHANNELS=3, PATCH=patch, HAS_CLS=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, DOT_PRECISION=precision)
        label = f"{str(dtype)[6:]}-P{patch}-{precision}"
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        scalars = _example_scalars(64, size, patch)
        fp32 = torch.float32
        fwd_cfg = _FWD_CONFIGS[dtype]
        fwd_gemm = dict(gemm, BLOCK_M=fwd_cfg.block_m, BLOCK_N=fwd_cfg.block_n, BLOCK_K=fwd_cfg.block_k)
        variants += [
            # Contiguous bias, cls and pos have unit stride along D (which a launch turns into a constant)
            KernelVariant(_patch_embed_fwd_kernel, label, dict(fwd_gemm, HAS_BIAS=True, HAS_POS=True),
                          {"images": dtype, "weight": dtype, "bias": dtype, "pos": dtype, "cls": dtype, "out": dtype},
                          dict(scalars, bias_stride=1, cls_stride=1, pos_stride_d=1),
                          dict(num_warps=fwd_cfg.num_warps, num_stages=fwd_cfg.num_stages), gemm_shaped=True),
            KernelVariant(_patch_embed_bwd_images_kernel, label, gemm,
                          {"grad_out": dtype, "weight": dtype, "grad_images": dtype}, scalars, options, gemm_shaped=True),
        ]
        weight_cfg = WEIGHT_GRAD_CONFIGS[dtype, precision]
        weight_gemm = dict(gemm, BLOCK_M=weight_cfg.block_m, BLOCK_N=weight_cfg.block_n, BLOCK_K=weight_cfg.block_k)
        weight_options = dict(num_warps=weight_cfg.num_warps, num_stages=weight_cfg.num_stages)
        for one_split in (False, True):  # fp32 partials, or the gradient itself in its dtype
            variants.append(KernelVariant(
                _patch_embed_bwd_weight_kernel, label + ("-one-split" if one_split else ""), weight_gemm,
                {"grad_out": dtype, "images": dtype, "grad_weight": dtype if one_split else fp32},
                scalars, weight_options, gemm_shaped=True))
    for dtype in _SUPPORTED_DTYPES:
        variants.append(KernelVariant(_batch_sum_kernel, str(dtype)[6:], dict(BLOCK=_BATCH_SUM_BLOCK),
                                      {"x": dtype, "out": torch.float32}, _example_scalars(64, 224, 16),
                                      dict(num_warps=_BATCH_SUM_WARPS)))
        variants.append(KernelVariant(_split_sum_kernel, str(dtype)[6:], dict(BLOCK=_BATCH_SUM_BLOCK),
                                      {"parts": torch.float32, "out": dtype}, dict(splits=4, numel=768 * 768),
                                      dict(num_warps=_BATCH_SUM_WARPS)))
    return variants
