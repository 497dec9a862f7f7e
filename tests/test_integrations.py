"""vlkernels.integrations: patched HF ViLT, LXMERT, VisualBERT and ViT (tiny random configs)
against the same models unpatched, on padded inputs: outputs, state dict, which kernel each flag
switches on, revert, class-level patching, the per-call fallbacks and errors."""
import copy
import io
import pickle
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vlkernels  # noqa: E402
from vlkernels import integrations, ops  # noqa: E402
from vlkernels.integrations import _kernels, _patching, _versions, lxmert, vilt, visual_bert, vit  # noqa: E402
from vlkernels.testing import HostReads  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the kernels differ from HF only by rounding
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def vilt_model(**overrides):
    config = transformers.ViltConfig(**{**TINY, **dict(vocab_size=99, num_hidden_layers=2, image_size=32,
                                                       patch_size=8, max_position_embeddings=16), **overrides})
    return transformers.ViltModel(config)


def vilt_inputs(g):
    text_mask = torch.ones(2, 7, dtype=torch.long)
    text_mask[1, 4:] = 0  # padded text
    pixel_mask = torch.ones(2, 32, 32, dtype=torch.long)
    pixel_mask[1, :, 16:] = 0  # the second image fills half the canvas: padded patches
    return dict(input_ids=torch.randint(0, 99, (2, 7), generator=g), attention_mask=text_mask,
                pixel_values=torch.randn(2, 3, 32, 32, generator=g), pixel_mask=pixel_mask)


def lxmert_model(**overrides):
    config = transformers.LxmertConfig(**{**TINY, **dict(vocab_size=99, l_layers=2, x_layers=1, r_layers=1,
                                                         visual_feat_dim=16, visual_pos_dim=4), **overrides})
    return transformers.LxmertModel(config)


def lxmert_inputs(g):
    return dict(input_ids=torch.randint(0, 99, (2, 6), generator=g),
                attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
                visual_feats=torch.randn(2, 5, 16, generator=g), visual_pos=torch.rand(2, 5, 4, generator=g),
                visual_attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]))


def visual_bert_model(**overrides):
    config = transformers.VisualBertConfig(**{**TINY, **dict(vocab_size=99, num_hidden_layers=2,
                                                             visual_embedding_dim=16), **overrides})
    return transformers.VisualBertModel(config)


def visual_bert_inputs(g):
    return dict(input_ids=torch.randint(0, 99, (2, 6), generator=g),
                attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
                visual_embeds=torch.randn(2, 4, 16, generator=g),
                visual_attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))


def vit_model(attn_implementation="eager", **overrides):
    config = transformers.ViTConfig(**{**TINY, **dict(num_hidden_layers=2, image_size=32, patch_size=8), **overrides},
                                    attn_implementation=attn_implementation)
    return transformers.ViTModel(config)


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def vit_inputs(g):
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    if TRANSFORMERS_4:  # ViTModel takes no attention mask there
        return dict(pixel_values=pixels)
    mask = torch.ones(2, 17, dtype=torch.long)  # cls + 16 patches
    mask[1, 12:] = 0
    return dict(pixel_values=pixels, attention_mask=mask)


@dataclass
class Case:
    name: str
    build: Callable
    inputs: Callable
    module: object  # the integration module (apply/revert/FAMILY)
    apply: Callable
    revert: Callable
    kernels: tuple  # the ops a full apply routes through


CASES = [
    Case("vilt", vilt_model, vilt_inputs, vilt, integrations.apply_vlkernels_to_vilt,
         integrations.revert_vlkernels_to_vilt, ("attention", "patch_embed")),
    Case("lxmert", lxmert_model, lxmert_inputs, lxmert, integrations.apply_vlkernels_to_lxmert,
         integrations.revert_vlkernels_to_lxmert, ("attention",)),
    Case("visual_bert", visual_bert_model, visual_bert_inputs, visual_bert, integrations.apply_vlkernels_to_visual_bert,
         integrations.revert_vlkernels_to_visual_bert, ("attention",)),
    Case("vit-eager", vit_model, vit_inputs, vit, integrations.apply_vlkernels_to_vit,
         integrations.revert_vlkernels_to_vit, ("attention", "patch_embed")),
    Case("vit-sdpa", lambda **o: vit_model("sdpa", **o), vit_inputs, vit, integrations.apply_vlkernels_to_vit,
         integrations.revert_vlkernels_to_vit, ("attention", "patch_embed")),
]
BY_NAME = {case.name: case for case in CASES}
case_param = pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)


