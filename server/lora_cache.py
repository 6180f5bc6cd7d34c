"""A bounded, expiring cache of LoRA tensors that clients uploaded, so a backward pass (or a repeated forward) may
name them by digest instead of sending them again.

Entries belong to the peer that uploaded them: a digest from another peer never reaches them. An entry lives
until it is `ttl` seconds unused or the cache needs its bytes for newer uploads (least recently used goes first).
When the cache is full, room is made fairly among peers (swarm.bounded with server.fair_share.victim): a peer
that floods uploads evicts its own entries, not those of a peer that holds less. Nothing else about a client is
kept between requests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from server.fair_share import victim
from swarm.bounded import BoundedStore

# Which peer a key of the server's stores (LoRA tensors, delta references) belongs to: its first part. Entries are
# not in use between requests, so equal holders may take each other's (no idle wait).
PEER_OF_KEY = dict(owner=lambda key: key[0], victim=functools.partial(victim, idle_s=0.0))


class LoraCache:
    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        # Keyed by the names too: a digest covers them (swarm.lora.digest), and a lookup under other names misses.
        self._store = BoundedStore(max_bytes, ttl, clock, **PEER_OF_KEY)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._store.bytes

    @property
    def evictions(self) -> int:
        return self._store.evicted

    def put(self, peer: str, digest: str, names: list[str], tensors: list[torch.Tensor]) -> bool:
        """Keep validated tensors under (peer, digest); False when they alone exceed the cache's size."""
        return self._store.put((peer, digest, tuple(names)), list(tensors), sum(t.numel() * t.element_size() for t in tensors))

    def get(self, peer: str, digest: str, names: list[str]) -> list[torch.Tensor] | None:
        """The tensors uploaded under (peer, digest) with exactly these names, or None if unknown or expired."""
        tensors = self._store.get((peer, digest, tuple(names)))
        if tensors is None:
            self.misses += 1
        else:
            self.hits += 1
        return tensors
