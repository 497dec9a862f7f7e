"""The life of every public module and reference model beyond one call: copies, pickling,
saving, state-dict round trips, FSDP2's meta-device recipe, dtype casts and autocast, the
no-grad modes, frozen parameters, functional_call, checkpointing and hooks, threads, compile
and export.

Everything is parametrized from REGISTRY: adding a module or a model is one line there
(a builder and the inputs of one call). Outputs are compared in eval mode (dropout off, the
visual dictionary not updating) on the default backend, with torch's global RNG reseeded
before each call (ITM's hard negatives draw from it).
"""
from __future__ import annotations

import copy
import io
import pickle
import threading
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkernels import nn as vnn
from vlkernels.models import MODELS, build_model

D, H = 16, 2


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _mask(batch, length):
    return torch.arange(length) < torch.tensor([length, max(1, length - 2)][:batch])[:, None]


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]  # (args, kwargs) of one call
    model: tuple = ()  # a model's (name, config overrides)


def _model(name, **overrides):
    def build():
        return build_model(name, "tiny", **overrides)

    def inputs():
        if name not in _BATCH_MODELS:
            _BATCH_MODELS[name] = build_model(name, "tiny")
        model = _BATCH_MODELS[name]
        return (), model.synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    return Entry(build, inputs, (name, overrides))


_BATCH_MODELS: dict = {}
REGISTRY = {
    "Mlp": Entry(lambda: vnn.Mlp(D, 32), lambda: ((_rand(2, 5, D),), {})),
    "Pooler": Entry(lambda: vnn.Pooler(D), lambda: ((_rand(2, 5, D),), {})),
    "PredictionTransform": Entry(lambda: vnn.PredictionTransform(D), lambda: ((_rand(2, 5, D),), {})),
    "MLMHead": Entry(lambda: vnn.MLMHead(D, 30), lambda: ((_rand(2, 5, D),), {})),
    "TextEmbeddings": Entry(lambda: vnn.TextEmbeddings(30, D, 8, dropout=0.0),
                            lambda: ((torch.arange(10).view(2, 5) % 30,), {})),
    "VLMultiheadAttention": Entry(lambda: vnn.VLMultiheadAttention(D, H),
                                  lambda: ((_rand(2, 5, D),), {"key_padding_mask": _mask(2, 5)})),
    "MultiheadAttention": Entry(lambda: vnn.MultiheadAttention(D, H, batch_first=True),
                                lambda: ((_rand(2, 5, D), _rand(2, 5, D), _rand(2, 5, D)), {})),
    "PostLNAttention": Entry(lambda: vnn.PostLNAttention(D, H), lambda: ((_rand(2, 5, D),), {})),
    "PostLNFeedForward": Entry(lambda: vnn.PostLNFeedForward(D, 32), lambda: ((_rand(2, 5, D),), {})),
    "PreLNBlock": Entry(lambda: vnn.PreLNBlock(D, H, 2.0), lambda: ((_rand(2, 5, D), _mask(2, 5)), {})),
    "BertLayer": Entry(lambda: vnn.BertLayer(D, H, 32), lambda: ((_rand(2, 5, D), _mask(2, 5)), {})),
    "LXMERTCrossLayer": Entry(lambda: vnn.LXMERTCrossLayer(D, H, 32), lambda: ((_rand(2, 5, D), _rand(2, 4, D)), {})),
    "METERCrossLayer": Entry(lambda: vnn.METERCrossLayer(D, H, 32), lambda: ((_rand(2, 5, D), _rand(2, 4, D)), {})),
    "ViLBERTCoLayer": Entry(lambda: vnn.ViLBERTCoLayer(D, 8, D, H, 32, 16),
                            lambda: ((_rand(2, 5, D), _rand(2, 4, 8)), {})),
    "MoMEFFN": Entry(lambda: vnn.MoMEFFN(D, 32, ("text", "image")), lambda: ((_rand(2, 5, D),), {"text_len": 2})),
    "VLMoAttention": Entry(lambda: vnn.VLMoAttention(D, H), lambda: ((_rand(2, 5, D), _mask(2, 5)), {})),
    "MoMEBlock": Entry(lambda: vnn.MoMEBlock(D, H, 2.0, max_text_len=2), lambda: ((_rand(2, 5, D), _mask(2, 5)), {})),
    "PatchEmbed": Entry(lambda: vnn.PatchEmbed(8, 4, 3, D), lambda: ((_rand(2, 3, 8, 8),), {})),
    "VisualDictionary": Entry(lambda: vnn.VisualDictionary(6, D), lambda: ((_rand(2, 5, D),), {})),
    "WRALoss": Entry(lambda: vnn.WRALoss(iters=5), lambda: ((_rand(2, 5, D), _rand(2, 4, D), _mask(2, 5),
                                                             _mask(2, 4), torch.tensor([1, 0])), {})),
    "WPALoss": Entry(lambda: vnn.WPALoss(iters=5), lambda: ((_rand(2, 5, D), _rand(2, 4, D), _mask(2, 5),
                                                             _mask(2, 4), torch.tensor([1, 0])), {})),
    **{f"model:{name}": _model(name) for name in MODELS},
    # config-derived state: VLMo's relative_position_index, ViLT's zero q/k/v bias and its tie
    "model:vlmo-relative-position": _model("vlmo", relative_position_bias=True),
    "model:vilt-no-qkv-bias": _model("vilt", qkv_bias=False),
    "model:vilt-tied-decoder": _model("vilt", tie_mlm_decoder=True),  # as HF's ViltForMaskedLM
}
def _is_model(name) -> bool:
    return name.startswith("model:")


