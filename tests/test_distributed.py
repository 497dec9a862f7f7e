"""Distributed training with the vlkernels.nn modules (2 CPU processes, gloo).

Each case trains for STEPS SGD steps under DistributedDataParallel and under FSDP2
(``fully_shard``), each rank on its half of the global batch. The parameters and buffers on
every rank after every step, and the mean of the ranks' losses, must equal one process
training on the whole batch (computed here, in the pytest process) to fp32 rounding. The
VisualDictionary's buffers are updated from all-reduced statistics in its forward, on each of
its backends; DDP runs with forward_sync_buffers=False (and FSDP2 never broadcasts buffers),
so each rank's dictionary is its own update. Its ``process_group`` and ``sync=False`` are checked
by one step per setting.

One spawn runs every case (spawn is slow). To add a case (a full model, say), add one line
to CASES: a factory returning (module, make_batch, loss_fn), where make_batch(step) gives the
global batch (a tuple or dict of tensors, batch dimension first; sharded here along dim 0)
and loss_fn(module, batch) a mean of per-sample terms (so DDP's gradient average over equal
shards is the global batch's gradient).
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from vlkernels import _backend, use_backend
from vlkernels.nn import (
    LXMERTCrossLayer, METERCrossLayer, MoMEBlock, PatchEmbed, VisualDictionary, VLMultiheadAttention, WRALoss,
)

WORLD, GLOBAL_BATCH, STEPS, LR = 2, 4, 3, 0.1
SPAWN_TIMEOUT_S = 300  # the whole spawn (normally ~20 s); collectives time out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# fully_shard is applied to each of these below the root, then to the root: whole vlkernels
# modules, since they read their submodules' parameters directly (PatchEmbed.proj, MoMEFFN's mlp_*).
FSDP_UNITS = (MoMEBlock, LXMERTCrossLayer, METERCrossLayer)


def _generator(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + step)


def _lengths_mask(lengths: list[int], size: int) -> torch.Tensor:
    return torch.arange(size) < torch.tensor(lengths)[:, None]


def _sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [B, S] -> mean over samples of the mean over each sample's real tokens."""
    return ((values * mask).sum(1) / mask.sum(1)).mean()


def _masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _sample_mean((out - target).square().mean(-1), mask)


# -- cases: factory() -> (module, make_batch(step) -> global batch, loss_fn(module, batch) -> scalar)
class PatchClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = PatchEmbed((12, 8), 4, 3, 16), nn.Linear(16, 5)  # timm's strict img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images).mean(1))


def patch_embed_case():
    def make_batch(step):
        g = _generator(step)
        return torch.randn(GLOBAL_BATCH, 3, 12, 8, generator=g), torch.randint(5, (GLOBAL_BATCH,), generator=g)
    return PatchClassifier(), make_batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def attention_case():
    def make_batch(step):
        g = _generator(step)
        return (torch.randn(GLOBAL_BATCH, 7, 16, generator=g), _lengths_mask([7, 3, 5, 1], 7),
                torch.randn(GLOBAL_BATCH, 7, 16, generator=g))
    return (VLMultiheadAttention(16, 2), make_batch,
            lambda m, b: _masked_mse(m(b[0], key_padding_mask=b[1]), b[2], b[1]))


LXMERT_MASKS, METER_MASKS = ("lang_mask", "visn_mask"), ("text_mask", "image_mask")


def _two_stream_case(layer: nn.Module, mask_names: tuple[str, str]):
    def make_batch(step):
        g = _generator(step)
        return (torch.randn(GLOBAL_BATCH, 5, 16, generator=g), torch.randn(GLOBAL_BATCH, 6, 16, generator=g),
                _lengths_mask([5, 2, 4, 3], 5), _lengths_mask([1, 6, 3, 4], 6))

    def loss_fn(m, b):
        text, image = m(b[0], b[1], **dict(zip(mask_names, b[2:])))
        return _sample_mean(text.square().mean(-1), b[2]) + _sample_mean(image.sin().mean(-1), b[3])
    return layer, make_batch, loss_fn


