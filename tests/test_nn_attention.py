"""vlkernels.nn attention modules: VLMultiheadAttention (against nn.MultiheadAttention and HF BERT),
LXMERTCrossLayer (against HF LxmertXLayer), ViLBERTCoLayer and METERCrossLayer (against float64
re-statements of the original math written over the original checkpoints' names, plus HF BertLayer
for METER): outputs, every parameter and input gradient, masks (padded text, padded regions, fully
padded samples), loading, dropout and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlkernels
from vlkernels.nn.attention import (
    VLMultiheadAttention, PostLNAttention, PostLNFeedForward, convert_hf_attention, real_token_mask,
)
from vlkernels.nn.co_attention import LXMERTCrossLayer, METERCrossLayer, ViLBERTCoLayer
from vlkernels.testing import DEVICE, HostReads, assert_matches_reference, dtype_id, kernel_dtypes, poisoned_allocations

# (backend, dtype): the torch backend in fp32, the Triton kernels in every dtype they run in here.
# The torch backend in fp16/bf16 is the same-dtype baseline itself, so it is not a separate case.
RUNS = [("torch", torch.float32)] + [("triton", dtype) for dtype in kernel_dtypes()]


def run_id(run):
    return f"{run[0]}-{dtype_id(run[1])}"


def padding_mask(generator, batch, length, *, fully_padded=()):
    """Random bool [batch, length] mask, True = real token; the first token of each sample is
    real except in the samples listed in fully_padded, which have none."""
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[:, 0] = True
    for sample in fully_padded:
        mask[sample] = False
    return mask


def check_all(names, actual, expected, same_dtype):
    for name, a, e, s in zip(names, actual, expected, same_dtype):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_matches_reference(name, a, e, s)


# ------------------------------------------------------------------------------------------------
# VLMultiheadAttention against nn.MultiheadAttention (float64)
# ------------------------------------------------------------------------------------------------
MHA_CASES = {
    "self-padded": dict(mask=True),
    "self-causal-padded": dict(mask=True, causal=True),
    "self-prefix-per-sample": dict(prefix=True),
    "cross-key-is-value-padded": dict(cross=True, mask=True),
    "cross-kdim24-vdim32-padded": dict(cross=True, kdim=24, vdim=32, mask=True),
    "sequence-first-padded": dict(mask=True, batch_first=False),
}


def torch_attn_mask(case, batch, heads, seq, prefix):
    """nn.MultiheadAttention's attn_mask (True = may NOT attend) for the causal / prefix cases."""
    query, key = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    if case.get("causal"):
        return key > query
    if prefix is not None:
        allowed = (key <= query)[None] | (key[None] < prefix[:, None, None])
        return (~allowed).repeat_interleave(heads, 0)  # [B*H, Sq, Sk], batch-major
    return None


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("case_name", list(MHA_CASES))
def test_multihead_attention_matches_torch(case_name, run):
    backend, dtype = run
    case = MHA_CASES[case_name]
    generator = torch.Generator().manual_seed(len(case_name))
    batch, heads, dim, seq_q = 3, 4, 40, 13
    seq_k = 9 if case.get("cross") else seq_q
    kdim, vdim = case.get("kdim", dim), case.get("vdim", dim)
    batch_first = case.get("batch_first", True)
    torch.manual_seed(len(case_name))
    reference = nn.MultiheadAttention(dim, heads, kdim=kdim, vdim=vdim, batch_first=batch_first).double().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    module = VLMultiheadAttention.from_torch(reference).to(DEVICE, dtype)
    assert module.batch_first == batch_first and not module.training

    def batched(*shape):  # [B, S, D] or [S, B, D]
        shape = shape if batch_first else (shape[1], shape[0], shape[2])
        return torch.randn(*shape, generator=generator)

    query = batched(batch, seq_q, dim)
    key = batched(batch, seq_k, kdim) if case.get("cross") else query
    value = batched(batch, seq_k, vdim) if "vdim" in case else key
    mask = padding_mask(generator, batch, seq_k) if case.get("mask") else None
    prefix = torch.randint(0, seq_q + 1, (batch,), generator=generator) if case.get("prefix") else None
    grad_out = batched(batch, seq_q, dim)
    distinct = list({id(t): t for t in (query, key, value)}.values())  # self-attention: one input

    def ours(backend_name, module_dtype):
        inputs = [t.to(DEVICE, module_dtype).requires_grad_() for t in distinct]
        lookup = {id(t): x for t, x in zip(distinct, inputs)}
        with vlkernels.use_backend(backend_name), poisoned_allocations():
            out = module(lookup[id(query)], lookup[id(key)], lookup[id(value)],
                         key_padding_mask=None if mask is None else mask.to(DEVICE), causal=case.get("causal", False),
                         prefix_len=None if prefix is None else prefix.to(DEVICE))
            grads = torch.autograd.grad(out, inputs + list(module.parameters()), grad_out.to(DEVICE, module_dtype))
        return [out, *grads]

    actual = ours(backend, dtype)
    same_dtype = actual if dtype == torch.float32 else ours("torch", dtype)
    inputs64 = [t.double().requires_grad_() for t in distinct]
    lookup = {id(t): x for t, x in zip(distinct, inputs64)}
    expected, _ = reference(lookup[id(query)], lookup[id(key)], lookup[id(value)],
                            key_padding_mask=None if mask is None else ~mask, need_weights=False,
                            attn_mask=torch_attn_mask(case, batch, heads, seq_q, prefix))
    grads64 = torch.autograd.grad(expected, inputs64 + list(reference.parameters()), grad_out.double())
    names = ["out"] + [f"grad input {i}" for i in range(len(distinct))] + [
        f"grad {name}" for name, _ in module.named_parameters()]
    assert [name for name, _ in module.named_parameters()] == [name for name, _ in reference.named_parameters()]
    check_all(names, actual, [expected, *grads64], same_dtype)


