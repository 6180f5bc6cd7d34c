"""Budgets of what peers hold on a server (KV-cache bytes, open sessions, kept activations, requests in flight):
ledgers of holdings per peer, admitted by the fair-share policy (server.fair_share), which says what to end to make
room for a peer that holds less. Ending a holding is its owner's business: each holding comes with a callback."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass

from server.fair_share import Admission, Holding, admit
from swarm.errors import CacheFull, LimitReached, SwarmError
from swarm.kv_cache import mib

Evict = Callable[[str], None]  # ends a holding; takes the reason, to give its peer


@dataclass
class _Held:
    amount: int
    last_used: float
    on_evict: Evict | None  # None: it cannot be ended (activations in use)
    pinned: bool = False  # cannot be ended for now (a request running)


class FairBudget:
    """`total` units that peers hold under keys; when short, those over their fair share give way (or are refused)."""

    what = "this budget"  # for messages, e.g. "KV-cache tokens"

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.used, self.clock = total, 0, clock
        self._held: dict[str, OrderedDict[Hashable, _Held]] = {}  # peer -> key -> holding, least recently used first
        self._peer_of: dict[Hashable, str] = {}

    @property
    def free(self) -> int:
        return self.total - self.used

    def held(self, peer: str) -> int:
        return sum(h.amount for h in self._held.get(peer, {}).values())

    def plan(self, peer: str, amount: int, without: Collection[Hashable] = ()) -> Admission:
        """The policy's decision on `peer` taking `amount`, as if the holdings `without` were gone already."""
        if amount > self.total:
            raise self.too_large(amount)
        if amount <= self.free:  # the common case, without building the policy's view
            return Admission(True)
        holdings = {p: [Holding(k, h.amount, h.last_used, h.pinned or h.on_evict is None) for k, h in items.items() if k not in without]
                    for p, items in self._held.items()}
        return admit(self.total, holdings, peer, amount, self.clock())

    def acquire(self, peer: str, key: Hashable, amount: int, on_evict: Evict | None = None) -> None:
        """Hold `amount` under `key` until `release(key)`, ending what the policy says to; a clear error if refused.
        `on_evict`: how to end this holding for another peer (None: it cannot be ended)."""
        decision = self.plan(peer, amount)
        if not decision.admitted:
            raise self.refusal(peer, amount, decision)
        self.take(peer, key, amount, on_evict, decision.evict)

    def take(self, peer: str, key: Hashable, amount: int, on_evict: Evict | None, evict: Collection[Hashable] = ()) -> None:
        """Record an admitted holding after ending `evict` (a plan's)."""
        for victim in evict:
            self.evict(victim, amount)
        self._held.setdefault(peer, OrderedDict())[key] = _Held(amount, self.clock(), on_evict)
        self._peer_of[key] = peer
        self.used += amount

    def evict(self, key: Hashable, wanted: int) -> None:
        peer = self._peer_of.get(key)
        if peer is None:
            return
        holding, held = self._held[peer][key], self.held(peer)
        self.release(key)
        if holding.on_evict is not None:
            holding.on_evict(self.eviction(held, wanted))

    def release(self, key: Hashable) -> None:
        """Give back what `key` holds (again: nothing happens)."""
        peer = self._peer_of.pop(key, None)
        if peer is not None:
            self.used -= self._held[peer].pop(key).amount
            if not self._held[peer]:
                del self._held[peer]

    def touch(self, key: Hashable) -> None:
        """`key` was just used: it goes last in its peer's eviction order."""
        peer = self._peer_of.get(key)
        if peer is not None:
            self._held[peer][key].last_used = self.clock()
            self._held[peer].move_to_end(key)

    def pin(self, key: Hashable) -> None:
        """`key` cannot be ended any more (its request started running)."""
        peer = self._peer_of.get(key)
        if peer is not None:
            self._held[peer][key].pinned = True

    # -- messages ------------------------------------------------------------------------------------------------

    def _fmt(self, amount: float) -> str:
        return f"{amount:.1f}".removesuffix(".0")

    def too_large(self, amount: int) -> SwarmError:
        return CacheFull(f"{self._fmt(amount)} {self.what} exceed this server's whole budget of {self._fmt(self.total)}")

    def full(self, amount: int) -> SwarmError:
        return CacheFull(f"{self.what} are all taken: {self._fmt(self.free)} of {self._fmt(self.total)} free, "
                         f"{self._fmt(amount)} requested; retry later or use another server")

    def refusal(self, peer: str, amount: int, decision: Admission) -> SwarmError:
        if not decision.limited:
            return self.full(amount)
        return LimitReached(f"limit reached for {self.what}: this peer holds {self._fmt(decision.held)} of this "
                            f"server's {self._fmt(self.total)} and asks {self._fmt(amount)} more, over its fair share "
                            f"({self._fmt(decision.share)}: the budget over the {decision.holders} peers holding some) "
                            "while the budget is short; free some (close sessions, wait for replies) or retry later")

    def eviction(self, held: int, wanted: int) -> str:
        return (f"limit reached for {self.what}: ended to make room for another peer, as its peer held "
                f"{self._fmt(held)} of this server's {self._fmt(self.total)}, the most of any peer, while it was short")


class SessionCount(FairBudget):
    what = "open sessions"


class MiBBudget(FairBudget):
    """A budget in bytes, shown in MiB."""

    def _fmt(self, amount: float) -> str:
        return f"{amount / 2**20:.1f} MiB"


