"""vilt_patches: pos-embed interpolation against an independent per-image loop in float64 (and
F.interpolate at every size in fp32), the valid patch grid against the nearest-neighbour
formula, both samplings' invariants on random masks, the static sampling's law and its single
graph under torch.compile(dynamic=True), and parity of the "vilt" sampling with HuggingFace's
ViltEmbeddings.visual_embed under the same seed (its draws are pinned there)."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from vlkernels import value_checks
from vlkernels.ops.vilt_patches import (
    interpolate_pos_embed,
    select_patches,
    valid_patch_grid,
    vilt_visual_embed,
)
from vlkernels.testing import DEVICE


def loop_pos_embed(pos_grid, valid_hw, grid_hw):
    """Independent oracle: one F.interpolate + F.pad per image, as ViLT writes it."""
    rows, cols = grid_hw
    out = []
    for h, w in valid_hw.tolist():
        if h == 0 or w == 0:
            out.append(pos_grid.new_zeros(1, pos_grid.shape[1], rows, cols))
            continue
        resized = F.interpolate(pos_grid, size=(h, w), mode="bilinear", align_corners=True)
        out.append(F.pad(resized, (0, cols - w, 0, rows - h)))
    return torch.cat(out).flatten(2).transpose(1, 2)


# (D, pos grid (gh0, gw0), B, batch grid (H, W))
INTERP_CASES = [
    (5, (12, 12), 6, (12, 20)),
    (3, (4, 7), 9, (9, 5)),  # upsampling rows, downsampling cols
    (16, (3, 3), 4, (1, 8)),
    (7, (2, 5), 11, (13, 3)),
]


def interp_id(case):
    d, (gh, gw), b, (h, w) = case
    return f"D{d}-pos{gh}x{gw}-B{b}-grid{h}x{w}"


def random_valid_hw(batch, grid_hw, generator, zeros=False):
    rows, cols = grid_hw
    low = 0 if zeros else 1
    valid_hw = torch.stack([torch.randint(low, rows + 1, (batch,), generator=generator),
                            torch.randint(low, cols + 1, (batch,), generator=generator)], dim=1)
    valid_hw[-1] = valid_hw[0]  # at least one repeated size
    valid_hw[1] = torch.tensor([rows, cols])  # and one image filling the grid
    return valid_hw


@pytest.mark.parametrize("case", INTERP_CASES, ids=interp_id)
@pytest.mark.parametrize("with_zero_sizes", [False, True], ids=["sizes>=1", "with-zero-sizes"])
def test_interpolate_matches_per_image_loop(case, with_zero_sizes):
    d, (gh, gw), batch, grid_hw = case
    generator = torch.Generator().manual_seed(zlib.crc32(interp_id(case).encode()))
    pos_grid = torch.randn(1, d, gh, gw, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_()
    valid_hw = random_valid_hw(batch, grid_hw, generator, zeros=with_zero_sizes).to(DEVICE)

    actual = interpolate_pos_embed(pos_grid, valid_hw, grid_hw)
    expected = loop_pos_embed(pos_grid, valid_hw, grid_hw)
    assert actual.shape == (batch, grid_hw[0] * grid_hw[1], d)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(actual.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    (grad_actual,) = torch.autograd.grad(actual, pos_grid, upstream)
    (grad_expected,) = torch.autograd.grad(expected, pos_grid, upstream)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=1e-12, atol=1e-12)


def test_interpolate_float32_matches_loop():
    generator = torch.Generator().manual_seed(3)
    pos_grid = torch.randn(1, 9, 6, 6, generator=generator).to(DEVICE)
    valid_hw = random_valid_hw(7, (10, 11), generator).to(DEVICE)
    actual = interpolate_pos_embed(pos_grid, valid_hw, (10, 11))
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, loop_pos_embed(pos_grid, valid_hw, (10, 11)), rtol=1e-6, atol=1e-6)


def test_full_size_image_gets_the_unchanged_grid():
    generator = torch.Generator().manual_seed(4)
    pos_grid = torch.randn(1, 8, 5, 7, generator=generator, dtype=torch.float64).to(DEVICE)
    flat = pos_grid.flatten(2).transpose(1, 2)[0]  # [35, D]

    same = interpolate_pos_embed(pos_grid, torch.tensor([[5, 7], [5, 7]], device=DEVICE), (5, 7))
    assert torch.equal(same, flat.expand(2, -1, -1))

    # In a larger batch grid the image's rows sit top-left, zeros elsewhere.
    larger = interpolate_pos_embed(pos_grid, torch.tensor([[5, 7], [2, 3]], device=DEVICE), (6, 9))
    grid = larger[0].view(6, 9, 8)
    assert torch.equal(grid[:5, :7].reshape(35, 8), flat)
    assert not grid[5:].any() and not grid[:, 7:].any()
    assert not larger[1].view(6, 9, 8)[2:].any() and not larger[1].view(6, 9, 8)[:, 3:].any()


def test_interpolate_every_size_matches_f_interpolate():
    """fp32 at every (h, w) of a 12x12 grid resized into a 12x20 batch grid (ViLT-B/32's): the
    interpolation weights round as F.interpolate's do (its scale is one fp32 division)."""
    generator = torch.Generator().manual_seed(5)
    pos_grid = torch.randn(1, 16, 12, 12, generator=generator).to(DEVICE)
    valid_hw = torch.tensor([(h, w) for h in range(1, 13) for w in range(1, 21)], device=DEVICE)
    actual = interpolate_pos_embed(pos_grid, valid_hw, (12, 20))
    torch.testing.assert_close(actual, loop_pos_embed(pos_grid, valid_hw, (12, 20)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_interpolate_half_grid_rounds_once(dtype):
    """A 16-bit grid is interpolated in fp32 and rounded once, as F.interpolate does."""
    generator = torch.Generator().manual_seed(6)
    pos_grid = torch.randn(1, 8, 6, 6, generator=generator).to(DEVICE)
    valid_hw = random_valid_hw(5, (7, 9), generator).to(DEVICE)
    actual = interpolate_pos_embed(pos_grid.to(dtype), valid_hw, (7, 9))
    assert actual.dtype == dtype
    expected = loop_pos_embed(pos_grid.to(dtype).float(), valid_hw, (7, 9)).to(dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=torch.finfo(dtype).eps * 4)


@pytest.mark.parametrize("bad, match", [
    (dict(pos_grid=torch.randn(2, 4, 3, 3)), "pos_grid must be"),
    (dict(pos_grid=torch.randn(4, 3, 3)), "pos_grid must be"),
    (dict(valid_hw=torch.tensor([3, 3])), "valid_hw must be a"),
    (dict(valid_hw=torch.tensor([[3, 3, 1]])), "valid_hw must be a"),
    (dict(valid_hw=torch.tensor([[6, 3]])), "exceeds the patch grid"),
    (dict(valid_hw=torch.tensor([[-1, 3]])), "negative"),
    (dict(grid_hw=(0, 4)), "grid_hw must be positive"),
    (dict(grid_hw=(4,)), "grid_hw must be two ints"),
], ids=["pos-batch2", "pos-3d", "hw-1d", "hw-3cols", "hw-too-big", "hw-negative", "grid-zero", "grid-1"])
def test_interpolate_rejects_bad_input(bad, match):
    args = dict(pos_grid=torch.randn(1, 4, 3, 3), valid_hw=torch.tensor([[2, 3], [4, 4]]), grid_hw=(5, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):  # the tests' value checks read on the host (conftest)
        interpolate_pos_embed(**args)
    if match in ("exceeds the patch grid", "negative"):  # checked in place in the default device mode
        with value_checks("device"), pytest.raises(RuntimeError, match=match):
            interpolate_pos_embed(**args)


# ------------------------------------------------------------------------------------------
# valid_patch_grid
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32], ids=["long", "bool", "float"])
def test_valid_patch_grid_matches_nearest_formula(mask_dtype):
    generator = torch.Generator().manual_seed(6)
    batch, height_px, width_px, rows, cols = 8, 70, 93, 5, 7  # pixel sizes not multiples of the grid
    real_hw = torch.stack([torch.randint(1, height_px + 1, (batch,), generator=generator),
                           torch.randint(1, width_px + 1, (batch,), generator=generator)], dim=1)
    pixel_mask = torch.zeros(batch, height_px, width_px, dtype=mask_dtype)
    for b, (h, w) in enumerate(real_hw.tolist()):
        pixel_mask[b, :h, :w] = 1
    patch_mask, valid_hw = valid_patch_grid(pixel_mask.to(DEVICE), (rows, cols))

    # Nearest: output cell i reads input pixel floor(i * in / out).
    source_rows = torch.arange(rows) * height_px // rows
    source_cols = torch.arange(cols) * width_px // cols
    expected_rows = source_rows[None] < real_hw[:, :1]  # [B, H]
    expected_cols = source_cols[None] < real_hw[:, 1:]  # [B, W]
    expected_mask = (expected_rows[:, :, None] & expected_cols[:, None, :]).flatten(1)
    assert patch_mask.dtype == torch.bool and patch_mask.shape == (batch, rows * cols)
    assert torch.equal(patch_mask.cpu(), expected_mask)
    assert torch.equal(valid_hw.cpu(), torch.stack([expected_rows.sum(1), expected_cols.sum(1)], dim=1))


def test_valid_patch_grid_counts_column_0_and_row_0():
    # ViLT's rule on a non-rectangular mask: h from column 0, w from row 0.
    pixel_mask = torch.zeros(1, 4, 5, dtype=torch.long)
    pixel_mask[0, :3, 0] = 1  # column 0: 3 rows
    pixel_mask[0, 0, :2] = 1  # row 0: 2 cols
    pixel_mask[0, 3, 4] = 1  # a stray real pixel elsewhere
    patch_mask, valid_hw = valid_patch_grid(pixel_mask, (4, 5))
    assert valid_hw.tolist() == [[3, 2]]
    assert patch_mask.sum().item() == 5


def test_valid_patch_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="pixel_mask must be"):
        valid_patch_grid(torch.ones(2, 1, 8, 8), (2, 2))
    with pytest.raises(ValueError, match="grid_hw"):
        valid_patch_grid(torch.ones(2, 8, 8), (2, -2))


# ------------------------------------------------------------------------------------------
# select_patches
# ------------------------------------------------------------------------------------------
def random_patch_mask(batch, num_patches, generator):
    """Random masks of varied density, each image with at least one valid patch, one full."""
    density = torch.rand(batch, 1, generator=generator)
    mask = torch.rand(batch, num_patches, generator=generator) < density
    mask[torch.arange(batch), torch.randint(0, num_patches, (batch,), generator=generator)] = True
    mask[batch // 2] = True
    return mask


def check_selection(selection, mask, expected_length):
    index, keep_mask = selection
    batch, num_patches = mask.shape
    assert index.shape == (batch, expected_length) and index.dtype == torch.int64
    assert keep_mask.shape == (batch, expected_length) and keep_mask.dtype == torch.bool
    assert int(index.min()) >= 0 and int(index.max()) < num_patches
    for b in range(batch):
        count = int(mask[b].sum())
        chosen = index[b].tolist()
        if count >= expected_length:
            assert len(set(chosen)) == expected_length, "sampled with replacement among valid patches"
            assert bool(mask[b, index[b]].all()), "kept an invalid patch"
            assert bool(keep_mask[b].all())
        else:
            valid_positions = mask[b].nonzero().squeeze(1).tolist()
            assert chosen[:count] == valid_positions, "valid patches not all kept in grid order"
            assert not bool(mask[b, index[b, count:]].any()), "pad drawn from a valid patch"
            assert bool(keep_mask[b, :count].all()) and not bool(keep_mask[b, count:].any())


def expected_length(sampling, mask, cap):
    """static: min(N, cap); vilt: min(largest valid count, cap) (no cap for None or <= 0)."""
    longest = mask.shape[1] if sampling == "static" else int(mask.sum(1).max())
    return longest if cap is None or cap <= 0 else min(longest, cap)


def _generator():
    return torch.Generator(device=DEVICE)  # the static draws are on the mask's device


@pytest.mark.parametrize("sampling", ["static", "vilt"])
@pytest.mark.parametrize("cap", [None, -1, 0, 1, 6, 17, 1000], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("batch, num_patches", [(7, 35), (1, 12), (12, 97)], ids=lambda v: str(v))
def test_selection_invariants(batch, num_patches, cap, sampling):
    generator = torch.Generator().manual_seed(batch * 1000 + num_patches)
    mask = random_patch_mask(batch, num_patches, generator)
    draws = generator if sampling == "vilt" else _generator().manual_seed(batch)
    selection = select_patches(mask.to(DEVICE), cap, generator=draws, sampling=sampling)
    assert selection.index.device.type == DEVICE.type
    check_selection((selection.index.cpu(), selection.keep_mask.cpu()), mask, expected_length(sampling, mask, cap))


@pytest.mark.parametrize("sampling", ["static", "vilt"])
def test_selection_samples_all_valid_patches_over_draws(sampling):
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, ::2] = True  # 10 valid, capped to 3
    mask[1, :2] = True  # 2 valid, padded to 3 from 18 invalid
    generator = (torch.Generator() if sampling == "vilt" else _generator()).manual_seed(7)
    seen_valid, seen_pad = set(), set()
    for _ in range(300):
        index, _ = select_patches(mask.to(DEVICE), 3, generator=generator, sampling=sampling)
        seen_valid.update(index[0].tolist())
        seen_pad.update(index[1, 2:].tolist())
    assert seen_valid == set(range(0, 20, 2))
    assert seen_pad == set(range(2, 20))


def test_static_sampling_law():
    """The static draws' law is ViLT's: 4000 copies of two images in one call. Image 0 (10
    valid patches, L = 4): each valid patch kept with probability 4/10, in every slot alike
    (a uniformly random order); image 1 (2 valid): both kept in grid order, each pad uniform
    over the 18 invalid patches. Frequencies within 5 standard deviations."""
    copies, num_patches, length = 4000, 20, 4
    mask = torch.zeros(2, num_patches, dtype=torch.bool)
    mask[0, 1::2] = True
    mask[1, [3, 11]] = True
    masks = mask.repeat(copies, 1).to(DEVICE)
    index, keep = select_patches(masks, length, generator=_generator().manual_seed(3))
    index, keep = index.cpu().view(copies, 2, length), keep.cpu().view(copies, 2, length)

    def near(count, trials, p):
        return abs(count - trials * p) <= 5 * (trials * p * (1 - p)) ** 0.5

    for slot in range(length):  # image 0: every slot uniform over the 10 valid patches
        counts = torch.bincount(index[:, 0, slot], minlength=num_patches)
        assert counts[0::2].sum() == 0 and all(near(int(c), copies, 1 / 10) for c in counts[1::2])
    kept = torch.zeros(copies, num_patches).scatter_(1, index[:, 0], 1.0).sum(0)
    assert all(near(int(c), copies, 4 / 10) for c in kept[1::2]) and bool(keep[:, 0].all())
    assert bool((index[:, 1, :2] == torch.tensor([3, 11])).all()) and bool(keep[:, 1, :2].all())
    pads = torch.bincount(index[:, 1, 2:].flatten(), minlength=num_patches)
    assert pads[3] == 0 and pads[11] == 0 and not bool(keep[:, 1, 2:].any())
    others = [c for position, c in enumerate(pads.tolist()) if position not in (3, 11)]
    assert all(near(c, 2 * copies, 1 / 18) for c in others)


@pytest.mark.parametrize("sampling", ["static", "vilt"])
def test_selection_generator_reproducible_and_leaves_global_rng(sampling):
    mask = random_patch_mask(5, 40, torch.Generator().manual_seed(8)).to(DEVICE)
    make = (lambda: torch.Generator()) if sampling == "vilt" else _generator
    state = torch.get_rng_state()
    first = select_patches(mask, 9, generator=make().manual_seed(11), sampling=sampling)
    second = select_patches(mask, 9, generator=make().manual_seed(11), sampling=sampling)
    other = select_patches(mask, 9, generator=make().manual_seed(12), sampling=sampling)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.index, second.index) and torch.equal(first.keep_mask, second.keep_mask)
    assert not torch.equal(first.index, other.index)


def test_selection_valid_hw_sets_length():
    # Non-rectangular masks: ViLT's length is the largest h*w, not the largest count.
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [0, 1, 2, 4]] = True  # count 4
    mask[1, [0, 5]] = True  # count 2
    valid_hw = torch.tensor([[2, 3], [1, 1]])  # areas 6 and 1
    selection = select_patches(mask, None, valid_hw=valid_hw, generator=torch.Generator().manual_seed(0),
                               sampling="vilt")
    check_selection(selection, mask, 6)
    assert select_patches(mask, None, sampling="vilt").index.shape == (2, 4)
    # static: the grid's size, whatever the counts
    check_selection(select_patches(mask, None, valid_hw=valid_hw), mask, 12)


