"""Model identity: digests of the model a peer loaded, which servers announce and clients compare with their own.

What it protects against: an honest mistake, a server that loaded other weights or another config under the same
model name (another fine-tune, a changed block, an edited config.json) and that the swarm would otherwise use without
question. What it does not: a dishonest server, which can announce the right digests and compute with anything else
(catching that takes spot checks of results, a later issue). Nor does it prove every byte: a tensor's fingerprint is its
name, dtype and shape and a deterministic sample of its stored values, so that a client of a 70B model, which holds
only the embeddings and the head, checks a server's blocks by reading a few KB of each from its own checkpoint; another
fine-tune or a re-initialized tensor changes nearly every value, hence the sample.

The digests are of the checkpoint as stored: the dtype a peer computes in, the folder's name and the sharding do not
count; a checkpoint saved again in another dtype does (its stored bytes differ), as does any change to the config
except to fields that do not change the model (IGNORED_CONFIG_FIELDS).

Quantized blocks (`--quant`, swarm.quantize) are the same model computed approximately, as another dtype is: a
quantized server loaded the same checkpoint and announces the same digests, so routing and compatibility treat it as
any other server of the model; its record's `quant` field is what spot checks read to allow for its rounding
(client.spot_checks.QUANT_ERROR) when they compare its outputs with other replicas'.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

SAMPLE_WINDOWS = 8  # runs of values read per tensor
WINDOW_VALUES = 16  # values per run, along the tensor's last dimension
DIGEST_HEX = 32  # announced digests are this many hex digits (128 bits)

# Provenance and runtime switches: they say where a config came from or how it is run, not what the model computes.
IGNORED_CONFIG_FIELDS = frozenset({
    "name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "attn_implementation",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})


def config_digest(config: PretrainedConfig | Mapping[str, Any]) -> str:
    """Digest of a model config's canonical JSON: the fields that differ from the config class's defaults (so a
    config saved by another transformers release, which writes more defaults out, digests the same), less
    IGNORED_CONFIG_FIELDS and private ("_...") ones."""
    values = config.to_diff_dict() if isinstance(config, PretrainedConfig) else dict(config)
    canonical = json.dumps(_model_fields(values), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_HEX]


def _model_fields(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _model_fields(v) for k, v in value.items()
                if k not in IGNORED_CONFIG_FIELDS and not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_model_fields(v) for v in value]
    return value


def sample_windows(name: str, shape: Sequence[int], count: int = SAMPLE_WINDOWS,
                   width: int = WINDOW_VALUES) -> list[tuple[slice, ...]]:
    """Where a tensor's fingerprint reads its values: `count` runs of up to `width` values along the last dimension,
    the first at the tensor's first value, the others at positions drawn from its name and shape (the same on every
    peer, so both sides read the same values; nothing secret, since this is against mistakes)."""
    shape = [int(d) for d in shape]
    if not shape:
        return [()]  # a scalar: its one value
    if 0 in shape:
        return []
    width = min(width, shape[-1])
    windows = []
    for k in range(count):
        raw = hashlib.shake_256(f"{name}:{shape}:{k}".encode()).digest(8 * len(shape))
        numbers = [int.from_bytes(raw[8 * i : 8 * i + 8], "little") if k else 0 for i in range(len(shape))]
        lead = tuple(slice(n % d, n % d + 1) for n, d in zip(numbers, shape[:-1], strict=False))
        begin = numbers[-1] % (shape[-1] - width + 1)
        windows.append((*lead, slice(begin, begin + width)))
    return windows


def weights_digest(slices: Mapping[str, Any]) -> str:
    """Digest of tensors given as safetensors slices by name (safe_open(...).get_slice(name), or anything with
    get_shape(), get_dtype() and indexing by a tuple of slices into a torch tensor of the stored dtype): each one's
    name, dtype, shape and the stored bytes of its sample_windows, read without loading the rest."""
    digest = hashlib.sha256()
    for name in sorted(slices):
        tensor = slices[name]
        shape, dtype = [int(d) for d in tensor.get_shape()], str(tensor.get_dtype())
        digest.update(json.dumps([name, dtype, shape]).encode())
        for window in sample_windows(name, shape):
            digest.update(_stored_bytes(tensor[window]))
    return digest.hexdigest()[:DIGEST_HEX]


def _stored_bytes(values) -> bytes:
    import torch

    return values.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def span_digest(block_digests: Sequence[str]) -> str:
    """Digest of a span's weights from its blocks' (each block's names carry its index, so spans do not collide)."""
    return hashlib.sha256(",".join(block_digests).encode()).hexdigest()[:DIGEST_HEX]


class ModelIdentity:
    """The digests a peer's own checkpoint gives: the config's at once, each block's weights when first asked
    (swarm.checkpoint.Checkpoint reads a few KB of it), then cached. Thread-safe."""

    def __init__(self, checkpoint, family):
        self.checkpoint, self.family = checkpoint, family
        self.config = config_digest(checkpoint.config)
        self._blocks: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def block(self, index: int) -> str | None:
        """The weights digest of one block; None when its files are not on this machine (a hub checkpoint whose
        shards of that block were never downloaded: a client does not fetch gigabytes to check a server)."""
        with self._lock:
            if index not in self._blocks:
                self._blocks[index] = self._read_block(index)
            return self._blocks[index]

    def span(self, start: int, end: int) -> str | None:
        blocks = [self.block(i) for i in range(start, end)]
        return None if None in blocks else span_digest(blocks)

    def _read_block(self, index: int) -> str | None:
        from safetensors import safe_open

        prefix = self.family.block_keys_prefix(index)
        by_file: dict[str, list[str]] = {}
        for key, filename in self.checkpoint.weight_map.items():
            if key.startswith(prefix):
                by_file.setdefault(filename, []).append(key)
        paths = {filename: self.checkpoint.local_file(filename) for filename in by_file}
        if not by_file or None in paths.values():
            logger.info("cannot digest block %d of %s: %s", index, self.checkpoint.model,
                        "its files are not on this machine" if by_file else "the checkpoint has no tensors for it")
            return None
        with contextlib.ExitStack() as files:
            slices = {}
            for filename, keys in by_file.items():
                opened = files.enter_context(safe_open(str(paths[filename]), framework="pt"))
                slices.update({key: opened.get_slice(key) for key in keys})
            return weights_digest(slices)
