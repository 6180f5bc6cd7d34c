"""Block selection and rebalancing: where a --num-blocks server goes and when it moves (pure policy, no network),
and how a moved server's DHT records read."""

from __future__ import annotations

import itertools
import random

import pytest

from server.block_selection import HostedSpan, Move, apply_moves, best_move, choose_span, coverage, decide_move
from swarm.dht_records import ServerInfo, ServerRecord, ServerState


def swarm(*specs: str) -> list[HostedSpan]:
    """'a 0:3' is server a on blocks 0:3; a trailing '!' marks a server started with --blocks (it never moves)."""
    servers = []
    for spec in specs:
        peer, span = spec.split()
        start, end = (int(x) for x in span.rstrip("!").split(":"))
        servers.append(HostedSpan(peer, start, end, movable=not span.endswith("!")))
    return servers


@pytest.mark.parametrize(
    "num_blocks, length, spans, expected",
    [
        (6, 3, [(0, 3)], (3, 6)),
        (6, 3, [(0, 3), (3, 6)], (0, 3)),  # everything covered once: the earliest window
        (6, 3, [(0, 3), (3, 6), (0, 3)], (3, 6)),
        (6, 2, [(0, 4), (2, 6)], (0, 2)),  # ties on coverage and sum: earliest
        (6, 2, [(0, 6), (1, 3)], (3, 5)),  # 0:1 is as covered but 0:2 holds block 1's second server
        (10, 4, [(0, 3), (7, 10)], (3, 7)),  # the hole exactly
        (10, 4, [(0, 2), (8, 10)], (2, 6)),  # a hole wider than the span: its start
        (6, 1, [(0, 6), (0, 6), (0, 5)], (5, 6)),
    ],
)
def test_choose_span(num_blocks, length, spans, expected):
    assert choose_span(num_blocks, length, spans) == expected


@pytest.mark.parametrize(
    "servers, margin, movers",
    [
        # a hole: of two redundant servers, the smaller peer id moves and the other waits
        (swarm("a 0:3", "b 0:3"), 0.2, {"a": (3, 6, "blocks 3:6 have no server")}),
        (swarm("b 0:3", "a 0:3"), 0.2, {"a": (3, 6, "blocks 3:6 have no server")}),  # order of listing is irrelevant
        # a hole, but nobody can leave without uncovering its own blocks
        (swarm("a 0:3", "b 3:4"), 0.2, {}),
        # a is the only server of block 0: b (redundant on 1:3) moves and fills part of the hole
        (swarm("a 0:3", "b 1:3"), 0.2, {"b": (3, 5, "blocks 3:6 have no server")}),
        # only movable servers move: a was given --blocks, so b takes the hole although its id is larger
        (swarm("a 0:3!", "b 0:3"), 0.2, {"b": (3, 6, "blocks 3:6 have no server")}),
        (swarm("a 0:3!", "b 0:3!"), 0.2, {}),
        # three blocks without a server: a's move covers two of them at once (c or d takes block 2 next)
        (swarm("a 0:2", "b 0:2", "c 3:4", "d 3:4"), 0.2, {"a": (4, 6, "blocks 2:3, 4:6 have no server")}),
        # badly uneven: three servers on 0:3, one on 3:6 -> one moves (1 -> 2 servers on the least-served blocks)
        (swarm("a 0:3", "b 0:3", "c 0:3", "d 3:6"), 0.2,
         {"a": (3, 6, "coverage is uneven: the least-served blocks have 1 server(s), and 1 move(s) would give them 2")}),
        # 2 vs 1 cannot be evened out by moving one server: nobody moves
        (swarm("a 0:3", "b 0:3", "d 3:6"), 0.2, {}),
        # 7 servers on 0:3, 5 on 3:6: one move gives 6 and 6, +20%, not more than the margin of 20%...
        (swarm(*[f"a{i} 0:3" for i in range(7)], *[f"b{i} 3:6" for i in range(5)]), 0.2, {}),
        # ... but more than a margin of 10%
        (swarm(*[f"a{i} 0:3" for i in range(7)], *[f"b{i} 3:6" for i in range(5)]), 0.1,
         {"a0": (3, 6, "coverage is uneven: the least-served blocks have 5 server(s), and 1 move(s) would give them 6")}),
        # 9 vs 5: the first move alone gives +20%, the whole plan (two moves, 7 and 7) +40%: the plan counts
        (swarm(*[f"a{i} 0:3" for i in range(9)], *[f"b{i} 3:6" for i in range(5)]), 0.2,
         {"a0": (3, 6, "coverage is uneven: the least-served blocks have 5 server(s), and 2 move(s) would give them 7")}),
        # overlapping spans of different lengths that no single move improves
        (swarm("a 0:4", "b 0:4", "c 4:8", "d 4:6"), 0.2, {}),
        # a server hosting the whole model never moves
        (swarm("a 0:6", "b 0:6"), 0.2, {}),
    ],
)
def test_decide_move(servers, margin, movers):
    """What every server of the swarm decides: only the listed ones move, to the given span, for the given reason."""
    num_blocks = 8 if any(s.end > 6 for s in servers) else 6
    decisions = {s.peer_id: decide_move(num_blocks, s.peer_id, servers, margin) for s in servers}
    assert {peer: (m.start, m.end, m.reason) for peer, m in decisions.items() if m is not None} == movers