def test_static_length_is_vilts_when_an_image_fills_the_grid():
    """ViLT's collate pads the batch to its largest image, which then fills the grid: both
    samplings keep the same number of tokens, and of real patches per image. Without a full
    image (a tall and a wide one) the static length is larger by pads only."""
    mask = random_patch_mask(6, 30, torch.Generator().manual_seed(9))  # image 3 fills the grid
    for cap in (-1, 7, 30):
        static, vilt = select_patches(mask, cap), select_patches(mask, cap, sampling="vilt")
        assert static.index.shape == vilt.index.shape
        assert torch.equal(static.keep_mask.sum(1), vilt.keep_mask.sum(1))
    tall_and_wide = torch.zeros(2, 4, 5, dtype=torch.bool)
    tall_and_wide[0, :, :2], tall_and_wide[1, :1, :] = True, True  # 8 and 5 valid of 20
    static = select_patches(tall_and_wide.flatten(1), -1)
    vilt = select_patches(tall_and_wide.flatten(1), -1, sampling="vilt")
    assert static.index.shape == (2, 20) and vilt.index.shape == (2, 8)
    assert static.keep_mask.sum(1).tolist() == vilt.keep_mask.sum(1).tolist() == [8, 5]


def test_selection_rejects_bad_input():
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"images \[1\] have no valid patch"):
        select_patches(mask, 5, sampling="vilt")
    with pytest.raises(ValueError, match=r"images \[1\] have no valid patch"):  # host checks (conftest)
        select_patches(mask, 5)
    with value_checks("device"), pytest.raises(RuntimeError, match="an image has no valid patch"):
        select_patches(mask, 5)  # static, default mode: checked in place
    with pytest.raises(ValueError, match="sampling must be one of"):
        select_patches(torch.ones(3, 10, dtype=torch.bool), 5, sampling="random")
    with pytest.raises(ValueError, match="patch_mask must be"):
        select_patches(torch.ones(3, 2, 5, dtype=torch.bool), 5)
    with pytest.raises(TypeError, match="max_image_len"):
        select_patches(torch.ones(3, 10, dtype=torch.bool), 2.5)
    with pytest.raises(ValueError, match="one per image"):
        select_patches(torch.ones(3, 10, dtype=torch.bool), 5, valid_hw=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="more than the grid"):
        select_patches(torch.ones(1, 10, dtype=torch.bool), 5, valid_hw=torch.tensor([[4, 3]]), sampling="vilt")


