"""Servers announce their request limits and clients fit them: a server started with --max-chunk-tokens 64 shows the
limit in `swarm server --help` (the declaration's default), in its DHT record, and in a client that splits a 4x128
batch to fit it with outputs equal to local transformers. The decisions (client.limits) as tables first."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from client.limits import (
    RequestLimits,
    announced_limits,
    forward_needs_session,
    length_chunks,
    route_limit,
    split_batch,
)
from client.routing import RouteStep, ServerChoice
from swarm.config import ServerConfig
from swarm.dht_records import ServerInfo, ServerRecord, ServerState

# ---------------------------------------------------------------------------------------------- the decisions


def server(name: str, start: int, end: int, tokens: int = 8192, batch: int = 64, state=ServerState.ONLINE,
           adapters=()) -> ServerInfo:
    return ServerInfo(name, ServerRecord(state=state, start=start, end=end, max_chunk_tokens=tokens, max_batch_size=batch,
                                         adapters=tuple(adapters)))


SWARM = [server("a", 0, 3, tokens=64), server("b", 3, 6, tokens=100, batch=3), server("c", 0, 6, tokens=32,
         state=ServerState.OFFLINE), server("d", 4, 6, tokens=16, adapters=["x"])]


@pytest.mark.parametrize("start, end, own, kwargs, expected", [
    (0, 6, 8192, {}, RequestLimits(16, 3)),  # the smallest of the online servers of any of the blocks (c is offline)
    (0, 3, 8192, {}, RequestLimits(64, 64)),  # only servers of the chain's own blocks count
    (0, 3, 50, {}, RequestLimits(50, 64)),  # and the client's own setting
    (0, 6, 8192, dict(choice=ServerChoice.of(blocked=["d"])), RequestLimits(64, 3)),  # never used: does not count
    (0, 6, 8192, dict(adapter="y"), RequestLimits(8192, None)),  # none hosts the adapter: nothing announced
])
def test_announced_limits_are_the_smallest_of_the_servers_that_may_serve(start, end, own, kwargs, expected):
    assert announced_limits(SWARM, start, end, own, **kwargs) == expected
    assert announced_limits([], start, end, own) == RequestLimits(own, None)


@pytest.mark.parametrize("batch, length, tokens, max_batch, expected", [
    (4, 128, 8192, None, [(0, 4)]),
    (4, 32, 64, None, [(0, 2), (2, 4)]),
    (4, 16, 64, 3, [(0, 2), (2, 4)]),  # 4 fit the tokens, but not the batch limit: two nearly equal chunks
    (7, 1, 8192, 3, [(0, 3), (3, 6), (6, 7)]),
    (3, 9000, 8192, None, [(0, 1), (1, 2), (2, 3)]),  # a sequence over the limit still goes alone
])
def test_split_batch_fits_tokens_and_batch_size(batch, length, tokens, max_batch, expected):
    assert [(s.start, s.stop) for s in split_batch(batch, length, tokens, max_batch)] == expected


@pytest.mark.parametrize("batch, length, tokens, expected", [
    (1, 128, 64, [(0, 64), (64, 128)]),
    (3, 128, 64, [(i, min(i + 21, 128)) for i in range(0, 128, 21)]),
    (2, 5, 64, [(0, 5)]),
    (4, 128, None, [(0, 128)]),  # no limit announced
])
def test_length_chunks_of_an_inference_step(batch, length, tokens, expected):
    pieces = length_chunks(batch, length, tokens)
    assert [(s.start, s.stop) for s in pieces] == expected
    assert all(batch * (s.stop - s.start) <= (tokens or batch * length) for s in pieces)


def test_a_batch_wider_than_the_token_limit_cannot_be_stepped():
    with pytest.raises(ValueError, match="a batch of 65 sequences exceeds the 64 tokens per request"):
        length_chunks(65, 2, 64)


def test_route_limit_and_when_a_forward_needs_a_session():
    assert route_limit([RouteStep("a", 0, 3, 64), RouteStep("b", 3, 6, 100)]) == 64
    assert route_limit([RouteStep("a", 0, 3), RouteStep("b", 3, 6, 100)]) == 100
    assert route_limit([RouteStep("a", 0, 6)]) is None
    assert RouteStep("a", 0, 3, 64) == RouteStep("a", 0, 3)  # the limit is what was announced, not the step's identity
    limits = RequestLimits(64, 3)
    assert not forward_needs_session(64, limits, needs_grad=True)
    assert forward_needs_session(65, limits, needs_grad=False)
    with pytest.raises(ValueError, match="a sequence of 65 tokens exceeds the 64 tokens per request .* train on "
                                         "sequences of at most 64 tokens, or use servers started with a larger "
                                         "--max-chunk-tokens"):
        forward_needs_session(65, limits, needs_grad=True)


def test_records_carry_the_limits_and_parse_without_them():
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=3, max_chunk_tokens=64, max_batch_size=3)
    assert ServerRecord.from_dict(record.to_dict()) == record
    old = {k: v for k, v in record.to_dict().items() if k not in ("max_chunk_tokens", "max_batch_size")}
    parsed = ServerRecord.from_dict(old)  # a server from before limits were announced takes the declared defaults
    assert (parsed.max_chunk_tokens, parsed.max_batch_size) == (ServerConfig.max_chunk_tokens, ServerConfig.max_batch_size)
    for bad in ("64", -1, 0, True, None, 1.5):
        parsed = ServerRecord.from_dict({**record.to_dict(), "max_chunk_tokens": bad})
        assert parsed is not None and parsed.max_chunk_tokens == ServerConfig.max_chunk_tokens and parsed.max_batch_size == 3


# ---------------------------------------------------------------------------------------------- the declaration


def _server_help(capsys) -> str:
    from swarm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["server", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_server_help_shows_the_declared_default(capsys, monkeypatch):
    from swarm.cli import build_parser
    from swarm.options import from_args

    declared = {f.name: f for f in dataclasses.fields(ServerConfig)}["max_chunk_tokens"]
    assert (f"largest batch * length accepted in one request (forward, backward or inference step) "
            f"(default: {declared.default})") in _server_help(capsys)
    monkeypatch.setattr(declared, "default", 64)  # change the declaration: the flag's help and default follow
    assert "inference step) (default: 64)" in _server_help(capsys)
    args = build_parser().parse_args(["server", "m", "--blocks", "0:3", "--new-swarm"])
    assert from_args(ServerConfig, args, adapters={}).max_chunk_tokens == 64


# ---------------------------------------------------------------------------------------------- a swarm


LIMITED = "tiny-llama-limited"  # its own DHT prefix: no other test's client routes through these servers


@pytest.fixture(scope="module")
def limited_swarm(tiny_swarm, tiny_model_path):
    """Blocks 0:3 on a server that takes 64 tokens per request, 3:6 on one that takes 100 and batches of 3 (beside the
    shared swarm, in its DHT)."""
    from tests.conftest import JoinedSwarm, own_prefix

    common = ["--torch-dtype", "float32", "--cache-tokens", "2048", *own_prefix(LIMITED)]
    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        started = [*swarm.start_servers(tiny_model_path, [(0, 3)], [*common, "--max-chunk-tokens", "64"], wait=False),
                   *swarm.start_servers(tiny_model_path, [(3, 6)], [*common, "--max-chunk-tokens", "100",
                                                                    "--max-batch-size", "3"], wait=False)]
        for process in started:
            process.wait_ready()
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def limited_model(limited_swarm, tiny_model_path):
    from client.model import DistributedModelForCausalLM
    from tests.conftest import exact

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, limited_swarm.initial_peers,
                                                              dht_prefix=LIMITED))
    yield model
    model.remote_layers.connection.shutdown()


def test_the_limits_are_in_the_records_and_enforced(limited_model):
    from client import aio
    from swarm.dht_records import fetch_servers
    from swarm.errors import RemoteError
    from tests.conftest import raw_span_call

    connection = limited_model.remote_layers.connection
    records = {(s.record.start, s.record.end): s.record for s in fetch_servers(connection.dht, connection.prefix, 6)}
    assert {span: (r.max_chunk_tokens, r.max_batch_size) for span, r in records.items()} == {(0, 3): (64, 64),
                                                                                            (3, 6): (100, 3)}
    (first, _) = connection.plan()
    assert (first.start, first.end, first.max_chunk_tokens) == (0, 3, 64)
    with pytest.raises(RemoteError, match="1x65 tokens exceed this server's limit of 64 per request"):
        aio.run(raw_span_call(connection, "forward", first, [torch.randn(1, 65, 64), torch.arange(65)[None]]))
    assert limited_model.remote_layers.request_limits() == RequestLimits(64, 3)


def test_a_long_batch_without_gradients_goes_through_sessions_in_chunks(limited_model, reference_model):
    """4 x 128 tokens, each sequence twice what the first server takes: exact all the same (one row left-padded)."""
    input_ids = torch.randint(3, 320, (4, 128), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(input_ids)
    mask[2, :5] = 0
    with torch.no_grad():
        ours = limited_model(input_ids, attention_mask=mask).logits
        theirs = reference_model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_generation_from_a_long_prompt_matches_local(limited_model, reference_model):
    prompt = torch.randint(3, 320, (1, 128), generator=torch.Generator().manual_seed(13))
    expected = reference_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with limited_model.inference_session(max_length=134) as session:
        ours = limited_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert [len(stream.history) for stream in session.streams] == [2 + 5, 2 + 5]  # the prompt in 2 pieces of 64
    assert torch.equal(ours, expected)


def test_training_batches_are_split_to_fit_and_too_long_sequences_are_refused(limited_model, reference_model):
    layers = limited_model.remote_layers
    input_ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(14))
    embeds = reference_model.model.embed_tokens(input_ids).detach()
    ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    ours = limited_model(inputs_embeds=ours_in, labels=input_ids).loss
    theirs = reference_model(inputs_embeds=theirs_in, labels=input_ids).loss
    assert len(layers.last_routes) == 2  # 4 x 32 tokens: two requests of 2 x 32 (64 tokens, batches under 3)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-4, rtol=0)

    long_in = reference_model.model.embed_tokens(torch.randint(3, 320, (4, 128))).detach().requires_grad_(True)
    with pytest.raises(ValueError, match="a sequence of 128 tokens exceeds the 64 tokens per request .* train on "
                                         "sequences of at most 64 tokens"):
        limited_model(inputs_embeds=long_in)
