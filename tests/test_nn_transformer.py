"""vlkernels.nn transformer blocks against the modules they replace (HF BERT, a timm-style ViT
block written out in torch), on fresh random inputs, in eval mode, fp32."""
import pytest
import torch
import torch.nn.functional as F

import vlkernels
from vlkernels.nn import BertLayer, MLMHead, Mlp, Pooler, PreLNBlock, TextEmbeddings

transformers = pytest.importorskip("transformers")
from transformers.models.bert import modeling_bert  # noqa: E402

TIGHT = dict(rtol=1e-5, atol=1e-5)
BACKENDS = ["torch", "triton"]


def _bert_config(**overrides):
    config = transformers.BertConfig(vocab_size=160, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **overrides)
    config._attn_implementation = "eager"
    return config


def _padding(batch, length, generator):
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return torch.arange(length)[None, :] < lengths[:, None]


def timm_block_forward(block: PreLNBlock, x: torch.Tensor, state: dict, mask: torch.Tensor) -> torch.Tensor:
    """What a timm ViT Block with the state dict ``state`` (attn.qkv / attn.proj names) computes."""
    heads = block.attn.num_heads
    h = F.layer_norm(x, x.shape[-1:], state["norm1.weight"], state["norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, state["attn.qkv.weight"], state["attn.qkv.bias"]).unflatten(-1, (3, heads, -1)).permute(
        2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    x = x + F.linear(attended, state["attn.proj.weight"], state["attn.proj.bias"])
    h = F.layer_norm(x, x.shape[-1:], state["norm2.weight"], state["norm2.bias"], eps=1e-6)
    return x + F.linear(F.gelu(F.linear(h, state["mlp.fc1.weight"], state["mlp.fc1.bias"])),
                        state["mlp.fc2.weight"], state["mlp.fc2.bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_ln_block_loads_timm_keys_and_matches_timm_math(backend):
    generator = torch.Generator().manual_seed(0)
    block = PreLNBlock(32, 4).eval()
    state = {
        "norm1.weight": torch.randn(32, generator=generator), "norm1.bias": torch.randn(32, generator=generator),
        "attn.qkv.weight": torch.randn(96, 32, generator=generator) / 6, "attn.qkv.bias": torch.randn(96, generator=generator),
        "attn.proj.weight": torch.randn(32, 32, generator=generator) / 6, "attn.proj.bias": torch.randn(32, generator=generator),
        "norm2.weight": torch.randn(32, generator=generator), "norm2.bias": torch.randn(32, generator=generator),
        "mlp.fc1.weight": torch.randn(128, 32, generator=generator) / 6, "mlp.fc1.bias": torch.randn(128, generator=generator),
        "mlp.fc2.weight": torch.randn(32, 128, generator=generator) / 11, "mlp.fc2.bias": torch.randn(32, generator=generator),
    }
    block.load_state_dict(dict(state), strict=True)
    x = torch.randn(3, 7, 32, generator=generator)
    mask = _padding(3, 7, generator)
    with vlkernels.use_backend(backend):
        out = block(x, mask)
    torch.testing.assert_close(out, timm_block_forward(block, x, state, mask), **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_layer_matches_hf(backend):
    torch.manual_seed(1)
    config = _bert_config()
    hf = modeling_bert.BertLayer(config).eval()
    ours = BertLayer(32, 4, 64, dropout=0.0).eval()
    ours.load_hf_state_dict(hf.state_dict())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 32, generator=generator)
    mask = _padding(3, 9, generator)
    additive = torch.zeros(3, 1, 1, 9).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    expected = hf(x, attention_mask=additive)
    expected = expected[0] if isinstance(expected, tuple) else expected
    with vlkernels.use_backend(backend):
        out = ours(x, mask)
    torch.testing.assert_close(out, expected, **TIGHT)


def test_bert_layer_with_cross_attention_needs_context():
    layer = BertLayer(32, 4, 64, cross_attention=True)
    with pytest.raises(ValueError, match="needs a context"):
        layer(torch.randn(2, 3, 32))


def test_text_embeddings_load_hf_bert_embeddings_unchanged():
    torch.manual_seed(3)
    config = _bert_config()
    hf = modeling_bert.BertEmbeddings(config).eval()
    ours = TextEmbeddings(160, 32, 24, 2, dropout=0.0).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("position_ids" in k or "token_type_ids" in k for k in unexpected)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 160, (2, 11), generator=generator)
    types = torch.randint(0, 2, (2, 11), generator=generator)
    torch.testing.assert_close(ours(ids, types), hf(input_ids=ids, token_type_ids=types), **TIGHT)


def test_text_embeddings_reject_too_long_text():
    with pytest.raises(ValueError, match="exceed the 24 positions"):
        TextEmbeddings(160, 32, 24)(torch.zeros(1, 25, dtype=torch.long))


def test_mlm_head_matches_hf_and_ties_the_decoder():
    torch.manual_seed(5)
    config = _bert_config()
    hf = modeling_bert.BertLMPredictionHead(config).eval()
    with torch.no_grad():
        hf.bias.normal_()
    embeddings = torch.nn.Embedding(160, 32)
    ours = MLMHead(32, 160, word_embeddings=embeddings)
    assert ours.decoder.weight is embeddings.weight
    ours.transform.load_state_dict(hf.transform.state_dict())
    with torch.no_grad():
        embeddings.weight.copy_(hf.decoder.weight)
        ours.bias.copy_(hf.bias)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))
    hf.decoder.bias = hf.bias  # tied, as HF's pretraining models tie them
    torch.testing.assert_close(ours(x), hf(x), **TIGHT)


def test_pooler_and_mlp():
    generator = torch.Generator().manual_seed(7)
    pooler, mlp = Pooler(32), Mlp(32, 64, activation="gelu_tanh")
    x = torch.randn(2, 5, 32, generator=generator)
    torch.testing.assert_close(pooler(x), torch.tanh(pooler.dense(x[:, 0])), **TIGHT)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")), **TIGHT)
    with pytest.raises(ValueError, match="activation"):
        Mlp(32, 64, activation="swish")