def test_real_token_mask_converts_torch_and_hf_masks():
    ignore = torch.tensor([[False, True, False], [True, True, True]])
    assert torch.equal(real_token_mask(ignore), ~ignore)
    additive = torch.zeros(2, 3).masked_fill(ignore, float("-inf"))
    assert torch.equal(real_token_mask(additive), ~ignore)
    assert torch.equal(real_token_mask(additive_mask(~ignore, torch.float16)), ~ignore)  # HF [B, 1, 1, S]
    with pytest.raises(ValueError, match="is a bias"):
        real_token_mask(torch.tensor([[0.0, -1.0, 0.0]]))


def test_multihead_attention_state_dict_is_torch_layout():
    for kdim in (None, 24):
        reference = nn.MultiheadAttention(40, 4, kdim=kdim, vdim=kdim, batch_first=True, bias=kdim is None)
        module = VLMultiheadAttention(40, 4, kdim=kdim, vdim=kdim, bias=kdim is None)
        assert {k: v.shape for k, v in module.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}
        module.load_torch_state_dict(reference.state_dict())
        for name, tensor in reference.state_dict().items():
            assert torch.equal(module.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="add_bias_kv"):
        VLMultiheadAttention.from_torch(nn.MultiheadAttention(40, 4, add_bias_kv=True))
    copied = VLMultiheadAttention.from_torch(nn.MultiheadAttention(40, 4, dropout=0.25, batch_first=False).double())
    assert (copied.dropout, copied.batch_first, copied.in_proj_weight.dtype, copied.training) == (
        0.25, False, torch.float64, True)


# ------------------------------------------------------------------------------------------------
# HuggingFace BERT attention blocks
# ------------------------------------------------------------------------------------------------
def tiny_bert_config(**overrides):
    from transformers import BertConfig

    config = BertConfig(hidden_size=40, num_attention_heads=4, intermediate_size=56, vocab_size=32,
                        max_position_embeddings=32, **overrides)
    config._attn_implementation = "eager"
    return config


def perturbed(module, generator):
    """Random weights everywhere (LayerNorms too), so a swapped or skipped tensor shows."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module.eval()


def additive_mask(mask, dtype):
    """HF's extended attention mask [B, 1, 1, S]: 0 for real tokens, the dtype's minimum for padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multihead_attention_and_blocks_load_hf_bert(backend):
    from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

    generator = torch.Generator().manual_seed(5)
    config = tiny_bert_config()
    hf_attention = perturbed(BertAttention(config), generator)
    hf_intermediate = perturbed(BertIntermediate(config), generator)
    hf_output = perturbed(BertOutput(config), generator)
    x = torch.randn(3, 11, 40, generator=generator)
    mask = padding_mask(generator, 3, 11)
    grad_out = torch.randn(3, 11, 40, generator=generator)

    # VLMultiheadAttention.from_hf_bert: out_proj(attention(x)) == BertSelfOutput.dense(BertSelfAttention(x)).
    mha = VLMultiheadAttention.from_hf_bert(hf_attention.self, hf_attention.output.dense).to(DEVICE)
    with vlkernels.use_backend(backend):
        out = mha(x.to(DEVICE), key_padding_mask=mask.to(DEVICE))
        grads = torch.autograd.grad(out, list(mha.parameters()), grad_out.to(DEVICE))
    hf64 = copy.deepcopy(hf_attention).double()
    context, _ = hf64.self(x.double(), attention_mask=additive_mask(mask, torch.float64))
    expected = hf64.output.dense(context)
    sources = dict(hf64.self.named_parameters(prefix="self"))
    sources.update(hf64.output.dense.named_parameters(prefix="dense"))
    grads64 = dict(zip(sources, torch.autograd.grad(expected, list(sources.values()), grad_out.double())))
    mapped = convert_hf_attention(grads64, "self.", "dense.", "")
    check_all(["out"] + [f"grad {n}" for n, _ in mha.named_parameters()], [out, *grads],
              [expected, *(mapped[n] for n, _ in mha.named_parameters())], [out, *grads])

    # PostLNAttention / PostLNFeedForward == BertAttention / BertIntermediate + BertOutput.
    block = PostLNAttention.from_hf_bert(hf_attention).to(DEVICE)
    ffn = PostLNFeedForward.from_hf_bert(hf_intermediate, hf_output).to(DEVICE)
    with vlkernels.use_backend(backend):
        attended = block(x.to(DEVICE), key_padding_mask=mask.to(DEVICE))
        layer_out = ffn(attended)
    expected_attended, _ = hf64(x.double(), additive_mask(mask, torch.float64))
    expected_out = copy.deepcopy(hf_output).double()(copy.deepcopy(hf_intermediate).double()(expected_attended),
                                                     expected_attended)
    check_all(["attention block", "feed-forward block"], [attended, layer_out], [expected_attended, expected_out],
              [attended, layer_out])


