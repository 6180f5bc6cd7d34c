"""A server's life in the swarm: it picks blocks where they are needed, announces itself, answers `info`,
and on SIGTERM announces that it is offline before it exits."""

from __future__ import annotations

import json
import signal
import time

from hivemind.proto import runtime_pb2

from client import aio
from swarm.dht_records import ServerState, fetch_models, fetch_servers
from swarm.join import join_swarm
from swarm.keyed_p2p import keyed
from swarm.launch import LOCALHOST, LocalSwarm, PeerProcess
from swarm.service import BlockService


def test_num_blocks_servers_fill_the_model_and_leave_cleanly(tiny_model_path):
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        common = ["--initial-peers", *swarm.initial_peers, "--host-maddrs", LOCALHOST, "--torch-dtype", "float32"]
        first = PeerProcess(["server", tiny_model_path, "--num-blocks", "4", *common], "auto-1")
        swarm.servers.append(first)
        first.wait_ready()
        second = PeerProcess(["server", tiny_model_path, "--num-blocks", "4", *common], "auto-2")
        swarm.servers.append(second)
        second.wait_ready()
        assert "blocks 0:4 of tiny-llama" in first.log()
        assert "blocks 2:6 of tiny-llama" in second.log()  # covers the uncovered 4:6, overlapping least

        dht = join_swarm(swarm.initial_peers, client_mode=True)  # with the suite's swarm key (SWARM_KEY_FILE)
        p2p = keyed(aio.run(dht.replicate_p2p()), dht.keyring)
        try:
            assert fetch_models(dht) == {"tiny-llama": 6}
            servers = fetch_servers(dht, "tiny-llama", 6)
            assert sorted((s.record.start, s.record.end, s.record.state) for s in servers) == [
                (0, 4, ServerState.ONLINE), (2, 6, ServerState.ONLINE)]
            assert all(s.record.ms_per_block > 0 and s.record.cache_tokens_left > 0 for s in servers)

            first_peer = next(s.peer_id for s in servers if s.record.start == 0)
            stub = BlockService.get_stub(p2p, first_peer, namespace="tiny-llama")
            info = json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)
            assert (info["start"], info["end"], info["hidden_size"], info["num_model_blocks"]) == (0, 4, 64, 6)

            begin = time.monotonic()
            assert first.stop(signal.SIGTERM) == 0
            assert time.monotonic() - begin < 15
            assert "announcing offline" in first.log() and "server stopped" in first.log()
            states = {(s.record.start, s.record.state) for s in fetch_servers(dht, "tiny-llama", 6)}
            assert (0, ServerState.OFFLINE) in states and (2, ServerState.ONLINE) in states
        finally:
            aio.run(p2p.shutdown())
            dht.shutdown()
