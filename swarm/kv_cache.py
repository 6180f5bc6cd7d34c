"""KV-cache geometry: what one cached token costs a block, and a server's cache budget in bytes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # swarm.config imports this module: keep transformers out of `swarm status`
    import torch
    from transformers import PretrainedConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '1073741824', '512MiB', '2 GiB', '1.5GB' (binary units KiB/MiB/GiB, decimal KB/MB/GB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r}; give bytes, or a number with KiB, MiB, GiB (or KB, MB, GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes one token of one sequence takes in one block's KV cache: its keys and values over all KV heads."""
    return 2 * kv_heads(config) * head_dim(config) * dtype.itemsize


def cache_budget_bytes(cache_bytes: int | None, cache_tokens: int, config: PretrainedConfig, dtype: torch.dtype,
                       num_blocks: int) -> int:
    """A server's KV-cache budget in bytes: `cache_bytes` if given, else `cache_tokens` tokens in each of its
    `num_blocks` blocks."""
    if cache_bytes is not None:
        return cache_bytes
    return cache_tokens * num_blocks * kv_bytes_per_token(config, dtype)


def session_bytes(batch_size: int, max_length: int, num_blocks: int, token_bytes: int) -> int:
    """What a session's preallocated cache takes: batch_size * max_length tokens in each of its `num_blocks` blocks,
    `token_bytes` (kv_bytes_per_token) each."""
    return batch_size * max_length * num_blocks * token_bytes


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