# ------------------------------------------------------------------------------------------
# vilt_visual_embed
# ------------------------------------------------------------------------------------------
def test_visual_embed_gathers_tokens_and_pos():
    generator = torch.Generator().manual_seed(9)
    batch, rows, cols, dim = 4, 5, 6, 7
    mask = random_patch_mask(batch, rows * cols, generator).to(DEVICE)
    patches = torch.randn(batch, rows * cols, dim, generator=generator).to(DEVICE)
    pos = torch.randn(batch, rows * cols, dim, generator=generator).to(DEVICE)
    cls_token, cls_pos = torch.randn(2, 1, 1, dim, generator=generator).to(DEVICE)

    out = vilt_visual_embed(patches, mask, (rows, cols), cls_token, 11, pos=pos, cls_pos=cls_pos,
                            generator=_generator().manual_seed(1))
    selection = select_patches(mask, 11, generator=_generator().manual_seed(1))
    length = selection.index.shape[1]
    assert out.embeddings.shape == (batch, 1 + length, dim)
    assert torch.equal(out.mask[:, 0], torch.ones(batch, dtype=torch.bool, device=DEVICE))
    assert torch.equal(out.mask[:, 1:], selection.keep_mask)
    assert torch.equal(out.patch_index[..., 0] * cols + out.patch_index[..., 1], selection.index)
    assert int(out.patch_index[..., 1].max()) < cols and int(out.patch_index[..., 0].max()) < rows
    for b in range(batch):
        torch.testing.assert_close(out.embeddings[b, 0], (cls_token + cls_pos).view(dim))
        expected = patches[b, selection.index[b]] + pos[b, selection.index[b]]
        torch.testing.assert_close(out.embeddings[b, 1:], expected)

    # pos already inside patches (the fused patch_embed) gives the same tokens.
    fused = vilt_visual_embed(patches + pos, mask, (rows, cols), (cls_token + cls_pos).view(dim), 11,
                              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused.embeddings, out.embeddings)