NAMES = list(REGISTRY)
MODULES = [name for name in NAMES if not _is_model(name)]
MODEL_ENTRIES = [name for name in NAMES if _is_model(name)]


def _flat(out) -> torch.Tensor:
    """One tensor from a module's output: a model's loss, else every floating tensor flattened."""
    if isinstance(out, dict):
        return out["loss"]
    if isinstance(out, torch.Tensor):
        return out
    flats = [_flat(o).flatten() for o in out if o is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in flats) else torch.float32
    return torch.cat([t.to(dtype) for t in flats])


def _state(module) -> dict:
    """Every parameter and buffer, persistent or not, by name."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _ties(module) -> list:
    """The names sharing one parameter, for each parameter with several (tied weights)."""
    names: dict = {}
    for key, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(key)
    return sorted(sorted(group) for group in names.values() if len(group) > 1)


def _assert_same_state(actual, expected, name) -> None:
    assert _ties(actual) == _ties(expected), f"{name}: tied parameters {_ties(actual)}, not {_ties(expected)}"
    a, e = _state(actual), _state(expected)
    assert a.keys() == e.keys(), f"{name}: {sorted(a.keys() ^ e.keys())}"
    for key in e:
        assert a[key].device == e[key].device, f"{name}: {key} on {a[key].device}"
        torch.testing.assert_close(a[key], e[key], rtol=0, atol=0, msg=lambda m: f"{name}: {key}: {m}")


def _build(name, seed=0):
    torch.manual_seed(seed)
    return REGISTRY[name].build().eval()


def _call(module, name, inputs=None):
    args, kwargs = REGISTRY[name].inputs() if inputs is None else inputs
    torch.manual_seed(1)
    return _flat(module(*args, **kwargs))


def _float_inputs(name):
    """The inputs with every floating tensor requiring grad (and those tensors)."""
    args, kwargs = REGISTRY[name].inputs()
    leaves = []

    def mark(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.clone().requires_grad_(True)
            leaves.append(value)
        return value
    return (tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()}), leaves


@pytest.mark.parametrize("name", NAMES)
def test_copies_pickle_and_save(name):
    module = _build(name)
    expected = _call(module, name)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    weights = io.BytesIO()
    torch.save(module.state_dict(), weights)
    weights.seek(0)
    from_weights = _build(name, seed=1)
    from_weights.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    buffer.seek(0)
    copies = (copy.deepcopy(module), pickle.loads(pickle.dumps(module)), torch.load(buffer, weights_only=False),
              from_weights)
    for copy_ in copies:
        _assert_same_state(copy_, module, name)
    for copy_ in copies:
        torch.testing.assert_close(_call(copy_.eval(), name), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_recipe(name):
    """FSDP2's recipe: build on meta, to_empty, reset_parameters(), load the checkpoint; and
    load_state_dict(assign=True) into a meta-built module. Both compute as the original."""
    module = _build(name)
    state = module.state_dict()
    with torch.device("meta"):
        empty = _build(name, seed=1)
    empty.to_empty(device="cpu")
    for m in empty.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    empty.load_state_dict(state, strict=True)
    _assert_same_state(empty, module, name)  # non-persistent buffers included
    with torch.device("meta"):
        assigned = _build(name, seed=1)
    assigned.load_state_dict(state, strict=True, assign=True)
    on_meta = [n for n, t in [*assigned.named_parameters(), *assigned.named_buffers()] if t.is_meta]
    assert not on_meta, f"{name}: still on meta after load_state_dict(assign=True): {on_meta}"
    _assert_same_state(assigned, module, name)
    if not _is_model(name):
        expected = _call(module, name)
        for rebuilt in (empty, assigned):
            torch.testing.assert_close(_call(rebuilt, name), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_dtype_casts_and_autocast(name):
    module = _build(name)
    expected = _call(module, name)
    args, kwargs = REGISTRY[name].inputs()
    to64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    kw64 = {k: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for k, t in kwargs.items()}
    wide = copy.deepcopy(module).double()
    try:
        out64 = _call(wide, name, (to64, kw64))
    except (TypeError, ValueError) as error:  # a clear refusal naming the op or module is acceptable
        assert any(word in str(error) for word in ("float64", "dtype", "double")), error
    else:
        # the models compute their losses in fp32 whatever the dtype (as the papers' code does)
        assert out64.dtype == (torch.float32 if _is_model(name) else torch.float64), out64.dtype
        torch.testing.assert_close(out64.to(expected.dtype), expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _call(module, name)
    assert low.shape == expected.shape and bool(torch.isfinite(low.float()).all())


@pytest.mark.parametrize("name", NAMES)
def test_grad_modes_frozen_parameters_and_functional_call(name):
    module = _build(name)
    expected = _call(module, name)
    with torch.no_grad():
        torch.testing.assert_close(_call(module, name), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(_call(module, name), expected, rtol=0, atol=0)
    other = _build(name, seed=1)
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    args, kwargs = REGISTRY[name].inputs()
    torch.manual_seed(1)
    functional = _flat(torch.func.functional_call(module, state, args, kwargs))
    torch.testing.assert_close(functional, _call(other, name), rtol=0, atol=0)
    # frozen parameters: the float inputs still get gradients
    module.requires_grad_(False)
    inputs, leaves = _float_inputs(name)
    out = _call(module, name, inputs)
    if leaves and out.requires_grad:
        grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
        assert any(g is not None and bool(g.ne(0).any()) for g in grads)
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_hooks_checkpointing_and_threads(name):
    module = _build(name)
    expected = _call(module, name)
    seen = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: seen.append(out), with_kwargs=True)
    _call(module, name)
    handle.remove()
    assert len(seen) == 1
    inputs, leaves = _float_inputs(name)
    args, kwargs = inputs
    torch.manual_seed(1)
    checkpointed = _flat(torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs))
    torch.testing.assert_close(checkpointed, expected, rtol=0, atol=0)
    first = list(module.parameters())[:1]
    if checkpointed.requires_grad and first:
        g_ckpt = torch.autograd.grad(checkpointed.float().sum(), first, allow_unused=True)
        plain = _call(module, name, inputs)
        g_plain = torch.autograd.grad(plain.float().sum(), first, allow_unused=True)
        if g_plain[0] is not None:
            torch.testing.assert_close(g_ckpt[0], g_plain[0])
    # two threads, each on its own copy, compute what one thread does
    results = {}

    def work(i, copy_):
        with torch.no_grad():
            results[i] = _flat(copy_(*REGISTRY[name].inputs()[0], **REGISTRY[name].inputs()[1]))
    threads = [threading.Thread(target=work, args=(i, copy.deepcopy(module))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not name.startswith("model:"):  # models draw ITM negatives from the global RNG, shared by threads
        for i in range(2):
            torch.testing.assert_close(results[i], expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODULES)
def test_static_compile_one_graph(name):
    """Static compile (one graph, no break) equals eager (the models: tests/test_compile.py,
    a whole training step each)."""
    import torch._dynamo.testing

    module = _build(name)
    expected = _call(module, name)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    torch.testing.assert_close(_call(compiled, name), expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", NAMES)
def test_export(name):
    """torch.export gives a program that computes what the module computes (a model's output
    comes back as a ModelOutput, a registered pytree)."""
    module = _build(name)
    expected = _call(module, name)
    args, kwargs = REGISTRY[name].inputs()
    exported = torch.export.export(module, args, kwargs)
    torch.manual_seed(1)  # the models' ITM negatives are drawn inside the program too
    out = exported.module()(*args, **kwargs)
    assert type(out) is type(module(*args, **kwargs))
    torch.testing.assert_close(_flat(out), expected)


def _lengths(batch, length):
    """[B, S] bool with a different number of real tokens per sample (at least 1)."""
    return torch.arange(length) < (length - torch.arange(batch) % 3).clamp(min=1)[:, None]


def _pair(batch, length):  # text and image features, their masks and ITM targets
    return (_rand(batch, length, D), _rand(batch, length - 1, D), _lengths(batch, length),
            _lengths(batch, length - 1), torch.arange(batch) % 2)


# Each nn module's positional arguments at batch size b and sequence length n, then its keyword
# arguments where it takes some (PatchEmbed: timm's strict img_size fixes the image).
SIZED = {
    "Mlp": lambda b, n: (_rand(b, n, D),),
    "Pooler": lambda b, n: (_rand(b, n, D),),
    "PredictionTransform": lambda b, n: (_rand(b, n, D),),
    "MLMHead": lambda b, n: (_rand(b, n, D),),
    "TextEmbeddings": lambda b, n: (torch.arange(b * n).view(b, n) % 30,),
    "VLMultiheadAttention": lambda b, n: (_rand(b, n, D), {"key_padding_mask": _lengths(b, n)}),
    "MultiheadAttention": lambda b, n: (_rand(b, n, D), _rand(b, n + 1, D), _rand(b, n + 1, D)),
    "PostLNAttention": lambda b, n: (_rand(b, n, D),),
    "PostLNFeedForward": lambda b, n: (_rand(b, n, D),),
    "PreLNBlock": lambda b, n: (_rand(b, n, D), _lengths(b, n)),
    "BertLayer": lambda b, n: (_rand(b, n, D), _lengths(b, n)),
    "LXMERTCrossLayer": lambda b, n: (_rand(b, n, D), _rand(b, n - 1, D)),
    "METERCrossLayer": lambda b, n: (_rand(b, n, D), _rand(b, n - 1, D)),
    "ViLBERTCoLayer": lambda b, n: (_rand(b, n, D), _rand(b, n - 1, 8)),
    "MoMEFFN": lambda b, n: (_rand(b, n, D), {"text_len": 2}),
    "VLMoAttention": lambda b, n: (_rand(b, n, D), _lengths(b, n)),
    "MoMEBlock": lambda b, n: (_rand(b, n, D), _lengths(b, n)),
    "PatchEmbed": lambda b, n: (_rand(b, 3, 8, 8),),
    "VisualDictionary": lambda b, n: (_rand(b, n, D), _lengths(b, n)),
    "WRALoss": _pair,
    "WPALoss": _pair,
}
SIZES = ((2, 4), (3, 5), (4, 6), (5, 8))  # TextEmbeddings has 8 positions


def test_every_module_has_sized_inputs():
    assert SIZED.keys() == {name for name in NAMES if not _is_model(name)}  # adding a module: one line each


@pytest.mark.parametrize("name, training", [pytest.param(name, False, id=name) for name in SIZED] + [
    pytest.param("VisualDictionary", True, id="VisualDictionary-train")])
def test_dynamic_compile_one_graph_over_sizes(name, training):
    """dynamic=True, fullgraph=True: one graph over 4 batch sizes and sequence lengths, equal to
    eager (a training VisualDictionary updates its buffers as eager does)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    module, twin = _build(name).train(training), _build(name).train(training)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, backend=counter, dynamic=True, fullgraph=True)
    for batch, length in SIZES:
        args = SIZED[name](batch, length)
        args, kwargs = (args[:-1], args[-1]) if isinstance(args[-1], dict) else (args, {})
        torch.testing.assert_close(_flat(compiled(*args, **kwargs)), _flat(twin(*args, **kwargs)),
                                   msg=lambda m: f"{name} at {batch} x {length}: {m}")
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs over 4 sizes"
    _assert_same_state(module, twin, name)


