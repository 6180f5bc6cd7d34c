"""Server-to-server forwarding: each server pushes its output to the next one of the route. Generation stays
token-identical to the local model and to client-driven hops, the client sends each step once instead of once per
hop, bad pushes are refused while the server goes on serving, and a failed push falls back to the client."""

from __future__ import annotations

import itertools
import signal
import time

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import StoppingCriteria, StoppingCriteriaList

from client import aio
from client.config import CLIENT, ClientConfig
from swarm.errors import RemoteError
from swarm.forwarding import ForwardHop, HopTarget, PushStep, forward_chain, forwarding_pays, forwarding_setting
from swarm.tensors import pack_tensor
from tests.conftest import exact
from tests.test_fault_tolerance import AtLength

GREEDY = dict(do_sample=False, pad_token_id=0)

A, B, C = "A" * 40, "B" * 40, "C" * 40


def target(peer: str, accepts: bool = True, codec: str = "none", step: int = 3) -> HopTarget:
    return HopTarget(peer, peer[0].lower() * 32, step, codec, accepts)


@pytest.mark.parametrize(
    "targets, index, step_bytes, expected",
    [
        ([target(A), target(B), target(C)], 0, 100, [B, C]),  # the whole rest of the route
        ([target(A), target(B), target(C)], 1, 100, [C]),
        ([target(A), target(B), target(C)], 2, 100, []),  # the last server answers the client
        ([target(A), target(B, accepts=False), target(C)], 0, 100, []),  # a push into B failed: the client drives B
        ([target(A), target(B), target(C, accepts=False)], 0, 100, [B]),  # ... and B's output comes back to the client
        ([target(A), target(B, accepts=False), target(C)], 1, 100, [C]),  # B, sent by the client, still pushes to C
        ([target(A), target(B), target(C)], 0, 4 << 20, []),  # too large for one push message: client-driven
    ],
)
def test_forward_chain_names_the_hops_that_take_pushes(targets, index, step_bytes, expected):
    hops = forward_chain(targets, index, step_bytes, max_bytes=3 << 20)
    assert [hop.peer_id for hop in hops] == expected
    assert all(hop.session_id == hop.peer_id[0].lower() * 32 and hop.step == 3 for hop in hops)


def test_forward_chain_names_each_sessions_codec():
    hops = forward_chain([target(A), target(B, codec="int8_outlier"), target(C, codec="none")], 0, 10, 100)
    assert [hop.codec for hop in hops] == ["int8_outlier", ""]


