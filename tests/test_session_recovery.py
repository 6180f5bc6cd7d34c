"""How an inference session picks servers when many have vanished (no network: a fake swarm of one-hop routes).

Under churn, the DHT still lists servers that were killed until their records expire; a session must pass over
all of them, however many, and still open or recover through a live one (found by tests/test_churn.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import client.inference_session as inference_session
from client.config import CLIENT
from client.inference_session import InferenceSession
from client.routing import NoRouteError, RouteStep
from swarm.errors import RemoteError
from swarm.tensors import pack_tensor, unpack_tensor


class FakeSwarm:
    """Servers that each host every block, planned in order; `dead` ones refuse connections."""

    num_blocks = 6

    def __init__(self, servers: list[str], dead: set[str]):
        self.order, self.dead, self.bans = servers, dead, []

    def plan(self, start: int, end: int, adapter=None, **_) -> list[RouteStep]:
        for peer in self.order:
            if peer not in self.bans:
                return [RouteStep(peer, start, end)]
        raise NoRouteError(f"no online server hosts block {start}")

    def ban(self, peer_id) -> float:
        self.bans.append(str(peer_id))
        return 15.0

    async def aplan(self, *args, **kwargs) -> list[RouteStep]:
        return self.plan(*args, **kwargs)

    async def afailed(self, peer_id, refresh=False) -> None:  # every failure here is a dead server: banned
        self.ban(peer_id)


class FakeStream:
    """A SpanStream whose server adds 1 to the hidden states, or refuses once it is in FakeSwarm.dead."""

    def __init__(self, swarm: FakeSwarm, step: RouteStep, batch_size: int, *args):
        self.swarm, self.step, self.batch_size = swarm, step, batch_size
        self.history: list = []
        self.failed = False
        self.codec, self.session_id, self.step_id, self.accepts_pushes = "none", "", 0, False

    def _check(self) -> None:
        if self.step.peer_id in self.swarm.dead:
            self.failed = True
            raise RemoteError("transport", "P2PDaemonError: connection refused", self.step.peer_id)

    async def open(self) -> None:
        self._check()

    def submit(self, tensors, forward=(), hypo_ids=()) -> None:
        self._check()

    async def result(self, tensors):
        self._check()
        self.history.append(tensors)
        hidden = tensors[0] if isinstance(tensors[0], torch.Tensor) else unpack_tensor(tensors[0], "input")
        return pack_tensor(hidden + 1), SimpleNamespace(forwarded=False, forward_error="")

    async def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch):
    monkeypatch.setattr(inference_session, "SpanStream", FakeStream)


STALE = [f"stale-{i}" for i in range(CLIENT.max_retries + 3)]  # more vanished servers than retries


def test_a_session_opens_past_more_vanished_servers_than_retries():
    swarm = FakeSwarm([*STALE, "live"], dead=set(STALE))
    with InferenceSession(swarm, max_length=8) as session:
        output = session.step(torch.zeros(1, 2, 4))
        assert [s.step.peer_id for s in session.streams] == ["live"]
    assert torch.equal(output, torch.ones(1, 2, 4))
    assert swarm.bans == STALE


def test_a_failed_span_moves_past_more_vanished_servers_than_retries():
    swarm = FakeSwarm(["first", *STALE, "live"], dead=set(STALE))
    with InferenceSession(swarm, max_length=8) as session:
        session.step(torch.zeros(1, 2, 4))
        swarm.dead.add("first")
        output = session.step(torch.zeros(1, 1, 4))
        assert [s.step.peer_id for s in session.streams] == ["live"]
        assert len(session.streams[0].history) == 2  # the first step replayed, then the new one
        assert len(session.recoveries) == 1
    assert torch.equal(output, torch.ones(1, 1, 4))
    assert swarm.bans == ["first", *STALE]


def test_when_every_server_is_gone_the_error_says_what_was_tried():
    swarm = FakeSwarm(["first", *STALE], dead=set(STALE))
    with InferenceSession(swarm, max_length=8) as session:
        session.step(torch.zeros(1, 2, 4))
        swarm.dead.add("first")
        tried = "; ".join(f"{peer} \\(P2PDaemonError: connection refused\\)" for peer in ["first", *STALE])
        with pytest.raises(RemoteError, match=rf"blocks 0:6 failed and could not be moved; tried: {tried}; "
                                              r"a new route \(no online server hosts block 0\)"):
            session.step(torch.zeros(1, 1, 4))
