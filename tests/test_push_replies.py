"""A server's reply to the client goes at once, not after its push to the next server: a slow push delays only that
next server; a push that fails after the reply is reported on the client's stream and the client sends that hop
itself. Generation (greedy and beam search, whose reorders ride on the pushes) stays token-identical to the local
model, also when a server dies mid-generation and its span is replayed, reorders included, on a replica."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import StoppingCriteriaList

from tests.conftest import exact
from tests.push_faults import ENTRY, faults
from tests.test_fault_tolerance import AtLength

DELAYED, DELAY, LOST, LOST_AFTER = 3, 2.0, 6, 0.5  # the steps of every session whose pushes the first server delays/loses
PROMPT, NEW = 5, 10


PUSHES = "tiny-llama-pushes"  # its own DHT prefix: no other test's client routes through these servers


@pytest.fixture(scope="module")
def faulty_push_swarm(tiny_swarm, tiny_model_path):
    """Blocks 0:3 on a server with faulty pushes, 3:6 on two servers (the second hop has a replica to move to), beside
    the shared swarm, in its DHT. Only the test of a dying server needs the replica: it starts in the background while
    the tests before it wait out their delayed pushes (`swarm.replica`; that test waits for it)."""
    from tests.conftest import JoinedSwarm, own_prefix

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    args = ["--torch-dtype", "float32", *own_prefix(PUSHES)]
    try:
        started = swarm.start_servers(tiny_model_path, [(0, 3)], args, env=faults({DELAYED: DELAY}, {LOST: LOST_AFTER}),
                                      python_args=ENTRY, wait=False)
        started += swarm.start_servers(tiny_model_path, [(3, 6)], args, wait=False)
        for server in started:
            server.wait_ready(180)
        (swarm.replica,) = swarm.start_servers(tiny_model_path, [(3, 6)], args, wait=False)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def model(faulty_push_swarm, tiny_model_path):
    from client.model import DistributedModelForCausalLM

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, faulty_push_swarm.initial_peers,
                                                              dht_prefix=PUSHES, request_timeout=20))
    yield model
    model.remote_layers.connection.shutdown()


def _timed_replies(stream) -> list[float]:
    """Seconds from each step's send to this stream's reply (the client asks for it right after it submits)."""
    result, seconds = stream.result, []

    async def timed(tensors):
        began = time.perf_counter()
        output = await result(tensors)
        seconds.append(time.perf_counter() - began)
        return output

    stream.result = timed
    return seconds


def test_a_slow_push_does_not_delay_the_reply_and_a_lost_one_is_sent_by_the_client(model):
    layers = model.model.layers
    hidden = torch.randn(1, LOST + 3, 64, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = layers(hidden)
    with layers.inference_session(max_length=hidden.shape[1], forwarding=True) as session:
        outputs = [session.step(hidden[:, :1])]
        first, second = session.streams
        replies, steps = _timed_replies(first), []
        for i in range(1, hidden.shape[1]):
            began = time.perf_counter()
            outputs.append(session.step(hidden[:, i : i + 1]))
            steps.append(time.perf_counter() - began)
            assert second.accepts_pushes == (i < LOST), i  # the client drives the hop from the lost push on
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-4, rtol=0)
    assert second.traffic.sent_wire > 0  # the client sent it the lost step (and the ones after) itself
    delayed = DELAYED - 1  # steps[] and replies[] start at step 1
    print(f"\nstep {DELAYED}, whose push waited {DELAY} s: the first server replied in {replies[delayed] * 1000:.1f} ms, "
          f"the step took {steps[delayed]:.2f} s; step {LOST}, whose push failed after {LOST_AFTER} s: "
          f"{steps[LOST - 1]:.2f} s; other steps' median {sorted(steps)[len(steps) // 2] * 1000:.1f} ms")
    assert steps[delayed] >= DELAY  # the push was delayed, and the next server waited for it
    assert replies[delayed] < DELAY / 4  # ... but not the first server's reply to the client
    assert steps[LOST - 1] >= LOST_AFTER  # the client waited for the push until the report came, then sent it


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beam"])
def test_generation_with_slow_and_lost_pushes_equals_local(model, reference_model, mode):
    prompt = torch.randint(3, 320, (1, PROMPT), generator=torch.Generator().manual_seed(22))
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **mode)
    with model.inference_session(max_length=PROMPT + NEW, forwarding=True) as session:
        ours = model.generate(prompt, **kwargs)
        pushes = [s.accepts_pushes for s in session.streams]
    assert torch.equal(ours, reference_model.generate(prompt, **kwargs))
    assert pushes == [True, False]  # the lost push made the client drive the second hop
    if "num_beams" in mode:
        assert sum(bool(rows) for rows in session.reorders) > NEW // 2  # the beams did move, on pushes and not


def test_beam_search_survives_a_server_dying_mid_generation(model, faulty_push_swarm, reference_model):
    """The replica replays the span's history with the same reorders: its cache ends the same as the dead one's."""
    prompt = torch.randint(3, 320, (1, PROMPT), generator=torch.Generator().manual_seed(23))
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3, pad_token_id=0)
    killed = {}
    faulty_push_swarm.replica.wait_ready(180)

    def kill(session):
        victim = str(session.streams[1].step.peer_id)
        (process,) = [p for p in faulty_push_swarm.servers if any(victim in m for m in p.maddrs)]
        faulty_push_swarm.servers.remove(process)
        process.stop(signal.SIGKILL)
        killed.update(peer=victim, reorders=sum(bool(rows) for rows in session.reorders))

    with model.inference_session(max_length=PROMPT + NEW, forwarding=True) as session:
        # Killed before step LOST - 1: the first server's push of that step finds nobody, then the client's step.
        kill_at = AtLength(PROMPT + LOST - 1, lambda: kill(session))
        ours = model.generate(prompt, stopping_criteria=StoppingCriteriaList([kill_at]), **kwargs)
    assert torch.equal(ours, reference_model.generate(prompt, **kwargs))
    assert len(session.recoveries) == 1 and str(session.streams[1].step.peer_id) != killed["peer"]
    assert killed["reorders"] >= 2  # the replay carried reorders
