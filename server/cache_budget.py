"""Budgets of what peers hold on a server (KV-cache tokens, open sessions, kept activations, requests in flight):
ledgers of holdings per peer, admitted by the fair-share policy (server.fair_share), which says what to end to make
room for a peer that holds less. Ending a holding is its owner's business: each holding comes with a callback."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass

from server.fair_share import Admission, Holding, admit
from swarm.errors import CacheFull, LimitReached, SwarmError

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


class CacheBudget(FairBudget):
    """KV-cache tokens (batch_size * max_length summed over sessions) that sessions may reserve."""

    what = "KV-cache tokens"

    def too_large(self, tokens: int) -> SwarmError:
        return CacheFull(f"a session of {tokens} tokens (batch_size * max_length) exceeds this server's whole KV-cache "
                         f"budget of {self.total}; use a smaller max_length or batch")

    def full(self, tokens: int) -> SwarmError:
        return CacheFull(f"KV cache is full: {self.free} of {self.total} tokens free, {tokens} requested; retry later "
                         "or use another server")


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


class SessionBudget:
    """An inference session holds one of `max_sessions` and batch_size * max_length of `cache_tokens`: admitted
    only if both budgets admit it, ending what either policy says to."""

    def __init__(self, cache_tokens: int, max_sessions: int, clock: Callable[[], float] = time.monotonic):
        self.tokens, self.sessions = CacheBudget(cache_tokens, clock), SessionCount(max_sessions, clock)

    @property
    def free(self) -> int:
        return self.tokens.free

    def acquire(self, peer: str, key: Hashable, tokens: int, on_evict: Evict) -> None:
        count = self.sessions.plan(peer, 1)
        if not count.admitted:
            raise self.sessions.refusal(peer, 1, count)
        cache = self.tokens.plan(peer, tokens, without=count.evict)
        if not cache.admitted:
            raise self.tokens.refusal(peer, tokens, cache)
        evict = list(dict.fromkeys([*count.evict, *cache.evict]))
        for victim in evict:  # ended by the policy that chose it, with that budget's reason
            (self.sessions if victim in count.evict else self.tokens).evict(victim, tokens)
            self.sessions.release(victim)
            self.tokens.release(victim)
        self.sessions.take(peer, key, 1, on_evict)
        self.tokens.take(peer, key, tokens, on_evict)

    def release(self, key: Hashable) -> None:
        self.sessions.release(key)
        self.tokens.release(key)

    def touch(self, key: Hashable) -> None:
        self.sessions.touch(key)
        self.tokens.touch(key)