# A model's batches at (batch size, text length): lengths under the tiny configs' 12 (Oscar: 14
# tokens of caption and tags), none equal to a batch size, a region count or a config size such as
# UNITER's 12 region classes: dynamo's duck sizing would give them one symbol, and a check of the
# config size would then fix the text length too.
MODEL_SIZES = ((2, 11), (3, 9), (4, 10), (5, 8))


def _sized_batch(entry, batch, length):
    """synthetic_batch of a twin whose batches have `length` text tokens (the model's own config
    takes any length up to its position table)."""
    name, overrides = REGISTRY[entry].model
    field = "max_seq_length" if name == "oscar" else "max_text_len"
    twin = build_model(name, "tiny", **overrides, **{field: length + (name == "oscar") * 2})
    return twin.synthetic_batch(batch, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("name", MODEL_ENTRIES)
def test_dynamic_compile_one_graph_over_batch_sizes_and_text_lengths(name):
    """Every model and config variant under dynamic=True, fullgraph=True: one graph over 4 batch
    sizes and 4 text lengths, losses equal to eager under one seed (up to 12 s a model on CI's CPU)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = _build(name)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for batch, length in MODEL_SIZES:
        inputs = _sized_batch(name, batch, length)
        torch.manual_seed(1)  # ITM's negatives and SOHO's masked-visual-modeling draws
        actual = compiled(**inputs).loss
        torch.manual_seed(1)
        torch.testing.assert_close(actual, model(**inputs).loss, msg=lambda m: f"{name} at {batch} x {length}: {m}")
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs over 4 batch sizes and text lengths"


def test_reference_path_model_compiles_in_one_graph():
    """A use_kernels=False model (its forward opens a use_backend("torch") block) compiles under
    fullgraph, dynamic=True, equal to eager."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = build_model("visualbert", "tiny", use_kernels=False).eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for batch, length in MODEL_SIZES[:2]:
        inputs = _sized_batch("model:visualbert", batch, length)
        torch.manual_seed(1)
        actual = compiled(**inputs).loss
        torch.manual_seed(1)
        torch.testing.assert_close(actual, model(**inputs).loss)
    assert counter.frame_count == 1


def test_vilt_dynamic_compile_one_graph_over_batch_and_image_sizes():
    """ViLT's batches differ in batch size and in padded pixel size (its collate pads each batch
    to its largest image): one graph over 4 of each, losses equal to eager under one seed. The
    first grid is not square (dynamo's duck sizing would tie H to W). ~10 s on CI's CPU."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = _build("model:vilt")
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for batch, (rows, cols) in ((2, (8, 0)), (3, (0, 16)), (4, (16, 8)), (5, (8, 8))):  # extra pixels
        inputs = model.synthetic_batch(batch, generator=torch.Generator().manual_seed(batch))
        for key in ("pixel_values", "pixel_mask"):  # zero pixels, masked out
            inputs[key] = F.pad(inputs[key], (0, cols, 0, rows))
        torch.manual_seed(1)  # the patch sampling's draws
        actual = compiled(**inputs).loss
        torch.manual_seed(1)
        torch.testing.assert_close(actual, model(**inputs).loss, msg=lambda m: f"vilt at batch {batch}: {m}")
    assert counter.frame_count == 1, f"vilt: {counter.frame_count} graphs over 4 batch and image sizes"


def test_masked_lm_loss_without_labels_compiled():
    """The nothing-labelled branch is tensor ops: compiled and eager agree (0, connected to the graph)."""
    from vlkernels.models.common import masked_lm_loss

    logits = torch.randn(2, 5, 7, requires_grad=True)
    for labels in (torch.full((2, 5), -100), torch.randint(7, (2, 5))):
        eager = masked_lm_loss(logits, labels)
        compiled = torch.compile(masked_lm_loss, backend="aot_eager", fullgraph=True)(logits, labels)
        torch.testing.assert_close(compiled, eager)
        reference = (F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)) if (labels != -100).any()
                     else torch.tensor(0.0))
        torch.testing.assert_close(eager, reference)
        assert eager.requires_grad


# The batch fields a model's objectives take as token or region targets (-100: ignored), and the
# masks of its image side (0: padding); VLMo, METER and SimVLM always see a whole image.
TARGETS = {"mlm_labels", "labels", "obj_labels", "attr_labels", "region_labels"}
IMAGE_MASKS = {"pixel_mask", "region_mask", "visual_attention_mask", "image_attention_mask", "grid_mask", "img_mask"}


def _edge_batches(name, batch) -> dict:
    """The batch with nothing labelled (no token target, no masked region), with no image (every
    image position padding; nothing masked there either) and cut to its first sample."""
    unlabelled = {key: torch.full_like(value, -100) if key in TARGETS else value for key, value in batch.items()}
    one = {key: value[:1] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    if "itm_image_index" in one:  # the pairing: the sample's own image
        one["itm_image_index"] = torch.zeros_like(one["itm_image_index"])
    if name == "vlmo":  # ITM's hard negatives come from the other pairs (a clear error with one)
        one["itm"] = False
    edges = {"unlabelled": unlabelled, "one sample": one}
    if IMAGE_MASKS & batch.keys():
        edges["imageless"] = {key: torch.zeros_like(value) if key in IMAGE_MASKS else value
                              for key, value in batch.items()}
    for edge in edges.values():
        if "masked_regions" in edge and edge is not one:
            edge["masked_regions"] = torch.zeros_like(edge["masked_regions"])
    return edges


@pytest.mark.parametrize("name", MODELS)
def test_compiled_losses_equal_eager_without_labels_or_images_and_with_one_sample(name):
    """The losses' data-dependent branches are tensor ops: under fullgraph compile a batch with
    nothing labelled, a batch without an image and a batch of one sample give eager's losses,
    every objective's (ViLT refuses an image with no patch, clearly; up to 15 s a model on CI's CPU)."""
    torch._dynamo.reset()
    model = _build(f"model:{name}")
    edges = _edge_batches(name, model.synthetic_batch(2, generator=torch.Generator().manual_seed(0)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    if name == "vilt":
        with pytest.raises(ValueError, match="no valid patch"):
            model(**edges.pop("imageless"))
    for edge, inputs in edges.items():
        torch.manual_seed(1)
        actual = compiled(**inputs)
        torch.manual_seed(1)
        expected = model(**inputs)
        assert actual["losses"].keys() == expected["losses"].keys()
        for key, value in expected["losses"].items():
            assert bool(value.isfinite()), f"{name} {edge} {key}: {value}"
            torch.testing.assert_close(actual["losses"][key], value, msg=lambda m: f"{name} {edge} {key}: {m}")


@pytest.mark.parametrize("name", MODEL_ENTRIES)
def test_tied_weights_declares_every_tie(name):
    """`tied_weights()` (what reset_parameters and load_state_dict tie again) lists the ties the model builds."""
    model = _build(name)
    assert sorted(sorted(pair) for pair in model.tied_weights().items()) == _ties(model)


@pytest.mark.parametrize("name", [name for name in MODEL_ENTRIES if _ties(_build(name))])
def test_checkpoint_with_one_name_of_each_tie_loads(name):
    """A checkpoint holding one name of a tie (HF's leave the tied decoder out; safetensors keeps
    one name of each shared tensor, whichever sorts first) loads strictly into a built model, into
    a meta-built one with assign=True and by the meta recipe: the model equals the original."""
    module = _build(name)
    full = module.state_dict()
    for keep in (0, 1):  # the source's name, then the alias's
        dropped = {pair[1 - keep] for pair in module.tied_weights().items()}
        state = {key: value for key, value in full.items() if key not in dropped}
        built = _build(name, seed=1)
        built.load_state_dict(state, strict=True)
        with torch.device("meta"):
            assigned, empty = _build(name, seed=1), _build(name, seed=1)
        assigned.load_state_dict(state, strict=True, assign=True)
        empty.to_empty(device="cpu")
        empty.load_state_dict(state, strict=True)  # no reset_parameters(): the load ties again
        for rebuilt in (built, assigned, empty):
            _assert_same_state(rebuilt, module, name)


def test_wrapped_tied_weights_still_load():
    """A tied decoder wrapped by peft's LoRA (target_modules="all-linear") or parametrized: the
    model's state dict loads back (the re-tie leaves a weight that is not a plain slot alone)."""
    peft = pytest.importorskip("peft")
    from torch.nn.utils import parametrize

    model = _build("model:simvlm")
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(adapted.base_model.model.lm_head, peft.tuners.lora.LoraLayer)
    adapted.load_state_dict(adapted.state_dict(), strict=True)

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight
    parametrize.register_parametrization(model.lm_head, "weight", Doubled())
    model.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(model.lm_head.weight, 2 * model.word_embeddings.weight)


