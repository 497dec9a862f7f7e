"""Every public op, module, model and patching function says what it takes and returns: a
docstring with tensor shapes ("[B, S, D]")."""
import inspect

import pytest

import vlkernels
import vlkernels.integrations as integrations
import vlkernels.models as models
import vlkernels.nn as vnn
import vlkernels.ops as ops

PUBLIC = ([(f"ops.{name}", getattr(ops, name)) for name in ops.__all__]
          + [(f"nn.{name}", getattr(vnn, name)) for name in vnn.__all__]
          + [(f"models.{cls}", models.model_class(key)) for key, (_, cls) in models.MODELS.items()]
          + [(f"integrations.{name}", getattr(integrations, name)) for name in integrations.__all__
             if name.startswith("apply_")]
          + [(name, getattr(vlkernels, name)) for name in ("flash_attn_func", "flash_attn_varlen_func")])


def _documentation(obj) -> str:
    text = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "forward" in vars(obj):
        text += inspect.getdoc(obj.forward) or ""
    return text


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_api_documents_its_shapes(name, obj):
    text = _documentation(obj)
    assert len(text) > 40, f"{name} has no docstring"
    assert "[" in text and "]" in text, f"{name}'s docstring gives no tensor shapes"