class MoMEStack(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MoMEBlock(16, 2, mlp_ratio=2.0, max_text_len=3) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, modality_type: Optional[str] = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, modality_type)
        return x


def mome_case(depth: int, modality_type: Optional[str] = None):
    """modality_type None: the joint input (tokens [0, 3) to the text expert, the rest to the
    image expert); "text": a text-only pass, which leaves the image expert unused."""
    def make_batch(step):
        g = _generator(step)
        return (torch.randn(GLOBAL_BATCH, 7, 16, generator=g), _lengths_mask([7, 4, 6, 2], 7),
                torch.randn(GLOBAL_BATCH, 7, 16, generator=g))
    module = MoMEBlock(16, 2, mlp_ratio=2.0, max_text_len=3) if depth == 1 else MoMEStack(depth)
    return module, make_batch, lambda m, b: _masked_mse(m(b[0], b[1], modality_type), b[2], b[1])


class QuantizedEncoder(nn.Module):
    """A Linear into SOHO's visual dictionary (its straight-through output trains the Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.dictionary = nn.Linear(6, 8), VisualDictionary(num_embeddings=5, dim=8)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dictionary(self.proj(features), mask)[0]


def visual_dictionary_case():
    def make_batch(step):
        g = _generator(step)
        return (torch.randn(GLOBAL_BATCH, 9, 6, generator=g), _lengths_mask([9, 4, 7, 2], 9),
                torch.randn(GLOBAL_BATCH, 9, 8, generator=g))
    return QuantizedEncoder(), make_batch, lambda m, b: _masked_mse(m(b[0], b[1]), b[2], b[1])


class AlignmentHead(nn.Module):
    """Text and region projections under UNITER's word-region alignment loss."""

    def __init__(self) -> None:
        super().__init__()
        self.txt, self.img, self.wra = nn.Linear(8, 8), nn.Linear(10, 8), WRALoss(weight=1.0, iters=10)

    def forward(self, txt, img, txt_mask, img_mask, targets) -> torch.Tensor:
        return self.wra(self.txt(txt), self.img(img), txt_mask, img_mask, targets)


def wra_case():
    def make_batch(step):
        g = _generator(step)
        return (torch.randn(GLOBAL_BATCH, 5, 8, generator=g), torch.randn(GLOBAL_BATCH, 6, 10, generator=g),
                _lengths_mask([5, 3, 2, 4], 5), _lengths_mask([6, 2, 5, 3], 6), torch.tensor([1, 0, 0, 1]))
    return AlignmentHead(), make_batch, lambda m, b: m(*b)


def tiny_model_case():
    """A whole reference model (LXMERT, tiny) trained on its matching objective: a mean of
    per-sample cross-entropies, so the shards' average gradient is the global batch's."""
    from vlkernels.models import build_model

    class MatchingLoss(nn.Module):  # DDP gets the loss alone: the model's other outputs take no part in it
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model("lxmert", "tiny")

        def forward(self, **batch) -> torch.Tensor:
            return self.model(**batch).loss

    module = MatchingLoss()
    keys = ("input_ids", "visual_feats", "visual_pos", "attention_mask", "visual_attention_mask", "itm_labels")

    def make_batch(step):
        batch = module.model.synthetic_batch(GLOBAL_BATCH, generator=_generator(step))
        return {key: batch[key] for key in keys}
    return module, make_batch, lambda m, b: m(**b)