def test_a_one_block_server_fills_part_of_a_wider_hole():
    servers = swarm("a 0:4", "b 0:1")
    assert decide_move(6, "b", servers) == Move("b", 4, 5, "blocks 4:6 have no server")
    assert decide_move(6, "a", servers) is None


def _random_swarm(rng: random.Random, num_blocks: int) -> list[HostedSpan]:
    servers = []
    for index in range(rng.randint(1, 8)):
        length = rng.randint(1, num_blocks)
        start = rng.randint(0, num_blocks - length)
        servers.append(HostedSpan(f"p{index:02d}", start, start + length, movable=rng.random() < 0.8))
    return servers


@pytest.mark.parametrize("seed", range(4))
def test_servers_that_each_follow_decide_move_converge_without_uncovering_blocks(seed):
    """Rounds in which every server checks the same swarm: at most one moves, no covered block is ever left
    uncovered, holes only shrink, and the swarm settles (no server moves back and forth)."""
    rng = random.Random(seed)
    for _ in range(50):
        num_blocks = rng.randint(2, 10)
        servers = _random_swarm(rng, num_blocks)
        for _round in range(4 * len(servers) + 1):
            moves = [m for s in servers if (m := decide_move(num_blocks, s.peer_id, servers, 0.2)) is not None]
            if not moves:
                break
            assert len(moves) == 1, moves
            before = coverage(num_blocks, [(s.start, s.end) for s in servers])
            servers = apply_moves(servers, moves)
            after = coverage(num_blocks, [(s.start, s.end) for s in servers])
            assert all(a > 0 for a, b in zip(after, before, strict=True) if b > 0), (before, after)
            assert sorted(after) > sorted(before)
        else:
            pytest.fail(f"no steady state: {servers}")


def test_best_move_never_moves_a_server_that_is_alone_on_a_block():
    for spans in itertools.product([(0, 2), (2, 4), (1, 3), (0, 4)], repeat=3):
        servers = [HostedSpan(f"p{i}", a, b) for i, (a, b) in enumerate(spans)]
        counts = coverage(6, spans)
        move = best_move(6, servers)
        if move is not None:
            mover = next(s for s in servers if s.peer_id == move.peer_id)
            assert min(counts[mover.start : mover.end]) >= 2


