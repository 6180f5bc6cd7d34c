"""A store of values bounded in bytes, the least recently used going first, whose entries expire unused."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class BoundedStore:
    """Values by key, at most `max_bytes` in all (least recently used first out), each gone after `ttl` s unused."""

    def __init__(self, max_bytes: int, ttl: float = math.inf, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._items: OrderedDict[Hashable, tuple[Any, int, float]] = OrderedDict()  # value, bytes, last used
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
        return value

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep `value` of `nbytes` under `key` (replacing what was there); False when it alone exceeds the bound."""
        self.drop(key)
        if nbytes > self.max_bytes:
            return False
        self._expire()
        while self.bytes + nbytes > self.max_bytes:
            self.drop(next(iter(self._items)))
            self.evicted += 1
        self._items[key] = (value, nbytes, self.clock())
        self.bytes += nbytes
        return True

    def drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]

    def _expire(self) -> None:
        deadline = self.clock() - self.ttl
        while self._items and next(iter(self._items.values()))[2] < deadline:  # in order of last use
            self.drop(next(iter(self._items)))