def test_vlmo_loads_a_scalar_logit_scale():
    """logit_scale is [1] (FSDP2 shards no scalar); a checkpoint with the old 0-dim one still loads."""
    model = build_model("vlmo", "tiny")
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(1.25)
    model.load_state_dict(state, strict=True)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 1.25


def test_check_batch_keeps_the_batch_dynamic():
    """check_batch compares sizes without hashing them: one graph over 4 batch sizes under dynamic=True."""
    import torch._dynamo.testing

    from vlkernels.models.common import check_batch

    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def scaled(a, b):
        return a * check_batch("M", a=a, b=b, c=None)
    for batch in (2, 3, 5, 7):
        torch.testing.assert_close(scaled(torch.ones(batch, 3), torch.ones(batch)), torch.full((batch, 3), batch * 1.0))
    assert counter.frame_count == 1


# The entries whose calls dispatch vlkernels ops (the rest are plain torch layers), and the call's
# keyword arguments on the kernel path: MultiheadAttention returns its weights by default (as
# torch's does), which only the fallback computes.
PLAIN = {"Mlp", "Pooler", "PredictionTransform", "MLMHead", "TextEmbeddings", "PostLNFeedForward"}
KERNEL_CALL = {"MultiheadAttention": {"need_weights": False}}


@pytest.mark.parametrize("name", [name for name in NAMES if name not in PLAIN])
def test_triton_path_copies_and_meta_recipe(name):
    """The Triton path (the interpreter on CPU) at small sizes: every op call runs on Triton
    with no fallback, and modules rebuilt by the meta recipe (to_empty + reset_parameters +
    load; load_state_dict(assign=True)), a pickled copy and a torch.save'd one compute what the
    original does, forward and backward (the models: the rebuilt ones, forward only, as their
    backward under the interpreter takes minutes); the original agrees with the default backend."""
    import vlkernels
    from vlkernels import _backend
    why = _backend.triton_refusal(torch.device("cpu"))
    if why:
        pytest.skip(why)
    module = _build(name)
    state = module.state_dict()
    with torch.device("meta"):
        empty, assigned = _build(name, seed=1), _build(name, seed=1)
    empty.to_empty(device="cpu")
    for m in empty.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    empty.load_state_dict(state, strict=True)
    assigned.load_state_dict(state, strict=True, assign=True)
    copies = (empty, assigned)
    if not _is_model(name):  # a model's copies: test_copies_pickle_and_save (4 s a forward here)
        saved = io.BytesIO()
        torch.save(module, saved)
        saved.seek(0)
        copies += (pickle.loads(pickle.dumps(module)), torch.load(saved, weights_only=False))

    def run(m):
        (args, kwargs), leaves = _float_inputs(name)
        out = _call(m, name, (args, {**kwargs, **KERNEL_CALL.get(name, {})}))
        if _is_model(name):
            return out.detach(), []
        params = [p for p in m.parameters() if p.requires_grad]
        return out.detach(), torch.autograd.grad(out.float().sum(), leaves + params, allow_unused=True)
    default = run(module)
    with vlkernels.use_backend("triton"), vlkernels.kernel_coverage() as coverage:
        expected = run(module)
        copied = [run(copy_.eval()) for copy_ in copies]
    assert coverage.calls and coverage.backends() == {"triton": len(coverage.calls)}, coverage.backends()
    assert not coverage.fallbacks, coverage.fallbacks
    torch.testing.assert_close(expected, default, rtol=1e-4, atol=1e-5)
    for actual in copied:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# The entries with no nn.Linear or nn.Conv2d for LoRA to adapt.
