"""What every reference model shares: the kernels switch, the output type, input checks,
BERT-style token masking and the pretraining losses."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from vlkernels._backend import use_backend
from vlkernels.nn import VLMultiheadAttention

IGNORE_INDEX = -100  # label of positions without a target (torch's cross_entropy default)


class ModelOutput(dict):
    """A dict whose entries are also attributes (``out.loss``, ``out["loss"]``). Models fill
    ``loss`` (the summed objective, when labels were given), ``losses`` (each objective by
    name), their encoders' outputs and each head's ``*_logits``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def set_losses(self, losses: dict, weights: dict) -> None:
        """Record the computed objectives: ``losses`` (name -> scalar) and ``loss``, their sum
        weighted by ``weights`` (name -> float). Nothing is set when no objective was computed."""
        if losses:
            self.losses = losses
            self.loss = sum(weights[name] * value for name, value in losses.items())


# A pytree node (as HF's ModelOutput is), so torch.export, torch.func and the compile stack see the
# tensors inside a model's output and rebuild it as a ModelOutput (torch.export.load of a saved
# program needs vlkernels.models imported, as HF's outputs need transformers).
pytree.register_pytree_node(
    ModelOutput,
    lambda output: (list(output.values()), list(output.keys())),
    lambda values, keys: ModelOutput(zip(keys, values)),
    serialized_type_name=f"{ModelOutput.__module__}.{ModelOutput.__qualname__}",
    flatten_with_keys_fn=lambda output: ([(pytree.MappingKey(key), value)
                                          for key, value in output.items()], list(output.keys())),
)


# BERT's masked-LM decoder shares the word embedding table.
BERT_MLM_TIE = {"mlm_head.decoder.weight": "embeddings.word_embeddings.weight"}


