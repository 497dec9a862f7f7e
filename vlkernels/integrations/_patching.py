"""The rebinding and revert mechanics shared by every ``apply_vlkernels_to_<model>``.

Two ways to patch one HF module class ``cls`` with a kernel forward ``fn`` (a plain function
with the same parameters as ``cls.forward``):

- a loaded model: each ``cls`` instance inside it gets ``fn`` bound as an instance attribute
  (``module.forward = BoundForward(fn, module)``). nn.Module stores a plain attribute in the
  instance ``__dict__``, so parameters, buffers, the state dict and hooks are untouched, and
  ``nn.Module.__call__`` finds the instance ``forward`` before the class one. Revert deletes it.
  A :class:`BoundForward` (not a ``types.MethodType``, which pickles as ``getattr(module,
  fn.__name__)``, a name the module does not have) pickles, deep-copies and ``torch.save``-s
  with the module: the function by its qualified name, the module by reference.
- no model: ``cls.forward = fn``, Liger-Kernel style, so every instance uses it (those created
  later too). The HF function is kept on the class under ``_ORIGINAL`` until revert puts it back.

A kernel forward falls back to the HF forward for calls the kernel cannot compute exactly
(:func:`original_forward`); it finds that function whichever way the module was patched.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from vlkernels.integrations._versions import check_transformers, installed

# Class attribute holding the HF forward while the class is patched.
_ORIGINAL = "_vlkernels_original_forward"
# Function attribute marking a kernel forward (so revert removes only what vlkernels bound).
_MARK = "__vlkernels_kernel_forward__"


def kernel_forward(fn: Callable) -> Callable:
    """Mark ``fn`` as a vlkernels kernel forward (a decorator)."""
    setattr(fn, _MARK, True)
    return fn


def _is_kernel_forward(fn) -> bool:
    return getattr(fn, _MARK, False) is True


def original_forward(module) -> Callable:
    """The HF ``forward`` function (unbound) of ``module``'s class (or of the class ``module``),
    the one a kernel forward falls back to. Call it as ``original_forward(module)(module, *args)``."""
    owner = module if isinstance(module, type) else type(module)
    for cls in owner.__mro__:
        original = vars(cls).get(_ORIGINAL)
        if original is not None:  # this class is patched: its HF forward is kept here
            return original
    return owner.forward


@dataclass(frozen=True)
class Patch:
    """Replace ``cls.forward`` by ``forward`` (a :func:`kernel_forward` with the same parameters)."""

    cls: type
    forward: Callable


# ---- one module ---------------------------------------------------------------------------------
class BoundForward:
    """``fn`` bound to ``module``, as ``types.MethodType(fn, module)`` but picklable: calling it
    calls ``fn(module, *args, **kwargs)``. ``__func__`` and ``__self__`` as on a bound method."""

    def __init__(self, fn: Callable, module: nn.Module):
        self.__func__ = fn
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __eq__(self, other) -> bool:
        return (isinstance(other, BoundForward) and other.__func__ is self.__func__
                and other.__self__ is self.__self__)

    def __hash__(self) -> int:
        return hash((self.__func__, id(self.__self__)))

    def __repr__(self) -> str:
        return f"<vlkernels forward {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` has a vlkernels forward bound on the instance."""
    bound = vars(module).get("forward")
    return isinstance(bound, BoundForward) and _is_kernel_forward(bound.__func__)


def output_capture_active(module: nn.Module) -> bool:
    """True while transformers 4.x's output capturing (``check_model_inputs`` with
    ``output_attentions``) has wrapped ``module.forward`` to record its outputs: the kernel
    forward must then return what HF returns (the attention probabilities), so it falls back.
    The wrapper is an instance ``forward`` made with ``functools.wraps`` (``__wrapped__``)."""
    bound = vars(module).get("forward")
    return bound is not None and hasattr(bound, "__wrapped__")


def patch_module(module: nn.Module, patch: Patch) -> bool:
    """Bind ``patch.forward`` on ``module``; False (and nothing done) when it is already patched
    or its class overrides the HF forward (a user subclass whose forward we must not replace)."""
    if is_patched(module):
        return False
    hf_forward = vars(patch.cls).get(_ORIGINAL, patch.cls.forward)
    if type(module).forward not in (hf_forward, patch.forward):
        return False
    module.forward = BoundForward(patch.forward, module)
    return True