class StepClock(StoppingCriteria):
    """Never stops generation; records when each token is ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _generate(model, prompt, new_tokens: int, forwarding: bool):
    with model.inference_session(max_length=prompt.shape[1] + new_tokens, forwarding=forwarding) as session:
        output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY)
    return output, session


def test_forwarding_is_token_identical_and_the_client_sends_each_step_once(dist_model, reference_model):
    prompt = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(11))
    expected = reference_model.generate(prompt, max_new_tokens=32, min_new_tokens=32, **GREEDY)
    forwarded, pushed = _generate(dist_model, prompt, 32, forwarding=True)
    driven, direct = _generate(dist_model, prompt, 32, forwarding=False)
    assert torch.equal(forwarded, expected) and torch.equal(driven, expected)
    assert len(pushed.streams) == 3 and all(s.accepts_pushes for s in pushed.streams)  # no push fell back
    # The client sent every step to the first server only; every server's output still came back (the next span's
    # history, for replay), so it received as much as with client-driven hops.
    assert [s.traffic.sent_wire > 0 for s in pushed.streams] == [True, False, False]
    assert 3 * pushed.traffic.sent_wire == direct.traffic.sent_wire
    assert pushed.traffic.received_wire == direct.traffic.received_wire
    assert [len(s.history) for s in pushed.streams] == [len(s.history) for s in direct.streams] == [32] * 3


def test_forwarding_with_a_lossy_codec_equals_client_driven_hops(dist_model):
    """Each hop's input is encoded once either way (the client relays a server's output bytes as they came)."""
    prompt = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(12))
    dist_model.set_codecs(inference="int8_outlier")
    try:
        forwarded, pushed = _generate(dist_model, prompt, 16, forwarding=True)
        driven, _ = _generate(dist_model, prompt, 16, forwarding=False)
    finally:
        exact(dist_model)
    assert torch.equal(forwarded, driven)
    assert all(s.accepts_pushes for s in pushed.streams)
    # It did travel compressed, and a pushed span's history holds the very bytes the server pushed to it.
    assert pushed.traffic.ratio > 2 and pushed.streams[1].history[-1][0].dtype == "payload:int8_outlier"


def test_a_refused_push_falls_back_to_the_client(dist_model, reference_model):
    """A server that cannot push (here: it names a session the next server does not have) says so in its reply; the
    client sends that hop itself, from then on, and the output is unchanged."""
    layers = dist_model.model.layers
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = layers(hidden)
    with layers.inference_session(max_length=9, forwarding=True) as session:
        first = session.step(hidden[:, :4])
        session.streams[2].session_id = "0" * 32  # pushes into the last server now miss
        rest = [session.step(hidden[:, i : i + 1]) for i in range(4, 9)]
        assert [s.accepts_pushes for s in session.streams] == [True, True, False]
        sent = [s.traffic.sent_wire for s in session.streams]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), expected, atol=1e-4, rtol=0)
    assert sent[0] > 0 and sent[1] == 0 and sent[2] > 0


def test_bad_pushes_are_refused_clearly_and_the_session_goes_on(dist_model):
    layers = dist_model.model.layers
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        expected = layers(hidden)
    with layers.inference_session(max_length=6, forwarding=True) as session:
        first = session.step(hidden[:, :3])
        middle = session.streams[1]
        stub = layers.connection.stub(middle.step.peer_id)

        def push(tensors, **fields):
            meta = dict(step=middle.step_id, session_id=middle.session_id) | fields
            request = runtime_pb2.ExpertRequest(metadata=PushStep(**meta).encode(), tensors=tensors)
            with pytest.raises(Exception) as info:
                aio.run(stub.rpc_push(request, timeout=10))
            return RemoteError.from_exception(info.value).message

        good = [pack_tensor(torch.randn(1, 1, 64)), pack_tensor(torch.tensor([[3]]))]
        assert "no inference session " + "f" * 32 + " is open here" in push(good, session_id="f" * 32)
        assert "pushed step 7 does not follow this session's 1 steps" in push(good, step=7)
        assert "codec 'int8_outlier'; this session takes 'none'" in push([pack_tensor(torch.randn(1, 1, 64), "int8_outlier"),
                                                                          good[1]])
        assert "shape [batch, length, 64], got [1, 1, 32]" in push([pack_tensor(torch.randn(1, 1, 32)), good[1]])
        assert "batch size 1, push has 2" in push([pack_tensor(torch.randn(2, 1, 64)), pack_tensor(torch.tensor([[3], [3]]))])
        assert "NaN or Inf" in push([pack_tensor(torch.full((1, 1, 64), float("nan"))), good[1]])
        assert "unknown codec 'zip9'" in push(good, forward=[ForwardHop(peer_id=A, session_id="a" * 32, step=1, codec="zip9")])
        request = runtime_pb2.ExpertRequest(metadata=b'{"step": "soon"}', tensors=good)
        with pytest.raises(Exception) as info:
            aio.run(stub.rpc_push(request, timeout=10))
        assert "malformed PushStep" in str(info.value)
        rest = session.step(hidden[:, 3:])
        assert all(s.accepts_pushes for s in session.streams)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def two_hop_swarm(tiny_model_path):
    """Blocks 0:3 on one server, 3:6 on two: the second hop has a replica to move to."""
    from swarm.launch import LocalSwarm

    swarm = LocalSwarm()
    try:
        swarm.start_bootstrap()
        swarm.start_servers(tiny_model_path, [(0, 3), (3, 6), (3, 6)], ["--torch-dtype", "float32", "--shutdown-timeout", "2"])
        yield swarm
    finally:
        swarm.stop()


def test_the_next_server_killed_mid_generation_falls_back_and_stays_identical(two_hop_swarm, tiny_model_path,
                                                                              reference_model):
    from client.model import DistributedModelForCausalLM

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, two_hop_swarm.initial_peers,
                                                              request_timeout=20))
    prompt = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(15))
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, **GREEDY)
    expected = reference_model.generate(prompt, **kwargs)
    killed, clock = [], StepClock()

    def kill(session):
        victim = str(session.streams[1].step.peer_id)
        (process,) = [p for p in two_hop_swarm.servers if any(victim in m for m in p.maddrs)]
        process.stop(signal.SIGKILL)  # the first server's next push finds nobody
        killed.append(victim)

    try:
        with model.inference_session(max_length=48, forwarding=True) as session:
            ours = model.generate(prompt, stopping_criteria=StoppingCriteriaList([AtLength(20, lambda: kill(session)), clock]),
                                  **kwargs)
    finally:
        model.remote_layers.connection.shutdown()
    assert torch.equal(ours, expected)
    assert len(session.recoveries) == 1 and str(session.streams[1].step.peer_id) != killed[0]
    # The replacement took its history from the client and pushes from the first server again.
    assert session.streams[1].accepts_pushes and len(session.streams[1].history) == 40
    steps = sorted(b - a for a, b in itertools.pairwise(clock.times))
    print(f"\nnext server SIGKILLed mid-generation: the step took {steps[-1]:.2f} s (push failed, fell back, moved the "
          f"span in {session.recoveries[0]:.2f} s); median step {steps[len(steps) // 2] * 1000:.1f} ms")


def test_generate_command_turns_forwarding_on_off_and_auto():
    from swarm.cli import build_parser

    parser = build_parser()
    args = ["generate", "model", "hello", "--initial-peers", "/ip4/127.0.0.1/tcp/1"]
    assert parser.parse_args(args).forwarding is CLIENT.forwarding is False
    assert parser.parse_args([*args, "--forwarding"]).forwarding is True
    assert parser.parse_args([*args, "--forwarding", "on"]).forwarding is True
    assert parser.parse_args([*args, "--forwarding", "off"]).forwarding is False
    assert parser.parse_args([*args, "--forwarding", "auto", "--forwarding-min-rtt-ms", "12"]).forwarding_min_rtt_ms == 12
    generate = parser._subparsers._group_actions[0].choices["generate"]
    assert "--forwarding [{auto,on,off}]" in generate.format_help() and "server of the route" in generate.format_help()


def test_a_bad_forwarding_setting_is_refused_by_name(capsys):
    from swarm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "hi", "--forwarding", "sometimes"])
    assert "forwarding must be one of auto, on, off" in capsys.readouterr().err
    with pytest.raises(ValueError, match="forwarding must be one of auto, on, off.*'sometimes'"):
        ClientConfig(forwarding="sometimes")
    assert (ClientConfig(forwarding="ON").forwarding, ClientConfig(forwarding="off").forwarding) == (True, False)
    assert forwarding_setting(False) is False and forwarding_setting(" auto ") == "auto"


INF = float("inf")


@pytest.mark.parametrize(
    "rtt_ms, expected",
    [
        ([0.6, 0.8, 0.7, 0.9], False),  # one machine's loopback: client-driven hops are as fast or faster
        ([50.0, 51.0, 49.0, 50.5], True),  # 25 ms one way: forwarding saves a round trip per hop
        ([None, None, None], False),  # nothing measured yet: the safe choice
        ([INF, 50.0, 60.0], True),  # a server whose last ping failed is left out of the median
        ([1.0, 2.0, 90.0], False),  # one far server: the median says the route is near
        ([4.0, 6.0], True),  # even count: the mean of the middle two (5.0), at the threshold
        ([INF, INF], False),
    ],
)
def test_forwarding_pays_where_the_measured_round_trips_are_long(rtt_ms, expected):
    assert forwarding_pays(rtt_ms, min_rtt_ms=5.0) is expected


def test_auto_forwarding_follows_the_measured_round_trips(dist_model, reference_model):
    """With forwarding "auto", the session asks the client's pinger (real round trips to the route's servers, ~1 ms
    here) at every step: a threshold below them forwards each step, one above them drives every hop."""
    prompt = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(13))
    expected = reference_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, **GREEDY)
    layers, saved = dist_model.remote_layers, dist_model.remote_layers.config
    connection = layers.connection
    peers = {str(s.peer_id) for s in connection.servers()}
    deadline = time.monotonic() + 20
    while not peers <= set(connection.pings) and time.monotonic() < deadline:  # the pinger has measured them all
        time.sleep(0.1)
    measured = [connection.pings[p] for p in peers]
    assert all(0 < rtt < 1000 for rtt in measured), measured
    try:
        sessions = {}
        for threshold in (0.0, 1e9):
            layers.configure(forwarding="auto", forwarding_min_rtt_ms=threshold)
            output, sessions[threshold] = _generate(dist_model, prompt, 6, forwarding=None)
            assert torch.equal(output, expected)
    finally:
        layers.config = saved
    near, far = sessions[1e9], sessions[0.0]
    assert far.forwarding == near.forwarding == "auto" and (far.forwards, near.forwards) == (True, False)
    assert [s.traffic.sent_wire > 0 for s in far.streams] == [True, False, False]  # pushed along the route
    assert all(s.traffic.sent_wire > 0 for s in near.streams)  # the client sent every hop itself