def vlmo_model_case():
    """VLMo (tiny) under FSDP2 (it has no scalar parameter: logit_scale is [1]) and DDP: the
    fusion pass's pooled output under a per-sample loss."""
    from vlkernels.models import build_model

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model("vlmo", "tiny")

        def forward(self, input_ids, pixel_values, attention_mask) -> torch.Tensor:
            return self.model(input_ids, pixel_values, attention_mask).pooler_output

    module = Pooled()

    def make_batch(step):
        batch = module.model.synthetic_batch(GLOBAL_BATCH, generator=_generator(step))
        return batch["input_ids"], batch["pixel_values"], batch["attention_mask"], torch.randn(
            GLOBAL_BATCH, 32, generator=_generator(step))
    return module, make_batch, lambda m, b: (m(*b[:3]) - b[3]).square().mean()


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], tuple]
    backend: str = "auto"  # vlkernels backend the case runs on (auto on CPU: C++ where built, else torch)
    ddp_options: tuple = ()  # (name, value) pairs for DistributedDataParallel


CASES = [
    Case("patch_embed-head", patch_embed_case),
    Case("attention-padding", attention_case),
    Case("lxmert-cross", lambda: _two_stream_case(LXMERTCrossLayer(16, 2, 32, dropout=0.0), LXMERT_MASKS)),
    Case("meter-cross", lambda: _two_stream_case(METERCrossLayer(16, 2, 32, dropout=0.0), METER_MASKS)),
    Case("mome-block", lambda: mome_case(1)),
    Case("mome-stack", lambda: mome_case(2)),
    Case("mome-text-only", lambda: mome_case(1, "text"), ddp_options=(("find_unused_parameters", True),)),
    Case("visual_dictionary-auto", visual_dictionary_case),  # the C++ update where built
    Case("visual_dictionary-torch", visual_dictionary_case, backend="torch"),
    Case("visual_dictionary-triton", visual_dictionary_case, backend="triton"),
    Case("wra_loss", wra_case),
    # Only the matching head is trained: the other heads' parameters get no gradient.
    Case("lxmert-tiny-model", tiny_model_case, ddp_options=(("find_unused_parameters", True),)),
    Case("vlmo-tiny-model", vlmo_model_case, ddp_options=(("find_unused_parameters", True),)),
]
MODES = ("ddp", "fsdp2")


def _unavailable(case: Case) -> Optional[str]:
    if case.backend == "triton":
        return _backend.triton_refusal(torch.device("cpu"))
    return None


