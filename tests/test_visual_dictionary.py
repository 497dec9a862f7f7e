"""Visual dictionary: nearest-entry search and the moving-average update (Triton in the
interpreter or on the GPU, against float64 references), the module and its MVM helpers."""
import pytest
import torch

import vlkernels
from vlkernels.nn import VisualDictionary, mvm_mask
from vlkernels.ops import vd_ema_update_, vd_nearest
from vlkernels.reference import visual_dictionary as reference
from vlkernels.testing import DEVICE, dtype_id, kernel_dtypes, poisoned_allocations, rel_error

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
    "state-dtype": (lambda c, s, a, x, i: (c, s.half(), a, x, i), TypeError, "cluster_size must be a contiguous"),
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
