"""Several inference sessions' steps through a span as one batch (iteration-level batching, as in Orca and vLLM).

The hidden states of every session are stacked, so each linear layer runs once for all of them (its weights are read
once per step instead of once per session); attention runs per session, against that session's own cache and with its
own mask, through the very function it would use alone. Blocks reach the per-session attention through transformers'
attention interface: each block's attention module is given BATCHED as its implementation (in a config of its own),
which calls the block's original kernel, once for a lone step or once per session of a batch."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

BATCHED = "swarm_batched"


def original_attention(attention: nn.Module) -> Callable:
    """The attention function an attention module runs as configured (eager: the one its modeling file defines)."""
    implementation = attention.config._attn_implementation
    if implementation in (None, "eager"):
        return sys.modules[type(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def make_batchable(layer: nn.Module) -> None:
    """Route the block's attention through BATCHED (idempotent); the block computes exactly as before when alone."""
    attention = layer.self_attn
    if attention.config._attn_implementation == BATCHED:
        return
    attention.swarm_attention = original_attention(attention)
    config = copy.copy(attention.config)  # its own: the block's config may be shared (a model's, in tests)
    config._attn_implementation = BATCHED
    attention.config = config


def batched_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *args, swarm_batch: StepBatch | None = None, **kwargs):
    inner = module.swarm_attention
    if swarm_batch is None:
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    outputs = [inner(module, query[rows], keys, values, mask, *args, **kwargs)[0]
               for rows, keys, values, mask in swarm_batch.attention_inputs(module.layer_idx)]
    return torch.cat(outputs, dim=0), None


AttentionInterface.register(BATCHED, batched_attention)


def row_slices(sizes: Sequence[int]) -> list[slice]:
    """Where each of several sessions' rows lie in their stacked batch."""
    slices, first = [], 0
    for size in sizes:
        slices.append(slice(first, first + size))
        first += size
    return slices


@dataclass
class BatchItem:
    """One session's step: its new tokens, their positions, its 2-D padding mask over cached + new tokens, its cache."""

    hidden: torch.Tensor  # [rows, length, hidden]
    position_ids: torch.Tensor  # [rows, length]
    attention_mask: torch.Tensor  # [rows, cached + length]
    cache: object  # a swarm.models.preallocated.PreallocatedCache


class StepBatch:
    """What the blocks' `cache` argument is during a batched step: each block's keys and values go to their sessions'
    caches (split by rows); its attention then reads, per session, that session's cache and masks."""

    def __init__(self, items: Sequence[BatchItem], masks: list[dict], layer_types: Sequence):
        self.caches = [item.cache for item in items]
        self.masks, self.layer_types = masks, layer_types  # masks: per item, by layer type
        self.rows = row_slices([item.hidden.shape[0] for item in items])
        self._filled: dict[int, list] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._filled[layer_idx] = [cache.update(key_states[rows], value_states[rows], layer_idx)
                                   for rows, cache in zip(self.rows, self.caches, strict=True)]
        return key_states, value_states  # unused: batched_attention reads each session's own

    def attention_inputs(self, layer_idx: int):
        layer_type = self.layer_types[layer_idx]
        for rows, (keys, values), masks in zip(self.rows, self._filled.pop(layer_idx), self.masks, strict=True):
            yield rows, keys, values, masks[layer_type]

    def to(self, device: torch.device) -> None:
        """Masks follow the hidden states to another part's device (a span held by several devices)."""
        from swarm.models.span import to_part

        self.masks = [to_part((masks,), device)[0] for masks in self.masks]
