"""Model families: how to build a span of blocks from checkpoint tensors and what stays on the client.

Each family is one module in this package, named after its model type, that calls `register(...)` when imported;
adding a family is one new module plus its test. Only the family a checkpoint needs is imported.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.24 renamed the KV-cache argument of models, layers and mask functions from `past_key_values` to
# `cache` (the old name still works for models, with a warning, but not for decoder layers or mask functions).
# Every call that passes a cache uses this name, so both sides of the rename work.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def causal_mask_for(config: PretrainedConfig, layer_type: str | None = None) -> Callable:
    """The mask function of a block of type `layer_type` (an entry of config.layer_types, as Qwen2 and Gemma 2 name
    their full and sliding-window layers); for a config without layer types (None), create_causal_mask, or its
    sliding-window variant when the config sets a window (as Mistral does)."""
    if layer_type is None:
        layer_type = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
    if layer_type not in LAYER_MASKS:
        raise ValueError(f"layer type {layer_type!r} is not supported yet; supported: {sorted(LAYER_MASKS)}")
    return LAYER_MASKS[layer_type]


LAYER_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def same_tensors(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    return tensors


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    causal_lm_class: type  # the transformers class the client model derives from
    decoder_layer_class: type
    rotary_class: type
    # The mask function of a block, from the config and the block's entry of config.layer_types (None without them).
    mask_function: Callable[[PretrainedConfig, str | None], Callable] = causal_mask_for
    # One block's checkpoint tensors (names relative to the block) -> the decoder layer's state dict, for families
    # whose checkpoints store weights otherwise than their modules hold them (e.g. one tensor per MoE expert).
    block_state: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]] = same_tensors
    # What the base model's forward returns: its causal LM head reads fields of it (MoE heads: router_logits).
    base_output_class: type = BaseModelOutputWithPast
    # The attention kernel blocks run with: "eager" where sdpa would drop a feature (Gemma 2's logit soft-capping).
    attn_implementation: str = "sdpa"
    block_prefix: str = "model.layers.{index}."
    base_model_attr: str = "model"  # attribute of the causal LM that holds embeddings, layers and norm
    client_prefixes: tuple[str, ...] = field(default=("model.embed_tokens.", "model.norm.", "lm_head."))

    def block_keys_prefix(self, index: int) -> str:
        return self.block_prefix.format(index=index)

    def embed(self, base_model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return base_model.embed_tokens(input_ids)

    def final_norm(self, base_model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return base_model.norm(hidden)


_FAMILIES: dict[str, ModelFamily] = {}
NOT_FAMILIES = {"span"}  # modules of this package that hold no family


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_for(config: PretrainedConfig) -> ModelFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES and isinstance(model_type, str) and model_type.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{model_type}")  # the family's module registers it
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{model_type}":
                raise
    family = _FAMILIES.get(model_type)
    if family is None:
        for module in pkgutil.iter_modules(__path__):  # a module may register more model types than its name
            if module.name not in NOT_FAMILIES:
                importlib.import_module(f"{__name__}.{module.name}")
        family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model type {model_type!r} is not supported yet; supported: {sorted(_FAMILIES)}. "
                         "A new family is one module in swarm/models/.")
    return family
