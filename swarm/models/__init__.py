"""Model families: how to build a span of blocks from checkpoint tensors and what stays on the client.

Each family is one module in this package that calls `register(...)`; adding a family is one new
module plus its test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

# transformers 5.24 renamed the KV-cache argument of models, layers and mask functions from `past_key_values` to
# `cache` (the old name still works for models, with a warning, but not for decoder layers or mask functions).
# Every call that passes a cache uses this name, so both sides of the rename work.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    causal_lm_class: type  # the transformers class the client model derives from
    decoder_layer_class: type
    rotary_class: type
    mask_function: Callable[[PretrainedConfig], Callable]  # picks create_causal_mask or a sliding-window variant
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


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_for(config: PretrainedConfig) -> ModelFamily:
    from swarm.models import llama  # noqa: F401  (registers the built-in families)

    family = _FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(
            f"model type {config.model_type!r} is not supported yet; supported: {sorted(_FAMILIES)}. "
            "A new family is one module in swarm/models/."
        )
    return family
