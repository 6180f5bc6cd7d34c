"""An honest client and full servers (server.fair_share), live: a server with no room for the client (its open
sessions taken, this client's share of them included) is routed around to another replica of its blocks, and when
every replica is full the client's error says the swarm is full and what to do."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from swarm.errors import RemoteError
from tests.conftest import JoinedSwarm, exact, own_prefix

FULL = "tiny-llama-full"  # its own DHT prefix: no other test's client routes through these servers
MAX_SESSIONS = 2


@pytest.fixture(scope="module")
def replicas(tiny_swarm, tiny_model_path) -> list[str]:
    """The peer ids of two servers of blocks 0:6 that keep at most MAX_SESSIONS sessions open each (beside the shared
    swarm, in its DHT)."""
    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        started = swarm.start_servers(tiny_model_path, [(0, 6), (0, 6)], ["--torch-dtype", "float32", "--max-sessions",
                                                                          str(MAX_SESSIONS), *own_prefix(FULL)])
        yield [server.maddrs[0].rsplit("/p2p/", 1)[1] for server in started]
    finally:
        swarm.stop()


def _client(tiny_model_path, peers, **overrides):
    from client.model import DistributedModelForCausalLM

    return exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, peers, dht_prefix=FULL, **overrides))


def _held(model, where: str):
    """An inference session of `model` that holds one of the server's sessions (it opens on its first step)."""
    session = model.remote_layers.inference_session(max_length=16)
    session.step(torch.randn(1, 1, 64))
    assert [str(s.step.peer_id) for s in session.streams] == [where]
    return session


def test_a_full_server_is_routed_around_and_with_every_replica_full_the_error_says_so(
        replicas, tiny_swarm, tiny_model_path, reference_model, caplog):
    # It pings each server once (no later round changes its routes), so the server it tries first is known here.
    honest = _client(tiny_model_path, tiny_swarm.initial_peers, ping_period_s=3600)
    connection = honest.remote_layers.connection
    deadline = time.monotonic() + 60
    while not (len(connection.servers(refresh=True)) == 2 and len(connection.pings) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    (first,) = connection.plan()
    preferred = str(first.peer_id)
    (other,) = set(replicas) - {preferred}
    filler = _client(tiny_model_path, tiny_swarm.initial_peers, allowed_servers=[preferred])  # another peer
    held = []
    try:
        # The server the honest client prefers holds 2 of 2 sessions: the filler's and one of the honest client's, so
        # a second session of the honest client is over its fair share (1) there: limit_reached.
        held += [_held(filler, preferred), _held(honest, preferred)]
        prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(21))
        settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        expected = reference_model.generate(prompt, **settings)
        with caplog.at_level(logging.INFO, logger="client.failover"):
            with honest.inference_session(max_length=12) as session:
                assert torch.equal(honest.generate(prompt, **settings), expected)
                assert [str(s.step.peer_id) for s in session.streams] == [other]  # through the other replica
        refusals = [r.getMessage() for r in caplog.records if "trying another server" in r.getMessage()]
        assert len(refusals) == 1 and preferred[-8:] in refusals[0] and "[limit_reached]" in refusals[0], refusals
        assert preferred in connection.full() and not connection.banned()  # routed around for a while, not banned

        # Now the other replica fills up with the honest client's own sessions (new routes avoid the full one).
        held += [_held(honest, other), _held(honest, other)]
        began = time.monotonic()
        with pytest.raises(RemoteError) as caught:
            honest.generate(prompt, **settings)
        message = str(caught.value)
        assert caught.value.code in ("limit_reached", "cache_full") and time.monotonic() - began < 10
        assert "no server of these blocks has room for it now, the swarm is full" in message
        assert message.endswith("Retry later, or run a server for these blocks to add capacity")
        for peer, answer in [(preferred, "limit reached for open sessions: this peer holds 1 of this server's 2"),
                             (other, "open sessions are all taken: 0 of 2 free")]:  # each server's own answer
            assert f"{peer[-8:]} ({answer}" in message, message
    finally:
        for session in held:
            session.close()
        for model in (honest, filler):
            model.remote_layers.connection.shutdown()
