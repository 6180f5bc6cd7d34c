"""Fair shares of a server's budgets (server.fair_share) as tables; the ledgers that act on them (sessions, caches,
the compute queue) without a swarm; then one live server whose open sessions an abuser cannot all keep."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest
import torch

from server.cache_budget import ActivationBudget, CacheBudget, SessionBudget
from server.compute_queue import FairCompute
from server.fair_share import IDLE_S, Holding, admit, decayed, next_peer, victim
from swarm.bounded import BoundedStore
from swarm.errors import CacheFull, LimitReached

NOW = 100.0


def held(*amounts, peer="x", idle=0.0, pinned=False):
    """Holdings of `amounts`, least recently used first, the oldest idle for `idle` seconds."""
    return [Holding(f"{peer}{i}", a, NOW - idle + i * 1e-3, pinned) for i, a in enumerate(amounts)]


# (case, total, holdings by peer, requester, amount, expected: evicted keys or "limited"/"full")
CASES = [
    ("room left: anyone takes it, over its share or not", 10, {"a": held(5, peer="a")}, "a", 4, ()),
    ("the sole holder of a full budget: plain full", 10, {"a": held(5, 5, peer="a")}, "a", 1, "full"),
    ("a newcomer takes the largest holder's least recently used", 10,
     {"a": held(4, 4, peer="a"), "b": held(2, peer="b")}, "c", 3, ("a0",)),
    ("as many holdings as it takes, each from the largest holder then", 12,
     {"a": held(3, 3, peer="a"), "b": held(2, 2, 2, peer="b")}, "c", 5, ("a0", "b0")),
    ("the largest holder asking more: limited, nothing taken", 10,
     {"a": held(3, 3, peer="a"), "b": held(2, peer="b"), "c": held(2, peer="c")}, "a", 1, "limited"),
    ("never from one that holds less than the requester would: a once down to 3, b at 3, c wants 4", 9,
     {"a": held(3, 3, peer="a"), "b": held(3, peer="b")}, "c", 4, "full"),
    ("a tie is taken only when idle", 4, {f"s{i}": held(1, peer=f"s{i}", idle=IDLE_S + 1) for i in range(4)},
     "h", 1, ("s00",)),
    ("a tie in use is kept", 4, {f"s{i}": held(1, peer=f"s{i}") for i in range(4)}, "h", 1, "full"),
    ("pinned holdings count but are never taken", 10,
     {"a": held(4, 4, peer="a", pinned=True), "b": held(2, peer="b")}, "c", 3, "full"),
    ("a peer under its share may still be refused when the rest is pinned", 10,
     {"a": held(8, peer="a", pinned=True), "b": held(1, 1, peer="b")}, "b", 1, "full"),
]


@pytest.mark.parametrize("case, total, holdings, peer, amount, expected", CASES, ids=[c[0] for c in CASES])
def test_admission(case, total, holdings, peer, amount, expected):
    decision = admit(total, holdings, peer, amount, NOW)
    if isinstance(expected, str):
        assert not decision.admitted and decision.limited == (expected == "limited")
    else:
        assert decision.admitted and decision.evict == expected


def test_ten_ids_holding_200_sessions_cannot_keep_8_peers_from_one_each():
    """The abuser's ids hold the whole budget, in use (not idle); 8 honest peers, one after another, each get one."""
    holdings = {f"sybil{i}": held(*[1] * 20, peer=f"sybil{i}") for i in range(10)}
    for honest in range(8):
        decision = admit(200, holdings, f"honest{honest}", 1, NOW)
        assert decision.admitted and len(decision.evict) == 1 and decision.evict[0].startswith("sybil")
        victim_peer = next(p for p in holdings if holdings[p] and holdings[p][0].key == decision.evict[0])
        holdings[victim_peer] = holdings[victim_peer][1:]
        holdings[f"honest{honest}"] = [Holding(f"honest{honest}", 1, NOW)]
    again = admit(200, holdings, "sybil0", 1, NOW)  # an id over its share asking more: the clear limit
    assert not again.admitted and again.limited and again.holders == 18


@pytest.mark.parametrize("totals, oldest, after, expected", [
    ({"a": 5, "b": 5}, {"a": NOW - 1, "b": NOW - 2}, 1, "b"),  # equals: the one with the oldest holding
    ({"a": 5, "b": 6}, {"a": NOW - 9, "b": NOW}, 1, "b"),  # the largest first, however recent
    ({"me": 9, "a": 1}, {"me": 0, "a": 0}, 2, None),  # never the requester, never one that holds less
])
def test_victim(totals, oldest, after, expected):
    assert victim(totals, oldest, "me", after, NOW) == expected


