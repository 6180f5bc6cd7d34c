"""A contiguous span of decoder blocks, run exactly as the full transformers model runs them."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from swarm.models import CACHE_KWARG, ModelFamily


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of the model config that describes only blocks [start, end), numbered from 0."""
    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = list(layer_types[start:end])
    config.num_hidden_layers = end - start
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    return config


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model. Inputs and outputs are hidden states of shape [batch, length, hidden]."""

    def __init__(self, family: ModelFamily, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module]):
        super().__init__()
        self.family, self.start, self.end = family, start, end
        self.config = span_config(config, start, end)
        for local_index, layer in enumerate(layers):
            # The cache indexes layers by position; a span's cache holds only its own blocks.
            layer.self_attn.layer_idx = local_index
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = family.rotary_class(config=self.config)
        self._mask_function = family.mask_function(self.config)

    @classmethod
    def from_state_dict(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int,
                        tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> BlockSpan:
        """Build the span from checkpoint tensors named as in the full model (e.g. 'model.layers.3.mlp...')."""
        layers = [build_block(family, config, start, end, index, tensors, dtype) for index in range(start, end)]
        return cls.of_blocks(family, config, start, end, layers)

    @classmethod
    def from_checkpoint(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int, checkpoint,
                        dtype: torch.dtype, prepare: Callable[[nn.Module], nn.Module] | None = None) -> BlockSpan:
        """Build the span reading one block at a time from a swarm.checkpoint.Checkpoint; `prepare` (e.g. a
        swarm.quantize.quantizer) turns each block into what is served before the next is read, so the peak memory is
        the result plus about one block in `dtype`."""
        layers = []
        for index in range(start, end):
            prefix = family.block_keys_prefix(index)
            tensors = checkpoint.load(lambda key, prefix=prefix: key.startswith(prefix), dtype)
            layer = build_block(family, config, start, end, index, tensors, dtype)
            del tensors  # the layer holds them now (or `prepare` frees them)
            layers.append(prepare(layer) if prepare is not None else layer)
        return cls.of_blocks(family, config, start, end, layers)

    @classmethod
    def of_blocks(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int,
                  layers: list[nn.Module]) -> BlockSpan:
        # The rotary embedding keeps its float32 frequencies, as in transformers' own loading.
        return cls(family, config, start, end, layers).eval().requires_grad_(False)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: DynamicCache | None = None, start: int | None = None, end: int | None = None,
                prompts: torch.Tensor | None = None, first_token: int = 0) -> torch.Tensor:
        """Run blocks [start, end) of the span (all by default).

        `attention_mask` is the 2-D padding mask over cached + new tokens (1 = attend); `cache` is one
        made by `new_cache()`, indexed by block position within this span. `prompts` (deep prompt tuning),
        [blocks run, batch or 1, P, hidden], is added to the input of each block at the sequence's first P
        tokens; `hidden` starts at token `first_token` of its sequence (the tokens a cache already holds).
        """
        first = (self.start if start is None else start) - self.start
        last = (self.end if end is None else end) - self.start
        mask = self._mask_function(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                   position_ids=position_ids, layer_idx=first, **{CACHE_KWARG: cache})
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(self.layers[first:last]):
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[index], first_token)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                           use_cache=cache is not None, **{CACHE_KWARG: cache})
        return hidden


def build_block(family: ModelFamily, config: PretrainedConfig, start: int, end: int, index: int,
                tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """Block `index` of the span [start, end) from checkpoint tensors named as in the full model."""
    prefix = family.block_keys_prefix(index)
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    with torch.device("meta"):
        layer = family.decoder_layer_class(span_config(config, start, end), index - start)
    missing = set(layer.state_dict()) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors of block {index}, e.g. {prefix}{min(missing)}")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(dtype)


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, first_token: int = 0) -> torch.Tensor:
    """hidden + prompt at the sequence's first P tokens; `hidden` [batch, length, h] starts at token `first_token`."""
    overlap = min(prompt.shape[1] - first_token, hidden.shape[1])
    if overlap <= 0:
        return hidden
    head = hidden[:, :overlap] + prompt[:, first_token : first_token + overlap].to(hidden.dtype)
    return torch.cat([head, hidden[:, overlap:]], dim=1)