def build(case, seed=0, **overrides):
    torch.manual_seed(seed)
    return case.build(**overrides).eval()


def inputs(case, seed=1):
    return case.inputs(torch.Generator().manual_seed(seed))


def run(model, batch, **kwargs):
    torch.manual_seed(7)  # ViLT samples pad patches at random: the same draws in every run
    return model(**batch, **kwargs)


def tensors(output):
    """Every tensor of an HF output (ModelOutput or tuple, nested), in order."""
    items = output.to_tuple() if isinstance(output, transformers.utils.ModelOutput) else output
    if isinstance(items, torch.Tensor):
        return [items]
    return [t for item in items if item is not None for t in tensors(item)]


def assert_outputs_close(actual, expected, *, exact=False):
    """Every output tensor close to fp32 rounding, or bit for bit when the same HF code ran."""
    actual, expected = tensors(actual), tensors(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(dict(rtol=0, atol=0) if exact else TOL))


def patched_modules(model):
    return [name for name, module in model.named_modules() if _patching.is_patched(module)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: intra-op threads only add OpenMP hand-offs, which cost up to a
    # second per forward on a busy machine. Restored for the tests that run after this file.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of vlkernels.ops.attention and vlkernels.ops.patch_embed (which the
    integrations look up on vlkernels.ops at call time); ``.dropout_p``: the attention calls' dropout_p."""
    class Counts(dict):
        dropout_p: list

    counts = Counts(attention=0, patch_embed=0)
    counts.dropout_p = []
    for name in list(counts):
        op = getattr(ops, name)

        def counting(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            if _name == "attention":
                counts.dropout_p.append(kwargs.get("dropout_p", 0.0))
            return _op(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return counts


@case_param
def test_patched_model_equals_unpatched_and_keeps_state_dict(case, calls):
    model, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
        tuple_expected = run(model, batch, return_dict=False)
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    assert case.apply(model) is model
    assert patched_modules(model)
    with torch.no_grad():
        assert_outputs_close(run(model, batch), expected)
        tuple_actual = run(model, batch, return_dict=False)
    assert isinstance(tuple_actual, tuple) and len(tuple_actual) == len(tuple_expected)
    assert_outputs_close(tuple_actual, tuple_expected)
    for kernel in ("attention", "patch_embed"):
        assert (calls[kernel] > 0) == (kernel in case.kernels), kernel
    after = model.state_dict()
    assert list(after) == list(state)
    for key, tensor in state.items():
        assert after[key].data_ptr() == tensor.data_ptr() and torch.equal(after[key], tensor), key
    assert all(p is parameters[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("case_name", ["vilt", "vit-eager"])
def test_each_flag_switches_only_its_kernel(case_name, calls):
    case = BY_NAME[case_name]
    model, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
    for flag, other in (("patch_embed", "attention"), ("attention", "patch_embed")):
        case.apply(model, **{flag: True, other: False})
        calls.update(attention=0, patch_embed=0)
        with torch.no_grad():
            assert_outputs_close(run(model, batch), expected)
        assert calls[flag] > 0 and calls[other] == 0, (flag, calls)
        case.revert(model)


@pytest.mark.parametrize("case_name", ["lxmert", "visual_bert"])
def test_attention_flag_false_patches_nothing(case_name, calls):
    case = BY_NAME[case_name]
    model = build(case)
    case.apply(model, attention=False)
    assert not patched_modules(model)
    with torch.no_grad():
        run(model, inputs(case))
    assert calls["attention"] == 0


@case_param
def test_revert_restores_the_class_forwards(case, calls):
    model, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
    case.apply(model)
    bound = {name: vars(module)["forward"] for name, module in model.named_modules() if _patching.is_patched(module)}
    case.apply(model)  # idempotent: the same bound forwards, nothing wrapped twice
    assert {n: vars(m)["forward"] for n, m in model.named_modules() if _patching.is_patched(m)} == bound
    assert all(vars(model.get_submodule(n))["forward"] is f for n, f in bound.items())
    assert case.revert(model) is model
    for module in model.modules():
        assert "forward" not in vars(module)
        assert module.forward.__func__ is type(module).forward
    calls.update(attention=0, patch_embed=0)
    with torch.no_grad():
        actual = run(model, batch)
    assert calls == {"attention": 0, "patch_embed": 0}
    assert_outputs_close(actual, expected, exact=True)  # the HF forwards again
    case.revert(model)  # reverting an unpatched model is a no-op


@case_param
def test_class_level_patching_and_revert(case, calls):
    reference, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(reference, batch)
    patches = [p for group in case.module.FAMILY.patches().values() for p in group]
    originals = {p.cls: p.cls.forward for p in patches}
    try:
        assert case.apply() is None
        assert all(p.cls.forward is p.forward for p in patches)
        model = build(case, seed=123)  # created after the patch; weights loaded from the reference
        model.load_state_dict(reference.state_dict())
        assert not patched_modules(model)  # class-level: nothing bound on the instances
        with torch.no_grad():
            assert_outputs_close(run(model, batch), expected)
        for kernel in case.kernels:
            assert calls[kernel] > 0, kernel
    finally:
        case.revert()
    assert all(p.cls.forward is originals[p.cls] for p in patches)
    assert not any(_patching.is_class_patched(p.cls) for p in patches)
    calls.update(attention=0, patch_embed=0)
    with torch.no_grad():
        run(model, batch)
    assert calls == {"attention": 0, "patch_embed": 0}


@case_param
def test_kernel_forwards_keep_the_hf_signature(case):
    def parameters(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    for group in case.module.FAMILY.patches().values():
        for patch in group:
            assert parameters(patch.forward) == parameters(patch.cls.forward), patch.cls.__name__


@pytest.mark.parametrize("via", ["argument", "config"])
@pytest.mark.parametrize("case_name", ["vilt", "lxmert", "visual_bert", "vit-eager"])
def test_output_attentions_runs_the_hf_forward(case_name, via, calls):
    case = BY_NAME[case_name]
    model, batch = build(case), inputs(case)
    kwargs = {"output_attentions": True} if via == "argument" else {}
    model.config.output_attentions = via == "config"
    with torch.no_grad():
        expected = run(model, batch, **kwargs)
        case.apply(model)
        actual = run(model, batch, **kwargs)
    assert expected.attentions if hasattr(expected, "attentions") else expected.language_attentions
    assert_outputs_close(actual, expected)  # attention probabilities included
    if case_name != "lxmert":  # LXMERT's cross-modality layers never ask their self-attention for probabilities
        assert calls["attention"] == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "vit-sdpa"], ids=lambda case: case.name)
def test_training_with_attention_dropout_runs_the_kernel_dropout(case, calls):
    # The kernel draws its own dropout masks: not HF's draws, so compare with itself (seeded,
    # reproducible; different from no dropout) and check the probability it was given.
    model, batch = build(case, attention_probs_dropout_prob=0.25, hidden_dropout_prob=0.0), inputs(case)
    case.apply(model)
    with torch.no_grad():
        no_dropout = tensors(run(model, batch))[0]
        assert calls.dropout_p and set(calls.dropout_p) == {0.0}  # eval: no dropout
        calls.dropout_p.clear()
        model.train()
        first, second = tensors(run(model, batch))[0], tensors(run(model, batch))[0]
    assert set(calls.dropout_p) == {0.25}
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # run() seeds the generator
    assert not torch.allclose(first, no_dropout, **TOL)


@pytest.mark.parametrize("case_name", ["vilt", "lxmert", "visual_bert", "vit-eager"])
def test_training_without_attention_dropout_uses_the_kernel(case_name, calls):
    case = BY_NAME[case_name]
    model = build(case, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0).train()
    batch = inputs(case)
    patched = copy.deepcopy(case.apply(copy.deepcopy(model)))  # a copy of a patched model is patched itself
    assert patched_modules(patched)
    assert all(vars(m)["forward"].__self__ is m for m in patched.modules() if _patching.is_patched(m))
    expected, actual = run(model, batch), run(patched, batch)
    assert calls["attention"] > 0
    assert_outputs_close(actual, expected)
    sum(t.sum() for t in tensors(expected)).backward()
    sum(t.sum() for t in tensors(actual)).backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)


def _vilt_attention_and_masks():
    module = build(BY_NAME["vilt"]).encoder.layer[0].attention.attention
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    minimum = torch.finfo(torch.float32).min
    padding = torch.zeros(2, 1, 1, 5)
    padding[1, ..., 3:] = minimum
    fully_padded = padding.clone()
    fully_padded[0] = minimum  # HF then spreads attention uniformly: the kernel path gives the same
    return module, hidden, padding, fully_padded


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hf_masks_run_the_kernel_as_bias(backend, calls):
    module, hidden, padding, fully_padded = _vilt_attention_and_masks()
    causal = torch.full((5, 5), float("-inf")).triu(1).expand(2, 1, 5, 5)
    masks = {"padding": padding, "padding expanded over queries": padding.expand(2, 1, 5, 5).contiguous(),
             "no mask": None, "a sample without real keys": fully_padded, "bool (sdpa)": padding == 0,
             "batch of one": padding[1:], "bias": torch.randn(2, 1, 1, 5), "causal": causal,
             "per head": torch.cat([padding, torch.randn(2, 1, 1, 5)], dim=1), "bias per query": torch.randn(2, 1, 5, 5)}
    vilt.apply_vlkernels_to_vilt(module)
    original = _patching.original_forward(module)
    for name, mask in masks.items():
        calls["attention"] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", integrations.FallbackWarning)
            with torch.no_grad(), vlkernels.use_backend(backend):
                actual = module(hidden, mask)[0]
        # HF's bool-mask path is SDPA's: compare with the additive form of the same mask
        hf_mask = padding if name == "bool (sdpa)" else mask
        with torch.no_grad():
            expected = original(module, hidden, hf_mask)[0]
        torch.testing.assert_close(actual, expected, **TOL, msg=name)
        assert calls["attention"] == 1, name


@pytest.fixture
def local_warnings(monkeypatch):
    """The integrations' own once-per-reason FallbackWarning (not vlkernels._coverage's record)."""
    monkeypatch.setattr(_kernels, "_record_fallback", None)
    monkeypatch.setattr(_kernels, "_WARNED", set())


def test_masks_the_kernel_cannot_take_run_the_hf_forward(calls, local_warnings):
    module, hidden, padding, _ = _vilt_attention_and_masks()
    vilt.apply_vlkernels_to_vilt(module)
    original = _patching.original_forward(module)
    masks = {"3-d": padding[:, 0], "integer": torch.zeros(2, 1, 1, 5, dtype=torch.long)}
    for name, mask in masks.items():
        _kernels._WARNED.clear()
        calls["attention"] = 0
        with pytest.warns(integrations.FallbackWarning, match="ViltSelfAttention runs the HuggingFace forward"):
            with torch.no_grad():
                actual = module(hidden, mask)[0]
        with torch.no_grad():
            torch.testing.assert_close(actual, original(module, hidden, mask)[0], **TOL, msg=name)
        assert calls["attention"] == 0, name


def test_fallback_warns_once_per_reason(local_warnings):
    module, hidden, padding, _ = _vilt_attention_and_masks()
    vilt.apply_vlkernels_to_vilt(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(3):
                module(hidden, padding, output_attentions=True)
                module(hidden, padding[:, 0])
    messages = [str(w.message) for w in caught if issubclass(w.category, integrations.FallbackWarning)]
    assert len(messages) == 2 and "output_attentions" in messages[0] and "4-D" in messages[1], messages


def test_fallback_goes_to_the_coverage_record_where_there_is_one(monkeypatch):
    records = []
    monkeypatch.setattr(_kernels, "_record_fallback", lambda op, reason: records.append((op, reason)))
    module, hidden, padding, _ = _vilt_attention_and_masks()
    vilt.apply_vlkernels_to_vilt(module)
    with torch.no_grad():
        module(hidden, padding, output_attentions=True)
    assert records == [("integrations.ViltSelfAttention",
                        "the attention probabilities are requested (output_attentions)")]


def test_hf_attention_bias_conversion():
    minimum = torch.finfo(torch.float32).min
    additive = torch.tensor([[0.0, 0.5, minimum], [0.0, float("-inf"), 0.0]])[:, None, None]

    def bias(mask, heads=2):
        result, reason = _kernels.hf_attention_bias(mask, 2, heads, 4, 3, torch.float32)
        assert reason is None
        return result

    clamped = additive.clamp(min=minimum / 4)
    assert torch.equal(bias(additive), clamped) and bias(None) is None
    assert torch.equal(bias(additive.expand(2, 2, 4, 3)), clamped.expand(2, 2, 4, 3))
    assert torch.equal(bias(additive[:1]), clamped[:1])
    assert torch.equal(bias(additive == 0), torch.where(additive == 0, 0.0, minimum / 4))
    assert torch.isfinite(bias(additive)).all()
    for bad in (additive.expand(2, 3, 4, 3), additive[:, :, :, :2], additive[:, 0],
                torch.ones(2, 1, 1, 3, dtype=torch.long), "mask"):
        result, reason = _kernels.hf_attention_bias(bad, 2, 2, 4, 3, torch.float32)
        assert result is None and "attention mask" in reason


@case_param
def test_patched_forward_and_backward_read_nothing_more_on_the_host(case):
    # HF's own code may read values on the host (ViLT samples patches); the patched modules add no read.
    counts = []
    for patch in (False, True):
        model, batch = build(case, num_hidden_layers=1) if case.name != "lxmert" else build(case), inputs(case)
        if patch:
            case.apply(model)
        with vlkernels.ops._checks.value_checks("device"), HostReads() as reads:
            sum(t.float().sum() for t in tensors(run(model, batch))).backward()
        counts.append(reads.reads)
    assert counts[1] == counts[0], "\n".join(reads.sources)


def test_vilt_patch_embeddings_keep_the_conv_layout(calls):
    module = build(BY_NAME["vilt"]).embeddings.patch_embeddings
    vilt.apply_vlkernels_to_vilt(module)
    g = torch.Generator().manual_seed(4)
    for size, kernel_calls in (((32, 24), 1), ((30, 32), 0)):  # 30 is not a multiple of the patch: HF's conv
        pixels = torch.randn(2, 3, *size, generator=g)
        calls["patch_embed"] = 0
        with torch.no_grad():
            actual, expected = module(pixels), module.projection(pixels)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **TOL)
        assert calls["patch_embed"] == kernel_calls, size


def test_vit_interpolated_position_embeddings_keep_the_patch_kernel(calls):
    # Another image size: HF's embeddings run (bicubic pos-embed), their conv on the kernel.
    model = build(BY_NAME["vit-eager"])
    pixels = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(pixels, interpolate_pos_encoding=True)
        vit.apply_vlkernels_to_vit(model)
        actual = model(pixels, interpolate_pos_encoding=True)
    assert calls["patch_embed"] == 1 and calls["attention"] == 2
    assert_outputs_close(actual, expected)


def test_user_subclass_with_its_own_forward_is_left_alone():
    from transformers.models.vilt.modeling_vilt import ViltSelfAttention

    class Custom(ViltSelfAttention):
        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            return super().forward(hidden_states, attention_mask, output_attentions)

    model = nn.Sequential(Custom(build(BY_NAME["vilt"]).config))
    vilt.apply_vlkernels_to_vilt(model)
    assert not patched_modules(model)


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "vit-sdpa"], ids=lambda case: case.name)
def test_wrong_model_type_raises(case):
    bert = transformers.BertModel(transformers.BertConfig(**TINY, num_hidden_layers=1, vocab_size=99))
    expected = {"vilt": "ViltModel", "lxmert": "LxmertModel", "visual_bert": "VisualBertModel", "vit-eager": "ViTModel"}
    for function in (case.apply, case.revert):
        with pytest.raises(TypeError, match=f"{expected[case.name]}.*got BertModel"):
            function(bert)
        with pytest.raises(TypeError, match="got str"):
            function("model")


