"""Spot checks: the pure policy (sampling, tolerance by codec and dtype, majority), and a live swarm where one of three
replicas of the model's blocks returns outputs scaled by 1.5 (tests/dishonest.py) and attracts every route: a client
with verify_fraction=1 bans it at once, names it in a warning, and its greedy generation and logits equal the local
model's."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from client.config import ClientConfig
from client.spot_checks import CODEC_ERROR, agreement, judge, relative_error, replicas, sampled, tolerance
from swarm.dht_records import ServerInfo, ServerRecord, ServerState
from tests.dishonest import ENTRY, lying

# ------------------------------------------------------------------------------------------------ the pure policy


@pytest.mark.parametrize(("draw", "fraction", "checked"), [
    (0.0, 0.0, False), (0.99, 0.0, False), (0.0, 1.0, True), (0.999, 1.0, True),
    (0.049, 0.05, True), (0.05, 0.05, False), (0.5, 0.05, False),
])
def test_a_share_fraction_of_requests_is_sampled(draw, fraction, checked):
    assert sampled(draw, fraction) is checked


@pytest.mark.parametrize("fraction", [-0.1, 1.01, math.nan])
def test_verify_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="verify_fraction"):
        ClientConfig(verify_fraction=fraction)


def test_verify_fraction_is_off_by_default_and_a_flag_of_generate_and_finetune(capsys):
    import argparse

    from client.config import FINETUNE_FLAGS, GENERATE_FLAGS, add_client_arguments, client_config_from

    assert ClientConfig().verify_fraction == 0.0
    for flags in (GENERATE_FLAGS, FINETUNE_FLAGS):
        parser = argparse.ArgumentParser()
        add_client_arguments(parser, flags)
        assert client_config_from(parser.parse_args(["--verify-fraction", "0.25"]), flags).verify_fraction == 0.25
        assert client_config_from(parser.parse_args([]), flags).verify_fraction == 0.0
        for wrong in ("2", "-0.5", "nan", "often"):
            with pytest.raises(SystemExit):
                parser.parse_args(["--verify-fraction", wrong])
            assert "verify_fraction must be" in capsys.readouterr().err


def _scaled(codec: str, factor: float) -> float:
    """The relative error between hidden states and the same scaled by `factor`, each through `codec` once."""
    from swarm import compression

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 64)
    hidden[..., 3] *= 30  # an outlier channel, as real hidden states have
    codec = compression.get(codec)
    return relative_error(codec.decode(codec.encode(hidden)), codec.decode(codec.encode(hidden * factor)))


@pytest.mark.parametrize(("codec", "dtypes"), [
    ("none", ("float32", "float32")), ("float16", ("float32", "float32")), ("int8_outlier", ("float32", "float32")),
    ("int8_outlier", ("bfloat16", "float32")), ("hadamard_int8", ("float32", "float32")),
    ("int4_outlier", ("float32", "float32")),
])
def test_the_tolerance_passes_honest_codec_error_and_catches_a_1_5x_lie(codec, dtypes):
    limit = tolerance(codec, dtypes)
    assert _scaled(codec, 1.0) <= limit  # honest: the same output, encoded
    assert _scaled(codec, 1.5) > limit  # the dishonest server of these tests
    assert limit >= 2 * CODEC_ERROR[codec]


def test_the_tolerance_is_exact_ish_for_float32_and_wider_for_lossy_codecs_dtypes_and_recoded_inputs():
    exact = tolerance("none")
    assert exact <= 2e-3
    assert exact < tolerance("float16") < tolerance("int8_outlier") < tolerance("int5_outlier") < tolerance("int4_outlier")
    assert tolerance("none", ("bfloat16", "float32")) > exact
    assert tolerance("int8_outlier", input_codecs=("int6_outlier",)) > tolerance("int8_outlier")
    assert tolerance("a-codec-nobody-knows") > tolerance("int4_outlier")


def test_relative_error_is_per_token_so_one_wrong_token_is_not_averaged_away():
    a = torch.randn(4, 16, 64)
    b = a.clone()
    b[2, 5] *= 1.5
    assert relative_error(a, a) == 0.0
    assert relative_error(a, b) == pytest.approx(0.5, rel=1e-5)
    assert relative_error(a, a[:, :8]) == math.inf
    assert relative_error(a, torch.full_like(a, math.nan)) == math.inf


T, F = True, False


@pytest.mark.parametrize(("agree", "majority", "outvoted"), [
    ([[T, T], [T, T]], (0, 1), ()),  # two agree
    ([[T, F], [F, T]], (), ()),  # two disagree: a third must decide
    ([[T, F, F], [F, T, T], [F, T, T]], (1, 2), (0,)),  # the checked server lied
    ([[T, F, T], [F, T, F], [T, F, T]], (0, 2), (1,)),  # the checker lied
    ([[T, T, F], [T, T, F], [F, F, T]], (0, 1), (2,)),  # the third lied
    ([[T, F, F], [F, T, F], [F, F, T]], (), ()),  # all disagree: undecided, nobody banned
    ([[T, T, F], [T, T, T], [F, T, T]], (0, 1, 2), ()),  # one sits between two: each agrees with a majority
])
def test_the_server_out_of_the_majority_is_outvoted(agree, majority, outvoted):
    verdict = judge(agree)
    assert (verdict.majority, verdict.outvoted, verdict.decided) == (majority, outvoted, bool(majority))


def test_agreement_compares_each_pair_with_its_tolerance():
    errors = [[0.0, 0.3, 0.01], [0.3, 0.0, 0.3], [0.01, 0.3, 0.0]]
    assert agreement(errors, [[0.05] * 3] * 3) == [[T, F, T], [F, T, F], [T, F, T]]
    assert agreement(errors, [[0.5] * 3] * 3) == [[T] * 3] * 3


def _server(peer: str, start: int, end: int, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(peer, ServerRecord(state=state, start=start, end=end, cache_tokens_left=10_000))


def test_replicas_host_all_the_blocks_and_leave_out_who_answered_banned_and_offline_servers():
    servers = [_server("A", 0, 6), _server("B", 0, 3), _server("C", 2, 6), _server("D", 1, 4), _server("E", 0, 6),
               _server("F", 0, 6, ServerState.OFFLINE), _server("G", 0, 6)]
    found = replicas(servers, 2, 3, exclude={"A"}, rules=dict(banned={"G"}))
    assert [s.peer_id for s in found] == ["B", "C", "D", "E"]
    assert [s.peer_id for s in replicas(servers, 0, 6, {"E"}, dict(banned=()))] == ["A", "G"]


# ------------------------------------------------------------------------------------------------ a live swarm

LIAR_PREFIX = "tiny-llama-liar"


@pytest.fixture(scope="module")
def liar_swarm(tiny_swarm, tiny_model_path):
    """Blocks 0:6 on three servers: one scales its outputs by 1.5 and announces itself as the fastest (`swarm.liar`:
    its peer id), two are honest."""
    from tests.conftest import JoinedSwarm, own_prefix

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    args = ["--torch-dtype", "float32", "--cache-tokens", "4096", *own_prefix(LIAR_PREFIX)]
    try:
        (liar,) = swarm.start_servers(tiny_model_path, [(0, 6)], args, env=lying(1.5), python_args=ENTRY, wait=False)
        honest = swarm.start_servers(tiny_model_path, [(0, 6), (0, 6)], args, wait=False)
        for server in (liar, *honest):
            server.wait_ready(180)
        swarm.liar = liar.maddrs[0].rsplit("/p2p/", 1)[1]
        yield swarm
    finally:
        swarm.stop()


def _client(swarm, path):
    from client.model import DistributedModelForCausalLM
    from tests.conftest import exact

    model = exact(DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, dht_prefix=LIAR_PREFIX,
                                                              verify_fraction=1.0, request_timeout=20))
    connection = model.remote_layers.connection
    for _ in range(100):  # all three servers announced: a check has replicas to ask
        if len(connection.servers(refresh=True)) == 3:
            break
        import time

        time.sleep(0.2)
    return model


def test_a_server_returning_wrong_activations_is_banned_and_generation_equals_the_local_model(
        liar_swarm, tiny_model_path, reference_model, caplog):
    model = _client(liar_swarm, tiny_model_path)
    connection = model.remote_layers.connection
    try:
        assert model.remote_layers.connection.plan()[0].peer_id.to_base58() == liar_swarm.liar  # routes go through it
        prompt = torch.tensor([[1, 17, 45, 99, 23, 8]])
        with caplog.at_level(logging.WARNING, logger="client.verification"):
            tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
        expected = reference_model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, expected)
        (conviction,) = connection.spot_checks.convictions
        assert (conviction.peer, conviction.kind) == (liar_swarm.liar, "generation step")
        assert conviction.request <= 50 and conviction.error == pytest.approx(0.5, rel=0.01)
        assert liar_swarm.liar in connection.banned()
        assert any(liar_swarm.liar in r.getMessage() and "relative error 0.5" in r.getMessage() for r in caplog.records)
        assert connection.spot_checks.checks >= 12 and connection.spot_checks.traffic.sent_wire > 0
    finally:
        connection.shutdown()


def test_a_forward_through_a_lying_server_is_checked_and_its_logits_equal_the_local_model(
        liar_swarm, tiny_model_path, reference_model):
    model = _client(liar_swarm, tiny_model_path)
    connection = model.remote_layers.connection
    try:
        ids = torch.tensor([[1, 5, 9, 200, 31, 77, 4], [1, 64, 2, 3, 250, 12, 6]])
        with torch.no_grad():
            logits = model(ids).logits
            expected = reference_model(ids).logits
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        # Training routes are drawn by throughput, and the liar announces itself as the fastest by far.
        assert [(c.peer, c.kind) for c in connection.spot_checks.convictions] == [(liar_swarm.liar, "forward")]
    finally:
        connection.shutdown()
