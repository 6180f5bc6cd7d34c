"""A KV cache allocated once for a session's whole max_length, on each block's own device.

transformers' DynamicCache concatenates every step (a copy of the whole cache per decode step, and memory that
grows by reallocation); StaticCache preallocates but attends over all max_length positions, masked, which makes a
short context in a long session as slow as a full one. This cache writes each step's keys and values in place and
hands attention the filled prefix only, as strided views of the buffers (bench/kv_cache.py on SmolLM2, on a CPU,
three runs: the step takes 0.94-0.95x the DynamicCache's time at 128 tokens and 0.86-0.89x at 1,024; contiguous copies
of the prefix, `contiguous = True`, took 0.98-0.99x and 0.94-0.97x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One block's keys and values, [batch, kv_heads, max_length, head_dim] each, filled from position 0."""

    is_sliding = False
    is_croppable = True
    supports_early_init = False  # allocated at construction: nothing to initialise from the first update

    def __init__(self, batch_size: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch_size, kv_heads, max_length, head_dim)
        self.buffers = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        self.device, self.max_length, self.length = torch.device(device), max_length, 0
        self.batch_size = batch_size
        self.contiguous = False  # attention gets views of the filled prefix (True: copies of it; bench/kv_cache.py)
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (b[:, :, : self.length] for b in self.buffers)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated in __init__

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self.length + new > self.max_length:
            raise ValueError(f"the cache holds {self.length} of {self.max_length} tokens; {new} more do not fit")
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[:, :, self.length : self.length + new].copy_(states)
        self.length += new
        self._views()
        if self.contiguous:
            return self.keys.contiguous(), self.values.contiguous()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # the mask covers the filled prefix and the new tokens, as returned

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def reset(self) -> None:
        self.length = 0
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (a negative count, as transformers' layers take it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows follow `beam_idx` (beam search), in the same buffers: only the filled prefix is copied."""
        if self.length:
            rows = beam_idx.to(self.device)
            for view in (self.keys, self.values):
                view.copy_(view.index_select(0, rows))

    def offload(self):
        raise NotImplementedError("a preallocated cache stays on its block's device")


class PreallocatedCache(Cache):
    """A span's cache: one PreallocatedLayer for each block in `blocks` (positions within the span), an empty one of
    no tokens for the others (a session may run only some of the span's blocks)."""

    def __init__(self, layers: Sequence[PreallocatedLayer], first: int):
        super().__init__(layers=list(layers))
        self.first = first  # a block the session runs: what get_seq_length() without a block answers for

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.layers for b in layer.buffers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx if self.layers[layer_idx].max_length else self.first].get_seq_length()

    def lengths(self) -> list[int]:
        """How many tokens each block holds: what restore() goes back to."""
        return [layer.length for layer in self.layers]

    def restore(self, lengths: Sequence[int]) -> None:
        """Forget what a step wrote after lengths() (a batch that failed part-way, to be run again session by
        session)."""
        for layer, length in zip(self.layers, lengths, strict=True):
            layer.length = length
            layer._views()


def preallocated_cache(batch_size: int, max_length: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       devices: Sequence[torch.device], blocks: range) -> PreallocatedCache:
    """A cache for len(devices) blocks, block i on devices[i]; those outside `blocks` hold nothing."""
    layers = [PreallocatedLayer(batch_size, kv_heads, max_length if i in blocks else 0, head_dim, dtype, device)
              for i, device in enumerate(devices)]
    return PreallocatedCache(layers, blocks.start)
