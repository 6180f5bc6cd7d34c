"""Pure policies: route planning, block selection and DHT record parsing (no network)."""

from __future__ import annotations

import pytest

from client.routing import NoRouteError, ban_seconds, plan_route
from server.block_selection import choose_span, coverage
from swarm.dht_records import ServerInfo, ServerRecord, ServerState
from swarm.errors import RemoteError


def server(name: str, start: int, end: int, ms: float | None = 1.0, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(name, ServerRecord(state=state, start=start, end=end, ms_per_block=ms))


def route(servers, start=0, end=6, **kwargs) -> list[tuple[str, int, int]]:
    return [(s.peer_id, s.start, s.end) for s in plan_route(servers, start, end, **kwargs)]


@pytest.mark.parametrize(
    "servers, expected",
    [
        ([server("a", 0, 2), server("b", 2, 4), server("c", 4, 6)], [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)]),
        ([server("a", 0, 6), server("b", 0, 3), server("c", 3, 6)], [("a", 0, 6)]),  # fewer hops
        ([server("a", 0, 6, ms=50), server("b", 0, 3), server("c", 3, 6)], [("b", 0, 3), ("c", 3, 6)]),  # a is slow
        ([server("a", 0, 4), server("b", 2, 6, ms=2)], [("a", 0, 4), ("b", 4, 6)]),  # enters b mid-span
        ([server("a", 0, 6, state=ServerState.OFFLINE), server("b", 0, 6, ms=9)], [("b", 0, 6)]),
        ([server("a", 0, 6, ms=None), server("b", 0, 6, ms=20)], [("a", 0, 6)]),  # unknown speed = default 10 ms
    ],
)
def test_plan_route(servers, expected):
    assert route(servers) == expected


@pytest.mark.parametrize("strikes, seconds", [(0, 0.0), (1, 15.0), (2, 30.0), (3, 60.0), (5, 240.0), (6, 300.0), (40, 300.0)])
def test_ban_time_doubles_per_failure_in_a_row_up_to_a_cap(strikes, seconds):
    assert ban_seconds(strikes, base=15.0, cap=300.0) == seconds


def test_plan_route_sub_range_and_bans():
    servers = [server("a", 0, 6), server("b", 0, 6, ms=5)]
    assert route(servers, 2, 5) == [("a", 2, 5)]
    assert route(servers, banned={"a"}) == [("b", 0, 6)]


def test_plan_route_reports_the_uncovered_block():
    with pytest.raises(NoRouteError, match="no online server hosts block 3"):
        route([server("a", 0, 3), server("b", 4, 6)])
    with pytest.raises(NoRouteError, match="block 0"):
        route([])


@pytest.mark.parametrize(
    "num_blocks, length, spans, expected",
    [
        (30, 10, [], (0, 10)),
        (30, 10, [(0, 10)], (10, 20)),
        (30, 10, [(0, 10), (10, 20)], (20, 30)),
        (30, 10, [(0, 10), (20, 30)], (10, 20)),
        (30, 10, [(0, 10), (10, 20), (20, 30)], (0, 10)),
        (30, 10, [(0, 10), (10, 20), (20, 30), (0, 10)], (10, 20)),
        (6, 6, [(0, 3)], (0, 6)),
        (8, 3, [(0, 4), (6, 8)], (3, 6)),  # the hole 4:6 must be covered
    ],
)
def test_choose_span_covers_least_served_blocks(num_blocks, length, spans, expected):
    assert choose_span(num_blocks, length, spans) == expected


def test_choose_span_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="cannot host 7 blocks"):
        choose_span(6, 7, [])
    assert coverage(4, [(0, 2), (1, 9)]) == [1, 2, 1, 1]


def test_server_record_round_trip_and_tolerance():
    record = ServerRecord(state=ServerState.ONLINE, start=2, end=5, public_name="x", ms_per_block=1.5,
                          cache_tokens_left=100, adapters=("a",))
    assert ServerRecord.from_dict(record.to_dict()) == record
    newer = {**record.to_dict(), "new_field": {"nested": 1}}
    assert ServerRecord.from_dict(newer) == record
    older = {"state": "online", "start": 0, "end": 4}
    assert ServerRecord.from_dict(older).cache_tokens_left == 0
    for garbage in (None, 5, "x", {"state": "dancing", "start": 0, "end": 1}, {"state": "online", "start": 3, "end": 1},
                    {"state": "online", "start": "a", "end": 2}, {"state": "online"}):
        assert ServerRecord.from_dict(garbage) is None


@pytest.mark.parametrize(
    "batch, length, limit, expected",
    [
        (4, 128, 8192, [(0, 4)]),  # fits in one request
        (32, 500, 8192, [(0, 16), (16, 32)]),  # 16 sequences of 500 tokens per request
        (5, 3000, 8192, [(0, 2), (2, 4), (4, 5)]),
        (3, 9000, 8192, [(0, 1), (1, 2), (2, 3)]),  # a single sequence over the limit still goes alone (server decides)
    ],
)
def test_split_batch_respects_the_token_limit(batch, length, limit, expected):
    from client.remote_sequential import split_batch

    assert [(s.start, s.stop) for s in split_batch(batch, length, limit)] == expected


@pytest.mark.parametrize(("error", "expected"), [
    (RemoteError("transport", "connection reset", "peer"), ("ban", "peer")),
    (RemoteError("server_leaving", "shutting down", "peer"), ("refresh", True)),  # it said so: its record is offline
    (RemoteError("blocks_not_served", "moved to 3:6", "peer"), ("refresh", True)),  # its new blocks stay usable
    (TimeoutError(), ("ban", "peer")),
])
def test_a_failed_server_is_banned_unless_it_left_or_moved(error, expected):
    from client import aio
    from client.failover import with_failover

    calls = []

    class Connection:
        async def afailed(self, peer_id, refresh=False):
            calls.append(("refresh", True) if refresh else ("ban", peer_id))

    async def attempt(number: int):
        if number == 0:  # a transport error reaches the policy as RemoteError "transport" (client.streams)
            raise error if isinstance(error, RemoteError) else RemoteError.from_exception(error, "peer")
        return "answered"

    assert aio.run(with_failover(Connection(), "blocks 0:2 failed", attempt, max_retries=3)) == "answered"
    assert calls == [expected]
