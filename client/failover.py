"""One failover policy for every remote call of a client: training forwards and backwards, opening an inference
session and moving one of its spans. `decide` is a pure function of what was tried; `with_failover` is the only
loop that acts on it (ban or refresh the swarm view off the client's loop, try again, or give up saying what was
tried)."""

from __future__ import annotations

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


def describe(tried: Sequence[Attempt]) -> str:
    return "; ".join(f"{a.peer[-8:]} ({a.message[:120]})" for a in tried)


def counted(tried: Sequence[Attempt]) -> int:
    """Failures that use up retries. A server that fails as a session opens, the first time, does not: a crashed
    server's record stays in the DHT for a while, and under churn there are more of those than retries. It is
    banned, so each such server is passed over once and the count still bounds the loop."""
    seen: set[str] = set()
    count = 0
    for attempt in tried:
        if not (attempt.opening and attempt.peer not in seen):
            count += 1
        seen.add(attempt.peer)
    return count


def decide(tried: Sequence[Attempt], max_retries: int, what: str) -> Decision:
    """The policy, given every failure so far (newest last); `what` begins the final error ("blocks 0:4 failed")."""
    last = tried[-1]
    if last.code not in RemoteError.SERVER_GONE:  # a refusal (bad input, a full cache): retrying elsewhere won't help
        return Decision(retry=False)
    moved, exhausted = last.code in RemoteError.SERVER_MOVED, counted(tried) > max_retries
    give_up = f"{what}; tried: {describe(tried)}" if exhausted else ""
    return Decision(not exhausted, ban=not moved, refresh=moved, give_up=give_up)


async def with_failover(connection: SwarmConnection, what: str, attempt: Callable[[int], Awaitable[T]],
                        max_retries: int, tried: list[Attempt] | None = None) -> T:
    """`await attempt(n)` for n = 0, 1, ... until it succeeds or the policy gives up. `attempt` plans its own
    route (n > 0: a replacement, leaving out what failed); a NoRouteError after a failure ends the tries with one
    error that names every server tried and why there is no other."""
    tried = [] if tried is None else tried
    number = 0
    while True:
        try:
            return await attempt(number)
        except NoRouteError as exc:
            if not tried:
                raise
            raise RemoteError("transport", f"{what}; tried: {describe(tried)}; a new route ({exc})") from None
        except RemoteError as exc:
            tried.append(Attempt.of(exc))
            decision = decide(tried, max_retries, what)
            if decision.ban or decision.refresh:
                await connection.afailed(exc.peer, refresh=decision.refresh)
            if decision.give_up:
                raise RemoteError("transport", decision.give_up) from None
            if not decision.retry:
                raise
            logger.info("%s: %s failed ([%s] %s); trying another server", what, str(exc.peer)[-8:], exc.code,
                        exc.message[:120])
        number += 1
