"""Bad requests get clear errors on the client, and the server keeps serving a concurrent session correctly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hivemind.proto import runtime_pb2

from client import aio
from client.routing import RouteStep
from client.streams import SpanStream
from swarm.errors import RemoteError
from swarm.protocol import SpanRequest
from swarm.tensors import pack_tensor
from tests.conftest import TINY_CACHE_TOKENS, raw_span_call


@pytest.fixture
def concurrent_session(dist_model):
    """A session on every server that is half-way through a sequence while the bad requests arrive."""
    layers = dist_model.model.layers
    hidden = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        expected = layers(hidden)
    session = layers.inference_session(max_length=10)
    first = session.step(hidden[:, :5])
    yield session, hidden, expected, first
    # After all the errors, the session continues and stays exact.
    rest = session.step(hidden[:, 5:])
    session.close()
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-4, rtol=0)


def _first_server(dist_model) -> RouteStep:
    return dist_model.model.layers.connection.plan()[0]  # hosts blocks 0:2


def _span_call(dist_model, step: RouteStep, tensors):
    return aio.run(raw_span_call(dist_model.model.layers.connection, "forward", step, tensors))


def test_max_length_exceeded_on_client(dist_model, concurrent_session):
    layers = dist_model.model.layers
    with layers.inference_session(max_length=4) as session:
        session.step(torch.randn(1, 3, 64))
        with pytest.raises(ValueError, match="max_length=4"):
            session.step(torch.randn(1, 2, 64))


def test_max_length_exceeded_on_server(dist_model, concurrent_session):
    """A client that skips its own check still gets a clear error from the server."""
    connection = dist_model.model.layers.connection
    step = _first_server(dist_model)

    async def overflow():
        stream = SpanStream(connection, RouteStep(step.peer_id, 0, 2), batch_size=1, max_length=4)
        await stream.open()
        try:
            await stream.send([torch.randn(1, 3, 64), torch.arange(3)[None]])
            await stream.send([torch.randn(1, 2, 64), torch.arange(3, 5)[None]])
        finally:
            await stream.close()

    with pytest.raises(RemoteError, match="max_length=4") as info:
        aio.run(overflow())
    assert info.value.code == "max_length_exceeded"


def test_blocks_not_served(dist_model, concurrent_session):
    step = _first_server(dist_model)
    with pytest.raises(RemoteError, match=r"hosts blocks 0:2; the request asked for 1:4") as info:
        _span_call(dist_model, RouteStep(step.peer_id, 1, 4), [torch.randn(1, 3, 64), torch.arange(3)[None]])
    assert info.value.code == "blocks_not_served"


def test_refused_requests_show_in_the_servers_info(dist_model):
    """rpc_info counts refused or failed requests (`errors`) apart from those served, which it counts by kind."""
    step = _first_server(dist_model)
    stub = dist_model.model.layers.connection.stub(step.peer_id)

    def info() -> dict:
        return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)

    before = info()
    with pytest.raises(RemoteError, match="must have shape"):
        _span_call(dist_model, step, [torch.randn(1, 3, 32), torch.arange(3)[None]])
    middle = info()
    assert middle["errors"] == before["errors"] + 1 and middle["by_kind"] == before["by_kind"]
    _span_call(dist_model, step, [torch.randn(1, 3, 64), torch.arange(3)[None]])
    after = info()
    assert after["errors"] == middle["errors"]
    assert after["by_kind"] == {**middle["by_kind"], "forward": middle["by_kind"].get("forward", 0) + 1}


def test_wrong_hidden_size(dist_model, concurrent_session):
    step = _first_server(dist_model)
    with pytest.raises(RemoteError, match=r"shape \[batch, length, 64\], got \[1, 3, 32\]") as info:
        _span_call(dist_model, step, [torch.randn(1, 3, 32), torch.arange(3)[None]])
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ([torch.full((1, 3, 64), float("nan")), torch.arange(3)[None]], "NaN or Inf"),
        ([torch.randn(1, 3, 64), torch.arange(4)[None]], "position ids must be integers of shape"),
        ([torch.randn(1, 3, 64), torch.arange(3)[None], torch.full((1, 3), 2)], "may only hold 0 and 1"),
        ([torch.randn(1, 3, 64)], "expected hidden states, position ids"),
        ([torch.randn(1, 3, 64), torch.tensor([[0, 1, 100000]])], "position ids must lie in"),
    ],
)
def test_malformed_tensors(dist_model, concurrent_session, tensors, message):
    with pytest.raises(RemoteError, match=message):
        _span_call(dist_model, _first_server(dist_model), tensors)


def test_malformed_wire_payloads(dist_model, concurrent_session):
    """Requests built by hand: a lying buffer size, a forbidden dtype, garbage metadata."""
    connection = dist_model.model.layers.connection
    stub = connection.stub(_first_server(dist_model).peer_id)
    good = [pack_tensor(torch.randn(1, 3, 64)), pack_tensor(torch.arange(3)[None])]
    short = runtime_pb2.Tensor(buffer=good[0].buffer[:-4], size=good[0].size, dtype="float32")
    pickled = runtime_pb2.Tensor(buffer=b"\x80\x04N.", size=[1], dtype="object")
    cases = [
        (SpanRequest(start=0, end=2).encode(), [short, good[1]], "buffer has 764 bytes"),
        (SpanRequest(start=0, end=2).encode(), [pickled, good[1]], "dtype 'object' is not one of"),
        (b"{not json", good, "malformed SpanRequest"),
        (b'{"start": 2, "end": 1}', good, "hosts blocks 0:2"),
    ]
    for metadata, tensors, message in cases:
        request = runtime_pb2.ExpertRequest(metadata=metadata, tensors=tensors)
        with pytest.raises(Exception) as info:
            aio.run(stub.rpc_forward(request, timeout=10))
        assert message in RemoteError.from_exception(info.value).message


def test_kv_cache_budget_exhausted(dist_model, concurrent_session):
    layers = dist_model.model.layers
    # The concurrent session holds 10 tokens on every server; this one takes nearly all that is left.
    big = layers.inference_session(max_length=490, batch_size=8)
    big.step(torch.randn(8, 2, 64))
    assert TINY_CACHE_TOKENS - 10 - 8 * 490 < 200
    try:
        with pytest.raises(RemoteError, match="KV cache is full") as info:
            with layers.inference_session(max_length=200) as session:
                session.step(torch.randn(1, 2, 64))
        assert info.value.code == "cache_full"
        with pytest.raises(RemoteError, match="exceeds this server's whole KV-cache budget"):
            with layers.inference_session(max_length=500, batch_size=9) as session:
                session.step(torch.randn(9, 1, 64))
    finally:
        big.close()
    # Once the big session is closed, its tokens are free again.
    with layers.inference_session(max_length=200) as session:
        session.step(torch.randn(1, 2, 64))


def test_unknown_hosted_adapter(dist_model, concurrent_session):
    step = _first_server(dist_model)
    with pytest.raises(RemoteError, match="does not host adapter 'x'; it hosts none"):
        aio.run(raw_span_call(dist_model.model.layers.connection,
            "forward", step, [torch.randn(1, 3, 64), torch.arange(3)[None]], adapter="x"))


@pytest.mark.parametrize(
    "grad, message",
    [
        (torch.randn(1, 4, 64), "output gradient has shape [1, 4, 64], hidden states [1, 3, 64]"),
        (torch.full((1, 3, 64), float("nan")), "output gradient must not contain NaN or Inf"),
        (torch.randn(1, 3, 32), "output gradient must have shape [batch, length, 64]"),
    ],
)
def test_bad_output_gradients(dist_model, concurrent_session, grad, message):
    step = _first_server(dist_model)
    with pytest.raises(RemoteError, match=re.escape(message)):
        aio.run(raw_span_call(dist_model.model.layers.connection,
            "backward", step, [torch.randn(1, 3, 64), torch.arange(3)[None], grad]))


def test_a_backward_with_nothing_to_differentiate_is_refused(dist_model, concurrent_session):
    """input_grad=False without LoRA tensors or deep prompts leaves no gradient to return: refused, on both paths."""
    from client.streams import TrainStream

    connection = dist_model.model.layers.connection
    step = _first_server(dist_model)
    inputs = [torch.randn(1, 4, 64), torch.arange(4)[None]]
    with pytest.raises(RemoteError, match="input_grad is false and the request has no LoRA tensors or deep prompts"):
        aio.run(raw_span_call(connection, "backward", step, [*inputs, torch.randn(1, 4, 64)], input_grad=False))
    with pytest.raises(RemoteError, match="input_grad is false and the request has no LoRA tensors or deep prompts"):
        aio.run(TrainStream(connection, step).forward(SpanRequest(start=0, end=2, input_grad=False), inputs))