def test_triton_kernels_under_the_interpreter(calls, monkeypatch):
    # fp32 everywhere: the Triton patch_embed follows the cudnn tf32 flag that nn.Conv2d follows.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case = BY_NAME["vilt"]
    model, batch = build(case, num_hidden_layers=1), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
        case.apply(model)
        with vlkernels.use_backend("triton"):
            actual = run(model, batch)
    assert calls["attention"] > 0 and calls["patch_embed"] > 0
    assert_outputs_close(actual, expected)


@pytest.mark.parametrize("version", ["4.56.2", "4.58.0", "3.36.0", "6.0.0"])
def test_transformers_outside_the_supported_range_is_refused(version, monkeypatch):
    monkeypatch.setattr(_versions, "installed", lambda: version)
    model = build(BY_NAME["visual_bert"])
    for function in (integrations.apply_vlkernels_to_visual_bert, integrations.revert_vlkernels_to_visual_bert):
        with pytest.raises(ImportError, match=f"4.57.x or 5.x.*transformers {version} is installed"):
            function(model)
    assert not patched_modules(model)


@pytest.mark.parametrize("version, ok", [("4.57.0", True), ("4.57.6", True), ("5.0.0", True), ("5.24.0.dev0", True),
                                         ("4.56.9", False), ("4.58.0", False), ("6.1.0", False)])