# ------------------------------------------------------------------------------------------------
# Float64 re-statements of the original layers, over the original checkpoints' parameter names
# ------------------------------------------------------------------------------------------------
HEADS = 4


def linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def layer_norm(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-12)


def attend(query_input, context, p, names, key_mask, drop_attention):
    """BERT attention with the ops' convention for a query with no real key: zeros."""
    def heads(t):
        return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)

    q, k, v = heads(linear(query_input, p, names[0])), heads(linear(context, p, names[1])), \
        heads(linear(context, p, names[2]))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if drop_attention:  # attention dropout with p = 1
        probs = probs * 0
    return (probs @ v).transpose(1, 2).flatten(2)


def bert_block(x, context, p, prefix, inner, key_mask, drop_attention):
    names = [f"{prefix}{inner}.{n}" for n in ("query", "key", "value")]
    attended = attend(x, context, p, names, key_mask, drop_attention)
    return layer_norm(x + linear(attended, p, f"{prefix}output.dense"), p, f"{prefix}output.LayerNorm")


def bert_ffn(x, p, intermediate, output):
    hidden = F.gelu(linear(x, p, f"{intermediate}dense"))
    return layer_norm(x + linear(hidden, p, f"{output}dense"), p, f"{output}LayerNorm")


def lxmert_restated(p, text, image, text_mask, image_mask, drop_attention=False):
    """LxmertXLayer: shared cross-attention both ways, then self-attention, then FFN, per stream."""
    lang = bert_block(text, image, p, "visual_attention.", "att", image_mask, drop_attention)
    visn = bert_block(image, text, p, "visual_attention.", "att", text_mask, drop_attention)
    lang = bert_block(lang, lang, p, "lang_self_att.", "self", text_mask, drop_attention)
    visn = bert_block(visn, visn, p, "visn_self_att.", "self", image_mask, drop_attention)
    return bert_ffn(lang, p, "lang_inter.", "lang_output."), bert_ffn(visn, p, "visn_inter.", "visn_output.")


def vilbert_restated(p, text, image, text_mask, image_mask, drop_attention=False):
    """BertConnectionLayer (stream 1 = image, 2 = text): query2 x key1 (text over image), query1 x
    key2 (image over text), biOutput dense1/LayerNorm1 for the image, dense2/LayerNorm2 for the text."""
    text_context = attend(text, image, p, ["biattention.query2", "biattention.key1", "biattention.value1"],
                          image_mask, drop_attention)
    image_context = attend(image, text, p, ["biattention.query1", "biattention.key2", "biattention.value2"],
                           text_mask, drop_attention)
    image_out = layer_norm(image + linear(image_context, p, "biOutput.dense1"), p, "biOutput.LayerNorm1")
    text_out = layer_norm(text + linear(text_context, p, "biOutput.dense2"), p, "biOutput.LayerNorm2")
    return bert_ffn(text_out, p, "t_intermediate.", "t_output."), bert_ffn(image_out, p, "v_intermediate.", "v_output.")


def meter_restated(p, text, image, text_mask, image_mask, drop_attention=False):
    """The text and image BertCrossLayers of one METER layer, keys/values from the other INPUT."""
    t, i = {k[5:]: v for k, v in p.items() if k.startswith("text.")}, \
        {k[6:]: v for k, v in p.items() if k.startswith("image.")}
    text_attended = bert_block(text, text, t, "attention.", "self", text_mask, drop_attention)
    image_attended = bert_block(image, image, i, "attention.", "self", image_mask, drop_attention)
    text_crossed = bert_block(text_attended, image, t, "crossattention.", "self", image_mask, drop_attention)
    image_crossed = bert_block(image_attended, text, i, "crossattention.", "self", text_mask, drop_attention)
    return bert_ffn(text_crossed, t, "intermediate.", "output."), bert_ffn(image_crossed, i, "intermediate.", "output.")


