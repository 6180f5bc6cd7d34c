"""Fair shares of a server's budgets among the peers that hold them: pure policy (server.holdings keeps the books).

Max-min, by progressive filling. While a budget has room, any peer takes what it asks (the budget is work-conserving).
Once it is short, a request is admitted only at the expense of the peers that hold at least as much as the requester
would after it: the largest holder first, its least recently used holding first. A peer that would end up holding
more than every other holder is refused: it has its share already. Ids cost nothing, so a share per peer id alone
does not stop one member that spreads itself over many ids; what this policy guarantees against that:

- a peer that holds little is admitted before anyone that holds more: taking from the largest holder never leaves
  the requester above it, so 10 ids holding 20 sessions each cannot keep 8 peers from opening one session each;
- against many ids holding as little as the requester wants (200 ids with one session each), ties are broken by
  idleness: a holding of a peer that holds as much as the requester would is taken only once it was idle for
  IDLE_S, so sessions in use (a generation steps every few milliseconds) outlive idle ones, and an abuser keeps its
  ids' holdings only by using them all the time, which costs it compute (shared fairly too: next_peer);
- what it does not guarantee: many ids that each keep a small holding busy shrink every peer's share to the budget
  over the number of ids; only the global caps (the budgets' totals) bound what they cost the server.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

# Seconds a holding must have been unused before a newcomer that would hold as much may take its place: well above
# a generation's step (milliseconds), well below a session's idle timeout (minutes).
IDLE_S = 5.0
# Compute time a peer used counts half after this many seconds: recent use decides whose request runs next.
USAGE_HALF_LIFE_S = 10.0


@dataclass(frozen=True)
class Holding:
    """One thing a peer holds (a session, a cache entry, a request in flight): its key, size and last use."""

    key: Hashable
    amount: int
    last_used: float
    pinned: bool = False  # counts, but cannot be ended (a request running, activations in use)


@dataclass(frozen=True)
class Admission:
    """The decision on a request for `amount` of a budget. `admitted`: with `evict` ended first (in that order).
    Otherwise `limited` says the requester already holds more than its share (a per-peer limit, not a full budget).
    `held` is what the requester holds, `share` the budget over the peers that hold some (the requester included)."""

    admitted: bool
    evict: tuple[Hashable, ...] = ()
    held: int = 0
    share: float = 0.0
    holders: int = 1
    limited: bool = False


def victim(totals: Mapping[str, int], oldest: Mapping[str, float], requester: str, after: int, now: float,
           idle_s: float = IDLE_S) -> str | None:
    """The peer to take a holding from so that `requester` may hold `after`: the largest other holder, if it holds
    more than `after`, or exactly as much with its least recently used holding idle for `idle_s`; among equals, the
    one whose oldest holding is oldest. None when no peer may be taken from."""
    best, best_rank = None, None
    for peer, total in totals.items():
        if peer == requester or total <= 0 or total < after:
            continue
        if total == after and now - oldest[peer] < idle_s:
            continue
        rank = (total, -oldest[peer])
        if best_rank is None or rank > best_rank:
            best, best_rank = peer, rank
    return best


def admit(total: int, holdings: Mapping[str, Sequence[Holding]], requester: str, amount: int, now: float,
          idle_s: float = IDLE_S) -> Admission:
    """Whether `requester` may take `amount` more of a budget of `total`, given every peer's holdings (each peer's
    least recently used first), and what to end for it (never a pinned holding). `amount` must not exceed `total`
    (callers say so)."""
    totals = {peer: sum(h.amount for h in held) for peer, held in holdings.items()}
    mine = totals.get(requester, 0)
    holders = len({peer for peer, held in totals.items() if held > 0} | {requester})
    share = total / holders
    free = total - sum(totals.values())
    if amount <= free:
        return Admission(True, held=mine, share=share, holders=holders)
    refused = Admission(False, held=mine, share=share, holders=holders,
                        limited=mine > 0 and holders > 1 and mine + amount > share)
    queues = {peer: [h for h in held if not h.pinned] for peer, held in holdings.items() if peer != requester}
    need, evict = amount - free, []
    while need > 0:
        oldest = {peer: queue[0].last_used for peer, queue in queues.items() if queue}
        peer = victim({p: totals[p] for p in oldest}, oldest, requester, mine + amount, now, idle_s)
        if peer is None:
            return refused
        holding = queues[peer].pop(0)
        totals[peer] -= holding.amount
        need -= holding.amount
        evict.append(holding.key)
    return Admission(True, tuple(evict), held=mine, share=share, holders=holders)


def decayed(usage: float, elapsed: float, half_life: float = USAGE_HALF_LIFE_S) -> float:
    """Compute seconds used, `elapsed` seconds later: recent use counts, old use fades."""
    return usage * 0.5 ** (max(elapsed, 0.0) / half_life)


def next_peer(waiting: Mapping[str, float], usage: Mapping[str, float]) -> str:
    """Whose request the compute thread runs next: of the peers with requests waiting (peer -> when its first one
    came), the one that used the least compute recently; among equals, the one waiting longest."""
    return min(waiting, key=lambda peer: (usage.get(peer, 0.0), waiting[peer]))