def test_supported_versions(version, ok):
    assert _versions.supported(version) is ok


def test_an_unknown_hf_signature_is_refused(monkeypatch):
    from transformers.models.lxmert import modeling_lxmert as hf

    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False, extra=None):
        return None

    monkeypatch.setattr(hf.LxmertAttention, "forward", forward)
    with pytest.raises(ImportError, match="LxmertAttention.forward.*not a signature vlkernels knows"):
        integrations.apply_vlkernels_to_lxmert(build(BY_NAME["lxmert"]))


def _compiled(model, fullgraph):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # dynamo's graphs, run without inductor (the graph count is the point)
    return torch.compile(model, backend=counter, fullgraph=fullgraph), counter


@pytest.mark.parametrize("case_name", ["lxmert", "visual_bert", "vit-eager"])
def test_patched_model_compiles_into_one_graph(case_name):
    # No host read in the patched forwards: fullgraph=True works, one graph as for HF's model.
    case = BY_NAME[case_name]
    torch._dynamo.reset()
    layers = dict(l_layers=1, x_layers=1, r_layers=1) if case_name == "lxmert" else dict(num_hidden_layers=1)
    model, batch = build(case, **layers), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
        compiled, counter = _compiled(case.apply(model), fullgraph=True)
        with vlkernels.ops._checks.value_checks("device"):
            actual = run(compiled, batch)
            run(compiled, batch)  # no recompile either
    assert counter.frame_count == 1
    assert_outputs_close(actual, expected)
    torch._dynamo.reset()