def _shard(batch, rank: int):
    rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    if isinstance(batch, dict):
        return {key: value[rows] for key, value in batch.items()}
    return tuple(value[rows] for value in batch)


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, FSDP2 shards gathered (a collective: every rank calls it)."""
    state = {}
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[name] = value.detach().clone()
    return state


def _train(case: Case, mode: Optional[str], rank: int) -> dict:
    """STEPS SGD steps; mode None = one process on the global batch. Returns the losses and
    the state after each step."""
    torch.manual_seed(0)  # every rank (and the single process) starts from the same parameters
    module, make_batch, loss_fn = case.factory()
    if mode == "ddp":
        model = DistributedDataParallel(module, forward_sync_buffers=False, **dict(case.ddp_options))
    elif mode == "fsdp2":
        mesh = init_device_mesh("cpu", (WORLD,))
        for unit in [m for m in module.modules() if isinstance(m, FSDP_UNITS) and m is not module]:
            fully_shard(unit, mesh=mesh)
        model = fully_shard(module, mesh=mesh)
    else:
        model = module
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, states = [], []
    with use_backend(case.backend):
        for step in range(STEPS):
            batch = make_batch(step)
            loss = loss_fn(model, batch if mode is None else _shard(batch, rank))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            states.append(_full_state(module))
    return {"losses": torch.stack(losses), "states": states}


# Submodules whose parameters a fused op reads (or whose projection methods their module
# calls): (name, build, submodule, run forward). fully_shard on one of them alone fails unless
# the module notices the wrapper and calls the submodule instead (MoMEFFN's experts).
INNER_UNITS = [
    ("MoMEBlock.ffn.mlp_text", lambda: MoMEBlock(16, 2, max_text_len=3), lambda m: m.ffn.mlp_text,
     lambda m: m(torch.randn(2, 5, 16))),
    ("LXMERTCrossLayer.cross_attention", lambda: LXMERTCrossLayer(16, 2, 32, dropout=0.0),
     lambda m: m.cross_attention, lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 16))),
]


def _inner_unit_errors() -> dict[str, str]:
    """fully_shard on such a submodule (then the root): FSDP2 never unshards it, so the forward raises."""
    errors = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, build, submodule, run in INNER_UNITS:
        torch.manual_seed(0)
        module = build()
        fully_shard(submodule(module), mesh=mesh)
        fully_shard(module, mesh=mesh)
        try:
            run(module)
            errors[name] = ""
        except RuntimeError as error:  # raised on every rank at the same point, after the same collectives
            errors[name] = str(error)
    return errors


# VisualDictionary's process_group and sync switch: one training step per setting, on each backend.
VD_BACKENDS = ("auto", "torch", "triton")


def _dictionary_step(x: torch.Tensor, mask: torch.Tensor, backend: str, **options) -> dict:
    torch.manual_seed(0)
    dictionary = VisualDictionary(num_embeddings=5, dim=8, **options).train()
    with use_backend(backend):
        dictionary(x, mask)
    return {name: value.clone() for name, value in dictionary.state_dict().items()}


def _dictionary_batch():
    g = _generator(99)
    return torch.randn(GLOBAL_BATCH, 6, 8, generator=g), _lengths_mask([6, 3, 5, 2], 6)


def _dictionary_settings(rank: int) -> dict:
    """{(setting, backend): the buffers after one step on this rank's half}: sync off, a group of
    this rank alone, and the whole world as an explicit group (new_group: every rank calls each)."""
    alone = [dist.new_group([r]) for r in range(WORLD)][rank]
    everyone = dist.new_group(list(range(WORLD)))
    x, mask = _shard(_dictionary_batch(), rank)
    settings = {"sync off": {"sync": False}, "own group": {"process_group": alone},
                "explicit world group": {"process_group": everyone}}
    return {(setting, backend): _dictionary_step(x, mask, backend, **options)
            for setting, options in settings.items() for backend in VD_BACKENDS
            if backend != "triton" or _backend.triton_refusal(torch.device("cpu")) is None}


def _every_model_wraps(rank: int) -> dict:
    """{(model, mode): (loss, parameters after one SGD step)} for every reference model (tiny),
    wrapped by DDP or FSDP2 (fully_shard on its MoME / cross layers, then the root), one step on
    a synthetic batch of this rank's own (a batch's indices, ITM's say, refer to its own rows)."""
    from vlkernels.models import MODELS, build_model

    results = {}
    for name in MODELS:
        for mode in MODES:
            torch.manual_seed(0)
            module = build_model(name, "tiny")
            if mode == "ddp":
                model = DistributedDataParallel(module, forward_sync_buffers=False, find_unused_parameters=True)
            else:
                mesh = init_device_mesh("cpu", (WORLD,))
                for unit in [m for m in module.modules() if isinstance(m, FSDP_UNITS)]:
                    fully_shard(unit, mesh=mesh)
                model = fully_shard(module, mesh=mesh)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            batch = module.synthetic_batch(GLOBAL_BATCH // WORLD, generator=_generator(rank))  # this rank's own
            torch.manual_seed(1)  # the models' own draws (ITM negatives, masks) alike on both ranks
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            results[(name, mode)] = (loss.detach(), _full_state(module))
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        results = {(mode, case.name): _train(case, mode, rank) for mode in MODES for case in CASES
                   if _unavailable(case) is None}
        results["inner-unit-errors"] = _inner_unit_errors()
        results["dictionary-settings"] = _dictionary_settings(rank)
        results["every-model"] = _every_model_wraps(rank)
    finally:
        dist.destroy_process_group()
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_workers(fn: Callable, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in WORLD spawned processes. A worker that raises fails this call
    with its traceback (the others are terminated); one still running after timeout_s fails it too."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # raises on a worker's error
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(10)
            pytest.fail(f"distributed workers still running after {timeout_s} s (a hang in a collective?)")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    _run_workers(_worker, (_free_port(), str(out_dir)), SPAWN_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_single_process(distributed_results, case: Case, mode: str):
    why = _unavailable(case)
    if why:
        pytest.skip(f"backend {case.backend} unavailable: {why}")
    single = _train(case, None, 0)
    ranks = [results[(mode, case.name)] for results in distributed_results]
    # each rank's loss is its half-batch mean: their average is the global batch's loss
    torch.testing.assert_close(torch.stack([r["losses"] for r in ranks]).mean(0), single["losses"])
    # the ranks trained on different halves, so agreeing with the whole batch takes the synchronisation
    assert not torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    for rank, result in enumerate(ranks):
        for step, (state, expected) in enumerate(zip(result["states"], single["states"])):
            assert state.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(state[name], expected[name],
                                           msg=lambda m: f"{mode} rank {rank}, after step {step + 1}, {name}: {m}")


# MoMEFFN calls an expert that is not a plain Mlp (fully_shard changes its class), so it runs.
INNER_UNITS_THAT_RUN = ("MoMEBlock.ffn.mlp_text",)


@pytest.mark.parametrize("name", [unit[0] for unit in INNER_UNITS])
def test_fsdp2_unit_inside_a_vlkernels_module(distributed_results, name: str):
    for results in distributed_results:
        if name in INNER_UNITS_THAT_RUN:
            assert results["inner-unit-errors"][name] == ""
        else:
            assert "mixed torch.Tensor and DTensor" in results["inner-unit-errors"][name]


@pytest.mark.parametrize("backend", VD_BACKENDS)
def test_visual_dictionary_process_group_and_sync_switch(distributed_results, backend: str):
    """sync=False and a group of one rank: each rank's dictionary is its own half's update (no
    collective over the default group); the world as an explicit group: the whole batch's."""
    if backend == "triton" and _backend.triton_refusal(torch.device("cpu")):
        pytest.skip(_backend.triton_refusal(torch.device("cpu")))
    batch = _dictionary_batch()
    whole = _dictionary_step(*batch, backend)
    for rank, results in enumerate(distributed_results):
        own = _dictionary_step(*_shard(batch, rank), backend)
        expected = {"sync off": own, "own group": own, "explicit world group": whole}
        for setting, state in expected.items():
            actual = results["dictionary-settings"][(setting, backend)]
            for name in state:
                torch.testing.assert_close(actual[name], state[name],
                                           msg=lambda m: f"{setting} rank {rank} {name}: {m}")
        assert not torch.equal(own["embed"], whole["embed"])  # the halves' updates differ from the whole's


def _stuck_or_failing_worker(rank: int, fail: bool) -> None:
    if fail and rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    time.sleep(600)  # stands for a process stuck in a collective


def test_worker_failure_fails_fast():
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        _run_workers(_stuck_or_failing_worker, (True,), timeout_s=120)
    assert time.monotonic() - start < 60


def test_stuck_workers_fail_at_the_timeout():
    with pytest.raises(pytest.fail.Exception, match="still running after 5 s"):
        _run_workers(_stuck_or_failing_worker, (False,), timeout_s=5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(__import__("vlkernels.models", fromlist=["MODELS"]).MODELS))
def test_every_reference_model_wraps_and_trains(distributed_results, name: str, mode: str):
    """Every reference model wraps under DDP and FSDP2 (no scalar parameter) and takes a step:
    finite losses that differ between the ranks' halves, and the same parameters on both ranks
    afterwards (the gradients were synchronised)."""
    (loss0, state0), (loss1, state1) = (results["every-model"][(name, mode)] for results in distributed_results)
    assert bool(loss0.isfinite()) and bool(loss1.isfinite()) and not torch.equal(loss0, loss1)
    assert state0.keys() == state1.keys()
    for key in state0:
        assert bool(state0[key].isfinite().all()) if state0[key].is_floating_point() else True, key
        torch.testing.assert_close(state0[key], state1[key], msg=lambda m: f"{name} {mode} {key}: {m}")