NO_LINEAR = {"TextEmbeddings", "VisualDictionary", "WRALoss", "WPALoss"}


@pytest.mark.parametrize("name", [name for name in NAMES if name not in NO_LINEAR])
def test_lora_on_every_linear_equals_merged(name):
    """peft's LoRA on every nn.Linear and nn.Conv2d of the entry (tied ones aside: merging one
    would change the table it shares) changes the output, and the adapted module computes what
    the module with the adapters merged computes, forward and the inputs' gradients (the fused
    modules' kernel paths and fallbacks in detail: tests/test_models_lora.py)."""
    peft = pytest.importorskip("peft")
    module = _build(name)
    tied = {key for group in _ties(module) for key in group}
    targets = [key for key, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and f"{key}.weight" not in tied]
    assert targets, f"{name}: nothing to adapt (list it in NO_LINEAR)"
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(module), config).eval()
    merged = copy.deepcopy(adapted).merge_and_unload()

    def run(m):
        inputs, leaves = _float_inputs(name)
        out = _call(m, name, inputs)
        return out, torch.autograd.grad(out.float().sum(), leaves, allow_unused=True) if leaves else ()
    out, grads = run(adapted)
    expected, expected_grads = run(merged)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, expected_grads)
    assert not torch.allclose(out, _call(module, name)), f"{name}: the adapters changed nothing"