def test_patched_vilt_compiles_as_hf_vilt_does():
    # HF ViLT's embeddings sample image patches with data-dependent sizes (graph breaks, no
    # fullgraph); the patched patch embedding adds no break: the same graph count there, and
    # the encoder (the patched attention) compiles whole.
    case = BY_NAME["vilt"]
    model, batch = build(case, num_hidden_layers=1), inputs(case)
    embeddings_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=torch.zeros_like(batch["input_ids"]), pixel_values=batch["pixel_values"],
                             pixel_mask=batch["pixel_mask"], inputs_embeds=None, image_embeds=None)
    counts = []
    for patch in (False, True):
        torch._dynamo.reset()
        if patch:
            case.apply(model)
        compiled, counter = _compiled(model.embeddings, fullgraph=False)
        with torch.no_grad():
            torch.manual_seed(7)
            compiled(**embeddings_inputs)
        counts.append(counter.frame_count)
    assert counts[0] == counts[1]
    torch._dynamo.reset()
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 1, 1, 9)  # HF's extended padding mask
    mask[1, ..., 5:] = torch.finfo(torch.float32).min
    encoder, counter = _compiled(model.encoder, fullgraph=True)
    with torch.no_grad():
        actual = encoder(hidden, mask).last_hidden_state
        vilt.revert_vlkernels_to_vilt(model)
        expected = model.encoder(hidden, mask).last_hidden_state
    assert counter.frame_count == 1
    torch.testing.assert_close(actual, expected, **TOL)
    torch._dynamo.reset()