class PretrainingModel(nn.Module):
    """Base of the reference models: ``use_kernels`` True runs the vlkernels ops on the backend
    vlkernels picks (``VLKERNELS_BACKEND`` / ``vlkernels.use_backend``); False runs every op on
    its pure-torch reference. Subclasses wrap their forward in ``with self.kernels():``; the
    backend is chosen when an op runs forward, so the backward follows the same choice."""

    def __init__(self, config, use_kernels: bool = True) -> None:
        super().__init__()
        self.config, self.use_kernels = config, use_kernels
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    def derived_buffers(self) -> dict:
        """The non-persistent buffers computed from the config, {dotted name: value} (none here).
        They are not in a checkpoint, so ``reset_parameters()`` and every ``load_state_dict`` rebuild
        them: FSDP2's meta-device recipe (``to_empty``, then load) and ``load_state_dict(assign=True)``
        of a meta-built model leave no garbage or meta tensor behind."""
        return {}

    def tied_weights(self) -> dict:
        """The tied weights, {dotted name: dotted name of the parameter it shares} (none here).
        ``to_empty`` and ``load_state_dict(assign=True)`` give each name its own Parameter (a tied
        decoder would then stop training the word table), so ``reset_parameters()`` and every
        ``load_state_dict`` tie them again; a checkpoint holding one name of a tie loads both."""
        return {}

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        """(the submodule that holds dotted ``name``, the attribute's name in it)."""
        owner_name, _, attr = name.rpartition(".")
        return self.get_submodule(owner_name), attr

    def _plain_parameter(self, name: str) -> tuple:
        """(owner module, attribute, Parameter) when ``name`` is a plain parameter slot, else
        (..., None): a wrapped owner (peft's LoRA layer) or a parametrized or pruned weight keeps
        its own parameters under other names."""
        owner, attr = self._owner(name)
        return owner, attr, owner._parameters.get(attr)

    def reset_parameters(self) -> None:
        """Tie the tied weights again and rebuild the config-derived buffers on the model's device
        (the submodules' ``reset_parameters()`` re-initialise their own parameters)."""
        for alias, source in self.tied_weights().items():
            owner, attr, current = self._plain_parameter(alias)
            shared = self._plain_parameter(source)[2]
            if current is not None and shared is not None and current is not shared:
                setattr(owner, attr, shared)
        parameter = next((p for p in self.parameters() if p.device.type != "meta"), None)
        for name, value in self.derived_buffers().items():
            owner, attr = self._owner(name)
            old = getattr(owner, attr)
            device = old.device if old.device.type != "meta" or parameter is None else parameter.device
            dtype = old.dtype if value.is_floating_point() else value.dtype
            owner.register_buffer(attr, value.to(device=device, dtype=dtype), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A tie saved under one name (HF checkpoints leave the tied decoder out; safetensors keeps
        # one name of each shared tensor): the other name loads the same tensor (state_dict is
        # load_state_dict's own copy).
        for pair in self.tied_weights().items():
            present = [name for name in pair if prefix + name in state_dict]
            if len(present) == 1:
                missing = pair[1 - pair.index(present[0])]
                if self._plain_parameter(missing)[2] is not None:
                    state_dict[prefix + missing] = state_dict[prefix + present[0]]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernels(self):
        return contextlib.nullcontext() if self.use_kernels else use_backend("torch")

    def synthetic_batch(self, batch_size: int, generator: Optional[torch.Generator] = None,
                        device: Optional[torch.device] = None) -> dict:
        """A pretraining batch (inputs and labels for every objective) from vlkernels.models.synthetic:
        ``model(**batch).loss`` trains all objectives."""
        raise NotImplementedError


def _rebuild_after_load(module: "PretrainingModel", incompatible_keys) -> None:
    # A module-level function (not a lambda), so the model still pickles.
    module.reset_parameters()


def init_bert_weights(model: nn.Module, std: float) -> None:
    """BERT's initialisation over every submodule: N(0, std) for Linear, Embedding and attention
    projection weights, zero biases, unit LayerNorms; then the padding rows of embeddings back
    to zero (a tied decoder shares the word table, so this runs after everything else)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VLMultiheadAttention):
            # HF BERT draws query, key and value as separate Linears; same distribution here.
            for weight in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                if weight is not None:
                    nn.init.normal_(weight, std=std)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def check_batch(model: str, **tensors: Optional[torch.Tensor]) -> int:
    """The common batch size of the given tensors (None entries skipped); a ValueError naming
    each tensor's batch size when they differ."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
    first = next(iter(sizes.values()))
    # Comparisons, not a set: hashing a symbolic size would specialise it under torch.compile(dynamic=True).
    if any(size != first for size in sizes.values()):
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"{model}: the inputs disagree on the batch size ({listed})")
    return first


def check_text(model: str, input_ids: torch.Tensor, max_len: int, vocab_size: Optional[int] = None) -> None:
    """input_ids must be an integer [B, S] tensor with S <= max_len (and ids < vocab_size)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{model}: input_ids must be an integer [B, S] tensor, got {shape}")
    if input_ids.shape[1] > max_len:
        raise ValueError(f"{model}: the text has {input_ids.shape[1]} tokens, more than max_text_len {max_len}")
    if vocab_size is not None:
        check_ids(model, "token ids", input_ids, 0, vocab_size)


def check_ids(model: str, name: str, tensor: Optional[torch.Tensor], low: int, high: int,
              ignore: Optional[int] = None) -> None:
    """A ValueError unless tensor is None or an integer tensor with values in [low, high)
    (``ignore`` also allowed, e.g. -100 for unlabelled positions)."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{model}: {name} must be an integer tensor, got "
                         f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    if tensor.numel() == 0 or torch.compiler.is_compiling():
        return
    values = tensor if ignore is None else tensor[tensor != ignore]
    if values.numel():
        lowest, highest = (int(v) for v in torch.aminmax(values))
        if lowest < low or highest >= high:
            allowed = f"[{low}, {high})" + ("" if ignore is None else f" or {ignore}")
            raise ValueError(f"{model}: {name} must lie in {allowed}, got values in [{lowest}, {highest}]")


def check_features(model: str, name: str, x: torch.Tensor, dim: int, rank: int = 3) -> None:
    """x must be a floating tensor of ``rank`` dims whose last dim is ``dim``."""
    if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != dim or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model}: {name} must be a floating [{', '.join(['.'] * (rank - 1))}, {dim}] tensor, "
                         f"got {shape}")