def test_swarm_view_takes_online_servers_and_this_one_where_it_really_is():
    from hivemind.p2p import PeerID

    from server.rebalance import swarm_view

    me, other, gone = PeerID(b"\x00me"), PeerID(b"\x00other"), PeerID(b"\x00gone")
    servers = [
        ServerInfo(me, ServerRecord(state=ServerState.ONLINE, start=0, end=3, rebalances=True)),  # a stale record
        ServerInfo(other, ServerRecord(state=ServerState.ONLINE, start=0, end=3)),
        ServerInfo(gone, ServerRecord(state=ServerState.OFFLINE, start=3, end=6, rebalances=True)),
    ]
    assert swarm_view(servers, me.to_base58(), 3, 6) == [HostedSpan(other.to_base58(), 0, 3, movable=False),
                                                         HostedSpan(me.to_base58(), 3, 6, movable=True)]


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("yes", False), (1, False), (None, False)])
def test_record_rebalances_flag_parses_strictly(value, expected):
    record = ServerRecord.from_dict({"state": "online", "start": 0, "end": 2, "rebalances": value})
    assert record.rebalances is expected
    assert ServerRecord.from_dict({"state": "online", "start": 0, "end": 2}).rebalances is False  # older servers


def test_a_moved_server_reads_as_online_where_it_is_now():
    """A server that moved from 0:3 to 3:6 leaves offline records under 0:3 until they expire: fetch_servers must
    report it online on 3:6 (not offline, and not on 0:3)."""
    import hivemind

    from swarm.dht_records import announce_span, fetch_servers

    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], start=True,
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        old = ServerRecord(state=ServerState.ONLINE, start=0, end=3, rebalances=True)
        assert announce_span(second, "m", 6, old, expiration=30)
        assert [(s.record.start, s.record.state) for s in fetch_servers(first, "m", 6)] == [(0, ServerState.ONLINE)]
        assert announce_span(second, "m", 6, ServerRecord(state=ServerState.OFFLINE, start=0, end=3), expiration=30)
        assert announce_span(second, "m", 6, ServerRecord(state=ServerState.ONLINE, start=3, end=6), expiration=30)
        (server,) = fetch_servers(first, "m", 6)
        assert (server.peer_id, server.record.start, server.record.end, server.record.state) == (
            second.peer_id, 3, 6, ServerState.ONLINE)
    finally:
        second.shutdown()
        first.shutdown()


# ---------------------------------------------------------------------------------------------- a real swarm


