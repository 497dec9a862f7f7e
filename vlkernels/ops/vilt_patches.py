"""ViLT's variable-size image embedding: per-image valid patch grids, interpolated position
embeddings and the random patch sampling of ``visual_embed``.

ViLT (dandelin/ViLT, vilt/modules/vision_transformer.py; HF ``ViltEmbeddings.visual_embed``)
feeds a batch of differently sized images padded to one pixel grid. From the pixel mask it
finds each image's valid patch grid (h rows, w cols), interpolates the ViT position grid to
(h, w), zero-pads it to the batch's patch grid (H, W), then samples a fixed number of patch
tokens per image and prepends the cls token. The steps here are pure torch (no kernels), split
so that the full-grid patch embedding can come from any implementation (e.g. the fused
``vlkernels.ops.patch_embed``, which takes the per-image ``[B, H*W, D]`` pos-embed this file
produces):

    patch_mask, valid_hw = valid_patch_grid(pixel_mask, (H, W))
    pos = interpolate_pos_embed(pos_grid, valid_hw, (H, W))            # [B, H*W, D]
    tokens = vilt_visual_embed(patches, patch_mask, (H, W), cls_token, max_image_len,
                               pos=pos, cls_pos=cls_pos, valid_hw=valid_hw)

Two samplings, one distribution (``sampling=``):

- ``"static"`` (the default): L = min(H*W, max_image_len) tokens per image, a function of the
  shapes and the config, drawn by tensor ops (random keys sorted under the valid mask, pads by
  scaled uniforms) on the mask's device: no host read, no Python loop, so
  ``torch.compile(dynamic=True, fullgraph=True)`` traces it in one graph. Each image's tokens
  have ViLT's law: at least L valid patches -> L of them without replacement, in random order;
  fewer -> all of them in grid order, then pads drawn with replacement from its invalid patches
  (mask False). ViLT's own L is min(largest valid count h*w, max_image_len): the two agree
  whenever an image fills the batch's grid (ViLT's collate pads the batch to its largest image)
  or has max_image_len valid patches; otherwise the static L is larger and the extra tokens are
  pads, masked keys, so every real token sees what it sees in ViLT.
- ``"vilt"``: ViLT's / HF's exact draws: under the same global seed the sampled patches equal
  theirs (the same torch.multinomial calls on the CPU default generator, in the same order) and
  L is ViLT's. Its length and draws depend on the data (host reads, one call per image), so it
  is for eager runs (parity with HF); under torch.compile it breaks the graph.

ViLT's dropout after the sum is left to the caller.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from vlkernels.ops._checks import check_value, reads_on_host

SAMPLINGS = ("static", "vilt")

__all__ = [
    "SAMPLINGS",
    "PatchSelection",
    "ViltVisualTokens",
    "interpolate_pos_embed",
    "select_patches",
    "valid_patch_grid",
    "vilt_visual_embed",
]


class PatchSelection(NamedTuple):
    """The patches ``select_patches`` keeps for each image.

    index: [B, L] int64, positions into the H*W row-major patch grid
    keep_mask: [B, L] bool, True for a real (valid) patch, False for a pad patch
    """

    index: torch.Tensor
    keep_mask: torch.Tensor


class ViltVisualTokens(NamedTuple):
    """ViLT's image tokens, as returned by ``vilt_visual_embed``.

    embeddings: [B, 1+L, D], cls token first, then the L selected patches (+ their pos-embed)
    mask: [B, 1+L] bool, True for cls and real patches, False for pad patches
        (ViLT returns it as int64; ``.long()`` gives its layout)
    patch_index: [B, L, 2] int64, (row, col) of each selected patch in the (H, W) patch grid
    """

    embeddings: torch.Tensor
    mask: torch.Tensor
    patch_index: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def _grid_size(grid_hw: Sequence[int]) -> tuple[int, int]:
    """(H, W) as two positive ints, or a ValueError naming what was given. While compiling the
    sizes are kept as they are: operator.index on a symbolic size would specialise it."""
    try:
        rows, cols = grid_hw
        if not torch.compiler.is_compiling():
            rows, cols = operator.index(rows), operator.index(cols)
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw must be two ints (H, W), got {grid_hw!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid_hw must be positive, got ({rows}, {cols})")
    return rows, cols


def _check_valid_hw(valid_hw: torch.Tensor, batch: Optional[int], grid: Optional[tuple[int, int]]) -> None:
    """valid_hw: [B, 2] integer, each (h, w) within 0..H, 0..W when the grid is known. The
    values are checked by ``check_value`` (in place by default, no host read)."""
    if not isinstance(valid_hw, torch.Tensor) or valid_hw.dim() != 2 or valid_hw.shape[1] != 2:
        shape = tuple(valid_hw.shape) if isinstance(valid_hw, torch.Tensor) else type(valid_hw).__name__
        raise ValueError(f"valid_hw must be a [B, 2] tensor of (rows, cols), got {shape}")
    if valid_hw.is_floating_point() or valid_hw.is_complex() or valid_hw.dtype == torch.bool:
        raise TypeError(f"valid_hw must hold integers, got {valid_hw.dtype}")
    if batch is not None and valid_hw.shape[0] != batch:
        raise ValueError(f"valid_hw has {valid_hw.shape[0]} rows, expected one per image ({batch})")
    check_value((valid_hw >= 0).all(), "valid_hw must not be negative")
    if grid is not None:
        rows, cols = grid
        # No symbolic size formatted while compiling: that would specialise it.
        where = "" if torch.compiler.is_compiling() else f" ({rows}, {cols})"
        check_value(((valid_hw[:, 0] <= rows) & (valid_hw[:, 1] <= cols)).all(),
                    f"valid_hw exceeds the patch grid{where}")


def _check_sampling(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(map(repr, SAMPLINGS))}, got {sampling!r}")
    return sampling


def _length_cap(max_image_len: Optional[int]) -> Optional[int]:
    """ViLT's cap on the patch count: None or <= 0 means no cap."""
    if max_image_len is None:
        return None
    try:
        cap = operator.index(max_image_len)
    except TypeError:
        raise TypeError(f"max_image_len must be an int or None, got {type(max_image_len).__name__}") from None
    return cap if cap > 0 else None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def interpolate_pos_embed(pos_grid: torch.Tensor, valid_hw: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Per-image position embeddings for a padded batch of differently sized images.

    pos_grid: [1, D, gh0, gw0], the ViT pos-embed grid without its cls entry (e.g. 12x12)
    valid_hw: [B, 2] integer, each image's valid patch rows h and cols w (0 <= h <= H, 0 <= w <= W)
    grid_hw: (H, W), the batch's patch grid
    returns: [B, H*W, D] in pos_grid's dtype: image b's grid resized bilinearly with
        align_corners=True to (h_b, w_b), placed top-left, zero elsewhere, flattened row-major.
        An image with h or w of 0 gets all zeros (it has no patch to place).

    Static-shaped: each image's resize is a pair of interpolation matrices (rows, cols) built by
    tensor ops from valid_hw, applied by two batched GEMMs; no host read, so it traces in one
    graph under torch.compile(dynamic=True). Differentiable in pos_grid (deterministically).
    """
    rows, cols = _grid_size(grid_hw)
    if not isinstance(pos_grid, torch.Tensor) or pos_grid.dim() != 4 or pos_grid.shape[0] != 1:
        shape = tuple(pos_grid.shape) if isinstance(pos_grid, torch.Tensor) else type(pos_grid).__name__
        raise ValueError(f"pos_grid must be [1, D, gh0, gw0], got {shape}")
    if not pos_grid.is_floating_point():
        raise TypeError(f"pos_grid must be floating point, got {pos_grid.dtype}")
    _check_valid_hw(valid_hw, None, (rows, cols))
    # F.interpolate's arithmetic type: fp16 / bf16 grids are interpolated in fp32 and rounded once.
    opmath = torch.float32 if pos_grid.dtype in (torch.float16, torch.bfloat16) else pos_grid.dtype
    grid = pos_grid[0].to(opmath).permute(1, 2, 0)  # [gh0, gw0, D]
    gh0, gw0, embed_dim = grid.shape
    row_weights = _bilinear_weights(valid_hw[:, 0], rows, gh0, opmath)  # [B, H, gh0]
    col_weights = _bilinear_weights(valid_hw[:, 1], cols, gw0, opmath)  # [B, W, gw0]
    # Separable: resize the rows, then the columns; two batched GEMMs (deterministic in both
    # directions), autocast off so that the grid keeps F.interpolate's precision.
    with torch.autocast(pos_grid.device.type, enabled=False):
        by_rows = torch.matmul(row_weights, grid.reshape(gh0, gw0 * embed_dim))  # [B, H, gw0 * D]
        pos = torch.matmul(col_weights.unsqueeze(1), by_rows.unflatten(-1, (gw0, embed_dim)))  # [B, H, W, D]
    return pos.flatten(1, 2).to(pos_grid.dtype)


def _bilinear_weights(sizes: torch.Tensor, out_len: int, in_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, out_len, in_len]: row i < sizes[b] holds the align_corners=True linear interpolation
    weights of output i of a resize from in_len to sizes[b] (F.interpolate's source index
    i * (in - 1) / (size - 1), its floor and fraction, in F.interpolate's arithmetic type);
    rows >= sizes[b] are zero (the zero padding)."""
    sizes = sizes.to(torch.int64)[:, None]  # [B, 1]
    out_index = torch.arange(out_len, device=sizes.device)  # [out]
    # align_corners=True: scale (in - 1) / (size - 1), 0 for a single output.
    # (a tensor numerator: a Python number over a tensor is a reciprocal and a product, two roundings)
    steps = (sizes - 1).clamp(min=1).to(dtype)
    scale = torch.where(sizes > 1, torch.full_like(steps, in_len - 1) / steps, 0.0).to(dtype)
    source = scale * out_index.to(dtype)  # [B, out]
    low = source.to(torch.int64).clamp(max=in_len - 1)
    high = (low + 1).clamp(max=in_len - 1)
    frac = (source - low.to(dtype)).clamp(0.0, 1.0)
    taps = torch.arange(in_len, device=sizes.device)
    weights = ((taps == low[..., None]) * (1 - frac)[..., None]
               + (taps == high[..., None]) * frac[..., None])  # [B, out, in]
    return weights * (out_index < sizes)[..., None]


def valid_patch_grid(pixel_mask: torch.Tensor, grid_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's valid patches, from its pixel mask, the way ViLT finds them.

    pixel_mask: [B, Hpx, Wpx], nonzero = real pixel, 0 = padding (any dtype)
    grid_hw: (H, W), the batch's patch grid (the patch projection's output size)
    returns: (patch_mask [B, H*W] bool, row-major; valid_hw [B, 2] int64 (h, w))

    The mask is resized to (H, W) with nearest interpolation (ViLT: F.interpolate on the float
    mask); h is the number of valid patches in column 0 and w the number in row 0 (ViLT's rule,
    exact for top-left-aligned rectangular images, which is what ViLT's collate produces).
    """
    rows, cols = _grid_size(grid_hw)
    if not isinstance(pixel_mask, torch.Tensor) or pixel_mask.dim() != 3:
        shape = tuple(pixel_mask.shape) if isinstance(pixel_mask, torch.Tensor) else type(pixel_mask).__name__
        raise ValueError(f"pixel_mask must be [B, Hpx, Wpx], got {shape}")
    if pixel_mask.shape[1] == 0 or pixel_mask.shape[2] == 0:
        raise ValueError(f"pixel_mask must not be empty, got {tuple(pixel_mask.shape)}")
    # float32 holds 0 and 1 exactly, and nearest interpolation only copies values.
    real_pixels = (pixel_mask != 0).to(torch.float32)[:, None]
    patch_grid = F.interpolate(real_pixels, size=(rows, cols), mode="nearest")[:, 0] != 0  # [B, H, W]
    valid_hw = torch.stack([patch_grid[:, :, 0].sum(dim=1), patch_grid[:, 0, :].sum(dim=1)], dim=1)
    return patch_grid.flatten(1), valid_hw


def select_patches(
    patch_mask: torch.Tensor,
    max_image_len: Optional[int],
    *,
    valid_hw: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sampling: str = "static",
) -> PatchSelection:
    """ViLT's patch sampling: the same number L of patch tokens for every image.

    patch_mask: [B, N] bool (or 0/1), True = valid patch of the N = H*W row-major grid
    max_image_len: cap on L; None or <= 0 = no cap (ViLT: 200 in pretraining, -1 = no cap)
    valid_hw: [B, 2] optional (from ``valid_patch_grid``); with ``sampling="vilt"``, L uses
        ViLT's count h*w per image instead of the number of True entries (the two agree for
        top-left rectangular masks); checked, else unused, with ``"static"``
    generator: torch.Generator for the draws; None = torch's default generator of the draws'
        device (``"vilt"``: the CPU one, which makes the draws equal ViLT's under the same
        torch.manual_seed; ``"static"``: patch_mask's device, where a generator must live too)
    sampling: ``"static"`` (L = min(N, cap), tensor ops, no host read: compiles in one graph)
        or ``"vilt"`` (ViLT's L and exact draws; data-dependent, eager) -- see the module docstring
    returns: PatchSelection(index [B, L] int64 into N, keep_mask [B, L] bool)

    An image with at least L valid patches gets L of them sampled without replacement (in
    sampled order); an image with fewer gets all of its valid patches in grid order, then
    L - count pad patches sampled with replacement from its invalid ones (keep_mask False).
    An image without any valid patch is refused (ViLT fails on it with a shape error):
    ``"vilt"`` raises ValueError; ``"static"`` checks it with ``check_value`` (in place by
    default: RuntimeError; ValueError in the strict host mode).
    """
    if not isinstance(patch_mask, torch.Tensor) or patch_mask.dim() != 2:
        shape = tuple(patch_mask.shape) if isinstance(patch_mask, torch.Tensor) else type(patch_mask).__name__
        raise ValueError(f"patch_mask must be [B, N], got {shape}")
    cap = _length_cap(max_image_len)
    _check_sampling(sampling)
    valid = patch_mask != 0
    batch, num_patches = valid.shape
    if valid_hw is not None:
        _check_valid_hw(valid_hw, batch, None)
    if sampling == "vilt":
        return _vilt_selection(valid, cap, valid_hw, generator)
    return _static_selection(valid, num_patches if cap is None else torch.sym_min(num_patches, cap), generator)


def _valid_first(valid: torch.Tensor) -> torch.Tensor:
    """[B, N]: the valid positions in grid order, then the invalid ones in grid order (a stable
    sort on "is invalid"), so that entry k < count is the k-th valid patch and count + k the
    k-th invalid one."""
    return torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices


def _static_selection(valid: torch.Tensor, length, generator: Optional[torch.Generator]) -> PatchSelection:
    """The static sampling: L = length tokens for every image, drawn by tensor ops."""
    batch, num_patches = valid.shape
    counts = valid.sum(dim=1)  # [B]
    message = "an image has no valid patch (all-padding pixel mask); ViLT needs at least one real patch per image"
    if reads_on_host() and not bool(counts.all()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"images {empty} have no valid patch (all-padding pixel mask); "
                         "ViLT needs at least one real patch per image")
    check_value(counts.all(), message)
    # Draws without a generator argument when none is given: torch's generator overloads take
    # no symbolic sizes (torch.compile(dynamic=True)).
    draw = dict(device=valid.device) if generator is None else dict(device=valid.device, generator=generator)

    # Images with at least L valid patches: i.i.d. uniform keys on the valid patches (invalid
    # ones above every key) sorted give a uniformly random order of the valid patches, whose
    # first L are a sample without replacement in sampled order (torch.multinomial's own
    # method for uniform weights, in one batched sort).
    keys = torch.rand(batch, num_patches, **draw).masked_fill(~valid, 2.0)
    shuffled = torch.sort(keys, dim=1).indices[:, :length]  # [B, L]

    # Images with fewer: their valid patches in grid order, then pads drawn with replacement,
    # uniformly among their N - count invalid ones (a scaled uniform, floored).
    slots = torch.arange(length, device=valid.device)[None]  # [1, L]
    invalid_counts = (num_patches - counts)[:, None]  # [B, 1]
    pads = (torch.rand(batch, length, **draw) * invalid_counts).to(torch.int64)
    pads = torch.minimum(pads, (invalid_counts - 1).clamp(min=0))  # u * n may round up to n
    positions = torch.where(slots < counts[:, None], slots, counts[:, None] + pads)  # into _valid_first
    padded = _valid_first(valid).gather(1, positions)

    sampled = counts[:, None] >= length  # [B, 1]
    index = torch.where(sampled, shuffled, padded)
    keep_mask = sampled | (slots < counts[:, None])
    return PatchSelection(index, keep_mask)


def _vilt_selection(valid: torch.Tensor, cap: Optional[int], valid_hw: Optional[torch.Tensor],
                    generator: Optional[torch.Generator]) -> PatchSelection:
    """ViLT's sampling with its exact draws: L from the data, one torch.multinomial per image in
    batch order, on the CPU default generator unless one is given (host reads: eager only)."""
    batch, num_patches = valid.shape
    device = valid.device
    if batch == 0:
        return PatchSelection(torch.zeros(0, 0, dtype=torch.long, device=device),
                              torch.zeros(0, 0, dtype=torch.bool, device=device))
    valid_counts = valid.sum(dim=1)
    counts = valid_counts.tolist()
    empty = [image for image, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError(f"images {empty} have no valid patch (all-padding pixel mask); "
                         "ViLT needs at least one real patch per image")
    if valid_hw is None:
        longest = max(counts)
    else:
        longest = int((valid_hw[:, 0].long() * valid_hw[:, 1].long()).max())
        if longest > num_patches:
            raise ValueError(f"valid_hw gives {longest} patches for an image, more than the grid's {num_patches}")
    length = longest if cap is None else min(longest, cap)
    if length == 0:
        raise ValueError("valid_hw gives every image 0 valid rows or cols, so ViLT would keep no patch")

    # ViLT draws from torch.ones(...) on the CPU; with a generator, draw on its device instead.
    draw_device = generator.device if generator is not None else torch.device("cpu")
    draws = []
    for count in counts:
        if count >= length:
            ones = torch.ones(count, dtype=torch.float32, device=draw_device)
            draws.append(torch.multinomial(ones, length, generator=generator))
        else:
            ones = torch.ones(num_patches - count, dtype=torch.float32, device=draw_device)
            pads = torch.multinomial(ones, length - count, replacement=True, generator=generator)
            draws.append(torch.cat([torch.arange(count, device=draw_device), count + pads]))
    positions = torch.stack(draws).to(device)  # [B, L] into _valid_first
    index = _valid_first(valid).gather(1, positions)
    keep_mask = positions < valid_counts[:, None]
    return PatchSelection(index, keep_mask)


def vilt_visual_embed(
    patches: torch.Tensor,
    patch_mask: torch.Tensor,
    grid_hw: Sequence[int],
    cls_token: torch.Tensor,
    max_image_len: Optional[int] = 200,
    *,
    pos: Optional[torch.Tensor] = None,
    cls_pos: Optional[torch.Tensor] = None,
    valid_hw: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sampling: str = "static",
) -> ViltVisualTokens:
    """ViLT's image tokens from full-grid patch embeddings: sample, add pos-embed, prepend cls.

    patches: [B, H*W, D], the patch projection of the padded images, row-major
    patch_mask: [B, H*W] bool, valid patches (from ``valid_patch_grid``)
    grid_hw: (H, W), the patch grid
    cls_token: [1, 1, D] (or [D])
    max_image_len: cap on the patch tokens per image; None or <= 0 = no cap (ViLT default 200)
    pos: [B, H*W, D] per-image pos-embed (from ``interpolate_pos_embed``), added to the selected
        patches; None when it is already in ``patches`` (e.g. added by the fused patch_embed)
    cls_pos: [1, 1, D] (or [D]), the pos-embed's cls entry added to cls_token; None = none
    valid_hw: [B, 2] (from ``valid_patch_grid``); pass it for ViLT's exact token count with
        ``sampling="vilt"``
    generator, sampling: see ``select_patches`` (``"static"``: L = min(H*W, cap), one graph under
        torch.compile; ``"vilt"``: ViLT's L and its draws under the same seed)
    returns: ViltVisualTokens(embeddings [B, 1+L, D], mask [B, 1+L] bool, patch_index [B, L, 2])
    """
    rows, cols = _grid_size(grid_hw)
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3 or patches.shape[1] != rows * cols:
        shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"patches must be [B, H*W, D] with H*W = {rows}*{cols} = {rows * cols}, got {shape}")
    batch, num_patches, embed_dim = patches.shape
    if not isinstance(patch_mask, torch.Tensor) or tuple(patch_mask.shape) != (batch, num_patches):
        shape = tuple(patch_mask.shape) if isinstance(patch_mask, torch.Tensor) else type(patch_mask).__name__
        raise ValueError(f"patch_mask must be [B, H*W] = {(batch, num_patches)}, got {shape}")
    if pos is not None and tuple(pos.shape) != tuple(patches.shape):
        raise ValueError(f"pos must match patches {tuple(patches.shape)}, got {tuple(pos.shape)}")
    if cls_token.numel() != embed_dim or cls_token.dim() not in (1, 3):
        raise ValueError(f"cls_token must be [1, 1, D] or [D] with D = {embed_dim}, got {tuple(cls_token.shape)}")
    if cls_pos is not None and (cls_pos.numel() != embed_dim or cls_pos.dim() not in (1, 3)):
        raise ValueError(f"cls_pos must be [1, 1, D] or [D] with D = {embed_dim}, got {tuple(cls_pos.shape)}")
    if valid_hw is not None:
        _check_valid_hw(valid_hw, batch, (rows, cols))

    selection = select_patches(patch_mask, max_image_len, valid_hw=valid_hw, generator=generator, sampling=sampling)
    gather_index = selection.index[:, :, None].expand(-1, -1, embed_dim)
    tokens = patches.gather(1, gather_index)  # [B, L, D]
    if pos is not None:
        tokens = tokens + pos.gather(1, gather_index)
    cls = cls_token.reshape(1, 1, embed_dim)
    if cls_pos is not None:
        cls = cls + cls_pos.reshape(1, 1, embed_dim)
    embeddings = torch.cat([cls.to(tokens.dtype).expand(batch, 1, embed_dim), tokens], dim=1)
    mask = torch.cat([selection.keep_mask.new_ones(batch, 1), selection.keep_mask], dim=1)
    patch_index = torch.stack([selection.index // cols, selection.index % cols], dim=-1)
    return ViltVisualTokens(embeddings, mask, patch_index)
