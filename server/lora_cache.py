"""A bounded, expiring cache of LoRA tensors that clients uploaded, so a backward pass (or a repeated forward) may
name them by digest instead of sending them again.

Entries belong to the peer that uploaded them: a digest from another peer never reaches them. An entry lives
until it is `ttl` seconds unused or the cache needs its bytes for newer uploads (least recently used goes first).
Nothing else about a client is kept between requests.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    names: tuple[str, ...]
    tensors: list[torch.Tensor]
    nbytes: int
    last_used: float


class LoraCache:
    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, peer: str, digest: str, names: list[str], tensors: list[torch.Tensor]) -> bool:
        """Keep validated tensors under (peer, digest); False when they alone exceed the cache's size."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.max_bytes:
            return False
        self._drop((peer, digest))
        self._expire()
        while self._entries and self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[(peer, digest)] = _Entry(tuple(names), list(tensors), nbytes, self.clock())
        self.nbytes += nbytes
        return True

    def get(self, peer: str, digest: str, names: list[str]) -> list[torch.Tensor] | None:
        """The tensors uploaded under (peer, digest) with exactly these names, or None if unknown or expired."""
        self._expire()
        entry = self._entries.get((peer, digest))
        if entry is None or entry.names != tuple(names):
            self.misses += 1
            return None
        entry.last_used = self.clock()
        self._entries.move_to_end((peer, digest))
        self.hits += 1
        return entry.tensors

    def _expire(self) -> None:
        deadline = self.clock() - self.ttl
        for key in [k for k, e in self._entries.items() if e.last_used < deadline]:
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