def _visual_tokens(pixel_mask, patches, pos_grid, cls_token):
    """The helpers' chain as a model runs it, at any batch size and pixel grid (8-pixel patches)."""
    grid_hw = (pixel_mask.shape[1] // 8, pixel_mask.shape[2] // 8)
    patch_mask, valid_hw = valid_patch_grid(pixel_mask, grid_hw)
    pos = interpolate_pos_embed(pos_grid, valid_hw, grid_hw)
    return vilt_visual_embed(patches, patch_mask, grid_hw, cls_token, 12, pos=pos, valid_hw=valid_hw)


def test_static_chain_compiles_to_one_graph_over_sizes():
    """dynamic=True, fullgraph=True: one graph over 4 batch sizes and pixel grids (the first
    not square: dynamo's duck sizing would tie H to W), equal to eager under one seed."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_visual_tokens, backend=counter, dynamic=True, fullgraph=True)
    generator = torch.Generator().manual_seed(10)
    for batch, (height, width) in ((2, (32, 40)), (3, (48, 24)), (5, (40, 40)), (7, (24, 56))):
        pixel_mask = torch.ones(batch, height, width)
        pixel_mask[1:, height // 2:] = 0  # smaller images: pads and fewer valid patches
        pixel_mask[0, :, width - 9:] = 0
        patches = torch.randn(batch, (height // 8) * (width // 8), 6, generator=generator)
        pos_grid, cls_token = torch.randn(1, 6, 3, 3, generator=generator), torch.randn(1, 1, 6, generator=generator)
        inputs = [t.to(DEVICE) for t in (pixel_mask, patches, pos_grid, cls_token)]
        torch.manual_seed(1)
        actual = compiled(*inputs)
        torch.manual_seed(1)
        expected = _visual_tokens(*inputs)
        assert torch.equal(actual.patch_index, expected.patch_index) and torch.equal(actual.mask, expected.mask)
        torch.testing.assert_close(actual.embeddings, expected.embeddings)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs over 4 sizes"
    torch._dynamo.reset()


@pytest.mark.parametrize("bad, match", [
    (dict(patches=torch.randn(2, 11, 4)), "patches must be"),
    (dict(patch_mask=torch.ones(2, 11, dtype=torch.bool)), "patch_mask must be"),
    (dict(pos=torch.randn(2, 12, 5)), "pos must match"),
    (dict(cls_token=torch.randn(1, 1, 5)), "cls_token must be"),
    (dict(cls_pos=torch.randn(1, 4)), "cls_pos must be"),
    (dict(grid_hw=(4, 4)), "patches must be"),
    (dict(valid_hw=torch.tensor([[3, 4]])), "one per image"),
], ids=["patches-N", "mask-N", "pos-D", "cls-D", "cls_pos-2d", "grid", "valid_hw-B"])
def test_visual_embed_rejects_bad_input(bad, match):
    args = dict(patches=torch.randn(2, 12, 4), patch_mask=torch.ones(2, 12, dtype=torch.bool), grid_hw=(3, 4),
                cls_token=torch.randn(1, 1, 4), max_image_len=5, pos=torch.randn(2, 12, 4),
                cls_pos=torch.randn(1, 1, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        vilt_visual_embed(**args)


# ------------------------------------------------------------------------------------------
# Parity with HuggingFace ViltEmbeddings.visual_embed
# ------------------------------------------------------------------------------------------
def tiny_vilt(patch_size):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViltConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, image_size=64, patch_size=patch_size, num_channels=3,
        max_image_length=-1, num_images=-1,
    )
    torch.manual_seed(0)
    model = transformers.ViltModel(config).eval()
    embeddings = model.embeddings
    with torch.no_grad():  # HF initialises cls and pos to zeros: make every input random
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_()
        embeddings.patch_embeddings.projection.weight.normal_(std=0.2)
        embeddings.patch_embeddings.projection.bias.normal_()
    return model


def ours_visual_embed(model, pixel_values, pixel_mask, max_image_len):
    """The composition of the helpers with the HF module's own projection, cls and pos."""
    embeddings = model.embeddings
    patch_grid = embeddings.patch_embeddings(pixel_values)  # [B, D, H, W]
    batch, dim, rows, cols = patch_grid.shape
    patches = patch_grid.flatten(2).transpose(1, 2)
    side = model.config.image_size // model.config.patch_size
    pos_grid = embeddings.position_embeddings[:, 1:].transpose(1, 2).reshape(1, dim, side, side)
    patch_mask, valid_hw = valid_patch_grid(pixel_mask, (rows, cols))
    pos = interpolate_pos_embed(pos_grid, valid_hw, (rows, cols))
    return vilt_visual_embed(patches, patch_mask, (rows, cols), embeddings.cls_token, max_image_len,
                             pos=pos, cls_pos=embeddings.position_embeddings[:, :1], valid_hw=valid_hw,
                             sampling="vilt")


# (patch size, padded image (Hpx, Wpx), real pixels per image (h, w) or "holes")
PARITY_CASES = [
    (16, (96, 128), [(96, 128), (40, 70), (16, 33), (64, 64), (95, 17)]),
    (8, (72, 88), [(30, 50), (72, 88), (9, 9), (50, 80)]),
    (16, (64, 96), [(64, 96), "holes", (20, 90)]),
    (8, (40, 48), [(17, 41), (33, 8), (40, 23)]),  # no image fills the grid
]


def parity_id(case):
    patch, (height, width), sizes = case
    return f"P{patch}-{height}x{width}-B{len(sizes)}" + ("-holes" if "holes" in sizes else "")


def make_pixel_inputs(case, generator):
    patch, (height, width), sizes = case
    pixel_values = torch.randn(len(sizes), 3, height, width, generator=generator)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for b, size in enumerate(sizes):
        if size == "holes":  # non-rectangular: full image with two padded patch-sized holes
            pixel_mask[b] = 1
            pixel_mask[b, patch:2 * patch, patch:2 * patch] = 0
            pixel_mask[b, -patch:, -patch:] = 0
        else:
            pixel_mask[b, :size[0], :size[1]] = 1
    return pixel_values, pixel_mask


@pytest.mark.parametrize("case", PARITY_CASES, ids=parity_id)
@pytest.mark.parametrize("cap", [-1, 3, "equal", 10_000], ids=lambda c: f"cap{c}")
def test_parity_with_huggingface(case, cap):
    model = tiny_vilt(case[0])
    generator = torch.Generator().manual_seed(zlib.crc32(parity_id(case).encode()))
    pixel_values, pixel_mask = make_pixel_inputs(case, generator)
    if cap == "equal":  # the cap equals one image's valid count: that image is permuted, others pad
        _, valid_hw = valid_patch_grid(pixel_mask, (case[1][0] // case[0], case[1][1] // case[0]))
        cap = int(valid_hw.prod(1).sort().values[len(valid_hw) // 2])

    with torch.no_grad():
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            expected, expected_mask, (expected_index, expected_hw) = model.embeddings.visual_embed(
                pixel_values, pixel_mask, max_image_length=cap)
            expected_state = torch.get_rng_state()
            torch.manual_seed(seed)
            ours = ours_visual_embed(model, pixel_values, pixel_mask, cap)
            assert torch.equal(torch.get_rng_state(), expected_state), "different number of random draws"

            assert torch.equal(ours.patch_index, expected_index)
            assert torch.equal(ours.mask.long(), expected_mask)
            assert tuple(expected_hw) == (case[1][0] // case[0], case[1][1] // case[0])
            torch.testing.assert_close(ours.embeddings, expected, rtol=1e-6, atol=1e-6)
            if cap > 0:
                assert ours.embeddings.shape[1] - 1 <= cap
            if cap == -1:  # images of different sizes: the smaller ones must have been padded
                assert not bool(ours.mask.all())
