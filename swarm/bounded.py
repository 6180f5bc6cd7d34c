"""A store of values bounded in bytes, the least recently used going first, whose entries expire unused.

With `owner` (which peer a key belongs to), room is made fairly: an entry of the owner that holds the most goes first,
and only if it holds at least as much as the one storing would after the put; else the one storing gives up its own
least recently used entries (a peer that floods the store churns its own entries, not others')."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

# The policy is the servers' (server.fair_share.victim); swarm/ may not import server/, so it is passed in: see
# server.lora_cache. Without it, or without `owner`, the store is plain least-recently-used.
Victim = Callable[[dict, dict, Hashable, int, float], Hashable | None]


class BoundedStore:
    """Values by key, at most `max_bytes` in all (least recently used first out), each gone after `ttl` s unused."""

    def __init__(self, max_bytes: int, ttl: float = math.inf, clock: Callable[[], float] = time.monotonic,
                 owner: Callable[[Hashable], Hashable] | None = None, victim: Victim | None = None):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self.owner = owner if owner is not None and victim is not None else (lambda key: None)
        self.victim = victim
        self._items: OrderedDict[Hashable, tuple[Any, int, float]] = OrderedDict()  # value, bytes, last used
        self._owned: dict[Hashable, OrderedDict[Hashable, None]] = {}  # owner -> its keys, least recently used first
        self._owner_bytes: dict[Hashable, int] = {}
        self.bytes = 0
        self.evicted = 0  # entries dropped to make room

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        """The value under `key` (now the most recently used), or None."""
        self._expire()
        if key not in self._items:
            return None
        value, nbytes, _ = self._items.pop(key)
        self._items[key] = (value, nbytes, self.clock())
        self._owned[self.owner(key)].move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep `value` of `nbytes` under `key` (replacing what was there); False when it alone exceeds the bound (or,
        with owners, when making room would take from owners that hold less)."""
        self.drop(key)
        if nbytes > self.max_bytes:
            return False
        self._expire()
        owner = self.owner(key)
        while self.bytes + nbytes > self.max_bytes:
            victim = self._to_evict(owner, nbytes)
            if victim is None:
                return False
            self.drop(victim)
            self.evicted += 1
        self._items[key] = (value, nbytes, self.clock())
        self._owned.setdefault(owner, OrderedDict())[key] = None
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + nbytes
        self.bytes += nbytes
        return True

    def _to_evict(self, owner: Hashable, nbytes: int) -> Hashable | None:
        """The key to drop to make room for `nbytes` of `owner`: the victim's least recently used, else its own; None
        when every other owner holds less than `owner` would (then the put is refused)."""
        if self.victim is not None and len(self._owned) > 1:
            oldest = {o: self._items[next(iter(keys))][2] for o, keys in self._owned.items()}
            chosen = self.victim(self._owner_bytes, oldest, owner, self._owner_bytes.get(owner, 0) + nbytes, self.clock())
            if chosen is not None:
                return next(iter(self._owned[chosen]))
        return next(iter(self._owned[owner])) if owner in self._owned else None

    def drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
            owner = self.owner(key)
            del self._owned[owner][key]
            self._owner_bytes[owner] -= item[1]
            if not self._owned[owner]:
                del self._owned[owner], self._owner_bytes[owner]

    def _expire(self) -> None:
        deadline = self.clock() - self.ttl
        while self._items and next(iter(self._items.values()))[2] < deadline:  # in order of last use
            self.drop(next(iter(self._items)))
