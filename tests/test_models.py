"""Every registered reference model (vlkernels.models.MODELS), on its tiny config:
- use_kernels=True with the Triton kernels (the interpreter here, the GPU where present) and
  use_kernels=False (the torch references) give the same losses and gradients;
- a few AdamW steps on one synthetic batch lower the loss;
- the synthetic batch is deterministic and trains every objective.
Model-specific behaviour (heads, routing, HF parity, bad inputs) is in tests/test_models_*.py."""
import copy

import pytest
import torch

import vlkernels
from vlkernels.models import MODELS, build_model, model_class
from vlkernels.testing import DEVICE, rel_error

# The kernels run fp32 ops within 1e-5 of float64 (1e-3 with tf32 dots on a GPU); through a
# whole model's forward and backward the differences add up over some tens of ops.
MODEL_TOLERANCE = 1e-4 if DEVICE.type == "cpu" else 1e-2
NAMES = sorted(MODELS)


def _batch(model, seed=0, batch_size=4):
    return model.synthetic_batch(batch_size, generator=torch.Generator().manual_seed(seed), device=DEVICE)


def _run(model, batch, seed=0):
    """Loss, per-objective losses and parameter gradients of one seeded forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", NAMES)
def test_kernels_match_references(name):
    torch.manual_seed(0)
    reference = build_model(name, "tiny", use_kernels=False).to(DEVICE).train()
    kernels = copy.deepcopy(reference)
    kernels.use_kernels = True
    batch = _batch(reference)
    expected, expected_grads = _run(reference, batch)
    with vlkernels.use_backend("triton"):
        actual, actual_grads = _run(kernels, batch)
    assert set(actual.losses) == set(expected.losses)
    for objective, value in expected.losses.items():
        error = rel_error(actual.losses[objective], value)
        assert error <= MODEL_TOLERANCE, f"{name} {objective} loss: relative error {error:.2e}"
    assert set(actual_grads) == set(expected_grads)
    for parameter, grad in expected_grads.items():
        if grad.abs().max() == 0:  # e.g. a row of the embedding table no token used
            assert actual_grads[parameter].abs().max() == 0, f"{name} {parameter}: gradient should be 0"
            continue
        error = rel_error(actual_grads[parameter], grad)
        assert error <= MODEL_TOLERANCE, f"{name} grad of {parameter}: relative error {error:.2e}"


def _train_accumulated(model, batches, backend):
    """Two SGD steps, each over two micro-batches accumulated into .grad and clipped in place as
    users do; returns how far every parameter and buffer moved."""
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with vlkernels.use_backend(backend):
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            for micro in range(2):
                torch.manual_seed(10 * step + micro)
                model(**batches[2 * step + micro]).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return {key: value.detach() - before[key] for key, value in model.state_dict().items()
            if value.is_floating_point()}


@pytest.mark.parametrize("name", NAMES)
def test_accumulated_steps_match_references(name):
    """Gradient accumulation over micro-batches, clipping and two optimizer steps move every
    parameter and buffer (SOHO's dictionary, too) alike with kernels and with references: a
    gradient that shares storage with another, or a state update that reads a stale value,
    shows here even where a single backward is right."""
    torch.manual_seed(0)
    reference = build_model(name, "tiny", use_kernels=False).to(DEVICE).train()
    kernels = copy.deepcopy(reference)
    kernels.use_kernels = True
    batches = [_batch(reference, seed=seed, batch_size=2) for seed in range(4)]
    expected = _train_accumulated(reference, batches, "auto")
    actual = _train_accumulated(kernels, batches, "triton")
    for key, moved in expected.items():
        if moved.abs().max() == 0:
            assert actual[key].abs().max() == 0, f"{name} {key}: moved with kernels only"
            continue
        # Two steps: the second gradient is taken at parameters that already differ by the
        # first step's rounding, so the bound is twice the single-step one.
        error = rel_error(actual[key], moved)
        assert error <= 2 * MODEL_TOLERANCE, f"{name} {key}: update off by {error:.2e} (relative)"


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").to(DEVICE).train()
    batch = _batch(model, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        loss = model(**batch).loss
        assert torch.isfinite(loss), f"{name}: loss {loss.item()} at step {step}"
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), f"{name}: losses {losses}"


@pytest.mark.parametrize("name", NAMES)
def test_synthetic_batch_is_deterministic_and_trains_every_objective(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").to(DEVICE).train()
    first, second = _batch(model, seed=3), _batch(model, seed=3)
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), f"{name}: {key} differs between equal generators"
    out = model(**first)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.losses, f"{name}: no objective computed"
    for objective, value in out.losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{name}: {objective} = {value}"


def test_registry_names_every_model_and_rejects_unknown_ones():
    for name in MODELS:
        cls = model_class(name)
        assert issubclass(cls, vlkernels.models.PretrainingModel)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("clip")
    with pytest.raises(ValueError, match="size"):
        build_model("vilt", "huge")
