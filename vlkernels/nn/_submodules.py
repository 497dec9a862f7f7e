"""When a fused module may read a submodule's weights instead of calling it."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module


def is_plain(module: nn.Module, *classes: type) -> bool:
    """True while ``module`` is exactly one of ``classes`` (no subclass, no wrapper such as a LoRA
    layer, no parametrization) with no hooks of its own and no global module hooks: only then may
    a fused kernel read its weight instead of calling it."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             _module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
             _module._global_backward_pre_hooks)
    return type(module) in classes and not any(hooks)


def embedding_row(embedding: nn.Module, index: int) -> torch.Tensor:
    """Row ``index`` [D] of an embedding table (a token-type or mask embedding added to every
    token): read from the weight while ``embedding`` is a plain nn.Embedding without hooks, else
    the module is called, so a LoRA adapter or a hook on it takes effect."""
    if is_plain(embedding, nn.Embedding):
        return embedding.weight[index]
    return embedding(torch.tensor(index, device=embedding.weight.device))