def vilbert_source(generator, text_dim=40, image_dim=24, bi_dim=48, text_ffn=56, image_ffn=36):
    """A random vilbert-multi-task BertConnectionLayer state dict (q_dense*: unused by the original)."""
    shapes = {}
    for index, dim in ((1, image_dim), (2, text_dim)):
        for name in ("query", "key", "value"):
            shapes[f"biattention.{name}{index}"] = (bi_dim, dim)
        shapes[f"biOutput.dense{index}"] = (dim, bi_dim)
        shapes[f"biOutput.q_dense{index}"] = (dim, bi_dim)
    for prefix, dim, ffn in (("v", image_dim, image_ffn), ("t", text_dim, text_ffn)):
        shapes[f"{prefix}_intermediate.dense"] = (ffn, dim)
        shapes[f"{prefix}_output.dense"] = (dim, ffn)
    source = {}
    for name, (rows, cols) in shapes.items():
        source[f"{name}.weight"] = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * cols ** -0.5
        source[f"{name}.bias"] = 0.1 * torch.randn(rows, generator=generator, dtype=torch.float64)
    for name, dim in (("biOutput.LayerNorm1", image_dim), ("biOutput.LayerNorm2", text_dim),
                      ("v_output.LayerNorm", image_dim), ("t_output.LayerNorm", text_dim)):
        source[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
        source[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
    return source


def hf_meter_pair(generator, **config):
    from transformers.models.bert.modeling_bert import BertLayer

    config = tiny_bert_config(is_decoder=True, add_cross_attention=True, **config)
    return perturbed(BertLayer(config), generator), perturbed(BertLayer(config), generator)


def hf_lxmert_layer(generator, **config):
    from transformers import LxmertConfig
    from transformers.models.lxmert.modeling_lxmert import LxmertXLayer

    config = LxmertConfig(hidden_size=40, num_attention_heads=4, intermediate_size=56, **config)
    return perturbed(LxmertXLayer(config), generator)


def build_layer(kind, generator, **options):
    """(our module loaded from a random original checkpoint, that checkpoint as float64 tensors,
    the re-statement, a function mapping gradients of the checkpoint to our parameter names,
    text_dim, image_dim)."""
    if kind == "lxmert":
        source = {k: v.double() for k, v in hf_lxmert_layer(generator).state_dict().items()}
        module = LXMERTCrossLayer(40, HEADS, 56, **options)
        module.load_hf_state_dict({k: v.float() for k, v in source.items()})
        return module, source, lxmert_restated, LXMERTCrossLayer.convert_hf_state_dict, 40, 40
    if kind == "vilbert":
        source = vilbert_source(generator)
        module = ViLBERTCoLayer(40, 24, 48, HEADS, 56, 36, **options)
        module.load_vilbert_state_dict({k: v.float() for k, v in source.items()})
        return module, source, vilbert_restated, ViLBERTCoLayer.convert_vilbert_state_dict, 40, 24
    text_layer, image_layer = hf_meter_pair(generator)
    source = {**{f"text.{k}": v.double() for k, v in text_layer.state_dict().items()},
              **{f"image.{k}": v.double() for k, v in image_layer.state_dict().items()}}
    module = METERCrossLayer(40, HEADS, 56, **options)
    module.load_meter_state_dicts(text_layer.state_dict(), image_layer.state_dict())

    def convert(grads):
        return METERCrossLayer.convert_meter_state_dicts(
            {k[5:]: v for k, v in grads.items() if k.startswith("text.")},
            {k[6:]: v for k, v in grads.items() if k.startswith("image.")})
    return module, source, meter_restated, convert, 40, 40


def layer_inputs(generator, text_dim, image_dim, batch=3, text_len=11, image_len=9):
    """Text and image streams with padding: sample 0 has no real text token, sample 2 no real
    region, sample 1 is partly padded in both."""
    text = torch.randn(batch, text_len, text_dim, generator=generator)
    image = torch.randn(batch, image_len, image_dim, generator=generator)
    text_mask = padding_mask(generator, batch, text_len, fully_padded=(0,))
    image_mask = padding_mask(generator, batch, image_len, fully_padded=(2,))
    text_mask[1, -3:] = False
    image_mask[1, -2:] = False
    return text, image, text_mask, image_mask


def run_layer(module, backend, dtype, text, image, text_mask, image_mask, grad_outs):
    inputs = [text.to(DEVICE, dtype).requires_grad_(), image.to(DEVICE, dtype).requires_grad_()]
    with vlkernels.use_backend(backend), poisoned_allocations():
        outs = module(*inputs, text_mask=text_mask.to(DEVICE), image_mask=image_mask.to(DEVICE)) \
            if not isinstance(module, LXMERTCrossLayer) else \
            module(*inputs, lang_mask=text_mask.to(DEVICE), visn_mask=image_mask.to(DEVICE))
        grads = torch.autograd.grad(outs, inputs + list(module.parameters()),
                                    [g.to(DEVICE, dtype) for g in grad_outs])
    return [*outs, *grads]


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("kind", ["lxmert", "vilbert", "meter"])
def test_co_attention_layer_matches_float64_restatement(kind, run):
    backend, dtype = run
    generator = torch.Generator().manual_seed(len(kind))
    module, source, restated, convert_grads, text_dim, image_dim = build_layer(kind, generator)
    module = module.to(DEVICE, dtype).eval()
    text, image, text_mask, image_mask = layer_inputs(generator, text_dim, image_dim)
    grad_outs = [torch.randn(text.shape, generator=generator), torch.randn(image.shape, generator=generator)]

    actual = run_layer(module, backend, dtype, text, image, text_mask, image_mask, grad_outs)
    same_dtype = actual if dtype == torch.float32 else run_layer(module, "torch", dtype, text, image, text_mask,
                                                                 image_mask, grad_outs)
    params = {k: v.clone().requires_grad_() for k, v in source.items()}
    inputs64 = [text.double().requires_grad_(), image.double().requires_grad_()]
    outs64 = restated(params, *inputs64, text_mask, image_mask)
    grads64 = torch.autograd.grad(outs64, inputs64 + list(params.values()), [g.double() for g in grad_outs],
                                  allow_unused=True)
    used = {k: g for k, g in zip(params, grads64[2:]) if g is not None}  # ViLBERT's q_dense is unused
    mapped = convert_grads(used)
    names = ["text out", "image out", "grad text", "grad image"] + [f"grad {n}" for n, _ in module.named_parameters()]
    expected = [*outs64, *grads64[:2]] + [mapped[n] for n, _ in module.named_parameters()]
    check_all(names, actual, expected, same_dtype)


# ------------------------------------------------------------------------------------------------
# Against the HuggingFace modules themselves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lxmert_cross_layer_matches_hf_lxmert_x_layer(backend):
    generator = torch.Generator().manual_seed(3)
    hf = hf_lxmert_layer(generator)
    module = LXMERTCrossLayer.from_hf(hf).to(DEVICE)
    assert not module.training and module.cross_attention.attention.dropout == 0.1  # HF's attention dropout
    # HF gives a fully padded sample uniform weights, the ops give zeros: here every sample has a real token.
    text, image, _, _ = layer_inputs(generator, 40, 40)
    text_mask, image_mask = padding_mask(generator, 3, 11), padding_mask(generator, 3, 9)
    grad_outs = [torch.randn(text.shape, generator=generator), torch.randn(image.shape, generator=generator)]
    actual = run_layer(module, backend, torch.float32, text, image, text_mask, image_mask, grad_outs)

    hf64 = copy.deepcopy(hf).double()
    inputs64 = [text.double().requires_grad_(), image.double().requires_grad_()]
    outs64 = hf64(inputs64[0], additive_mask(text_mask, torch.float64), inputs64[1],
                  additive_mask(image_mask, torch.float64))
    names = [n for n, _ in hf64.named_parameters()]
    grads64 = torch.autograd.grad(outs64, inputs64 + list(hf64.parameters()), [g.double() for g in grad_outs])
    mapped = LXMERTCrossLayer.convert_hf_state_dict(dict(zip(names, grads64[2:])))
    expected = [*outs64, *grads64[:2]] + [mapped[n] for n, _ in module.named_parameters()]
    check_all(["lang out", "visn out", "grad lang", "grad visn"] + [f"grad {n}" for n, _ in module.named_parameters()],
              actual, expected, actual)


def test_meter_cross_layer_matches_hf_bert_layer_pair():
    """METER's BertCrossLayer has HF BertLayer's (with cross-attention) structure and names."""
    generator = torch.Generator().manual_seed(4)
    text_layer, image_layer = hf_meter_pair(generator)
    module = METERCrossLayer.from_hf_bert_layers(text_layer, image_layer).to(DEVICE)
    text, image, _, _ = layer_inputs(generator, 40, 40)
    text_mask, image_mask = padding_mask(generator, 3, 11), padding_mask(generator, 3, 9)
    with vlkernels.use_backend("triton"), torch.no_grad():
        text_out, image_out = module(text.to(DEVICE), image.to(DEVICE), text_mask=text_mask.to(DEVICE),
                                     image_mask=image_mask.to(DEVICE))
    text64, image64 = copy.deepcopy(text_layer).double(), copy.deepcopy(image_layer).double()
    text_add, image_add = additive_mask(text_mask, torch.float64), additive_mask(image_mask, torch.float64)
    with torch.no_grad():
        expected_text = text64(text.double(), text_add, encoder_hidden_states=image.double(),
                               encoder_attention_mask=image_add)
        expected_image = image64(image.double(), image_add, encoder_hidden_states=text.double(),
                                 encoder_attention_mask=text_add)
    check_all(["text out", "image out"], [text_out, image_out], [expected_text, expected_image], [text_out, image_out])


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multihead_attention_dropout_in_training(backend):
    torch.manual_seed(6)
    module = VLMultiheadAttention(40, 4, dropout=1.0).to(DEVICE)
    nn.init.normal_(module.out_proj.bias)
    x = torch.randn(2, 7, 40, device=DEVICE, requires_grad=True)
    with vlkernels.use_backend(backend):
        with vlkernels.kernel_coverage() as dropping_all:
            dropped = module(x)  # every attention probability dropped: only out_proj's bias is left
        torch.testing.assert_close(dropped, module.out_proj.bias.expand_as(dropped), rtol=0, atol=0)
        # Dropout 1 runs in the op like any other rate (SDPA's zeros): no fallback.
        assert not dropping_all.fallbacks and dropping_all.backends("attention") == {backend: 1}
        assert torch.equal(torch.autograd.grad(dropped.sum(), x)[0], torch.zeros_like(x))
        module.dropout = 0.3
        with vlkernels.kernel_coverage() as dropping:
            first, second = module(x), module(x)
        assert not dropping.fallbacks and dropping.backends("attention") == {backend: 2}
        assert not torch.equal(first, second) and torch.isfinite(first).all()
        assert torch.isfinite(torch.autograd.grad(first.sum(), x)[0]).all()
        module.eval()
        torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multihead_attention_dropout_is_unbiased_fresh_per_call_and_seeded(backend):
    """Issue 14 item 4 through a module: in training with dropout 0.1 the outputs average to the
    eval output (the kept probabilities are scaled by 1 / 0.9), each call and each batch row draws
    its own mask, and torch.manual_seed replays a call exactly. One input repeated over the
    batch gives independent samples; 40 tokens span two of the kernels' key blocks."""
    torch.manual_seed(12)
    module = VLMultiheadAttention(32, 2, dropout=0.1).to(DEVICE)
    nn.init.normal_(module.in_proj_bias)
    copies = 8
    x = torch.randn(1, 40, 32, device=DEVICE).expand(copies, -1, -1)
    with torch.no_grad(), vlkernels.use_backend(backend), vlkernels.kernel_coverage() as coverage:
        expected = module.eval()(x[:1])[0].double()
        module.train()
        torch.manual_seed(3)
        first = module(x)
        second = module(x)
        torch.manual_seed(3)
        replayed = module(x)
    assert not coverage.fallbacks and coverage.backends("attention") == {backend: 4}
    torch.testing.assert_close(replayed, first, rtol=0, atol=0)
    assert not torch.equal(first, second), "two calls drew the same dropout mask"
    assert not torch.equal(first[0], first[1]), "two batch rows drew the same dropout mask"
    # Unbiased: each draw's deviation from the eval output, projected on the eval output, has
    # mean 0 (a t-test over the 16 independent draws). Without the 1 / 0.9 rescaling the draws
    # would sit 10% below the eval output along it: a t of ~-100 here.
    samples = torch.cat([first, second]).double()  # [2 * copies, S, D]
    deviation = ((samples - expected) * expected).flatten(1).sum(1) / expected.square().sum()
    t = deviation.mean() / (deviation.std() / len(deviation) ** 0.5)
    assert abs(t) < 4, f"the dropout outputs are biased: t = {t:.1f} (mean relative deviation {deviation.mean():.2e})"
    assert deviation.std() > 0


@pytest.mark.parametrize("kind", ["lxmert", "vilbert", "meter"])
def test_co_attention_layer_dropout_in_training(kind):
    generator = torch.Generator().manual_seed(7)
    module, source, restated, _, text_dim, image_dim = build_layer(kind, generator, dropout=0.0,
                                                                   attention_dropout=1.0)
    module = module.to(DEVICE).train()
    text, image, text_mask, image_mask = layer_inputs(generator, text_dim, image_dim)
    args = (text.to(DEVICE), image.to(DEVICE))
    masks = dict(lang_mask=text_mask.to(DEVICE), visn_mask=image_mask.to(DEVICE)) if kind == "lxmert" else \
        dict(text_mask=text_mask.to(DEVICE), image_mask=image_mask.to(DEVICE))
    with vlkernels.use_backend("triton"), torch.no_grad():
        # Attention dropout with p = 1 removes every attention term, cross and self alike, in
        # the kernels (no fallback).
        with vlkernels.kernel_coverage() as coverage:
            actual = module(*args, **masks)
        assert not coverage.fallbacks and coverage.backends("co_attention") == {"triton": 1}
        expected = restated(source, text.double(), image.double(), text_mask, image_mask, drop_attention=True)
        check_all(["text out", "image out"], actual, expected, actual)
        for block in module.modules():  # hidden dropout on, attention dropout off: the kernel path
            if isinstance(block, nn.Dropout):
                block.p = 0.5
            if isinstance(block, VLMultiheadAttention):
                block.dropout = 0.0
        if isinstance(module, ViLBERTCoLayer):
            module.attention_dropout = 0.0
        first, second = module(*args, **masks), module(*args, **masks)
        assert not torch.equal(first[0], second[0]) and all(torch.isfinite(t).all() for t in first + second)
        module.eval()
        check_all(["eval text out", "eval image out"], module(*args, **masks),
                  restated(source, text.double(), image.double(), text_mask, image_mask), first)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multihead_attention_fully_padded_sample_gives_finite_zero_attention(backend):
    torch.manual_seed(9)
    module = VLMultiheadAttention(40, 4).to(DEVICE)
    nn.init.normal_(module.in_proj_bias)
    nn.init.normal_(module.out_proj.bias)
    x = torch.randn(2, 7, 40, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with vlkernels.use_backend(backend):
        out = module(x, key_padding_mask=mask)
        grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    # Sample 1 sees no key: its attention output is zero, so only out_proj's bias is left.
    torch.testing.assert_close(out[1], module.out_proj.bias.expand(7, 40), rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in grads) and grads[0][1].abs().max() == 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multihead_attention_propagates_nan_and_ignores_padding(backend, training):
    """Issue 12 item 5 through the module, in eval and with attention dropout in training (in
    the op on both backends): a NaN in one real token's input reaches every query of its
    sample (its k and v are visible to all) and nothing of the other sample; the same NaN in a
    padded token reaches nothing. No nan_to_num erases it."""
    torch.manual_seed(10)
    module = VLMultiheadAttention(32, 2, dropout=0.25).to(DEVICE).train(training)
    x = torch.randn(2, 9, 32, device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False
    x[0, 3, 5] = float("nan")  # a real token of sample 0
    x[1, 7, 0] = float("nan")  # a padded token of sample 1
    with vlkernels.use_backend(backend):
        out = module(x, key_padding_mask=mask)
    assert bool(out[0].isnan().all(-1).all()), "the NaN fed in was not propagated"
    assert bool(out[1, :6].isfinite().all()), "a NaN in a padded key reached a real query"


@pytest.mark.parametrize("kind", ["lxmert", "vilbert", "meter"])
def test_co_attention_layer_runs_both_cross_directions_in_one_launch(kind, monkeypatch):
    import vlkernels.nn.attention as attention_module

    calls = []
    real = attention_module.co_attention
    monkeypatch.setattr(attention_module, "co_attention",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    module, _, _, _, text_dim, image_dim = build_layer(kind, torch.Generator().manual_seed(10))
    text, image, text_mask, image_mask = layer_inputs(torch.Generator().manual_seed(11), text_dim, image_dim)
    masks = dict(lang_mask=text_mask, visn_mask=image_mask) if kind == "lxmert" else \
        dict(text_mask=text_mask, image_mask=image_mask)
    with vlkernels.use_backend("torch"):
        module.eval()(text, image, **masks)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------
# Errors and loading mismatches
# ------------------------------------------------------------------------------------------------
def test_multihead_attention_bad_inputs_raise():
    module = VLMultiheadAttention(40, 4, kdim=24, vdim=24)
    x, context = torch.randn(2, 5, 40), torch.randn(2, 6, 24)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        VLMultiheadAttention(42, 4)
    with pytest.raises(ValueError, match=r"query must be \[B, S, 40\]"):
        module(torch.randn(2, 5, 41), context)
    with pytest.raises(ValueError, match="key has batch size 3, expected 2"):
        module(x, torch.randn(3, 6, 24))
    with pytest.raises(ValueError, match="key and value must have one length"):
        module(x, context, torch.randn(2, 7, 24))
    with pytest.raises(ValueError, match="True = a real token"):
        module(x, context, key_padding_mask=torch.ones(2, 6))  # float, as HF's
    with pytest.raises(ValueError, match=r"bool tensor \[2, 6\]"):
        module(x, context, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["lxmert", "vilbert", "meter"])
def test_co_attention_layer_bad_inputs_raise(kind):
    module = {"lxmert": lambda: LXMERTCrossLayer(40, 4, 56), "vilbert": lambda: ViLBERTCoLayer(40, 24, 48, 4, 56, 36),
              "meter": lambda: METERCrossLayer(40, 4, 56)}[kind]()
    image_dim = 24 if kind == "vilbert" else 40
    text, image = torch.randn(2, 5, 40), torch.randn(2, 6, image_dim)
    mask_name = "lang_mask" if kind == "lxmert" else "text_mask"
    with pytest.raises(ValueError, match="batch size 3, expected 2"):
        module(text, torch.randn(3, 6, image_dim))
    with pytest.raises(ValueError, match=rf"must be \[B, S, {image_dim}\]"):
        module(text, torch.randn(2, 6, image_dim + 1))
    with pytest.raises(ValueError, match=r"must be \[B, S, 40\]"):
        module(torch.randn(2, 5), image)
    with pytest.raises(ValueError, match=rf"{mask_name} must be a bool tensor \[2, 5\]"):
        module(text, image, **{mask_name: torch.ones(2, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="multiple of heads"):
        {"lxmert": lambda: LXMERTCrossLayer(42, 4, 56), "vilbert": lambda: ViLBERTCoLayer(40, 24, 42, 4, 56, 36),
         "meter": lambda: METERCrossLayer(42, 4, 56)}[kind]()


def test_loaders_refuse_foreign_or_incomplete_checkpoints():
    generator = torch.Generator().manual_seed(8)
    lxmert = hf_lxmert_layer(generator).state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*lang_extra.weight"):
        LXMERTCrossLayer(40, 4, 56).load_hf_state_dict({**lxmert, "lang_extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="visn_output.LayerNorm.bias"):
        LXMERTCrossLayer(40, 4, 56).load_hf_state_dict(
            {k: v for k, v in lxmert.items() if k != "visn_output.LayerNorm.bias"})
    vilbert = {k: v.float() for k, v in vilbert_source(generator).items()}
    with pytest.raises(RuntimeError, match="size mismatch"):  # a layer of other sizes
        ViLBERTCoLayer(40, 24, 48, 4, 56, 40).load_vilbert_state_dict(vilbert)
    text_layer, image_layer = hf_meter_pair(generator)
    with pytest.raises(ValueError, match=r"image layer.*unexpected keys.*extra"):
        METERCrossLayer(40, 4, 56).load_meter_state_dicts(text_layer.state_dict(),
                                                          {**image_layer.state_dict(), "extra": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# Issue 13: no host reads by default (value checks on the device; strict mode keeps ValueError)
# ------------------------------------------------------------------------------------------------


def test_real_token_mask_refuses_a_bias_in_both_modes():
    bias = torch.tensor([[0.0, -1.0, 0.0]], device=DEVICE)
    message = "real_token_mask: an additive mask with values other than 0"
    with vlkernels.value_checks("host"), pytest.raises(ValueError, match=message):
        real_token_mask(bias)
    with vlkernels.value_checks("device"), pytest.raises(RuntimeError, match=message):
        real_token_mask(bias)
    with vlkernels.value_checks("device"):  # a padding mask passes the device check
        assert torch.equal(real_token_mask(additive_mask(bias == 0, torch.float32)), bias == 0)


def _module_calls(kind, generator):
    """(module, leaves, call): our module on masked inputs (VLMultiheadAttention above the fp32 blocks)."""
    if kind in ("mha", "mha-prefix", "post_ln"):
        module = (PostLNAttention if kind == "post_ln" else VLMultiheadAttention)(40, HEADS).to(DEVICE)
        x = torch.randn(2, 70, 40, generator=generator).to(DEVICE).requires_grad_()
        mask = padding_mask(generator, 2, 70, fully_padded=(1,)).to(DEVICE)
        options = dict(key_padding_mask=mask)
        if kind == "mha-prefix":
            options = dict(prefix_len=torch.tensor([9, 70], device=DEVICE))
        return module, [x], lambda x: module(x, **options)
    module, _, _, _, text_dim, image_dim = build_layer(kind, generator)
    module = module.to(DEVICE)
    # small streams (the ops' own host-read test covers sizes above the blocks): keeps it fast
    text, image, text_mask, image_mask = layer_inputs(generator, text_dim, image_dim)
    leaves = [text.to(DEVICE).requires_grad_(), image.to(DEVICE).requires_grad_()]
    masks = dict(lang_mask=text_mask.to(DEVICE), visn_mask=image_mask.to(DEVICE)) if kind == "lxmert" else \
        dict(text_mask=text_mask.to(DEVICE), image_mask=image_mask.to(DEVICE))
    return module, leaves, lambda t, i: module(t, i, **masks)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["mha", "mha-prefix", "post_ln", "lxmert", "vilbert", "meter"])
def test_module_forward_and_backward_read_nothing_on_the_host(kind, backend):
    """Default (device) mode, eval (the kernels' path), warm: no host read in forward or backward."""
    def run(module, leaves, call):
        outs = call(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves + list(module.parameters()), [torch.ones_like(o) for o in outs])

    with vlkernels.use_backend(backend), vlkernels.value_checks("device"):
        module, leaves, call = _module_calls(kind, torch.Generator().manual_seed(3))
        module.eval()
        run(module, leaves, call)  # warm: first-call caches may read once
        with HostReads() as counter:
            run(module, leaves, call)
    assert counter.reads == 0, f"{kind}: {counter.reads} host read(s)"
