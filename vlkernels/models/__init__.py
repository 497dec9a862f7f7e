"""Full reference models of the seed vision-language systems, built from vlkernels.nn.

Each system has a config (``<Model>Config.base()`` with the paper's sizes, ``.tiny()`` for
tests), the model with its pretraining heads and losses, and a ``use_kernels`` switch
(True: the vlkernels ops; False: their pure-torch references, same outputs)::

    from vlkernels.models import build_model
    model = build_model("vilt", "tiny")
    batch = model.synthetic_batch(4)
    model(**batch).loss.backward()

Models are imported on first use, so ``import vlkernels.models`` stays cheap.
"""
from __future__ import annotations

import importlib

from vlkernels.models.common import ModelOutput, PretrainingModel

# name used by the example and benchmarks -> (module, model class)
MODELS = {
    "vilt": ("vilt", "ViLT"),
    "vlmo": ("vlmo", "VLMo"),
    "uniter": ("uniter", "UNITER"),
    "lxmert": ("lxmert", "LXMERT"),
    "vilbert": ("vilbert", "ViLBERT"),
    "meter": ("meter", "METER"),
    "soho": ("soho", "SOHO"),
    "simvlm": ("simvlm", "SimVLM"),
    "oscar": ("oscar", "Oscar"),
    "visualbert": ("visual_bert", "VisualBERT"),
}
_EXPORTS = {cls: module for module, cls in MODELS.values()}
_EXPORTS.update({cls + "Config": module for module, cls in MODELS.values()})

__all__ = ["MODELS", "ModelOutput", "PretrainingModel", "build_model", "model_class", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlkernels.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlkernels.models' has no attribute {name!r}")


def model_class(name: str) -> type:
    """The model class registered under ``name`` (a key of MODELS, e.g. "vilt")."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    module, cls = MODELS[name]
    return getattr(importlib.import_module(f"vlkernels.models.{module}"), cls)


def build_model(name: str, size: str = "tiny", *, use_kernels: bool = True, **overrides) -> PretrainingModel:
    """``model_class(name)`` built from its ``size`` config ("tiny" or "base"), with config
    fields replaced by ``overrides``."""
    import dataclasses

    cls = model_class(name)
    config_cls = getattr(importlib.import_module(cls.__module__), cls.__name__ + "Config")
    if size not in ("tiny", "base"):
        raise ValueError(f"size must be 'tiny' or 'base', got {size!r}")
    config = dataclasses.replace(getattr(config_cls, size)(), **overrides)
    return cls(config, use_kernels=use_kernels)