class ActivationBudget(MiBBudget):
    """Bytes of activations that training streams may keep between their forward and backward messages."""

    what = "kept training activations"

    def full(self, nbytes: int) -> SwarmError:
        return CacheFull(f"keeping {nbytes / 2**20:.0f} MiB of activations does not fit: "
                         f"{self.free / 2**20:.0f} of {self.total / 2**20:.0f} MiB free")


class InflightBudget(MiBBudget):
    what = "memory for requests waiting for or in compute"

    def too_large(self, nbytes: int) -> SwarmError:
        return CacheFull(f"a request of {self._fmt(nbytes)} exceeds the {self._fmt(self.total)} this server keeps for "
                         "requests waiting for or in compute (--inflight-mb); send smaller requests")


class CacheBudget(MiBBudget):
    """Bytes of KV cache (swarm.kv_cache.session_bytes summed over sessions) that sessions may reserve. `token_bytes`
    is what one token takes in one block, `blocks` the server's span length: messages also say what the bytes
    amount to in tokens of a session over the whole span."""

    what = "KV-cache bytes"

    def __init__(self, total: int, token_bytes: int = 1, blocks: int = 1, clock: Callable[[], float] = time.monotonic):
        super().__init__(total, clock)
        self.token_bytes, self.blocks = token_bytes, blocks

    def tokens(self, nbytes: int) -> int:
        """Tokens (batch_size * max_length) of a session over the whole span that `nbytes` hold."""
        return nbytes // (self.token_bytes * self.blocks)

    def _budget(self) -> str:
        return f"{mib(self.total)} ({self.tokens(self.total)} tokens over its {self.blocks} blocks)"

    def too_large(self, nbytes: int) -> SwarmError:
        return CacheFull(f"a session's KV cache of {mib(nbytes)} (batch_size * max_length tokens in each of its blocks) "
                         f"exceeds this server's whole KV-cache budget of {self._budget()}; use a smaller max_length or "
                         "batch, or give the server a larger --cache-bytes (or --cache-tokens)")

    def full(self, nbytes: int) -> SwarmError:
        return CacheFull(f"KV cache is full: {mib(self.free)} free ({self.tokens(self.free)} tokens) of "
                         f"{self._budget()}, {mib(nbytes)} requested ({self.tokens(nbytes)} tokens); retry later, use "
                         "another server or a smaller max_length or batch (a server takes more with --cache-bytes or "
                         "--cache-tokens)")


class SessionBudget:
    """An inference session holds one of `max_sessions` and the bytes of its KV cache of `cache_bytes` (see
    CacheBudget): admitted only if both budgets admit it, ending what either policy says to."""

    def __init__(self, cache_bytes: int, max_sessions: int, token_bytes: int = 1, blocks: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.cache = CacheBudget(cache_bytes, token_bytes, blocks, clock)
        self.sessions = SessionCount(max_sessions, clock)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # sessions waiting for room

    @property
    def free(self) -> int:
        """Free bytes of KV cache."""
        return self.cache.free

    @property
    def tokens_left(self) -> int:
        """Tokens of a session over the whole span that fit in the free bytes (what records announce)."""
        return self.cache.tokens(self.cache.free)

    def acquire(self, peer: str, key: Hashable, nbytes: int, on_evict: Evict) -> None:
        error, _ = self._admit(peer, key, nbytes, on_evict)
        if error is not None:
            raise error

    async def acquire_waiting(self, peer: str, key: Hashable, nbytes: int, on_evict: Evict, wait: float) -> None:
        """acquire, but a session refused only because the KV cache is full (not over the peer's fair share, nor
        larger than the whole budget) waits up to `wait` seconds for others to release theirs, without blocking the
        event loop; then the same clear error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            woken = asyncio.Event()
            error, waits = self._admit(peer, key, nbytes, on_evict)
            if error is None:
                return
            if not waits or loop.time() >= deadline:
                raise error
            self._waiters.append(waiter := (loop, woken))
            try:
                await asyncio.wait_for(woken.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _admit(self, peer: str, key: Hashable, nbytes: int, on_evict: Evict) -> tuple[SwarmError | None, bool]:
        """Take the holding (None) or why not, and whether waiting for memory may help."""
        count = self.sessions.plan(peer, 1)
        if not count.admitted:
            return self.sessions.refusal(peer, 1, count), False
        cache = self.cache.plan(peer, nbytes, without=count.evict)
        if not cache.admitted:
            return self.cache.refusal(peer, nbytes, cache), not cache.limited
        evict = list(dict.fromkeys([*count.evict, *cache.evict]))
        for victim in evict:  # ended by the policy that chose it, with that budget's reason
            (self.sessions if victim in count.evict else self.cache).evict(victim, nbytes)
            self.sessions.release(victim)
            self.cache.release(victim)
        self.sessions.take(peer, key, 1, on_evict)
        self.cache.take(peer, key, nbytes, on_evict)
        return None, False

    def release(self, key: Hashable) -> None:
        self.sessions.release(key)
        self.cache.release(key)
        waiters, self._waiters = self._waiters, []
        for loop, woken in waiters:  # each tries again (on its own loop: a release may come from another thread)
            loop.call_soon_threadsafe(woken.set)

    def touch(self, key: Hashable) -> None:
        self.sessions.touch(key)
        self.cache.touch(key)