def check_fixed_size_pixels(model: str, pixel_values: torch.Tensor, channels: int, image_size: int) -> None:
    """pixel_values must be a floating [B, channels, image_size, image_size] tensor (models whose
    position embedding has one fixed grid)."""
    expected = (channels, image_size, image_size)
    if (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4
            or not pixel_values.is_floating_point() or tuple(pixel_values.shape[1:]) != expected):
        shape = list(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"{model}: pixel_values must be a floating [B, {', '.join(map(str, expected))}] tensor "
                         f"(the position embedding is fixed to image_size), got {shape}")


def as_bool_mask(model: str, name: str, mask: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """An HF-style 0/1 (or bool) mask as bool True = real token, checked against ``shape``."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{model}: {name} must have shape {list(shape)}, got {list(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_token_id: int, maskable: torch.Tensor,
                word_ids: Optional[torch.Tensor] = None, prob: float = 0.15,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption, with whole-word masking when ``word_ids`` is given.

    input_ids: [B, S] int; maskable: [B, S] bool (real, non-special tokens); word_ids: [B, S]
    int, equal for the pieces of one word (whole-word masking picks words, then all their pieces).
    Each chosen token becomes [MASK] with prob. 0.8, a random token 0.1, itself 0.1.
    returns (corrupted ids [B, S], labels [B, S]: the original id where chosen, -100 elsewhere).
    """
    device = input_ids.device

    def draw(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device if generator else "cpu").to(device)

    if word_ids is None:
        chosen = (draw(*input_ids.shape) < prob) & maskable
    else:
        # One draw per word id: token t is chosen when its word's draw is below prob.
        words = int(word_ids.max()) + 1 if word_ids.numel() else 1
        per_word = draw(input_ids.shape[0], words) < prob
        chosen = per_word.gather(1, word_ids.clamp_min(0)) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = draw(*input_ids.shape)
    random_ids = (draw(*input_ids.shape) * vocab_size).long().clamp_max(vocab_size - 1)
    corrupted = torch.where(chosen & (roll < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, labels


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled positions (labels -100 elsewhere); logits [..., V],
    labels [...]. Zero (still connected to the graph) when nothing is labelled: the sum of the
    per-position losses (0 where unlabelled) over max(1, labelled count), all tensor ops, so
    torch.compile computes what eager does and no value is read on the host."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    losses = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum() / (flat_labels != IGNORE_INDEX).sum().clamp_min(1)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over L2-normalised [B, D] features with temperature exp(logit_scale)
    (CLIP / VLMo ITC). returns (loss, image-to-text logits [B, B])."""
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * image_features @ text_features.T  # fp32 whatever the scale's dtype
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    return loss, logits


def hard_negative_indices(similarity: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """For each row i of a [B, B] similarity, one column j != i drawn from softmax(similarity[i])
    without the diagonal (VLMo's ITM hard negatives). [B] int64; needs B >= 2."""
    if similarity.shape[0] < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    weights = torch.softmax(similarity.detach().float(), dim=1)
    weights = weights.masked_fill(torch.eye(len(weights), dtype=torch.bool, device=weights.device), 0.0)
    # A row whose off-diagonal mass underflowed to zero falls back to uniform negatives.
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0 - torch.eye(len(weights),
                                                                                    device=weights.device))
    return torch.multinomial(weights.cpu() if generator is not None else weights, 1,
                             generator=generator).view(-1).to(similarity.device)
