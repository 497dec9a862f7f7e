"""Benchmark presets of the attention ops, at the seed models' real shapes (12 heads, Dh 64):

attention (self-attention with the models' masks):
  UNITER single stream (60 text + 36 regions, padded keys), ViLT-B/32 (40 text + 145 patch
  tokens, padded keys) and at its pretraining length (40 text + 200 patches + cls), VLMo-B
  (40 + 197, padded keys), SimVLM PrefixLM at 512 tokens (a different prefix per sample);
  UNITER and ViLT's pretraining length also with attention dropout 0.1, as they train.
co_attention (both directions):
  LXMERT cross layer (20 text x 36 regions, batch 256), METER (50 text x 577 patches, batch 32).

Providers: vlkernels, eager (the torch reference), torch.compile(reference) (also in mode
"max-autotune-no-cudagraphs", full runs only), SDPA with a boolean mask through each of its
backends (flash, efficient, cuDNN, math; on CPU flash and math; a backend that refuses a case
is a recorded skip), FlexAttention compiled with a block mask of the padding / PrefixLM mask
(built once per preset; where torch has it); co-attention: two SDPA calls. Dropout calls draw
random masks, so their outputs are not compared with eager's.
FLOPs count the visible (query, key) pairs only (4*H*Dh per pair forward, 2.5x that backward):
padded keys, the causal part of PrefixLM and hidden pairs are work a kernel may skip, so
counting them would inflate TFLOP/s and the roofline. Masks and prefix lengths are drawn from a
generator seeded per preset, so every provider times the same masks that the FLOPs count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlkernels.bench.harness import Case, Compiled, Inputs, expensive, standard_providers

HEADS, HEAD_DIM = 12, 64


@dataclass(frozen=True)
class SelfPreset:
    name: str
    seq: int
    text: int = 0  # leading tokens kept in every sample; the rest is padded at random lengths
    prefix: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class CoPreset:
    name: str
    text: int
    image: int


SELF_PRESETS = [SelfPreset("vilt-b32", 185, text=40), SelfPreset("uniter", 96, text=60),
                SelfPreset("uniter-dropout", 96, text=60, dropout=0.1), SelfPreset("vilt-pretrain", 241, text=41),
                SelfPreset("vilt-pretrain-dropout", 241, text=41, dropout=0.1), SelfPreset("vlmo-b", 237, text=40),
                SelfPreset("simvlm-prefixlm", 512, prefix=True)]
CO_PRESETS = [CoPreset("lxmert", 20, 36), CoPreset("meter", 50, 577)]
GPU_BATCH = {"vilt-b32": 64, "uniter": 128, "uniter-dropout": 128, "vilt-pretrain": 64, "vilt-pretrain-dropout": 64,
             "vlmo-b": 64, "simvlm-prefixlm": 16, "lxmert": 256, "meter": 32}


def _padding_mask(batch: int, seq: int, keep: int, seed: int) -> torch.Tensor:
    # Real lengths drawn in [max(keep, seq/2), seq]: every sample has keys, most are padded.
    lengths = torch.randint(max(keep, seq // 2, 1), seq + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    return torch.arange(seq)[None, :] < lengths[:, None]


def _prefix_lengths(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(seq // 8, seq - seq // 8, (batch,), generator=torch.Generator().manual_seed(seed))


def _visible_pairs(seq_q: int, key_mask=None, prefix_len=None) -> int:
    """(query, key) pairs the masks let through, over the batch: every query sees each real
    key; under PrefixLM query i sees max(prefix, i + 1) keys."""
    if prefix_len is not None:
        positions = torch.arange(seq_q)
        return int(torch.maximum(prefix_len.cpu()[:, None].clamp(max=seq_q), positions[None, :] + 1).sum())
    return int(key_mask.cpu().sum()) * seq_q


def _qkv(batch, lengths, device, dtype):
    return [torch.randn(batch, HEADS, s, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for s in lengths]


def _sdpa_mask(key_mask=None, prefix_len=None, seq=None, device=None):
    """The boolean [B, 1, Sq, Sk] mask SDPA needs for our key_mask / PrefixLM masks."""
    if prefix_len is None:
        return key_mask[:, None, None, :]
    positions = torch.arange(seq, device=device)
    causal = positions[None, :] <= positions[:, None]
    return (causal[None] | (positions[None, None, :] < prefix_len[:, None, None]))[:, None]


def _sdpa(q, k, v, key_mask=None, prefix_len=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(key_mask, prefix_len, q.shape[2], q.device),
                                          dropout_p=dropout_p)


def _sdpa_peers(device: torch.device) -> dict:
    """SDPA through each backend it has on the device (a backend that refuses a call is a skip)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "math": "MATH"} if device.type != "cuda" else {
        "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}

    def with_backend(backend):
        def run(q, k, v, key_mask=None, prefix_len=None, dropout_p=0.0):
            with sdpa_kernel(backend):
                return _sdpa(q, k, v, key_mask=key_mask, prefix_len=prefix_len, dropout_p=dropout_p)

        return run

    return {f"sdpa-{name}": with_backend(getattr(SDPBackend, member)) for name, member in names.items()
            if hasattr(SDPBackend, member)}


def _flex_peer() -> dict:
    """FlexAttention (compiled) with a block mask of the padding / PrefixLM mask, built once per
    mask (the mask tensors of a preset are made once); {} where torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return {}
    compiled = torch.compile(flex_attention, dynamic=False)
    block_masks = {}

    def block_mask(key_mask, prefix_len, batch, seq, device):
        key = (id(key_mask), id(prefix_len), seq)
        if key not in block_masks:
            if prefix_len is None:
                def visible(b, h, q_idx, kv_idx):
                    return key_mask[b, kv_idx]
            else:
                def visible(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) | (kv_idx < prefix_len[b])
            block_masks[key] = create_block_mask(visible, batch, None, seq, seq, device=device)
        return block_masks[key]

    def flex(q, k, v, key_mask=None, prefix_len=None, dropout_p=0.0):
        if dropout_p:
            raise NotImplementedError("FlexAttention has no attention dropout")
        return compiled(q, k, v, block_mask=block_mask(key_mask, prefix_len, q.shape[0], q.shape[2], q.device))

    return {"flex-attention": expensive(flex)}


def _attention_flops(pairs: int):
    forward = 4.0 * pairs * HEADS * HEAD_DIM
    return lambda mode: forward * {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode]


def _attention_bytes(batch, seq_q, seq_k):
    # q, k, v read and the output written once forward; backward also reads out and grad_out
    # and writes the three gradients.
    forward = batch * HEADS * HEAD_DIM * (2 * seq_q + 2 * seq_k)
    elements = {"forward": forward, "backward": forward + batch * HEADS * HEAD_DIM * (2 * seq_q + 2 * seq_k)}
    elements["full"] = elements["forward"] + elements["backward"]
    return lambda mode, dtype: float(elements[mode] * torch.finfo(dtype).bits // 8)


def attention_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops import attention
    from vlkernels.reference.attention import attention as reference

    def vlkernels_fn(q, k, v, key_mask=None, prefix_len=None, dropout_p=0.0):
        return attention(q, k, v, key_mask=key_mask, prefix_len=prefix_len, dropout_p=dropout_p)

    def eager(q, k, v, key_mask=None, prefix_len=None, dropout_p=0.0):
        return reference(q, k, v, key_mask=key_mask, prefix_len=prefix_len, dropout_p=dropout_p)

    peers = {"torch.compile-max-autotune": Compiled(eager, mode="max-autotune-no-cudagraphs"),
             **_sdpa_peers(device), **_flex_peer()}
    providers = standard_providers(vlkernels_fn, eager, peers)
    presets = SELF_PRESETS[:1] if quick else SELF_PRESETS
    cases = []
    for seed, preset in enumerate(presets):
        batch = 2 if quick or device.type != "cuda" else GPU_BATCH[preset.name]
        if preset.prefix:
            masks = dict(prefix_len=_prefix_lengths(batch, preset.seq, seed))
        else:
            masks = dict(key_mask=_padding_mask(batch, preset.seq, preset.text, seed))

        def make(device, dtype, preset=preset, batch=batch, masks=masks):
            q, k, v = _qkv(batch, (preset.seq,) * 3, device, dtype)
            return Inputs((q, k, v), {**{name: mask.to(device) for name, mask in masks.items()},
                                      "dropout_p": preset.dropout})

        random_outputs = (lambda dtype: float("inf")) if preset.dropout else None  # dropout: nothing to compare
        cases.append(Case("attention", f"{preset.name}-S{preset.seq}-B{batch}", make, providers,
                          flops=_attention_flops(_visible_pairs(preset.seq, **masks)),
                          bytes=_attention_bytes(batch, preset.seq, preset.seq), tolerance=random_outputs))
    return cases


def co_attention_cases(device: torch.device, quick: bool = False) -> list[Case]:
    from vlkernels.ops import co_attention
    from vlkernels.reference.attention import co_attention as reference

    def vlkernels_fn(*qkv, text_mask=None, image_mask=None):
        return co_attention(*qkv, text_mask=text_mask, image_mask=image_mask)

    def eager(*qkv, text_mask=None, image_mask=None):
        return reference(*qkv, text_mask=text_mask, image_mask=image_mask)

    def two_sdpa_calls(q_t, k_t, v_t, q_i, k_i, v_i, text_mask=None, image_mask=None):
        return (F.scaled_dot_product_attention(q_t, k_i, v_i, attn_mask=image_mask[:, None, None, :]),
                F.scaled_dot_product_attention(q_i, k_t, v_t, attn_mask=text_mask[:, None, None, :]))

    providers = standard_providers(vlkernels_fn, eager, {"sdpa x2": two_sdpa_calls})
    presets = CO_PRESETS[:1] if quick else CO_PRESETS
    cases = []
    for seed, preset in enumerate(presets):
        batch = 2 if quick or device.type != "cuda" else GPU_BATCH[preset.name]
        masks = dict(text_mask=_padding_mask(batch, preset.text, 1, 2 * seed),
                     image_mask=_padding_mask(batch, preset.image, 1, 2 * seed + 1))

        def make(device, dtype, preset=preset, batch=batch, masks=masks):
            lengths = (preset.text,) * 3 + (preset.image,) * 3
            return Inputs(tuple(_qkv(batch, lengths, device, dtype)), {n: m.to(device) for n, m in masks.items()})

        # Text queries see the real image keys, image queries the real text keys.
        flops_t = _attention_flops(_visible_pairs(preset.text, key_mask=masks["image_mask"]))
        flops_i = _attention_flops(_visible_pairs(preset.image, key_mask=masks["text_mask"]))
        bytes_t, bytes_i = (_attention_bytes(batch, a, b) for a, b in ((preset.text, preset.image),
                                                                        (preset.image, preset.text)))
        cases.append(Case("co_attention", f"{preset.name}-T{preset.text}xI{preset.image}-B{batch}", make, providers,
                          flops=lambda mode, f=flops_t, g=flops_i: f(mode) + g(mode),
                          bytes=lambda mode, dtype, f=bytes_t, g=bytes_i: f(mode, dtype) + g(mode, dtype)))
    return cases