# -- bounded caches ---------------------------------------------------------------------------------
# The library's caches: the extension's and the integrations' loaders (functools caches of no
# argument), the once-per-reason fallback warnings (vlkernels._coverage, integrations._kernels),
# vd_nearest's codebook norms (a few entries, the codebook held weakly) and Triton's own compiled
# kernels, whose keys come from the launch tables that test_op_contract checks against the report.
def _library_modules():
    import importlib
    import pkgutil

    import vlkernels
    for info in pkgutil.walk_packages(vlkernels.__path__, "vlkernels."):
        if not info.name.startswith(("vlkernels.bench", "vlkernels._C")):
            yield importlib.import_module(info.name)


def test_functools_caches_take_no_arguments_or_are_bounded():
    import functools
    import inspect

    caches = {f"{module.__name__}.{name}": value for module in _library_modules()
              for name, value in vars(module).items() if isinstance(value, functools._lru_cache_wrapper)}
    assert "vlkernels._extension._load" in caches  # the scan sees them
    unbounded = [name for name, cache in caches.items() if cache.cache_parameters()["maxsize"] is None
                 and inspect.signature(cache.__wrapped__).parameters]
    assert not unbounded, f"caches that grow with their arguments: {unbounded}"


def test_fallback_warning_records_stay_bounded_over_shapes():
    """Each fallback is warned about once per (op, reason), and the pairs are kept for the whole
    process: reasons must name no sizes, or a run over many shapes would grow the record."""
    import warnings

    from vlkernels import _coverage
    from vlkernels.integrations import _kernels

    mha = vnn.MultiheadAttention(D, H)
    hooked = vnn.PatchEmbed(None, 4, 3, D)
    hooked.proj.register_forward_hook(lambda m, args, out: out)
    experts = vnn.MoMEFFN(D, 32, ("text", "image"))
    experts.mlp_text.fc1.register_forward_hook(lambda m, args, out: out)

    def run(length):
        x = _rand(length, 2, D)
        mha(x, x, x)  # need_weights=True
        mha(x, x, x, need_weights=False, attn_mask=_rand(length, length))
        mha(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, length))  # float padding mask
        hooked(_rand(2, 3, 4, 4 * length))
        experts(_rand(2, length, D), text_len=1)
        _bias, reason = _kernels.hf_attention_bias(torch.zeros(2, 1, length + 1, length), 2, H, length, length,
                                                   torch.float32)
        _kernels.fallback(mha, reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(3)
        sizes = len(_coverage._WARNED), len(_kernels._WARNED)
        for length in range(4, 12):
            run(length)
    assert (len(_coverage._WARNED), len(_kernels._WARNED)) == sizes


def _storages(module) -> list:
    from torch.multiprocessing.reductions import StorageWeakRef
    return [StorageWeakRef(t.untyped_storage()) for t in _state(module).values()]


@pytest.mark.parametrize("name", NAMES)
def test_dropped_module_is_freed(name):
    """After a forward and backward, nothing in the library keeps a dropped module or its tensors."""
    import gc
    import weakref

    module = _build(name).train()
    inputs, _ = _float_inputs(name)
    out = _call(module, name, inputs)
    if out.requires_grad:
        out.float().sum().backward()
    alive, storages = weakref.ref(module), _storages(module)
    del module, out, inputs
    gc.collect()
    assert alive() is None, f"{name}: {gc.get_referrers(alive())}"
    assert all(storage.expired() for storage in storages), f"{name}: a parameter's or buffer's memory is kept"


def test_codebook_norms_cache_is_bounded_and_keeps_no_codebook():
    """vd_nearest's codebook-norms cache (the Triton path) over many codebooks created and dropped:
    a few entries at most, and a dropped codebook's memory is freed."""
    import gc

    from vlkernels import _backend, use_backend
    from vlkernels.ops import visual_dictionary as vd_ops
    why = _backend.triton_refusal(torch.device("cpu"))
    if why:
        pytest.skip(why)
    x = _rand(5, D)
    storages = []
    with use_backend("triton"):
        for entries in range(3, 13):
            dictionary = vnn.VisualDictionary(entries, D).eval()
            index = vd_ops.vd_nearest(x, dictionary.embed)[0]
            torch.testing.assert_close(index, torch.cdist(x, dictionary.embed).argmin(1), rtol=0, atol=0)
            storages += _storages(dictionary)
            assert len(vd_ops._NORMS_CACHE) <= vd_ops._NORMS_CACHE_ENTRIES
            del dictionary
    gc.collect()
    assert all(storage.expired() for storage in storages)


def test_dropped_patched_hf_model_is_freed():
    """A patched HF model (its modules hold their bound kernel forwards) is freed once dropped."""
    import gc
    import weakref

    transformers = pytest.importorskip("transformers")
    from vlkernels.integrations import apply_vlkernels_to_vilt
    from vlkernels.integrations._patching import is_patched
    config = transformers.ViltConfig(hidden_size=D, num_attention_heads=H, intermediate_size=32, vocab_size=30,
                                     num_hidden_layers=1, image_size=16, patch_size=8, max_position_embeddings=8)
    model = apply_vlkernels_to_vilt(transformers.ViltModel(config).eval())
    assert any(is_patched(m) for m in model.modules())
    out = model(input_ids=torch.arange(10).view(2, 5) % 30, pixel_values=_rand(2, 3, 16, 16))
    out.last_hidden_state.sum().backward()
    alive, storages = weakref.ref(model), _storages(model)
    del model, out
    gc.collect()
    assert alive() is None and all(storage.expired() for storage in storages)
