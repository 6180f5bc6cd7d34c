"""Compressed tensors on the wire: any tensor slot may carry a codec payload; clients choose codecs per role,
servers decode them safely and refuse codecs they do not know."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hivemind.proto import runtime_pb2

from client import aio
from swarm.errors import BadRequest, RemoteError
from swarm.service import BlockService
from swarm.tensors import pack_tensor, unpack_tensor
from tests.conftest import raw_span_call


def hidden_like(batch=2, tokens=5, channels=64) -> torch.Tensor:
    x = torch.randn(batch, tokens, channels, generator=torch.Generator().manual_seed(1))
    x[:, 0, 3] = 300.0  # an outlier channel at the first token, as real models have
    return x


@pytest.mark.parametrize("codec, rtol", [("float16", 1e-3), ("bfloat16", 8e-3), ("int8_outlier", 2e-2)])
def test_codec_slots_round_trip(codec, rtol):
    x = hidden_like()
    proto = pack_tensor(x, codec)
    assert proto.dtype == f"payload:{codec}" and len(proto.buffer) < x.numel() * 4 / 1.5
    y = unpack_tensor(proto)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).norm(dim=-1) / x.norm(dim=-1)).max() < rtol


def test_malformed_slots_are_bad_requests():
    good = pack_tensor(hidden_like(), "int8_outlier")
    cases = [
        runtime_pb2.Tensor(buffer=good.buffer[:-3], size=good.size, dtype=good.dtype),  # truncated
        runtime_pb2.Tensor(buffer=good.buffer + b"xx", size=good.size, dtype=good.dtype),  # trailing bytes
        runtime_pb2.Tensor(buffer=b"\xff\xff\xff\x00" + good.buffer[4:], size=good.size, dtype=good.dtype),  # header size
        runtime_pb2.Tensor(buffer=good.buffer, size=[2, 5, 32], dtype=good.dtype),  # wrong declared shape
        runtime_pb2.Tensor(buffer=good.buffer, size=good.size, dtype="payload:nope"),  # unknown codec
        runtime_pb2.Tensor(buffer=good.buffer, size=good.size, dtype="payload:float16"),  # another codec's payload
        runtime_pb2.Tensor(buffer=b"\x02\x00\x00\x00{}", size=good.size, dtype=good.dtype),  # empty header
    ]
    for proto in cases:
        with pytest.raises(BadRequest):
            unpack_tensor(proto, "hidden states")


def _server_bytes_in(connection, peer_id) -> int:
    stub = BlockService.get_stub(connection.p2p, peer_id, namespace=connection.prefix)
    return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)["bytes_in"]


def test_clients_choose_codecs_per_role(dist_model, reference_model):
    layers = dist_model.remote_layers
    saved = layers.config
    connection = layers.connection
    first = connection.plan()[0].peer_id
    input_ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    try:
        sizes = {}
        for codec in ("none", "bfloat16"):
            dist_model.set_codecs(inference=codec, activations=codec, gradients=codec)
            before = _server_bytes_in(connection, first)
            with torch.no_grad():
                logits = dist_model(input_ids).logits
            sizes[codec] = _server_bytes_in(connection, first) - before
            torch.testing.assert_close(logits, reference_model(input_ids).logits, atol=0.05 if codec != "none" else 1e-4,
                                       rtol=0.05 if codec != "none" else 1e-4)
        assert sizes["none"] / sizes["bfloat16"] > 1.8  # hidden states dominate the request

        # Training with compressed activations and gradients stays close to the exact gradients.
        embeds = reference_model.get_input_embeddings()(input_ids).detach()
        ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
        dist_model(inputs_embeds=ours_in, labels=input_ids).loss.backward()
        reference_model(inputs_embeds=theirs_in, labels=input_ids).loss.backward()
        assert ((ours_in.grad - theirs_in.grad).norm() / theirs_in.grad.norm()) < 0.05

        # An inference session with compressed hidden states: its output stays close to the exact model's.
        dist_model.set_codecs(inference="int8_outlier", activations="none", gradients="none")
        with dist_model.inference_session(max_length=30) as session, torch.no_grad():
            out = session.step(dist_model.get_input_embeddings()(input_ids[:, :20]))
            logits = reference_model.lm_head(reference_model.model.norm(out))
            torch.testing.assert_close(logits, reference_model(input_ids[:, :20]).logits, atol=0.1, rtol=0.1)
    finally:
        layers.config = saved
        reference_model.zero_grad(set_to_none=True)


def test_unknown_codecs_are_refused_and_named(dist_model):
    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]
    inputs = [torch.randn(1, 3, 64), torch.arange(3)[None]]
    with pytest.raises(RemoteError, match=r"unknown codec 'nope'; this server supports \['none', "):
        aio.run(raw_span_call(connection, "forward", step, inputs, reply_codec="nope"))


def test_set_codecs_names_the_choices(dist_model):
    with pytest.raises(ValueError, match=r"unknown codec 'nope' for gradients; choose from \['none', "):
        dist_model.set_codecs(gradients="nope")
    before = dist_model.remote_layers.codecs
    saved = dist_model.remote_layers.config
    dist_model.set_codecs(inference="bfloat16", replies={"gradients": "int8_outlier"})
    try:
        assert dist_model.remote_layers.codecs == replace(before, inference="bfloat16", gradients_reply="int8_outlier")
        assert dist_model.remote_layers.reply_codec("gradients") == "int8_outlier"
        assert dist_model.remote_layers.reply_codec("activations") == before.activations
        with pytest.raises(ValueError, match="replies names role 'delta'"):
            dist_model.set_codecs(replies={"delta": "none"})
    finally:
        dist_model.remote_layers.config = saved


def test_traffic_is_counted_raw_and_on_the_wire(dist_model):
    from dataclasses import replace

    connection = dist_model.remote_layers.connection
    input_ids = torch.randint(3, 320, (2, 32), generator=torch.Generator().manual_seed(3))
    saved = dist_model.remote_layers.config
    dist_model.set_codecs(activations="bfloat16", inference="int8_outlier")
    try:
        before, hidden_before = replace(connection.traffic), replace(connection.hidden_traffic)
        with torch.no_grad():
            dist_model(input_ids)
        sent_raw = connection.traffic.sent_raw - before.sent_raw
        sent_wire = connection.traffic.sent_wire - before.sent_wire
        received_raw = connection.traffic.received_raw - before.received_raw
        received_wire = connection.traffic.received_wire - before.received_wire
        hidden = 3 * 2 * 32 * 64 * 4  # float32 hidden states, 3 hops
        assert received_raw == hidden and hidden // 2 < received_wire < hidden // 2 + 3 * 256  # bf16 + a small header per reply
        assert sent_raw == hidden + 3 * 2 * 32 * 8  # plus int64 position ids, sent as they are
        assert sent_wire < sent_raw * 0.6
        # hidden_traffic: the hidden states alone, without the position ids
        assert connection.hidden_traffic.sent_raw - hidden_before.sent_raw == hidden
        assert connection.hidden_traffic.received_wire - hidden_before.received_wire == received_wire

        with dist_model.inference_session(max_length=40) as session, torch.no_grad():
            dist_model.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False)
            traffic = session.traffic
        # One token of 64 channels per decode step: the payload header is a large part of it on this tiny model.
        assert traffic.sent_raw > 0 and traffic.received_wire < traffic.received_raw
    finally:
        dist_model.remote_layers.config = saved