@case_param
def test_apply_vlkernels_dispatches_by_model_type(case, calls):
    model, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
    assert vlkernels.apply_vlkernels(model) is model
    per_model = case.apply(build(case))
    assert patched_modules(model) == patched_modules(per_model)  # the same modules as the per-model function
    with torch.no_grad():
        assert_outputs_close(run(model, batch), expected)
    for kernel in ("attention", "patch_embed"):
        assert (calls[kernel] > 0) == (kernel in case.kernels), kernel
    assert vlkernels.revert_vlkernels(model) is model and not patched_modules(model)


def test_apply_vlkernels_flags_and_composite_models():
    vit_model, bert_model = build(BY_NAME["vit-eager"]), build(BY_NAME["visual_bert"])
    both = nn.ModuleDict({"vision": vit_model, "text": bert_model})
    vlkernels.apply_vlkernels(both, patch_embed=False)
    names = patched_modules(both)
    assert any(n.startswith("vision.") for n in names) and any(n.startswith("text.") for n in names)
    assert not any("embeddings" in n for n in names)  # patch_embed=False
    vlkernels.revert_vlkernels(both)
    assert not patched_modules(both)


@pytest.mark.parametrize("model", [transformers.BertModel(transformers.BertConfig(**TINY, num_hidden_layers=1,
                                                                                  vocab_size=99)),
                                   nn.Linear(2, 2), "model"], ids=["BertModel", "Linear", "str"])
