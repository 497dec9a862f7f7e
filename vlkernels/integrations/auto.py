"""One entry point for every supported HF model: ``apply_vlkernels(model)`` finds the model
families inside ``model`` (by the HF module classes it contains) and applies each family's
``apply_vlkernels_to_<family>``; ``revert_vlkernels(model)`` undoes it."""
from __future__ import annotations

from torch import nn

from vlkernels.integrations import _patching, lxmert, vilt, visual_bert, vit

# name -> (family, apply, revert, the flags the apply function takes)
FAMILIES = {
    "vilt": (vilt.FAMILY, vilt.apply_vlkernels_to_vilt, vilt.revert_vlkernels_to_vilt, ("attention", "patch_embed")),
    "lxmert": (lxmert.FAMILY, lxmert.apply_vlkernels_to_lxmert, lxmert.revert_vlkernels_to_lxmert, ("attention",)),
    "visual_bert": (visual_bert.FAMILY, visual_bert.apply_vlkernels_to_visual_bert,
                    visual_bert.revert_vlkernels_to_visual_bert, ("attention",)),
    "vit": (vit.FAMILY, vit.apply_vlkernels_to_vit, vit.revert_vlkernels_to_vit, ("attention", "patch_embed")),
}


def _families_in(model, function: str) -> list[str]:
    """The names of the families with at least one module in ``model``; TypeError when none."""
    if isinstance(model, nn.Module):
        found = [name for name, (family, *_rest) in FAMILIES.items()
                 if any(isinstance(module, _classes(family)) for module in model.modules())]
        if found:
            return found
    supported = ", ".join(family.name for family, *_rest in FAMILIES.values())
    raise TypeError(f"{function}: expected a transformers model of a supported type ({supported}: a model, "
                    f"a head such as ViltForQuestionAnswering, or a module containing one); got "
                    f"{type(model).__name__}, which contains none of their modules. Per-model functions: "
                    f"vlkernels.integrations.apply_vlkernels_to_<model>")


def _classes(family: _patching.Family) -> tuple:
    return tuple(patch.cls for group in family.patches().values() for patch in group)


def apply_vlkernels(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> nn.Module:
    """Run a HuggingFace model on the vlkernels ops, whatever its type (ViLT, LXMERT,
    VisualBERT or ViT): ``apply_vlkernels_to_<family>(model)`` for every family whose modules
    ``model`` contains (a composite model holding, say, a ViT and a VisualBERT gets both).

    model: a loaded transformers model (``ViltModel``, ``LxmertForQuestionAnswering``, ...) or
        any nn.Module containing one; its attention ([B, S, D] hidden states) and patch
        embedding ([B, C, H, W] pixels) modules get kernel forwards bound on the instance
        (state dict and outputs unchanged, to fp32 rounding).
    attention, patch_embed: which kernels (a family without patch embeddings ignores patch_embed).
    returns the model. Raises TypeError for a model of another type (naming the supported ones),
    ImportError outside the supported transformers versions (``TRANSFORMERS_RANGE``). Undo with
    :func:`revert_vlkernels`.
    """
    flags = {"attention": attention, "patch_embed": patch_embed}
    for name in _families_in(model, "apply_vlkernels"):
        _family, apply, _revert, takes = FAMILIES[name]
        apply(model, **{flag: flags[flag] for flag in takes})
    return model


def revert_vlkernels(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vlkernels` on ``model`` (every supported family it contains); returns
    the model. TypeError as :func:`apply_vlkernels` for a model of another type."""
    for name in _families_in(model, "revert_vlkernels"):
        FAMILIES[name][2](model)
    return model
