"""Routing policies as tables of fake servers (no network): least-latency inference routes, throughput-spread
training routes, allowed/blocked lists, the errors that say why no route exists, and background pings."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest

from client import aio
from client.measurements import InFlight, Pinger
from client.routing import (
    UNREACHABLE,
    NoRouteError,
    ServerChoice,
    plan_route,
    plan_training_route,
    smooth_rtt,
)
from swarm.dht_records import ServerInfo, ServerRecord, ServerState

INF = math.inf


def server(name: str, start: int, end: int, ms: float | None = 1.0, tps: float | None = None, cache: int = 10_000,
           state=ServerState.ONLINE, adapters=(), batch: int = 64) -> ServerInfo:
    return ServerInfo(name, ServerRecord(state=state, start=start, end=end, ms_per_block=ms, forward_tokens_per_s=tps,
                                         cache_tokens_left=cache, adapters=tuple(adapters), max_batch_size=batch))


def route(servers, start=0, end=6, **kwargs) -> list[tuple[str, int, int]]:
    return [(s.peer_id, s.start, s.end) for s in plan_route(servers, start, end, **kwargs)]


def choice(allowed=None, blocked=()) -> ServerChoice:
    return ServerChoice.of(allowed, blocked)


# ---------------------------------------------------------------------------------------------- inference


A_BC = [server("a", 0, 6), server("b", 0, 3), server("c", 3, 6)]  # one hop, or two


@pytest.mark.parametrize(
    "servers, kwargs, expected",
    [
        # a far-away server loses to two near ones: 50 + 6 ms against 1 + 3 + 1 + 3 ms
        (A_BC, dict(rtt_ms={"a": 50, "b": 1, "c": 1}), [("b", 0, 3), ("c", 3, 6)]),
        (A_BC, dict(rtt_ms={"a": 1, "b": 5, "c": 5}), [("a", 0, 6)]),  # 7 ms against 16
        # compute outweighs the network: 1 + 6 x 10 ms against 30 + 6 x 1 ms
        ([server("a", 0, 6, ms=10), server("b", 0, 6)], dict(rtt_ms={"a": 1, "b": 30}), [("b", 0, 6)]),
        # not measured yet counts as hop_ms (2): 2 + 6 against 5 + 6, then 2 + 6 against 1 + 6
        ([server("a", 0, 6), server("b", 0, 6)], dict(rtt_ms={"b": 5}), [("a", 0, 6)]),
        ([server("a", 0, 6), server("b", 0, 6)], dict(rtt_ms={"b": 1}), [("b", 0, 6)]),
        # unreachable (its last ping failed): only a last resort
        ([server("a", 0, 6), server("b", 0, 6, ms=5)], dict(rtt_ms={"a": UNREACHABLE, "b": 20}), [("b", 0, 6)]),
        ([server("a", 0, 6), server("b", 0, 3)], dict(rtt_ms={"a": UNREACHABLE, "b": 1}), [("a", 0, 6)]),  # one hop to it
        # a server without free cache for the session is not used; without a session it is
        ([server("a", 0, 6, cache=100), server("b", 0, 6, ms=5)], dict(session_tokens=1000), [("b", 0, 6)]),
        ([server("a", 0, 6, cache=100), server("b", 0, 6, ms=5)], dict(session_tokens=100), [("a", 0, 6)]),
        ([server("a", 0, 6, cache=100), server("b", 0, 6, ms=5)], {}, [("a", 0, 6)]),
        # a server that takes smaller batches than the session's is not used
        ([server("a", 0, 6, batch=2), server("b", 0, 6, ms=5)], dict(batch_size=4), [("b", 0, 6)]),
        ([server("a", 0, 6, batch=4), server("b", 0, 6, ms=5)], dict(batch_size=4), [("a", 0, 6)]),
        (A_BC, dict(banned={"a"}), [("b", 0, 3), ("c", 3, 6)]),
        (A_BC, dict(full={"a"}), [("b", 0, 3), ("c", 3, 6)]),  # it answered it has no room: routed around
        (A_BC, dict(choice=choice(allowed=["b", "c"])), [("b", 0, 3), ("c", 3, 6)]),
        (A_BC, dict(choice=choice(blocked=["a", "x"])), [("b", 0, 3), ("c", 3, 6)]),
        ([server("a", 0, 3), server("b", 3, 6), server("c", 3, 6, ms=9)], dict(choice=choice(blocked=["b"])),
         [("a", 0, 3), ("c", 3, 6)]),
        ([server("a", 0, 6), server("b", 0, 6, ms=5, adapters=["x"])], dict(adapter="x"), [("b", 0, 6)]),
        # entered in the middle of its span, with measured round trips
        ([server("a", 0, 4), server("b", 2, 6, ms=2)], dict(rtt_ms={"a": 1, "b": 1}), [("a", 0, 4), ("b", 4, 6)]),
        # a sub-range of the model
        (A_BC, dict(start=1, end=3, rtt_ms={"a": 3, "b": 1}), [("b", 1, 3)]),
    ],
)
def test_inference_route_has_least_expected_latency(servers, kwargs, expected):
    assert route(servers, **kwargs) == expected


# ---------------------------------------------------------------------------------------------- errors


NO_ROUTE = [
    ([server("a", 0, 3), server("b", 4, 6)], {}, r"^no online server hosts block 3 \(blocks 0:6 needed", set()),
    ([], {}, "no online server hosts block 0", set()),
    ([server("a", 0, 6, state=ServerState.OFFLINE)], {}, r"no online server hosts block 0 .*its servers: a \(offline\)",
     {"offline"}),
    ([server("a", 0, 6)], dict(adapter="x"), "no online server with adapter 'x' hosts block 0 .*does not host adapter",
     {"adapter"}),
    ([server("a", 0, 3), server("b", 3, 6)], dict(choice=choice(blocked=["b"])),
     r"block 3 is served only by servers left out of routes here .*: b \(in blocked_servers\)\. Allow one of them",
     {"blocked"}),
    ([server("a", 0, 3), server("b", 3, 6)], dict(choice=choice(allowed=["a"])), r"b \(not in allowed_servers\)",
     {"not_allowed"}),
    ([server("a", 0, 3), server("b", 3, 6)], dict(banned={"b"}), r"b \(banned after a failure\)\. Retry once its ban",
     {"banned"}),
    ([server("a", 0, 6, cache=100), server("b", 0, 6, state=ServerState.OFFLINE)], dict(session_tokens=5000),
     r"block 0 .*a \(100 cache tokens free, 5000 needed\), b \(offline\)\. Use a smaller max_length", {"cache", "offline"}),
    ([server("a", 0, 3), server("b", 3, 6, batch=2)], dict(batch_size=4),
     r"block 3 .*: b \(takes batches of at most 2, 4 needed\)\. Use a smaller batch", {"batch"}),
    ([server("a", 0, 6), server("b", 0, 6), server("c", 0, 6, state=ServerState.JOINING)],
     dict(choice=choice(blocked=["a"]), banned={"b"}), r"a \(in blocked_servers\), b \(banned after a failure\), c \(joining\)",
     {"blocked", "banned", "joining"}),
    ([server("a", 0, 3), server("b", 3, 6)], dict(full={"b"}),
     r"block 3 .*: b \(answered it has no room for this client\)\. Retry later, when they have room, or run a server "
     r"for these blocks to add capacity", {"full"}),
]


@pytest.mark.parametrize("servers, kwargs, message, reasons", NO_ROUTE)
def test_no_inference_route_says_why(servers, kwargs, message, reasons):
    with pytest.raises(NoRouteError, match=message) as info:
        route(servers, **kwargs)
    assert info.value.reasons == reasons


@pytest.mark.parametrize("servers, kwargs, message, reasons", [case for case in NO_ROUTE if "session_tokens" not in case[1]])
def test_no_training_route_says_why(servers, kwargs, message, reasons):  # training holds no KV cache
    with pytest.raises(NoRouteError, match=message) as info:
        plan_training_route(servers, 0, 6, random.Random(0), **kwargs)
    assert info.value.reasons == reasons


@pytest.mark.parametrize(
    "allowed, blocked, message",
    [
        ([], (), "allowed_servers is empty"),
        ("QmA", (), "lists of peer ids, not a single string"),
        (None, "QmA", "lists of peer ids, not a single string"),
        (["good", "bad!"], (), "allowed_servers: 'bad!' is not a peer id"),
        (None, ["bad!"], "blocked_servers: 'bad!' is not a peer id"),
    ],
)
def test_server_choice_rejects_malformed_lists(allowed, blocked, message):
    def check(peer: str) -> None:
        if not peer.isalnum():
            raise ValueError(peer)

    with pytest.raises(ValueError, match=message):
        ServerChoice.of(allowed, blocked, check=check)


# ---------------------------------------------------------------------------------------------- training


def shares(servers, draws=4000, **kwargs) -> dict[tuple, float]:
    rng = random.Random(1234)
    counts = Counter(tuple((s.peer_id, s.start, s.end) for s in plan_training_route(servers, 0, 6, rng, **kwargs))
                     for _ in range(draws))
    return {r: n / draws for r, n in counts.items()}


@pytest.mark.parametrize(
    "servers, kwargs, expected",
    [
        # replicas of one span: in proportion to forward_tokens_per_s
        ([server("a", 0, 6, tps=100), server("b", 0, 6, tps=300)], {}, {"a": 0.25, "b": 0.75}),
        ([server("a", 0, 6, tps=100), server("b", 0, 6, tps=100), server("c", 0, 6, tps=200)], {},
         {"a": 0.25, "b": 0.25, "c": 0.5}),
        # no throughput reported: counted as the average of the others (200)
        ([server("a", 0, 6), server("b", 0, 6, tps=100), server("c", 0, 6, tps=300)], {},
         {"a": 1 / 3, "b": 1 / 6, "c": 0.5}),
        # requests already in flight there lower a server's share: weight / (1 + in flight)
        ([server("a", 0, 6, tps=100), server("b", 0, 6, tps=100)], dict(in_flight={"a": 1}), {"a": 1 / 3, "b": 2 / 3}),
        ([server("a", 0, 6, tps=100), server("b", 0, 6, tps=100)], dict(in_flight={"a": 3}), {"a": 0.2, "b": 0.8}),
        ([server("a", 0, 6, tps=300), server("b", 0, 6, tps=100)], dict(in_flight={"a": 2}), {"a": 0.5, "b": 0.5}),
        # unreachable, banned, blocked, not allowed or without the adapter: never drawn while another can serve
        ([server("a", 0, 6, tps=1000), server("b", 0, 6, tps=1)], dict(rtt_ms={"a": UNREACHABLE}), {"b": 1.0}),
        ([server("a", 0, 6, tps=1000), server("b", 0, 6, tps=1)], dict(banned={"a"}), {"b": 1.0}),
        ([server("a", 0, 6, tps=1000), server("b", 0, 6, tps=1)], dict(choice=choice(blocked=["a"])), {"b": 1.0}),
        ([server("a", 0, 6, tps=1000), server("b", 0, 6, tps=1)], dict(choice=choice(allowed=["b"])), {"b": 1.0}),
        ([server("a", 0, 6, tps=1000), server("b", 0, 6, tps=1, adapters=["x"])], dict(adapter="x"), {"b": 1.0}),
        ([server("a", 0, 6, tps=1000, batch=8), server("b", 0, 6, tps=1)], dict(batch_size=16), {"b": 1.0}),
    ],
)
def test_training_spreads_over_replicas_by_throughput(servers, kwargs, expected):
    got = {route[0][0]: share for route, share in shares(servers, **kwargs).items()}
    assert got.keys() == expected.keys()
    for name, share in expected.items():
        assert abs(got[name] - share) < 0.03, (name, got)


def test_training_compares_throughput_per_block_across_span_lengths():
    # a's forward_tokens_per_s is for 6 blocks, b's and c's for 3: per block all three run 600 tokens/s
    servers = [server("a", 0, 6, tps=100), server("b", 0, 3, tps=200), server("c", 3, 6, tps=200)]
    got = shares(servers)
    expected = {(("a", 0, 6),): 0.5, (("b", 0, 3), ("a", 3, 6)): 0.25, (("b", 0, 3), ("c", 3, 6)): 0.25}
    assert got.keys() == expected.keys()
    for key, share in expected.items():
        assert abs(got[key] - share) < 0.03, got


def test_training_routes_are_deterministic_given_the_draw():
    servers = [server(name, 0, 3, tps=100) for name in "abc"] + [server(name, 3, 6, tps=100) for name in "de"]
    first = [plan_training_route(servers, 0, 6, random.Random(7)) for _ in range(5)]
    again = [plan_training_route(servers, 0, 6, random.Random(7)) for _ in range(5)]
    assert first == again
    rng = random.Random(7)
    draws = {tuple(plan_training_route(servers, 0, 6, rng)) for _ in range(50)}
    assert len(draws) == 6  # every combination of the 3 x 2 replicas comes up


# ---------------------------------------------------------------------------------------------- pings


@pytest.mark.parametrize(
    "previous, sample, alpha, expected",
    [(None, 5.0, 0.3, 5.0), (10.0, None, 0.3, INF), (INF, 4.0, 0.3, 4.0), (10.0, 20.0, 0.5, 15.0), (10.0, 20.0, 0.3, 13.0)],
)
def test_smooth_rtt(previous, sample, alpha, expected):
    assert smooth_rtt(previous, sample, alpha) == pytest.approx(expected)


def test_pinger_measures_marks_failures_unreachable_and_forgets_unwatched_servers():
    async def ping(peer: str) -> None:
        if peer == "down":
            raise ConnectionError("refused")
        await asyncio.sleep(0.5 if peer == "slow" else 0.01)

    pinger = Pinger(ping, period=3600, timeout=0.2)
    pinger.watch(["up", "down", "slow"])
    aio.run(pinger.ping_round())
    rtt = pinger.rtt_ms
    assert 5 < rtt["up"] < 200 and rtt["down"] == INF and rtt["slow"] == INF  # slow: past the timeout
    pinger.watch(["up"])
    assert pinger.rtt_ms.keys() == {"up"}

    pinger.watch(["up", "new"])  # once started, a new server is pinged at once, not after the period
    pinger.start()
    try:
        for _ in range(200):
            if "new" in pinger.rtt_ms:
                break
            aio.run(asyncio.sleep(0.01))
        assert pinger.rtt_ms["new"] < 200
    finally:
        pinger.stop()


def test_in_flight_counts_requests_until_they_end():
    load = InFlight()
    with load.request("a"), load.request("a"), load.request("b"):
        assert load.counts() == {"a": 2, "b": 1}
    with pytest.raises(RuntimeError), load.request("a"):
        raise RuntimeError
    assert load.counts() == {}


# ---------------------------------------------------------------------------------------------- on a real swarm


def _info(connection, peer_id) -> dict:
    import json

    from hivemind.proto import runtime_pb2

    return json.loads(aio.run(connection.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


def _wait_for_pings(connection, peers: set[str], timeout: float = 60.0) -> dict[str, float]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        connection.servers(refresh=True)
        pings = connection.pings
        if all(math.isfinite(pings.get(peer, INF)) for peer in peers):
            return pings
        assert time.monotonic() < deadline, f"pings after {timeout:.0f} s: {pings}, expected {peers}"
        time.sleep(0.2)


def test_pings_blocked_servers_and_training_spread_on_a_swarm(tiny_swarm, tiny_model_path, dist_model, reference_model):
    """With a second server for blocks 2:4 (started here, stopped at the end): every server gets pinged; training
    chunks spread over both replicas and the loss equals the local model's; a client that blocks the original 2:4
    server generates the reference tokens without sending it anything, nor pinging it."""
    import signal

    import torch

    from client.model import DistributedModelForCausalLM
    from tests.conftest import exact

    connection = dist_model.remote_layers.connection
    (original,) = [s for s in connection.servers(refresh=True) if (s.record.start, s.record.end) == (2, 4)
                   and s.record.state == ServerState.ONLINE]
    (replica,) = tiny_swarm.start_servers(tiny_model_path, [(2, 4)], ["--cache-tokens", "4096", "--torch-dtype", "float32",
                                                                      "--max-chunk-tokens", "16384", "--shutdown-timeout", "2"])
    replica_id = replica.maddrs[0].rsplit("/p2p/", 1)[1]
    blocked_model = None
    try:
        everyone = {str(s.peer_id) for s in connection.servers(refresh=True)}
        assert len(everyone) == 4 and replica_id in everyone
        pings = _wait_for_pings(connection, everyone)
        print(f"\nround trips (ms): {sorted(round(pings[p], 2) for p in everyone)}")

        # 16 chunks of one sequence each, planned one after another: the later ones see the earlier ones as load.
        layers = dist_model.remote_layers
        previous, connection.rng = layers.config, random.Random(0)
        layers.configure(max_chunk_tokens=5)
        batch = torch.randint(3, 320, (16, 5), generator=torch.Generator().manual_seed(5))
        try:
            with torch.no_grad():
                loss = dist_model(batch, labels=batch).loss
        finally:
            layers.config = previous
        used = Counter(str(step.peer_id) for route in layers.last_routes for step in route if step.start == 2)
        assert len(layers.last_routes) == 16 and used.keys() == {str(original.peer_id), replica_id}, used
        with torch.no_grad():
            torch.testing.assert_close(loss, reference_model(batch, labels=batch).loss, atol=1e-5, rtol=0)

        blocked_model = exact(DistributedModelForCausalLM.from_pretrained(
            tiny_model_path, tiny_swarm.initial_peers, blocked_servers=[str(original.peer_id)]))
        blocked_connection = blocked_model.remote_layers.connection
        before = _info(connection, original.peer_id)["requests"]
        prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(9))
        kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        with blocked_model.inference_session(max_length=22) as session:
            ours = blocked_model.generate(prompt, **kwargs)
            route = [(str(s.step.peer_id), s.step.start, s.step.end) for s in session.streams]
        assert torch.equal(ours, reference_model.generate(prompt, **kwargs))
        assert (replica_id, 2, 4) in route and str(original.peer_id) not in {peer for peer, _, _ in route}
        with torch.no_grad():  # training routes leave it out too
            blocked_model(batch[:2], labels=batch[:2])
        assert str(original.peer_id) not in {str(s.peer_id) for r in blocked_model.remote_layers.last_routes for s in r}
        assert _info(connection, original.peer_id)["requests"] == before
        blocked_pings = _wait_for_pings(blocked_connection, everyone - {str(original.peer_id)})
        assert str(original.peer_id) not in blocked_pings
    finally:
        if blocked_model is not None:
            blocked_model.remote_layers.connection.shutdown()
        tiny_swarm.servers.remove(replica)
        replica.stop(signal.SIGTERM)
        connection.servers(refresh=True)  # the shared client forgets the replica (it announced offline)
