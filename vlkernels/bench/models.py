"""Model-level benchmark: one pretraining step of each reference model (vlkernels.models).

Presets: every registered model, its base config (the paper's sizes) at batch 8 on a GPU, its
tiny config at batch 4 on CPU and with --quick. The batch is the model's synthetic batch.

Providers: vlkernels (use_kernels=True: the backend vlkernels picks), eager (use_kernels=False:
the torch references, the same parameters), torch.compile(eager model). Each call runs the
forward of all the model's objectives and returns the total loss; "backward" and "full"
differentiate it with respect to every parameter, so "full" is one training step without the
optimizer. Parameters stay fp32; a bf16/fp16 --dtype runs the step under autocast, as mixed
precision training does. Each call reseeds torch's RNG, so sampling inside the models (patch
sampling, hard negatives, MVM masks) draws the same for every provider.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from vlkernels.bench.harness import Case, Compiled, Inputs

OP = "model_step"


def _step(model, device: torch.device, dtype: torch.dtype):
    def loss(*parameters, **batch):  # parameters are the differentiated inputs; the model holds them
        torch.manual_seed(0)
        context = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with context:
            return model(**batch).loss.float()

    return loss


def _case(name: str, size: str, batch_size: int) -> Case:
    from vlkernels.models import build_model

    state = {}

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        model = build_model(name, size, use_kernels=True).to(device).train()
        eager = copy.copy(model)  # the same submodules and parameters, only the switch differs
        eager.use_kernels = False
        state.update(vlkernels=_step(model, device, dtype), eager=_step(eager, device, dtype))
        batch = model.synthetic_batch(batch_size, generator=torch.Generator().manual_seed(0), device=device)
        parameters = tuple(p for p in model.parameters() if p.requires_grad)
        return Inputs(parameters, batch)

    providers = {
        "vlkernels": lambda *args, **kwargs: state["vlkernels"](*args, **kwargs),
        "eager": lambda *args, **kwargs: state["eager"](*args, **kwargs),
        "torch.compile": Compiled(lambda *args, **kwargs: state["eager"](*args, **kwargs)),
    }
    return Case(OP, f"{name}-{size}-B{batch_size}", make, providers)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.models import MODELS

    size, batch_size = ("base", 8) if device.type == "cuda" and not quick else ("tiny", 4)
    # ViLT and VLMo first: with --schedule rounds and a time limit (bench/gpu_check.sh) they are
    # the model steps that get timed (the patch, attention and MoME kernels all in one step).
    names = sorted(MODELS, key=lambda name: name not in ("vilt", "vlmo"))
    return [_case(name, size, batch_size) for name in names]
