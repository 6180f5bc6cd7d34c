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


# ------------------------------------------------------------------------------------------------ full servers

class FullSwarm(FakeSwarm):
    """Servers in `full` answer that they have no room for this client (limit reached). As the client's connection
    does, a route leaves out the servers of `full=` always and those marked full while another server is left."""

    def __init__(self, servers: list[str], full: set[str]):
        super().__init__(servers, dead=set())
        self.full, self.marked = full, []

    def plan(self, start: int, end: int, adapter=None, full=(), **_) -> list[RouteStep]:
        usable = [peer for peer in self.order if peer not in full]
        preferred = [peer for peer in usable if peer not in self.marked] or usable
        if not preferred:
            raise NoRouteError(f"block {start} is served only by servers left out of routes here", start,
                               frozenset({"full"}))
        return [RouteStep(preferred[0], start, end)]

    def mark_full(self, peer_id) -> None:
        self.marked.append(str(peer_id))


class FullStream(FakeStream):
    def _check(self) -> None:
        if self.step.peer_id in self.swarm.full:
            raise RemoteError("limit_reached", "limit reached for open sessions: ended to make room for another peer",
                              self.step.peer_id)


def test_a_session_opens_past_full_servers_and_moves_off_one_that_ends_it(monkeypatch):
    monkeypatch.setattr(inference_session, "SpanStream", FullStream)
    swarm = FullSwarm(["full-0", "full-1", "first", "live"], full={"full-0", "full-1"})
    with InferenceSession(swarm, max_length=8) as session:
        session.step(torch.zeros(1, 2, 4))
        assert [s.step.peer_id for s in session.streams] == ["first"]
        swarm.full.add("first")  # it ends the session to make room for another peer
        output = session.step(torch.zeros(1, 1, 4))
        assert [s.step.peer_id for s in session.streams] == ["live"]
        assert len(session.streams[0].history) == 2  # the first step replayed, then the new one
    assert torch.equal(output, torch.ones(1, 1, 4))
    assert swarm.marked == ["full-0", "full-1", "first"] and swarm.bans == []  # alive: routed around, not banned


def test_when_every_server_is_full_the_error_says_the_swarm_is_full(monkeypatch):
    monkeypatch.setattr(inference_session, "SpanStream", FullStream)
    swarm = FullSwarm(["a", "b", "c"], full={"a", "b", "c"})
    with pytest.raises(RemoteError, match=r"^opening blocks 0:6 failed: no server of these blocks has room for it now, "
                                          r"the swarm is full \(tried: a \(.*\); b \(.*\); c \(.*\)\)\. Retry later, or "
                                          r"run a server for these blocks to add capacity$") as caught:
        InferenceSession(swarm, max_length=8).step(torch.zeros(1, 2, 4))
    assert caught.value.code == "limit_reached" and swarm.marked == ["a", "b", "c"]
