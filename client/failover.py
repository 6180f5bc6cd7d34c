"""One failover policy for every remote call of a client: training forwards and backwards, opening an inference
session and moving one of its spans. `decide` is a pure function of what was tried; `with_failover` is the only
loop that acts on it (ban or refresh the swarm view off the client's loop, route around a full server, try again,
or give up saying what was tried)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from client.routing import NoRouteError
from swarm.errors import RemoteError

if TYPE_CHECKING:
    from client.connection import SwarmConnection

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Attempt:
    """One failed try: the server, the error's code and message, and whether it failed while a session opened."""

    peer: str
    code: str
    message: str
    opening: bool = False

    @classmethod
    def of(cls, error: RemoteError) -> Attempt:
        return cls(str(error.peer or "?"), error.code, error.message, error.opening)


@dataclass(frozen=True)
class Decision:
    """What to do after a failure. `retry`: try again elsewhere. `ban`: the server went silent, keep it out of
    routes for a while. `refresh`: it said it is leaving or moved (its DHT record says so too), so read the swarm
    again instead of banning it. `give_up`: the final error's message (empty: the error is the server's answer to
    this request, raise it as it is)."""

    retry: bool
    ban: bool = False
    refresh: bool = False
    give_up: str = ""
    # `full`: it answered that it has no room for this peer now; left out of this loop's later routes and, while
    # others serve its blocks, of this client's routes for a while (ClientConfig.full_backoff_s). `code`: the final
    # error's.
    full: bool = False
    code: str = "transport"


def _full(attempt: Attempt) -> bool:
    return attempt.code in RemoteError.SERVER_FULL


def full_servers(tried: Sequence[Attempt]) -> frozenset[str]:
    """The servers that answered, during this loop, that they have no room: a replacement route leaves them out."""
    return frozenset(a.peer for a in tried if _full(a))


def describe(tried: Sequence[Attempt]) -> str:
    # A full server's message is given whole: it names the budget, what this peer holds there and its share.
    return "; ".join(f"{a.peer[-8:]} ({a.message[:600] if _full(a) else a.message[:120]})" for a in tried)


def gave_up(tried: Sequence[Attempt], what: str, no_route: str = "") -> tuple[str, str]:
    """(code, message) of the final error once the tries end (`no_route`: why no further route exists). If servers
    refused as full, it says the swarm is full and what to do, with the code of the last such refusal."""
    full = [a for a in tried if _full(a)]
    if not full:
        return "transport", f"{what}; tried: {describe(tried)}" + (f"; a new route ({no_route})" if no_route else "")
    return full[-1].code, (f"{what}: no server of these blocks has room for it now, the swarm is full (tried: "
                           f"{describe(tried)}). Retry later, or run a server for these blocks to add capacity")


def counted(tried: Sequence[Attempt]) -> int:
    """Failures that use up retries. A server that fails as a session opens, the first time, does not: a crashed
    server's record stays in the DHT for a while, and under churn there are more of those than retries. It is
    banned, so each such server is passed over once and the count still bounds the loop. Nor does a server's first
    answer that it is full: the loop leaves it out from then on, so that one full replica after another does not
    end the tries while another still has room."""
    seen: set[str] = set()
    count = 0
    for attempt in tried:
        if not ((attempt.opening or _full(attempt)) and attempt.peer not in seen):
            count += 1
        seen.add(attempt.peer)
    return count


def decide(tried: Sequence[Attempt], max_retries: int, what: str) -> Decision:
    """The policy, given every failure so far (newest last); `what` begins the final error ("blocks 0:4 failed")."""
    last = tried[-1]
    full = _full(last)
    if not (full or last.code in RemoteError.SERVER_GONE):  # a refusal (bad input): retrying elsewhere won't help
        return Decision(retry=False)
    moved, exhausted = last.code in RemoteError.SERVER_MOVED, counted(tried) > max_retries
    code, give_up = gave_up(tried, what) if exhausted else ("transport", "")
    return Decision(not exhausted, ban=not (moved or full), refresh=moved, give_up=give_up, full=full, code=code)


async def with_failover(connection: SwarmConnection, what: str, attempt: Callable[[int], Awaitable[T]],
                        max_retries: int, tried: list[Attempt] | None = None) -> T:
    """`await attempt(n)` for n = 0, 1, ... until it succeeds or the policy gives up. `attempt` plans its own
    route (n > 0: a replacement, leaving out what failed, and `full_servers(tried)` when the caller passes its own
    `tried`); a NoRouteError after a failure ends the tries with one error that names every server tried and why
    there is no other (or, if servers refused as full, that the swarm is full)."""
    tried = [] if tried is None else tried
    for number in itertools.count():
        try:
            return await attempt(number)
        except NoRouteError as exc:
            if not tried:
                raise
            raise RemoteError(*gave_up(tried, what, str(exc))) from None
        except RemoteError as exc:
            tried.append(Attempt.of(exc))
            decision = decide(tried, max_retries, what)
            if decision.full:
                connection.mark_full(exc.peer)
            elif decision.ban or decision.refresh:
                await connection.afailed(exc.peer, refresh=decision.refresh)
            if decision.give_up:
                raise RemoteError(decision.code, decision.give_up) from None
            if not decision.retry:
                raise
            logger.info("%s: %s failed ([%s] %s); trying another server", what, str(exc.peer)[-8:], exc.code,
                        exc.message[:120])
