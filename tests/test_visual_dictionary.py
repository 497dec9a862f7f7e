"""Visual dictionary: nearest-entry search and the moving-average update (Triton in the
interpreter or on the GPU, the C++ update, the torch path; against float64 references), the
module and its MVM helpers, SOHO after a batch without a real grid cell."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vlkernels
from vlkernels import _deterministic
from vlkernels._backend import NoBackendError
from vlkernels.nn import VisualDictionary, mvm_mask
from vlkernels.ops import vd_ema_update_, vd_nearest
from vlkernels.ops import visual_dictionary as vd_ops
from vlkernels.reference import visual_dictionary as reference
from vlkernels.testing import DEVICE, HostReads, dtype_id, kernel_dtypes, poisoned_allocations, rel_error

BACKENDS = ["torch", "triton"]
UPDATE_BACKENDS = BACKENDS + ["cpp"]  # the C++ update: CPU tensors


def device_for(backend):
    return torch.device("cpu") if backend == "cpp" else DEVICE
# (N, K, D): one row, one entry, K and D not powers of two, several K tiles
SIZES = [(1, 5, 8), (7, 1, 16), (97, 37, 33), (300, 200, 64), (130, 129, 96)]


def brute_force_sqdist(x, codebook):
    return (x.double()[:, None, :] - codebook.double()[None, :, :]).square().sum(-1)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}-K{}-D{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_finds_the_closest_entry(backend, size, dtype):
    n, k, d = size
    generator = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(n, d, generator=generator).to(DEVICE, dtype)
    codebook = torch.randn(k, d, generator=generator).to(DEVICE, dtype)
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x, codebook)
    assert index.dtype == torch.int64 and sqdist.dtype == torch.float32
    exact = brute_force_sqdist(x.cpu(), codebook.cpu())
    chosen = exact.gather(1, index.cpu()[:, None])[:, 0]
    best = exact.min(1).values
    # The chosen entry is the nearest up to the rounding of fp32 accumulation over D terms.
    slack = 1e-4 * exact.abs().max(1).values
    assert torch.all(chosen <= best + slack), (chosen - best).max()
    assert rel_error(sqdist, chosen) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_breaks_ties_to_the_lowest_index(backend):
    """Integer features make every distance exact: duplicate entries and duplicate rows tie."""
    generator = torch.Generator().manual_seed(4)
    codebook = torch.randint(-3, 4, (150, 24), generator=generator).float()
    codebook[[10, 77, 140]] = codebook[3].clone()  # four identical entries
    x = torch.cat([codebook[3:4].repeat(5, 1), torch.randint(-3, 4, (60, 24), generator=generator).float()])
    with vlkernels.use_backend(backend):
        index, sqdist = vd_nearest(x.to(DEVICE), codebook.to(DEVICE))
    exact = brute_force_sqdist(x, codebook)
    first_minimum = (exact == exact.min(1, keepdim=True).values).float().argmax(1)
    assert torch.equal(index.cpu(), first_minimum)
    assert torch.equal(sqdist.cpu().double(), exact.min(1).values)


def random_step(generator, n, k, d, dtype, masked, device=DEVICE):
    x = torch.randn(n, d, generator=generator).to(device, dtype)
    index = torch.randint(0, k // 2, (n,), generator=generator).to(device)  # half the entries stay empty
    mask = (torch.rand(n, generator=generator) < 0.7).to(device) if masked else None
    return x, index, mask


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_follows_the_reference_over_20_steps(backend, dtype, masked):
    k, d, device = 19, 40, device_for(backend)
    generator = torch.Generator().manual_seed(8)
    codebook = torch.randn(k, d, generator=generator)
    state = dict(codebook=codebook.to(device), cluster_size=torch.zeros(k, device=device),
                 embed_avg=torch.zeros(k, d, device=device))
    expected = dict(codebook=codebook.double(), cluster_size=torch.zeros(k, dtype=torch.float64),
                    embed_avg=torch.zeros(k, d, dtype=torch.float64))
    for step in range(20):
        x, index, mask = random_step(generator, 50 + step, k, d, dtype, masked, device)
        with vlkernels.use_backend(backend):
            vd_ema_update_(*state.values(), x, index, decay=0.4, mask=mask)
        reference.vd_ema_update_(*expected.values(), x.cpu().double(), index.cpu(), decay=0.4,
                                 mask=None if mask is None else mask.cpu())
    for name in state:
        assert torch.isfinite(state[name]).all(), name
        assert rel_error(state[name], expected[name]) < 1e-5, name


def test_update_statistics_match_a_dense_count():
    generator = torch.Generator().manual_seed(9)
    x, index, mask = random_step(generator, 333, 41, 24, torch.float32, masked=True)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        from vlkernels.ops.visual_dictionary import _cluster_statistics_op

        counts, sums = _cluster_statistics_op(x, index, 41, mask)
    one_hot = torch.nn.functional.one_hot(index.cpu(), 41).double() * mask.cpu().double()[:, None]
    assert torch.equal(counts.cpu().double(), one_hot.sum(0))
    assert rel_error(sums, one_hot.T @ x.cpu().double()) < 1e-6


BAD = {
    "feature-mismatch": (lambda c, s, a, x, i: (c, s, a, x[:, :-1], i), ValueError, "x has 7 features"),
    "index-high": (lambda c, s, a, x, i: (c, s, a, x, i + 5), IndexError, r"must lie in \[0, 5\)"),
    "index-negative": (lambda c, s, a, x, i: (c, s, a, x, i - 5), IndexError, r"must lie in \[0, 5\)"),
    "index-dtype": (lambda c, s, a, x, i: (c, s, a, x, i.int()), ValueError, "index must be int64"),
    "state-shape": (lambda c, s, a, x, i: (c, s[:-1], a, x, i), ValueError, r"cluster_size must be \[5\]"),
    "state-dtype": (lambda c, s, a, x, i: (c, s.half(), a, x, i), TypeError, "cluster_size must be a float32"),
    "codebook-empty": (lambda c, s, a, x, i: (c[:0], s[:0], a[:0], x, i), ValueError, "the codebook is empty"),
    "codebook-expanded": (lambda c, s, a, x, i: (c[:1].expand(5, 8), s, a, x, i), ValueError,
                          "codebook has elements sharing memory"),
    "state-expanded": (lambda c, s, a, x, i: (c, s[:1].expand(5), a, x, i), ValueError,
                       "cluster_size has elements sharing memory"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_bad_update_inputs_raise_before_any_change(backend, case):
    build, error, message = BAD[case]
    device = device_for(backend)
    codebook = torch.randn(5, 8, device=device)
    before = codebook.clone()
    args = build(codebook, torch.zeros(5, device=device), torch.zeros(5, 8, device=device),
                 torch.randn(9, 8, device=device), torch.arange(9, device=device) % 5)
    with vlkernels.use_backend(backend), pytest.raises(error, match=message):
        vd_ema_update_(*args, decay=0.4)
    assert torch.equal(codebook, before)


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("shift", [5, -5, 10**6], ids=["high", "negative", "huge"])
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_out_of_range_index_in_the_device_mode_fails_with_the_message(backend, shift, masked):
    """The default mode checks the ids on the device (torch._assert_async: RuntimeError on CPU) with
    the strict mode's message; the strict mode's IndexError also names the offending range. With a
    mask, one bad id in a counted row is enough (bad ids in masked rows are allowed, see
    test_update_never_reads_masked_rows)."""
    device = device_for(backend)
    codebook = torch.randn(5, 8, device=device)
    index = torch.arange(9, device=device) % 5
    mask = torch.arange(9, device=device) % 2 == 0 if masked else None
    index[4] += shift  # row 4 is counted either way
    args = (codebook, torch.zeros(5, device=device), torch.zeros(5, 8, device=device),
            torch.randn(9, 8, device=device), index)
    with vlkernels.use_backend(backend), vlkernels.value_checks("device"):
        with pytest.raises(RuntimeError, match=r"vd_ema_update_: index values must lie in \[0, 5\)"):
            vd_ema_update_(*args, decay=0.4, mask=mask)
    counted = index if mask is None else index[mask]
    low, high = counted.min().item(), counted.max().item()
    with vlkernels.use_backend(backend), vlkernels.value_checks("host"):
        with pytest.raises(IndexError, match=rf"must lie in \[0, 5\), got \[{low}, {high}\]"):
            vd_ema_update_(*args, decay=0.4, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_range_index_passes_the_device_mode_check(backend):
    """The device check does not fire on good ids (nor on bad ids of masked rows), and the update
    then equals the strict mode's."""
    generator = torch.Generator().manual_seed(41)
    x = torch.randn(40, 8, generator=generator).to(DEVICE)
    index = torch.randint(0, 5, (40,), generator=generator).to(DEVICE)
    mask = torch.rand(40, generator=generator).to(DEVICE) < 0.5
    index = torch.where(mask, index, -3)
    results = []
    for mode in ("device", "host"):
        state = (torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE),
                 torch.zeros(5, device=DEVICE), torch.zeros(5, 8, device=DEVICE))
        with vlkernels.use_backend(backend), vlkernels.value_checks(mode):
            vd_ema_update_(*state, x, index, decay=0.4, mask=mask)
        results.append(state)
    for device_mode, host_mode in zip(*results):
        assert torch.equal(device_mode, host_mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_training_step_reads_nothing_on_the_host(backend):
    """SOHO runs the dictionary every step: its training forward (nearest, update, quantise), the
    backward, the MVM mask and logits read no value on the host in the default mode."""
    torch.manual_seed(42)
    vd = VisualDictionary(num_embeddings=23, dim=16).to(DEVICE)
    x = torch.randn(2, 6, 16, device=DEVICE, requires_grad=True)
    valid = torch.rand(2, 6, device=DEVICE) < 0.8

    def step():
        quantized, index = vd(x, valid)
        masked, labels = mvm_mask(index, valid, prob=1.0)
        (quantized.square().sum() + vd.mvm_logits(quantized).sum()).backward()
        return labels

    with vlkernels.use_backend(backend), vlkernels.value_checks("device"):
        step()  # warm: first-call caches may read once
        counter = HostReads()  # tolist counted too
        with counter:
            step()
    assert counter.reads == 0


def test_bad_nearest_inputs_raise():
    x, codebook = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="x has 7 features but the codebook has 8"):
        vd_nearest(x[:, :7], codebook)
    with pytest.raises(TypeError, match="x is torch.float16 but the codebook is torch.float32"):
        vd_nearest(x.half(), codebook)
    with pytest.raises(ValueError, match="must be 2-D"):
        vd_nearest(x[None], codebook)
    with pytest.raises(ValueError, match="codebook is empty"):
        vd_nearest(x, codebook[:0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_quantizes_straight_through_and_updates_in_training(backend):
    torch.manual_seed(10)
    vd = VisualDictionary(num_embeddings=23, dim=16, decay=0.4).to(DEVICE)
    x = torch.randn(2, 3, 5, 16, device=DEVICE, requires_grad=True)
    valid = torch.rand(2, 3, 5, device=DEVICE) < 0.8
    expected = dict(codebook=vd.embed.double().cpu(), cluster_size=vd.cluster_size.double().cpu(),
                    embed_avg=vd.embed_avg.double().cpu())
    index64, _ = reference.vd_nearest(x.detach().reshape(-1, 16).double().cpu(), expected["codebook"])
    reference.vd_ema_update_(*expected.values(), x.detach().reshape(-1, 16).double().cpu(), index64, decay=0.4,
                             mask=valid.reshape(-1).cpu())
    with vlkernels.use_backend(backend):
        quantized, index = vd(x, valid)
    assert index.shape == (2, 3, 5) and torch.equal(index.reshape(-1).cpu(), index64)
    assert rel_error(vd.embed, expected["codebook"]) < 1e-5
    torch.testing.assert_close(quantized, vd.embed[index])  # the updated entries, as SOHO
    grad = torch.randn_like(x)
    (x_grad,) = torch.autograd.grad(quantized, x, grad)
    assert torch.equal(x_grad, grad)
    vd.eval()
    before = vd.embed.clone()
    vd(x)
    assert torch.equal(vd.embed, before)


def test_decay_schedule_and_state_dict():
    vd = VisualDictionary(num_embeddings=8, dim=4, decay=0.4)
    assert set(vd.state_dict()) == {"embed", "cluster_size", "embed_avg"}
    vd.set_decay_updates(2)
    assert vd.current_decay == pytest.approx(0.8)
    vd.set_decay_updates(10)
    assert vd.current_decay == 0.99


def test_mvm_mask_follows_soho_rule():
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 4, (64, 30), generator=generator)
    valid = torch.rand(64, 30, generator=generator) < 0.9
    masked, labels = mvm_mask(index, valid, prob=0.5, generator=torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    position = int(torch.randint(30, (1,), generator=replay))
    keep = torch.rand(64, 1, generator=replay)[:, 0] < 0.5
    for b in range(64):
        expected = (index[b] == index[b, position]) & valid[b] & bool(valid[b, position]) & bool(keep[b])
        assert torch.equal(masked[b], expected)
    assert torch.equal(labels[masked], index[masked]) and bool((labels[~masked] == -100).all())
    assert 0 < masked.any(1).sum() < 64
    with pytest.raises(ValueError, match="prob must lie"):
        mvm_mask(index, valid, prob=1.5)


def test_mvm_logits_are_cosine_similarities():
    vd = VisualDictionary(num_embeddings=9, dim=6)
    hidden = torch.randn(4, 6, requires_grad=True)
    logits = vd.mvm_logits(hidden)
    expected = torch.nn.functional.cosine_similarity(hidden[:, None, :], vd.embed[None], dim=-1)
    torch.testing.assert_close(logits, expected)


def _distributed_update(rank, world_size, init_file, backend, shards, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        device = device_for(backend)
        state = [t.to(device, copy=True) for t in shards["state"]]  # shards live in shared memory
        x, index, mask = (t[rank].to(device) for t in (shards["x"], shards["index"], shards["mask"]))
        with vlkernels.use_backend(backend):
            vd_ema_update_(*state, x, index, decay=0.4, mask=mask)
        if rank == 0:
            torch.save([t.cpu() for t in state], result_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_two_process_update_equals_one_process_on_the_whole_batch(backend, tmp_path):
    """gloo on CPU (Triton in the interpreter for the triton backend)."""
    generator = torch.Generator().manual_seed(12)
    k, d = 13, 24
    state = [torch.randn(k, d, generator=generator), torch.rand(k, generator=generator),
             torch.randn(k, d, generator=generator)]
    x, index, mask = random_step(generator, 2 * 40, k, d, torch.float32, masked=True)
    shards = dict(state=state, x=x.cpu().view(2, 40, d), index=index.cpu().view(2, 40), mask=mask.cpu().view(2, 40))
    torch.multiprocessing.spawn(_distributed_update, args=(2, str(tmp_path / "init"), backend, shards,
                                                           str(tmp_path / "result.pt")), nprocs=2)
    distributed = torch.load(tmp_path / "result.pt")
    single = [t.clone().double() for t in state]
    reference.vd_ema_update_(*single, x.cpu().double(), index.cpu(), decay=0.4, mask=mask.cpu())
    for got, expected in zip(distributed, single):
        assert rel_error(got, expected) < 1e-6


# ---------------------------------------------------------------------------------------------
# Issue 12: block sizes, degenerate and non-finite inputs, layouts, launch grids, gradients,
# property-based checks. Block sizes: vd_nearest 128 rows x 128 entries (64 for IEEE fp32) x 32
# (fp32) / 64 (fp16) features; the update kernels 256 features per program, 16 rows per step.
# ---------------------------------------------------------------------------------------------


def assert_same_values(name, actual, expected, tol=1e-5, scale=None):
    """NaN and inf in the same places (inf with the same sign), the finite rest within tol:
    relative error, or where ``scale`` is given |actual - expected| <= tol * scale elementwise."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, name
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN in other places"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{name}: inf in other places"
    assert torch.equal(actual[actual.isinf()], expected[expected.isinf()]), f"{name}: inf of another sign"
    finite = actual.isfinite()
    if scale is None:
        error = rel_error(actual[finite], expected[finite])
        assert error <= tol, f"{name}: relative error {error:.3e}"
    else:
        excess = (actual - expected).abs()[finite] - tol * scale.double().cpu()[finite]
        assert not (excess > 0).any(), f"{name}: off by {excess.max():.3e} more than {tol} x |x|^2 + |e|^2"


def sqdist_scale(x, codebook, index):
    """|x|^2 + |e|^2 of each row and its chosen entry: the size of the terms whose difference
    |x|^2 + |e|^2 - 2 x.e is (fp32 rounding of the sum is relative to them, not to the distance)."""
    x, codebook = x.detach().cpu().double(), codebook.detach().cpu().double()
    return x.square().sum(1) + codebook[index.cpu()].square().sum(1)


# fp32 accumulation of |x|^2 + (|e|^2 - 2 x.e) over D <= 768 terms, relative to |x|^2 + |e|^2
SQDIST_TOL = 1e-5


def random_state(generator, k, d, fresh=False, device=DEVICE):
    """(codebook, cluster_size, embed_avg): fresh as a new VisualDictionary, else a trained-looking one."""
    codebook = torch.randn(k, d, generator=generator)
    if fresh:
        return [codebook.to(device), torch.zeros(k, device=device), torch.zeros(k, d, device=device)]
    return [codebook.to(device), (3 * torch.rand(k, generator=generator)).to(device),
            torch.randn(k, d, generator=generator).to(device)]


def reference_update(state, x, index, decay, mask=None):
    """The float64 reference on copies of ``state``, counting only the rows of ``mask``."""
    expected = [t.detach().cpu().double().clone() for t in state]
    x, index = x.detach().cpu().double(), index.cpu()
    if mask is not None:  # only the counted rows reach the reference: masked rows must not matter
        x, index = x[mask.cpu()], index[mask.cpu()]
    reference.vd_ema_update_(*expected, x, index, decay=decay)
    return expected


def clear_winners(generator, n, k, d, dtype):
    """x near randomly chosen entries (noise 0.05 against unit entries): the nearest is unambiguous."""
    codebook = torch.randn(k, d, generator=generator)
    chosen = torch.randint(0, k, (n,), generator=generator)
    x = codebook[chosen] + 0.05 * torch.randn(n, d, generator=generator)
    return x.to(DEVICE, dtype), codebook.to(DEVICE, dtype)


# (c) sizes above every block -----------------------------------------------------------------
@pytest.mark.parametrize("dim", [300, 768])
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_above_one_feature_block_follows_the_reference(backend, dim):
    """D > 256: every feature slice of an entry must see the entry's new cluster size once
    (the triton kernel decayed it twice in the slices after the first)."""
    k, device = 33, device_for(backend)
    generator = torch.Generator().manual_seed(dim)
    state = random_state(generator, k, dim, device=device)
    expected = [t.double().cpu() for t in state]
    for step in range(2):
        x = torch.randn(70, dim, generator=generator).to(device)  # > 16 rows for some entries: several row steps
        index = torch.randint(0, k, (70,), generator=generator).to(device)
        mask = (torch.rand(70, generator=generator) < 0.8).to(device)
        expected = reference_update(expected, x, index, 0.4, mask)
        with vlkernels.use_backend(backend):
            vd_ema_update_(*state, x, index, decay=0.4, mask=mask)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert_same_values(name, got, want)


@pytest.mark.parametrize("dim", [300, 768])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_above_every_block(backend, dtype, dim):
    n, k = 300, 270  # two row blocks and two entry tiles of 128 (4 of 64: IEEE fp32), plus remainders
    x, codebook = clear_winners(torch.Generator().manual_seed(dim), n, k, dim, dtype)
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x, codebook)
    exact = brute_force_sqdist(x.cpu(), codebook.cpu())
    assert torch.equal(index.cpu(), exact.argmin(1))
    assert_same_values("sqdist", sqdist, exact.min(1).values, SQDIST_TOL, sqdist_scale(x, codebook, index))



@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_winners_at_the_codebook_tile_edges(backend, dtype):
    """The kernel's one loop over (codebook tile, feature chunk): K a whole number of 128-entry
    tiles, D two 64-feature chunks (four of 32 in fp32) plus one; winners at the last and first
    entries of neighbouring tiles, and entries 127 and 128 identical, so rows nearest to them tie
    across the tile edge (the lower index wins). Integer features keep every distance exact."""
    generator = torch.Generator().manual_seed(15)
    k, d = 256, 129
    codebook = torch.randint(-3, 4, (k, d), generator=generator).float()
    codebook[128] = codebook[127]
    edges = torch.tensor([0, 63, 64, 127, 128, 191, 255])
    chosen = edges[torch.randint(0, len(edges), (130,), generator=generator)]
    x = codebook[chosen] + torch.randint(-1, 2, (130, d), generator=generator) * (torch.rand(130, d, generator=generator) < 0.05)
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x.to(DEVICE, dtype), codebook.to(DEVICE, dtype))
    exact = brute_force_sqdist(x, codebook)
    first_minimum = (exact == exact.min(1, keepdim=True).values).float().argmax(1)
    assert (first_minimum != 128).all() and (first_minimum == 127).any()  # the tie is exercised
    assert torch.equal(index.cpu(), first_minimum)
    assert torch.equal(sqdist.cpu().double(), exact.min(1).values)

# (d) empty and degenerate inputs -----------------------------------------------------------------
NOTHING_COUNTED = {
    "no-rows": lambda x, index: (x[:0], index[:0], None, 0.4),
    "all-masked": lambda x, index: (x, index, torch.zeros(len(index), dtype=torch.bool, device=x.device), 0.4),
    "decay-1": lambda x, index: (x, index, None, 1.0),
}


@pytest.mark.parametrize("case", NOTHING_COUNTED, ids=list(NOTHING_COUNTED))
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_with_nothing_counted_keeps_a_fresh_codebook(backend, case):
    """sum(cluster_size) = 0 after the step: the codebook stays as it was (it became all-NaN),
    and the next step with rows follows the reference from there."""
    k, d, device = 9, 300, device_for(backend)
    generator = torch.Generator().manual_seed(21)
    state = random_state(generator, k, d, fresh=True, device=device)
    initial = state[0].clone()
    x = torch.randn(40, d, generator=generator).to(device)
    index = torch.randint(0, k, (40,), generator=generator).to(device)
    x, index, mask, decay = NOTHING_COUNTED[case](x, index)
    with vlkernels.use_backend(backend), poisoned_allocations():
        vd_ema_update_(*state, x, index, decay=decay, mask=mask)
    assert torch.equal(state[0], initial)
    assert not state[1].any() and not state[2].any()
    x = torch.randn(30, d, generator=generator).to(device)
    index = torch.randint(0, k, (30,), generator=generator).to(device)
    expected = reference_update(state, x, index, 0.4)
    with vlkernels.use_backend(backend):
        vd_ema_update_(*state, x, index, decay=0.4)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert torch.isfinite(got).all(), name
        assert_same_values(name, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_of_no_rows_and_of_no_features(backend):
    codebook = torch.randn(5, 8, device=DEVICE)
    with vlkernels.use_backend(backend):
        index, sqdist = vd_nearest(torch.randn(0, 8, device=DEVICE), codebook)
        assert index.shape == sqdist.shape == (0,)
        index, sqdist = vd_nearest(torch.randn(3, 0, device=DEVICE), codebook[:, :0])  # every distance 0
    assert torch.equal(index.cpu(), torch.zeros(3, dtype=torch.int64)) and torch.equal(sqdist.cpu(), torch.zeros(3))


@pytest.mark.parametrize("deterministic", [False, True], ids=["index_add", "segmented"])
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_never_reads_masked_rows(backend, deterministic):
    """Masked rows may carry out-of-range ids (validation allows it) and NaN / inf features: the
    result equals the update from the counted rows alone (the torch path raised IndexError)."""
    k, d, device = 11, 24, device_for(backend)
    generator = torch.Generator().manual_seed(22)
    state = random_state(generator, k, d, device=device)
    x = torch.randn(50, d, generator=generator)
    index = torch.randint(0, k, (50,), generator=generator)
    mask = torch.rand(50, generator=generator) < 0.6
    index[~mask] = torch.tensor([-7, k, 10**6, -1]).repeat(50)[: int((~mask).sum())]
    x[~mask] = float("nan")
    x[torch.nonzero(~mask)[0]] = float("inf")
    x, index, mask = x.to(device), index.to(device), mask.to(device)
    expected = reference_update(state, x, index, 0.4, mask)
    with vlkernels.use_backend(backend), _deterministic.deterministic(deterministic):
        vd_ema_update_(*state, x, index, decay=0.4, mask=mask)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert torch.isfinite(got).all(), name
        assert_same_values(name, got, want)


# (e) NaN and inf ----------------------------------------------------------------------------------
def nonfinite_nearest_inputs(dtype):
    generator = torch.Generator().manual_seed(23)
    x, codebook = clear_winners(generator, 140, 260, 40, torch.float32)
    x, codebook = x.cpu(), codebook.cpu()
    x[3] = float("nan")  # a NaN row: NaN to every entry -> entry 0
    x[5, 7] = float("inf")  # inf - inf against every entry with a positive feature 7
    x[6, 2] = float("-inf")
    x[130, 1] = float("inf")  # in the second row block
    codebook[200, 4] = float("nan")  # in the second entry tile: NaN for every row
    return x.to(DEVICE, dtype), codebook.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_propagates_nan_like_torch_min(backend, dtype):
    x, codebook = nonfinite_nearest_inputs(dtype)
    expected_index, expected_sqdist = reference.vd_nearest(x.cpu().double(), codebook.cpu().double())
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x, codebook)
    assert torch.equal(index.cpu(), expected_index)
    # The NaN entry wins every finite row; the NaN row gets entry 0, the infinite rows their first inf - inf.
    finite_rows = torch.isfinite(x.cpu()).all(1)
    assert (index.cpu()[finite_rows] == 200).all() and index[3] == 0 and (index.cpu()[~finite_rows] < 200).all()
    assert torch.isnan(sqdist).all()
    # Without the NaN entry: the NaN row stays NaN, the infinite rows follow torch.min, the rest are exact.
    codebook[200] = 0.5
    expected_index, expected_sqdist = reference.vd_nearest(x.cpu().double(), codebook.cpu().double())
    assert expected_sqdist.isnan().sum() >= 3 and expected_sqdist.isfinite().sum() > 130
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x, codebook)
    assert torch.equal(index.cpu(), expected_index)
    assert_same_values("sqdist", sqdist, expected_sqdist, SQDIST_TOL, sqdist_scale(x, codebook, index))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_with_an_infinite_entry_follows_torch_min(backend):
    generator = torch.Generator().manual_seed(24)
    x, codebook = clear_winners(generator, 60, 150, 16, torch.float32)
    codebook[140, 3] = float("inf")  # NaN (inf - inf) for rows with x[:, 3] > 0, inf for the others
    codebook[10, 5] = float("-inf")
    expected_index, expected_sqdist = reference.vd_nearest(x.cpu().double(), codebook.cpu().double())
    assert expected_sqdist.isnan().any() and expected_sqdist.isfinite().any()
    with vlkernels.use_backend(backend):
        index, sqdist = vd_nearest(x, codebook)
    assert torch.equal(index.cpu(), expected_index)
    assert_same_values("sqdist", sqdist, expected_sqdist, SQDIST_TOL, sqdist_scale(x, codebook, index))


NONFINITE_UPDATES = {
    "nan-row": lambda x, state: x.__setitem__((4, 3), float("nan")),
    "inf-row": lambda x, state: x.__setitem__((9, 0), float("inf")),
    "nan-cluster-size": lambda x, state: state[1].__setitem__(2, float("nan")),
    "inf-embed-avg": lambda x, state: state[2].__setitem__((1, 5), float("-inf")),
}


@pytest.mark.parametrize("case", NONFINITE_UPDATES, ids=list(NONFINITE_UPDATES))
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_propagates_nan_and_inf_like_the_reference(backend, case):
    k, d, device = 7, 300, device_for(backend)
    generator = torch.Generator().manual_seed(25)
    state = random_state(generator, k, d, device="cpu")
    x = torch.randn(30, d, generator=generator)
    index = torch.arange(30) % k
    NONFINITE_UPDATES[case](x, state)
    state, x, index = [t.to(device) for t in state], x.to(device), index.to(device)
    expected = reference_update(state, x, index, 0.4)
    assert not all(torch.isfinite(t).all() for t in expected)
    with vlkernels.use_backend(backend):
        vd_ema_update_(*state, x, index, decay=0.4)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert_same_values(name, got, want)


# (b) strided, transposed and expanded arguments --------------------------------------------------
def _every_other(t):
    """Every other element along the last dim of a tensor twice as wide: a non-unit inner stride."""
    return torch.stack([t, torch.full_like(t, 99)], dim=-1)[..., 0]


def _transposed(t):
    return t.t().contiguous().t() if t.dim() == 2 else _every_other(t)


def _padded_rows(t):
    """Rows of a wider tensor: unit inner stride, row stride above the width."""
    return torch.cat([t, torch.full_like(t, 99)], dim=1)[:, : t.shape[1]] if t.dim() == 2 else _every_other(t)


LAYOUTS = {"transposed": _transposed, "every-other": _every_other, "padded-rows": _padded_rows}


@pytest.mark.parametrize("layout", [*LAYOUTS, "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_on_any_layout_equals_the_contiguous_call(backend, layout):
    generator = torch.Generator().manual_seed(26)
    x, codebook = clear_winners(generator, 150, 140, 40, torch.float32)
    if layout == "expanded":
        x, codebook = x[:1].expand(150, 40), codebook[:, :1].expand(140, 40)  # stride-0 rows / features
    else:
        x, codebook = LAYOUTS[layout](x), LAYOUTS[layout](codebook)
    assert not x.is_contiguous() and not codebook.is_contiguous()
    with vlkernels.use_backend(backend):
        got = vd_nearest(x, codebook)
        expected = vd_nearest(x.contiguous(), codebook.contiguous())
    assert torch.equal(got[0], expected[0])  # torch's matmul rounds by layout: the distances are close
    assert_same_values("sqdist", got[1], expected[1], SQDIST_TOL, sqdist_scale(x, codebook, got[0]))


@pytest.mark.parametrize("layout", [*LAYOUTS, "expanded"])
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_update_on_any_layout_equals_the_contiguous_call(backend, layout):
    """x, index and mask in any layout, the state transposed / strided (updated in place)."""
    k, d, device = 13, 300, device_for(backend)
    generator = torch.Generator().manual_seed(27)
    state = random_state(generator, k, d, device=device)
    x = torch.randn(60, d, generator=generator).to(device)
    index = torch.randint(0, k, (60,), generator=generator).to(device)
    mask = (torch.rand(60, generator=generator) < 0.7).to(device)
    if layout == "expanded":  # the state cannot be expanded (written in place): transposed
        args = (x[:1].expand(60, d), index[:1].expand(60), torch.ones(1, dtype=torch.bool, device=device).expand(60))
        views = [_transposed(t) for t in state]
    else:
        args = (LAYOUTS[layout](x), _every_other(index), _every_other(mask))
        views = [LAYOUTS[layout](t) for t in state]
    assert not any(t.is_contiguous() for t in (*args, *views))
    contiguous = [t.clone() for t in state]
    with vlkernels.use_backend(backend):
        vd_ema_update_(*views, *args[:2], decay=0.4, mask=args[2])
        vd_ema_update_(*contiguous, *(t.contiguous() for t in args[:2]), decay=0.4, mask=args[2].contiguous())
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), views, contiguous):
        assert_same_values(name, got, want, 1e-6)


# launch grids ---------------------------------------------------------------------------------------
def test_launch_grids_stay_within_cudas_limits():
    """Axis 0 holds what grows with the data; axis 1 is bounded by 65535 (huge sizes, no launch)."""
    for rows in (1, 10**6, 2**40):
        grid = vd_ops._nearest_grid(rows, 128)
        assert len(grid) == 1 and grid[0] == -(-rows // 128)
    for entries, dim in ((2048, 768), (2**31 - 1, 10**9), (1, 2**40)):
        grid = vd_ops._entry_grid(entries, dim, 256)
        assert grid[0] == entries <= 2**31 - 1 and 1 <= grid[1] <= 65535
    assert vd_ops._entry_grid(7, 300, 256) == (7, 2)


def test_update_kernels_loop_over_feature_slices_beyond_the_grid(monkeypatch):
    """A grid capped below the feature slices (65535 on a GPU, 2 here): each program of axis 1
    takes every 2nd slice, and the result stays the reference's."""
    monkeypatch.setattr(vd_ops, "_MAX_GRID_AXIS_1", 2)
    assert vd_ops._entry_grid(5, 1300, 256) == (5, 2)  # 6 slices of 256 features
    generator = torch.Generator().manual_seed(28)
    state = random_state(generator, 5, 1300)
    x, index = torch.randn(40, 1300, generator=generator).to(DEVICE), (torch.arange(40) % 4).to(DEVICE)
    expected = reference_update(state, x, index, 0.4)
    with vlkernels.use_backend("triton"), poisoned_allocations():
        vd_ema_update_(*state, x, index, decay=0.4)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert_same_values(name, got, want)


def test_triton_refuses_grids_beyond_axis_0(monkeypatch):
    monkeypatch.setattr(vd_ops, "_MAX_GRID_AXIS_0", 2)
    with vlkernels.use_backend("triton"), pytest.raises(NoBackendError, match="row blocks"):
        vd_nearest(torch.randn(300, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE))
    with vlkernels.use_backend("triton"), pytest.raises(NoBackendError, match="entries exceed the launch grid"):
        vd_ema_update_(*random_state(torch.Generator().manual_seed(0), 3, 4), torch.randn(5, 4, device=DEVICE),
                       torch.zeros(5, dtype=torch.int64, device=DEVICE), decay=0.4)


# (a) gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_returns_no_gradient(backend):
    x = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    codebook = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    with vlkernels.use_backend(backend):
        index, sqdist = vd_nearest(x, codebook)
    assert not index.requires_grad and not sqdist.requires_grad and sqdist.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_module_gradients_accumulate_over_two_backwards(backend):
    """A projection before the dictionary (SOHO's): weight and bias gradients over two backwards
    (retain_graph) are twice the straight-through reference's and own their storage."""
    torch.manual_seed(29)
    projection = torch.nn.Linear(12, 300).to(DEVICE)
    vd = VisualDictionary(num_embeddings=40, dim=300).to(DEVICE).eval()  # eval: the buffers stay put
    features, upstream = torch.randn(2, 7, 12, device=DEVICE), torch.randn(2, 7, 300, device=DEVICE)
    with vlkernels.use_backend(backend):
        quantized, _ = vd(projection(features))
    quantized.backward(upstream, retain_graph=True)
    quantized.backward(upstream)
    # Straight through: d(loss)/d(projected) = upstream.
    weight_grad = upstream.reshape(-1, 300).T.double() @ features.reshape(-1, 12).double()
    assert rel_error(projection.weight.grad, 2 * weight_grad) < 1e-5
    assert rel_error(projection.bias.grad, 2 * upstream.double().sum((0, 1))) < 1e-5
    assert projection.weight.grad.untyped_storage().data_ptr() != projection.bias.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_fresh_module_stays_finite_after_a_fully_masked_training_step(backend):
    torch.manual_seed(30)
    vd = VisualDictionary(num_embeddings=20, dim=300).to(DEVICE)
    initial = vd.embed.clone()
    x = torch.randn(3, 8, 300, device=DEVICE, requires_grad=True)
    with vlkernels.use_backend(backend):
        quantized, index = vd(x, torch.zeros(3, 8, dtype=torch.bool, device=DEVICE))
        assert torch.equal(vd.embed, initial) and torch.isfinite(quantized).all()
        torch.testing.assert_close(quantized, initial[index])  # x + (entry - x): rounded
        vd(x[:, :0], torch.zeros(3, 0, dtype=torch.bool, device=DEVICE))  # no cells at all
        assert torch.equal(vd.embed, initial)
        vd(x)  # then a real step
    assert torch.isfinite(vd.embed).all() and not torch.equal(vd.embed, initial)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_soho_stays_finite_after_a_batch_without_a_real_grid_cell(backend):
    from vlkernels.models import build_model

    torch.manual_seed(31)
    model = build_model("soho", "tiny").train()
    batch = model.synthetic_batch(2, generator=torch.Generator().manual_seed(31))
    batch["grid_mask"] = torch.zeros_like(batch["grid_mask"])
    initial = model.dictionary.embed.clone()
    with vlkernels.use_backend(backend):
        out = model(**batch)
    assert torch.equal(model.dictionary.embed, initial)
    assert torch.isfinite(out.loss) and torch.isfinite(out.last_hidden_state).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# (f) property-based -------------------------------------------------------------------------------
@st.composite
def nearest_problems(draw):
    n, k, d = draw(st.integers(0, 200)), draw(st.integers(1, 260)), draw(st.integers(1, 80))
    layout = draw(st.sampled_from(["contiguous", *LAYOUTS]))
    return n, k, d, layout, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=nearest_problems())
@settings(max_examples=8)
def test_property_nearest_against_float64(backend, problem):
    n, k, d, layout, seed = problem
    x, codebook = clear_winners(torch.Generator().manual_seed(seed), n, k, d, torch.float32)
    if layout != "contiguous":
        x, codebook = LAYOUTS[layout](x), LAYOUTS[layout](codebook)
    with vlkernels.use_backend(backend), poisoned_allocations():
        index, sqdist = vd_nearest(x, codebook)
    exact = brute_force_sqdist(x.cpu(), codebook.cpu())
    if n:  # clear winners: the nearest entry exactly
        assert torch.equal(index.cpu(), exact.argmin(1))
        assert_same_values("sqdist", sqdist, exact.min(1).values, SQDIST_TOL, sqdist_scale(x, codebook, index))
    assert index.shape == sqdist.shape == (n,)


@st.composite
def update_problems(draw):
    n, k, d = draw(st.integers(0, 120)), draw(st.integers(1, 40)), draw(st.integers(1, 600))
    real = draw(st.sampled_from([None, 0.0, 0.5, 1.0]))  # fraction of counted rows; None = no mask
    # (no decays so small that fp32 state underflows to 0 where the float64 reference does not)
    decay = draw(st.sampled_from([0.0, 0.4, 0.99, 1.0]) | st.floats(1e-6, 1.0))
    layout = draw(st.sampled_from(["contiguous", *LAYOUTS]))
    return n, k, d, real, decay, draw(st.booleans()), layout, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@given(problem=update_problems())
@settings(max_examples=8)
def test_property_update_against_float64(backend, problem):
    n, k, d, real, decay, fresh, layout, seed = problem
    device = device_for(backend)
    generator = torch.Generator().manual_seed(seed)
    state = random_state(generator, k, d, fresh=fresh, device=device)
    x = torch.randn(n, d, generator=generator).to(device)
    index = torch.randint(0, k, (n,), generator=generator).to(device)
    mask = None if real is None else (torch.rand(n, generator=generator) < real).to(device)
    if layout != "contiguous":  # every argument, the in-place state included
        state, x, index = [LAYOUTS[layout](t) for t in state], LAYOUTS[layout](x), LAYOUTS[layout](index)
        mask = None if mask is None else LAYOUTS[layout](mask)
    expected = reference_update(state, x, index, decay, mask)
    with vlkernels.use_backend(backend):
        vd_ema_update_(*state, x, index, decay=decay, mask=mask)
    for name, got, want in zip(("codebook", "cluster_size", "embed_avg"), state, expected):
        assert torch.isfinite(got).all(), name
        assert_same_values(name, got, want)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_soho_dictionary_above_one_feature_block_follows_the_reference(backend):
    """SOHO at hidden 288 (> one 256-feature slice): one training step updates the dictionary as
    the torch reference path does (the triton update was 0.089 off)."""
    from vlkernels.models import build_model

    models = []
    for use_kernels in (True, False):
        torch.manual_seed(32)
        models.append(build_model("soho", "tiny", hidden_size=288, num_heads=4, use_kernels=use_kernels).train())
    batch = models[0].synthetic_batch(2, generator=torch.Generator().manual_seed(32))
    with vlkernels.use_backend(backend):
        models[0](**batch)
    models[1](**batch)
    kernels, references = (m.dictionary for m in models)
    for name in ("embed", "cluster_size", "embed_avg"):
        assert rel_error(getattr(kernels, name), getattr(references, name)) < 1e-5, name


# (i) the codebook norms' cache ---------------------------------------------------------------------
def assert_nearest(x, codebook):
    index, sqdist = vd_nearest(x, codebook)
    exact = brute_force_sqdist(x.cpu(), codebook.cpu())
    chosen = exact.gather(1, index.cpu()[:, None])[:, 0]
    # the nearest up to fp32 rounding (a stale |e|^2 would be off by units)
    assert torch.all(chosen <= exact.min(1).values + 1e-4 * exact.abs().max(1).values)
    assert rel_error(sqdist, chosen) < 1e-4


def test_codebook_norms_are_cached_until_the_codebook_changes():
    vd_ops.clear_codebook_norms()
    codebook = torch.randn(140, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    first = vd_ops.codebook_sqnorms(codebook)
    assert vd_ops.codebook_sqnorms(codebook) is first
    assert vd_ops.codebook_sqnorms(codebook.detach()) is first  # an alias shares the version counter
    codebook.mul_(0.5)  # in place: the version moves on
    again = vd_ops.codebook_sqnorms(codebook)
    assert again is not first
    torch.testing.assert_close(again, codebook.double().square().sum(1).float(), rtol=1e-6, atol=0)
    vd_ops.clear_codebook_norms(codebook)
    assert vd_ops.codebook_sqnorms(codebook) is not again


@pytest.mark.parametrize("backend", ["triton"])
def test_nearest_follows_in_place_and_ema_updates_and_new_codebooks(backend):
    """Each change of the codebook between vd_nearest calls reaches the distances: an in-place
    torch op, vd_ema_update_ (whose kernels write without a version bump) and a new tensor (the
    cache holds its entry's codebook, so a new one never reuses a cached address)."""
    generator = torch.Generator().manual_seed(11)
    n, k, d = 150, 140, 40  # above the row block, two entry tiles
    x, codebook = clear_winners(generator, n, k, d, torch.float32)
    state = random_state(generator, k, d, device=codebook.device)
    state = (codebook,) + tuple(state[1:])
    with vlkernels.use_backend(backend):
        assert_nearest(x, codebook)
        codebook.copy_(codebook.flip(0))  # in place: the version moves on, every entry moves
        assert_nearest(x, codebook)
        index, _ = vd_nearest(x, codebook)
        vd_ema_update_(*state, x, index, decay=0.2)
        assert_nearest(x, codebook)
        assert_nearest(x, torch.randn(k, d, generator=generator).to(codebook.device))
