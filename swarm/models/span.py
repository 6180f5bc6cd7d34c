"""A contiguous span of decoder blocks, run exactly as the full transformers model runs them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache

from swarm.kv_cache import head_dim, kv_heads
from swarm.models import CACHE_KWARG, ModelFamily
from swarm.models.batched import BatchItem, StepBatch, make_batchable
from swarm.models.preallocated import preallocated_cache


def span_config(config: PretrainedConfig, start: int, end: int, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """A copy of the model config that describes only blocks [start, end), numbered from 0, run with
    `attn_implementation` unless the config names one."""
    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = list(layer_types[start:end])
    config.num_hidden_layers = end - start
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = attn_implementation
    return config


@dataclass(frozen=True)
class SpanPart:
    """Blocks [start, end) of a span (model numbering), held by one device."""

    start: int
    end: int
    device: torch.device


def to_part(values: tuple, device: torch.device) -> tuple:
    """What blocks need (hidden states, mask, position embeddings (cos, sin)...) on a part's device; None and other
    values pass as they are."""
    def move(value):
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    return move(values)


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model. Inputs and outputs are hidden states of shape [batch, length, hidden]. The
    blocks may be held by several devices, each a contiguous part (`parts`); hidden states go from one to the next."""

    def __init__(self, family: ModelFamily, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module],
                 parts: Sequence[SpanPart] = ()):
        super().__init__()
        self.family, self.start, self.end = family, start, end
        self.config = span_config(config, start, end, family.attn_implementation)
        for local_index, layer in enumerate(layers):
            # The cache indexes layers by position; a span's cache holds only its own blocks.
            layer.self_attn.layer_idx = local_index
            make_batchable(layer)
        self.parts = tuple(parts) or (SpanPart(start, end, torch.device("cpu")),)
        if (self.parts[0].start, self.parts[-1].end) != (start, end) or any(
                a.end != b.start for a, b in zip(self.parts, self.parts[1:])):  # noqa: B905 - one shorter
            raise ValueError(f"parts {[(p.start, p.end) for p in self.parts]} do not cover blocks {start}:{end} in order")
        # Each block on its part's device (a no-op for blocks already placed there while loading).
        self.layers = nn.ModuleList(layer.to(self.part_of(start + i).device) for i, layer in enumerate(layers))
        # The rotary embedding and the mask are computed on the first part's device, then follow the hidden states.
        self.rotary_emb = family.rotary_class(config=self.config).to(self.parts[0].device)
        # Each block's type (Gemma 2 alternates sliding-window and full attention) and its mask function.
        layer_types = getattr(self.config, "layer_types", None) or [None] * len(layers)
        self._layer_types = tuple(layer_types)
        self._mask_functions = {t: family.mask_function(self.config, t) for t in set(layer_types)}

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first part's device."""
        return self.parts[0].device

    def part_of(self, block: int) -> SpanPart:
        return next(part for part in self.parts if part.start <= block < part.end)

    @classmethod
    def from_state_dict(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int,
                        tensors: dict[str, torch.Tensor], dtype: torch.dtype, parts: Sequence[SpanPart] = ()) -> BlockSpan:
        """Build the span from checkpoint tensors named as in the full model (e.g. 'model.layers.3.mlp...'), each block
        on its part's device (default: all on the CPU)."""
        layers = [build_block(family, config, start, end, index, tensors, dtype) for index in range(start, end)]
        return cls.of_blocks(family, config, start, end, layers, parts)

    @classmethod
    def from_checkpoint(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int, checkpoint,
                        dtype: torch.dtype, parts: Sequence[SpanPart] = (),
                        prepare: Callable[[nn.Module, torch.device], nn.Module] | None = None) -> BlockSpan:
        """Build the span reading one block at a time from a swarm.checkpoint.Checkpoint, each block on its part's
        device (default: all on the CPU); `prepare(block, device)` (e.g. a swarm.quantize.quantizer) turns each block
        into what is served before the next is read, so the peak memory is the result plus about one block in
        `dtype`."""
        devices = {p.start + i: p.device for p in parts for i in range(p.end - p.start)}
        layers = []
        for index in range(start, end):
            prefix = family.block_keys_prefix(index)
            tensors = checkpoint.load(lambda key, prefix=prefix: key.startswith(prefix), dtype)
            layer = build_block(family, config, start, end, index, tensors, dtype)
            del tensors  # the layer holds them now (or `prepare` frees them)
            device = devices.get(index, torch.device("cpu"))
            layers.append((prepare(layer, device) if prepare is not None else layer).to(device))
        return cls.of_blocks(family, config, start, end, layers, parts)

    @classmethod
    def of_blocks(cls, family: ModelFamily, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module],
                  parts: Sequence[SpanPart] = ()) -> BlockSpan:
        # The rotary embedding keeps its float32 frequencies, as in transformers' own loading.
        return cls(family, config, start, end, layers, parts).eval().requires_grad_(False)

    def new_cache(self, batch_size: int | None = None, max_length: int | None = None, dtype: torch.dtype | None = None,
                  start: int | None = None, end: int | None = None) -> Cache:
        """A DynamicCache without sizes (it grows by concatenation); with them, a PreallocatedCache of batch_size x
        max_length tokens for blocks [start, end) (all by default), each block's on its device, in `dtype` (by
        default the blocks' floating-point dtype: a quantized block computes in it)."""
        if batch_size is None or max_length is None:
            return DynamicCache(config=self.config)
        first = (self.start if start is None else start) - self.start
        last = (self.end if end is None else end) - self.start
        dtype = dtype or next(p.dtype for p in self.layers.parameters() if p.is_floating_point())
        devices = [self.part_of(self.start + i).device for i in range(len(self.layers))]
        return preallocated_cache(batch_size, max_length, kv_heads(self.config), head_dim(self.config), dtype, devices,
                                  range(first, last))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, start: int | None = None, end: int | None = None,
                prompts: torch.Tensor | None = None, first_token: int = 0) -> torch.Tensor:
        """Run blocks [start, end) of the span (all by default).

        `attention_mask` is the 2-D padding mask over cached + new tokens (1 = attend); `cache` is one
        made by `new_cache()`, indexed by block position within this span. `prompts` (deep prompt tuning),
        [blocks run, batch or 1, P, hidden], is added to the input of each block at the sequence's first P
        tokens; `hidden` starts at token `first_token` of its sequence (the tokens a cache already holds).
        """
        output = hidden
        for output in self.blocks(hidden, position_ids, attention_mask, cache, start, end, prompts, first_token):  # noqa: B007
            pass
        return output

    def blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: Cache | None = None, start: int | None = None, end: int | None = None,
               prompts: torch.Tensor | None = None, first_token: int = 0):
        """forward(), one block per next() (see iter_blocks)."""
        first, last = self._local(start, end)
        hidden, position_ids, attention_mask = to_part((hidden, position_ids, attention_mask), self.parts[0].device)
        masks = self.masks(hidden, position_ids, attention_mask, cache, first, last)
        return (yield from self.iter_blocks(hidden, position_ids, masks, cache, first, last, prompts, first_token))

    def forward_batch(self, items: Sequence[BatchItem], start: int | None = None, end: int | None = None) -> list[torch.Tensor]:
        """Several sessions' steps of one length through blocks [start, end) at once (swarm.models.batched): each
        item's output, as forward(item.hidden, item.position_ids, item.attention_mask, cache=item.cache, ...) would
        give it."""
        first, last = self._local(start, end)
        device = self.parts[0].device
        items = [BatchItem(*to_part((i.hidden, i.position_ids, i.attention_mask), device), i.cache) for i in items]
        masks = [self.masks(i.hidden, i.position_ids, i.attention_mask, i.cache, first, last) for i in items]
        batch = StepBatch(items, masks, self._layer_types)
        hidden = torch.cat([i.hidden for i in items])
        position_ids = torch.cat([i.position_ids for i in items])
        output = self.run_layers(hidden, position_ids, dict.fromkeys(self._layer_types), batch, first, last,
                                 swarm_batch=batch)
        return list(output.split([i.hidden.shape[0] for i in items]))

    def _local(self, start: int | None, end: int | None) -> tuple[int, int]:
        return (self.start if start is None else start) - self.start, (self.end if end is None else end) - self.start

    def masks(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              cache: Cache | None, first: int, last: int) -> dict:
        """The attention mask of each layer type among blocks [first, last) (local numbering), each built for the
        first block of that type (a cache may size them differently), before the step updates the cache."""
        masks = {}
        for local in range(first, last):
            layer_type = self._layer_types[local]
            if layer_type not in masks:
                masks[layer_type] = self._mask_functions[layer_type](
                    config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                    layer_idx=local, **{CACHE_KWARG: cache})
        return masks

    def run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache, first: int, last: int,
                   prompts: torch.Tensor | None = None, first_token: int = 0, **layer_kwargs) -> torch.Tensor:
        output = hidden
        for output in self.iter_blocks(hidden, position_ids, masks, cache, first, last, prompts, first_token, **layer_kwargs):  # noqa: B007
            pass
        return output

    def iter_blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache, first: int, last: int,
                    prompts: torch.Tensor | None = None, first_token: int = 0, **layer_kwargs):
        """Run blocks [first, last) (local numbering) one per next(): each yields the block's output. Whoever drives it
        may send() a tensor to use as the next block's input instead (the same values, detached: one autograd graph
        per block), and holds whatever context a block must run in (LoRA hooks, grad mode) around each next()."""
        part = self.parts[0]  # where the rotary embedding is
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(self.layers[first:last]):
            block = self.start + first + index
            if not part.start <= block < part.end:  # the block is another part's: on to its device
                part = self.part_of(block)
                hidden, masks, position_embeddings, position_ids = to_part((hidden, masks, position_embeddings,
                                                                           position_ids), part.device)
                if isinstance(cache, StepBatch):
                    cache.to(part.device)
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[index], first_token)
            hidden = layer(hidden, attention_mask=masks[self._layer_types[first + index]], position_embeddings=position_embeddings,
                           position_ids=position_ids, use_cache=cache is not None, **{CACHE_KWARG: cache}, **layer_kwargs)
            sent = yield hidden
            if sent is not None:
                hidden = sent


def build_block(family: ModelFamily, config: PretrainedConfig, start: int, end: int, index: int,
                tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """Block `index` of the span [start, end) from checkpoint tensors named as in the full model."""
    prefix = family.block_keys_prefix(index)
    state = family.block_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, config)
    with torch.device("meta"):
        layer = family.decoder_layer_class(span_config(config, start, end, family.attn_implementation), index - start)
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
    head = hidden[:, :overlap] + prompt[:, first_token : first_token + overlap].to(hidden.device, hidden.dtype)
    return torch.cat([head, hidden[:, overlap:]], dim=1)