def unpatch_module(module: nn.Module) -> bool:
    """Remove a vlkernels forward bound on ``module`` (the class forward applies again); False
    when there was none."""
    if not is_patched(module):
        return False
    del module.forward
    return True


# ---- classes ------------------------------------------------------------------------------------
def patch_class(patch: Patch) -> None:
    """``patch.cls.forward = patch.forward``, keeping the HF forward for revert (idempotent)."""
    cls = patch.cls
    if _ORIGINAL in vars(cls):
        return
    setattr(cls, _ORIGINAL, vars(cls)["forward"])
    cls.forward = patch.forward


def unpatch_class(patch: Patch) -> None:
    """Put the HF forward back on ``patch.cls`` (a no-op when the class is not patched)."""
    cls = patch.cls
    original = vars(cls).get(_ORIGINAL)
    if original is None:
        return
    cls.forward = original
    delattr(cls, _ORIGINAL)


def is_class_patched(cls: type) -> bool:
    """True while ``cls.forward`` is a vlkernels kernel forward set by :func:`patch_class`."""
    return _ORIGINAL in vars(cls)


def _parameters(function: Callable) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def _check_signature(patch: Patch, function: str) -> None:
    """ImportError unless the kernel forward takes exactly the HF forward's parameters: a
    transformers release whose module differs is refused, never patched with a wrong forward."""
    hf_forward = original_forward(patch.cls)
    if _parameters(hf_forward) != _parameters(patch.forward):
        raise ImportError(f"{function}: {patch.cls.__name__}.forward{inspect.signature(hf_forward)} of "
                          f"transformers {installed()} is not a signature vlkernels knows; the "
                          f"integrations are tested on transformers 4.57 and 5.x (see TRANSFORMERS_RANGE)")


# ---- a model family -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One HF model family: ``load()`` imports transformers lazily and returns, for each flag
    of the apply function (``attention``, ``patch_embed``), the patches it switches on."""

    name: str  # e.g. "ViLT"
    apply_name: str  # e.g. "apply_vlkernels_to_vilt", for error messages
    expected: str  # what a model must be, for the TypeError
    load: Callable[[], dict[str, tuple[Patch, ...]]]

    def patches(self) -> dict[str, tuple[Patch, ...]]:
        """The patches per flag; ImportError without transformers or outside the supported versions."""
        try:
            import transformers  # noqa: F401
        except ImportError as error:
            raise ImportError(f"{self.apply_name} patches HuggingFace {self.name} modules and needs "
                              f"transformers (pip install 'transformers>=4.57,<6'): {error}") from error
        check_transformers(self.apply_name)
        patches = self.load()
        for patch in (patch for group in patches.values() for patch in group):
            _check_signature(patch, self.apply_name)
        return patches

    def check_model(self, model, function: str) -> None:
        """Raise a TypeError unless ``model`` is an nn.Module holding at least one module this family patches."""
        classes = tuple(patch.cls for patches in self.patches().values() for patch in patches)
        if not isinstance(model, nn.Module) or not any(isinstance(module, classes) for module in model.modules()):
            names = ", ".join(sorted({cls.__name__ for cls in classes}))
            raise TypeError(f"{function}: expected {self.expected}, i.e. an nn.Module containing {names} "
                            f"modules; got {type(model).__name__}")


def apply(family: Family, model: Optional[nn.Module], flags: dict[str, bool]) -> Optional[nn.Module]:
    """Patch the kernels whose flag is True: on ``model``'s modules, or on the classes when model is None."""
    patches = family.patches()
    chosen = [patch for flag, on in flags.items() if on for patch in patches[flag]]
    if model is None:
        for patch in chosen:
            patch_class(patch)
        return None
    family.check_model(model, family.apply_name)
    for module in model.modules():
        for patch in chosen:
            # type(module) may be a subclass; patch_module skips those overriding forward.
            if isinstance(module, patch.cls):
                patch_module(module, patch)
    return model


def revert(family: Family, model: Optional[nn.Module], function: str) -> Optional[nn.Module]:
    """Undo :func:`apply` for every kernel of the family: on ``model``'s modules, or on the classes."""
    patches = [patch for group in family.patches().values() for patch in group]
    if model is None:
        for patch in patches:
            unpatch_class(patch)
        return None
    family.check_model(model, function)
    classes = tuple(patch.cls for patch in patches)
    for module in model.modules():
        if isinstance(module, classes):
            unpatch_module(module)
    return model