def test_next_peer_and_decay():
    waiting = {"flooder": 1.0, "quiet": 5.0, "new": 9.0}
    assert next_peer(waiting, {"flooder": 3.0, "quiet": 0.5}) == "new"  # never used: first
    assert next_peer(waiting, {"flooder": 3.0, "quiet": 0.5, "new": 0.5}) == "quiet"  # equal use: waiting longest
    assert decayed(4.0, 10.0, half_life=10.0) == 2.0 and decayed(4.0, -1.0) == 4.0


# ---------------------------------------------------------------------------------------------- the ledgers


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_session_budget_ends_the_largest_holders_session_with_a_clear_reason():
    clock, ended = Clock(), []
    budget = SessionBudget(cache_bytes=100, max_sessions=4, clock=clock)
    for i in range(4):
        budget.acquire("abuser", f"s{i}", 10, functools.partial(lambda i, reason: ended.append((i, reason)), i))
        clock.now += 1
    with pytest.raises(CacheFull, match="open sessions are all taken: 0 of 4 free"):
        budget.acquire("abuser", "s4", 10, print)  # the sole holder: the budget is simply full
    budget.acquire("honest", "h", 10, print)
    assert [i for i, _ in ended] == [0] and "held 4 of this server's 4, the most of any peer" in ended[0][1]
    assert budget.free == 100 - 40
    with pytest.raises(LimitReached, match=r"limit reached for open sessions: this peer holds 3 of this server's 4 "
                                           r"and asks 1 more, over its fair share \(2: the budget over the 2 peers"):
        budget.acquire("abuser", "s5", 10, print)
    budget.release("h")
    budget.release("h")  # twice: nothing more
    assert budget.free == 70 and budget.sessions.free == 1


