"""The client's one failover policy (client.failover), as a table, and its loop against a fake swarm."""

from __future__ import annotations

import pytest

from client import aio
from client.failover import Attempt, decide, full_servers, with_failover
from client.routing import NoRouteError
from swarm.errors import RemoteError

GONE = Attempt("peer-aaaaaaaa", "transport", "P2PDaemonError: connection refused")
LEAVING = Attempt("peer-bbbbbbbb", "server_leaving", "this server is leaving the swarm")
MOVED = Attempt("peer-cccccccc", "blocks_not_served", "this server serves blocks 3:6")
REFUSED = Attempt("peer-dddddddd", "bad_request", "hidden states have 32 features, the model has 64")
STALE = [Attempt(f"stale-{i}", "transport", "connection refused", opening=True) for i in range(5)]


@pytest.mark.parametrize(("tried", "retry", "ban", "refresh", "gives_up"), [
    ([GONE], True, True, False, False),  # transport error: banned, another server tried
    ([LEAVING], True, False, True, False),  # leaving: it said so (its record too), so refresh instead of a ban
    ([MOVED], True, False, True, False),  # moved to other blocks: its new blocks stay usable
    ([REFUSED], False, False, False, False),  # a bad request is the server's answer: no retry, raised as it is
    ([GONE, LEAVING, MOVED, GONE], False, True, False, True),  # 4 failures, 3 retries: give up
    ([GONE, GONE, GONE], True, True, False, False),  # 3 failures: one retry left
    # Servers that fail as a session opens (records of crashed servers) are each passed over once, for free...
    ([*STALE, GONE, GONE, GONE], True, True, False, False),
    # ...but the same one failing again counts.
    ([GONE, GONE, GONE, STALE[0], STALE[0]], False, True, False, True),
], ids=["transport", "leaving", "moved", "bad-request", "exhausted", "retry-left", "stale-records-free", "stale-twice"])
def test_failover_policy(tried, retry, ban, refresh, gives_up):
    decision = decide(tried, 3, "blocks 0:2 failed")
    assert (decision.retry, decision.ban, decision.refresh, bool(decision.give_up)) == (retry, ban, refresh, gives_up)
    if gives_up:
        assert decision.give_up.startswith("blocks 0:2 failed; tried: ")
        for attempt in tried:  # each server tried, and why
            assert f"{attempt.peer[-8:]} ({attempt.message})" in decision.give_up


class FakeConnection:
    def __init__(self):
        self.actions: list[tuple[str, str]] = []

    async def afailed(self, peer_id, refresh: bool = False) -> None:
        self.actions.append(("refresh" if refresh else "ban", str(peer_id)))


def test_the_loop_retries_then_reports_every_server_tried():
    connection = FakeConnection()
    errors = [RemoteError("transport", "connection reset", "one"),
              RemoteError("server_leaving", "shutting down", "two"),
              RemoteError("blocks_not_served", "moved to 3:6", "three"),
              RemoteError("transport", "timed out", "four")]

    async def attempt(number: int):
        raise errors[number]

    with pytest.raises(RemoteError) as caught:
        aio.run(with_failover(connection, "blocks 2:4 failed", attempt, max_retries=3))
    assert caught.value.message == ("blocks 2:4 failed; tried: one (connection reset); two (shutting down); "
                                    "three (moved to 3:6); four (timed out)")
    assert connection.actions == [("ban", "one"), ("refresh", "two"), ("refresh", "three"),
                                  ("ban", "four")]


def test_a_refusal_is_raised_as_it_is_and_nothing_is_banned():
    connection = FakeConnection()
    refusal = RemoteError("bad_request", "batch size 99 exceeds this server's limit of 64", "one")

    async def attempt(number: int):
        raise refusal

    with pytest.raises(RemoteError) as caught:
        aio.run(with_failover(connection, "blocks 0:2 failed", attempt, max_retries=3))
    assert caught.value is refusal and connection.actions == []


def test_no_route_after_a_failure_ends_the_tries_with_what_was_tried():
    connection = FakeConnection()

    async def attempt(number: int):
        if number == 0:
            raise RemoteError("transport", "connection refused", "one")
        raise NoRouteError("no online server hosts block 2")

    with pytest.raises(RemoteError, match=r"^blocks 2:4 failed; tried: one \(connection refused\); "
                                          r"a new route \(no online server hosts block 2\)"):
        aio.run(with_failover(connection, "blocks 2:4 failed", attempt, max_retries=3))
    with pytest.raises(NoRouteError):  # with nothing tried yet, there is nothing to add to it
        aio.run(with_failover(connection, "blocks 2:4 failed", attempt=lambda n: _no_route(), max_retries=3))


async def _no_route():
    raise NoRouteError("no online server hosts block 2")


# ------------------------------------------------------------------------------------------------ full servers

def _full(peer: str, code: str = "limit_reached") -> Attempt:
    return Attempt(peer, code, f"limit reached for open sessions: this peer holds 2 of this server's 2 ({peer})")


def test_a_full_server_is_routed_around_not_banned():
    decision = decide([_full("peer-ffffffff")], 3, "opening blocks 0:6 failed")
    assert (decision.retry, decision.full, decision.ban, decision.refresh, decision.give_up) == (True, True, False, False, "")
    # Each full server's first refusal is free (the loop leaves it out from then on), so many full replicas do not use
    # up the retries before one with room is reached; the same one refusing again counts.
    many = [_full(f"full-{i}", "cache_full") for i in range(6)]
    assert decide([*many, GONE, GONE, GONE], 3, "x").retry
    assert not decide([*many, GONE, GONE, many[0], many[1]], 3, "x").retry


def test_when_every_server_is_full_the_error_says_the_swarm_is_full():
    tried = [_full("peer-11111111", "cache_full"), GONE, _full("peer-22222222")]
    exhausted = decide([*tried, _full("peer-11111111")], 1, "opening blocks 0:6 failed")
    assert not exhausted.retry and exhausted.code == "limit_reached"
    assert exhausted.give_up.startswith("opening blocks 0:6 failed: no server of these blocks has room for it now, "
                                        "the swarm is full (tried: 11111111 (limit reached for open sessions")
    assert exhausted.give_up.endswith("Retry later, or run a server for these blocks to add capacity")
    assert "aaaaaaaa (P2PDaemonError: connection refused)" in exhausted.give_up

    connection = FakeConnection()
    marked: list[str] = []
    connection.mark_full = marked.append
    routes: list[frozenset] = []

    async def attempt(number: int):
        left_out = full_servers(seen)
        routes.append(left_out)
        if number < 2:
            raise RemoteError("limit_reached", f"limit reached for open sessions ({number})", f"peer-{number}")
        raise NoRouteError("block 0 is served only by servers left out of routes here", reasons=frozenset({"full"}))

    seen: list[Attempt] = []
    with pytest.raises(RemoteError, match=r"^blocks 0:6 failed: no server of these blocks has room for it now, the "
                                          r"swarm is full \(tried: peer-0 \(limit reached for open sessions \(0\)\); "
                                          r"peer-1 \(.*\)\)\. Retry later, or run a server") as caught:
        aio.run(with_failover(connection, "blocks 0:6 failed", attempt, max_retries=3, tried=seen))
    assert caught.value.code == "limit_reached"
    assert routes == [frozenset(), {"peer-0"}, {"peer-0", "peer-1"}]  # each replacement leaves out the full ones
    assert marked == ["peer-0", "peer-1"] and connection.actions == []  # routed around, not banned