def test_apply_vlkernels_refuses_unsupported_types(model):
    for function in (vlkernels.apply_vlkernels, vlkernels.revert_vlkernels):
        with pytest.raises(TypeError, match=r"ViLT, LXMERT, VisualBERT, ViT.*got (BertModel|Linear|str)"):
            function(model)


def _round_trips():
    def torch_save(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return {"pickle": lambda model: pickle.loads(pickle.dumps(model)), "torch.save": torch_save,
            "deepcopy": copy.deepcopy}


@case_param
def test_patched_model_survives_pickle_torch_save_and_deepcopy(case, calls):
    model, batch = build(case), inputs(case)
    case.apply(model)
    with torch.no_grad():
        expected = run(model, batch)
    for how, round_trip in _round_trips().items():
        loaded = round_trip(model)
        assert patched_modules(loaded) == patched_modules(model), how
        # each bound forward belongs to its own (loaded) module, none to the original model
        assert all(vars(m)["forward"].__self__ is m for m in loaded.modules() if _patching.is_patched(m)), how
        calls.update(attention=0, patch_embed=0)
        with torch.no_grad():
            assert_outputs_close(run(loaded, batch), expected, exact=True)
        for kernel in case.kernels:
            assert calls[kernel] > 0, (how, kernel)
        assert case.revert(loaded) is loaded and not patched_modules(loaded)


@pytest.mark.parametrize("case_name", ["vilt", "lxmert", "visual_bert", "vit-eager"])
def test_patched_model_save_pretrained_round_trips(case_name, tmp_path, calls):
    case = BY_NAME[case_name]
    model, batch = build(case), inputs(case)
    with torch.no_grad():
        expected = run(model, batch)
    case.apply(model).save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()  # HF's forwards: the patch is not part of the weights
    with torch.no_grad():
        assert_outputs_close(run(loaded, batch), expected)
        case.apply(loaded)
        calls.update(attention=0, patch_embed=0)
        assert_outputs_close(run(loaded, batch), expected)
    assert calls["attention"] > 0
    assert set(loaded.state_dict()) == set(model.state_dict())