def test_num_blocks_servers_cover_the_model_and_one_moves_to_blocks_left_without_a_server(tiny_model_path,
                                                                                          reference_model):
    """Three --num-blocks servers started one after another cover the 6 blocks (0:3, 3:6, then a replica of 0:3).
    The only server of 3:6 is SIGKILLed: one replica of 0:3 (the smaller peer id) moves there within a bounded time,
    its session on 0:3 is told to move while the other replica's goes on, and the swarm generates exactly."""
    import re
    import signal
    import time

    import torch
    from hivemind.p2p import PeerID

    from client import ClientConfig, aio
    from client.connection import SwarmConnection
    from client.model import DistributedModelForCausalLM
    from client.routing import RouteStep
    from client.streams import SpanStream
    from swarm.dht_records import block_key, fetch_servers
    from swarm.errors import RemoteError
    from swarm.launch import LOCALHOST, LocalSwarm, PeerProcess
    from tests.conftest import exact, raw_span_call

    # Records live 2.5 update periods (7.5 s), so the killed server's vanish soon (and live ones, re-announced every
    # 3 s, do not lapse on a busy machine); servers check the swarm every ~2 s.
    common = ["--num-blocks", "3", "--host-maddrs", LOCALHOST, "--torch-dtype", "float32", "--update-period", "3",
              "--rebalance-period", "2", "--shutdown-timeout", "2"]
    with LocalSwarm() as swarm:  # the first server starts the swarm (one process less to wait for)
        initial_peers = ["--new-swarm"]
        for index in range(3):
            process = PeerProcess(["server", tiny_model_path, *common, *initial_peers], f"rebalance-{index}")
            swarm.servers.append(process)
            process.wait_ready()
            initial_peers = ["--initial-peers", *swarm.servers[0].maddrs]
        assert [re.search(r"Server ready: blocks (\d+:\d+)", p.log()).group(1) for p in swarm.servers] == ["0:3", "3:6", "0:3"]
        peer = {p: re.search(r"/p2p/(\w+)", p.maddrs[0]).group(1) for p in swarm.servers}
        first, killed, third = swarm.servers
        mover, stayer = sorted([first, third], key=peer.get)  # the policy's tie-break: the smaller peer id moves

        connection = SwarmConnection(first.maddrs, "tiny-llama", 6, ClientConfig(request_timeout=20))

        def online() -> list[tuple[int, int, str]]:
            return sorted((s.record.start, s.record.end, s.peer_id.to_base58()) for s in fetch_servers(connection.dht, "tiny-llama", 6)
                          if s.record.state.value == "online")

        def step(process, start, end):
            return RouteStep(PeerID.from_base58(peer[process]), start, end)

        hidden = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(7))
        positions = torch.arange(10)[None]
        try:
            assert online() == sorted([(0, 3, peer[first]), (3, 6, peer[killed]), (0, 3, peer[third])])
            streams = {p: SpanStream(connection, step(p, 0, 3), batch_size=1, max_length=16) for p in (mover, stayer)}
            for stream in streams.values():
                aio.run(stream.open())
                aio.run(stream.send([hidden[:, :5], positions[:, :5]]))

            killed.stop(signal.SIGKILL)
            swarm.servers.remove(killed)
            began = time.monotonic()
            while online() != sorted([(0, 3, peer[stayer]), (3, 6, peer[mover])]):
                assert time.monotonic() - began < 60, (online(), mover.log()[-3000:])
                time.sleep(0.25)
            print(f"\nblocks 3:6 lost their only server; another server serves them {time.monotonic() - began:.1f} s later")
            assert "moving from blocks 0:3 to 3:6 because blocks 3:6 have no server" in mover.log()

            # The mover's open session on 0:3 is told to move (a client replays it elsewhere); the other goes on exactly.
            with pytest.raises(RemoteError) as leaving:
                aio.run(streams[mover].send([hidden[:, 5:], positions[:, 5:]]))
            assert leaving.value.code == "server_leaving"
            rest = aio.run(streams[stayer].send([hidden[:, 5:], positions[:, 5:]]))
            (whole,) = aio.run(raw_span_call(connection, "forward", step(stayer, 0, 3), [hidden, positions]))
            torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-5, atol=1e-5)
            for stream in streams.values():
                aio.run(stream.close())
            # Its old blocks are refused with a code that clients retry elsewhere, and recorded offline in the DHT.
            with pytest.raises(RemoteError) as refused:
                aio.run(raw_span_call(connection, "forward", step(mover, 0, 3), [hidden, positions]))
            assert refused.value.code == "blocks_not_served" and refused.value.server_gone
            old_record = connection.dht.get(block_key("tiny-llama", 0), latest=True).value[peer[mover]].value
            assert (old_record["state"], old_record["start"], old_record["end"]) == ("offline", 0, 3)

            model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, first.maddrs, request_timeout=20))
            try:
                prompt = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(11))
                kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
                assert torch.equal(model.generate(prompt, **kwargs), reference_model.generate(prompt, **kwargs))
            finally:
                model.remote_layers.connection.shutdown()

            deadline = time.monotonic() + 30
            while "blocks 0:3 retired" not in mover.log():
                assert time.monotonic() < deadline, mover.log()[-3000:]
                time.sleep(0.25)
            time.sleep(2.5)  # the longest check period (2 s + 25%): the settled swarm stays as it is
            assert online() == sorted([(0, 3, peer[stayer]), (3, 6, peer[mover])])
            assert "moving from" not in stayer.log() and mover.log().count("moving from") == 1
        finally:
            connection.shutdown()
            for process in swarm.servers:  # no need to wait for clean exits here
                process.stop(signal.SIGKILL)