def test_kv_cache_bytes_are_shared_fairly_too():
    mib = 2**20
    budget = CacheBudget(100 * mib, token_bytes=mib // 4, blocks=4)  # a token over the 4 blocks: 1 MiB
    budget.acquire("a", "a1", 60 * mib, print)
    budget.acquire("a", "a2", 30 * mib, print)
    with pytest.raises(CacheFull, match=r"KV cache is full: 10.0 MiB free \(10 tokens\) of 100.0 MiB \(100 tokens over "
                                        r"its 4 blocks\), 20.0 MiB requested \(20 tokens\); retry later.*--cache-bytes"):
        budget.acquire("a", "a3", 20 * mib, print)
    with pytest.raises(CacheFull, match=r"exceeds this server's whole KV-cache budget of 100.0 MiB \(100 tokens over "
                                        r"its 4 blocks\); use a smaller max_length or batch, or .*--cache-bytes"):
        budget.acquire("b", "b1", 101 * mib, print)
    budget.acquire("b", "b1", 40 * mib, print)  # takes a1 (60): a held 90 > 40
    assert budget.held("a") == 30 * mib and budget.held("b") == 40 * mib


def test_kept_activations_are_never_ended():
    budget = ActivationBudget(100 * 2**20)
    budget.acquire("a", "stream", 90 * 2**20)  # no callback: in use until its backward
    with pytest.raises(CacheFull, match="keeping 20 MiB of activations does not fit: 10 of 100 MiB free"):
        budget.acquire("b", "other", 20 * 2**20)


def test_a_store_flooded_by_one_peer_keeps_the_others_entries():
    store = BoundedStore(1000, owner=lambda key: key[0], victim=functools.partial(victim, idle_s=0.0))
    assert store.put(("honest", 0), "h", 100)
    for i in range(50):  # the flooder churns its own entries once it holds the most
        assert store.put(("flood", i), "f", 100)
    assert store.get(("honest", 0)) == "h" and store.bytes == 1000 and len(store) == 10
    assert store.put(("late", 0), "l", 300)  # a newcomer takes from the flooder, the largest holder
    assert store.get(("honest", 0)) == "h" and store.get(("late", 0)) == "l" and store.bytes == 1000
    plain = BoundedStore(200)
    plain.put(("honest", 0), "h", 100)
    plain.put(("flood", 0), "f", 100)
    plain.put(("flood", 1), "f", 100)
    assert plain.get(("honest", 0)) is None  # without owners: least recently used, whoever it is


def test_the_compute_queue_serves_the_peer_that_used_least_first():
    order, release = [], threading.Event()

    def work(name: str, wait: bool = False):
        if wait:
            release.wait(5)
        order.append(name)
        time.sleep(0.002)

    async def main():
        compute = FairCompute(inflight_bytes=1000)
        try:
            first = asyncio.create_task(compute.run("flooder", 10, work, "flooder-0", True))
            await asyncio.sleep(0.05)  # running now, holding the thread
            queued = [asyncio.create_task(compute.run("flooder", 10, work, f"flooder-{i}")) for i in range(1, 6)]
            await asyncio.sleep(0)
            honest = asyncio.create_task(compute.run("honest", 10, work, "honest"))
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(first, honest, *queued)
            assert order[:2] == ["flooder-0", "honest"]  # the flood waits; the honest step went next

            # The in-flight budget: a flooder over its share is refused; a queued request of it gives way to a peer.
            release.clear()
            blocker = asyncio.create_task(compute.run("flooder", 400, work, "blocker", True))
            await asyncio.sleep(0.05)
            flood = [asyncio.create_task(compute.run("flooder", 300, work, f"q{i}")) for i in range(2)]
            await asyncio.sleep(0)
            honest = asyncio.create_task(compute.run("honest", 300, work, "honest-2"))
            await asyncio.sleep(0)
            with pytest.raises(LimitReached, match="limit reached for memory for requests waiting for or in compute"):
                await compute.run("flooder", 300, work, "refused")
            release.set()
            results = await asyncio.gather(blocker, honest, *flood, return_exceptions=True)
            assert [isinstance(r, LimitReached) for r in results] == [False, False, True, False]
            assert compute.inflight.used == 0
        finally:
            compute.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- a server


FAIR = "tiny-llama-fair"  # its own DHT prefix: no other test's client routes through this server


@pytest.fixture(scope="module")
def fair_server(tiny_swarm, tiny_model_path):
    """All 6 blocks on one server that keeps at most 3 sessions open (beside the shared swarm, in its DHT)."""
    from tests.conftest import JoinedSwarm, own_prefix

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        swarm.start_servers(tiny_model_path, [(0, 6)], ["--torch-dtype", "float32", "--max-sessions", "3", *own_prefix(FAIR)])
        yield swarm
    finally:
        swarm.stop()


def test_a_peer_over_its_share_gets_a_clear_error_while_another_peers_session_opens(fair_server, tiny_model_path,
                                                                                    reference_model):
    from client.model import DistributedModelForCausalLM
    from swarm.errors import RemoteError
    from tests.conftest import exact

    abuser, honest = (exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, fair_server.initial_peers,
                                                                       dht_prefix=FAIR)) for _ in range(2))
    try:
        held = []
        for _ in range(3):  # the abuser takes every session the server keeps
            held.append(abuser.remote_layers.inference_session(max_length=16))
            held[-1].step(torch.randn(1, 1, 64))
        with pytest.raises(RemoteError, match="open sessions are all taken: 0 of 3 free") as full:
            abuser.remote_layers.inference_session(max_length=16).step(torch.randn(1, 1, 64))
        assert full.value.code == "cache_full"  # it holds them all: the server is simply full

        prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(5))
        expected = reference_model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        with honest.inference_session(max_length=11):  # admitted in place of the abuser's least recently used session
            assert torch.equal(honest.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False), expected)
            with pytest.raises(RemoteError, match=r"limit reached for open sessions: this peer holds 2 of this "
                                                  r"server's 3 and asks 1 more, over its fair share \(1.5: the "
                                                  r"budget over the 2 peers") as limited:
                abuser.remote_layers.inference_session(max_length=16).step(torch.randn(1, 1, 64))
            assert limited.value.code == "limit_reached"
        with pytest.raises(RemoteError, match="ended to make room for another peer, as its peer held 3 of this "
                                              "server's 3, the most of any peer") as ended:
            held[0].step(torch.randn(1, 1, 64))
        assert ended.value.code == "limit_reached"
        held[1].step(torch.randn(1, 1, 64))  # the abuser's other sessions go on
        for session in held:
            session.close()
    finally:
        for model in (abuser, honest):
            model.remote_layers.connection.shutdown()
