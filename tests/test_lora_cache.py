"""Uploaded LoRA tensors are reused by digest within a bounded, expiring, per-peer cache; oversized uploads are refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hivemind.proto import runtime_pb2
from peft import LoraConfig

from client import aio
from server.lora_cache import LoraCache
from swarm import lora as wire
from swarm.errors import RemoteError
from swarm.protocol import SpanRequest
from swarm.service import BlockService
from swarm.streaming import split_message
from swarm.tensors import pack_tensor
from tests.conftest import exact, raw_span_call

NAMES = ["0.self_attn.q_proj.A", "0.self_attn.q_proj.B"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tensors(n: int, value: float = 1.0) -> list[torch.Tensor]:
    return [torch.full((n,), value), torch.full((n,), value)]  # 8n bytes


def test_cache_is_per_peer_and_checks_names():
    cache = LoraCache(max_bytes=1 << 20, ttl=60)
    assert cache.put("peer-a", "d1", NAMES, tensors(4))
    assert cache.get("peer-a", "d1", NAMES)[0].tolist() == [1.0] * 4
    assert cache.get("peer-b", "d1", NAMES) is None  # another peer cannot use it
    assert cache.get("peer-a", "d1", NAMES[::-1]) is None  # the names must match exactly
    assert cache.get("peer-a", "other", NAMES) is None
    assert (cache.hits, cache.misses) == (1, 3)


def test_cache_evicts_least_recently_used_within_its_size():
    cache = LoraCache(max_bytes=200, ttl=60)
    for digest in ("a", "b"):
        assert cache.put("p", digest, NAMES, tensors(10))  # 80 bytes each
    assert cache.get("p", "a", NAMES) is not None  # "b" is now the least recently used
    assert cache.put("p", "c", NAMES, tensors(10))
    assert cache.nbytes == 160 and cache.get("p", "b", NAMES) is None
    assert cache.get("p", "a", NAMES) is not None and cache.get("p", "c", NAMES) is not None
    assert not cache.put("p", "huge", NAMES, tensors(100))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.put("p", "a", NAMES, tensors(10, 2.0))  # same key again replaces, not duplicates
    assert cache.nbytes == 160 and cache.get("p", "a", NAMES)[0][0] == 2.0


def test_cache_entries_expire_when_unused():
    clock = FakeClock()
    cache = LoraCache(max_bytes=1 << 20, ttl=10, clock=clock)
    cache.put("p", "a", NAMES, tensors(4))
    cache.put("p", "b", NAMES, tensors(4))
    clock.now = 8
    assert cache.get("p", "a", NAMES) is not None  # use refreshes "a"
    clock.now = 15
    assert cache.get("p", "b", NAMES) is None and cache.get("p", "a", NAMES) is not None
    clock.now = 30
    assert cache.get("p", "a", NAMES) is None and len(cache) == 0 and cache.nbytes == 0


def test_digest_covers_names_shapes_dtypes_and_values():
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    base = wire.digest(NAMES, [a, b])
    assert base == wire.digest(NAMES, [a.clone(), b.clone()])
    b2 = b.clone()
    b2[0, 0] += 1e-6
    assert len({base, wire.digest(NAMES, [a, b2]), wire.digest(NAMES[::-1], [a, b]), wire.digest(NAMES, [a.double(), b]),
                wire.digest(NAMES, [a.reshape(64, 4), b])}) == 5


def _server_info(connection, peer_id) -> dict:
    stub = BlockService.get_stub(connection.p2p, peer_id, namespace=connection.prefix)
    return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


def test_training_step_sends_lora_once_and_resends_when_the_server_lacks_it(dist_model, tiny_swarm, tiny_model_path):
    from client.model import DistributedModelForCausalLM

    lora = dist_model.add_lora_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    try:
        connection = dist_model.remote_layers.connection
        route = connection.plan()
        before = [_server_info(connection, step.peer_id)["lora_cache"]["hits"] for step in route]
        input_ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(3))
        dist_model.remote_layers.keep_activations = False  # separate forward and backward requests
        dist_model(input_ids, labels=input_ids).loss.backward()  # forward uploads, backward names them by digest
        after = [_server_info(connection, step.peer_id)["lora_cache"] for step in route]
        assert [a["hits"] - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
        assert all(a["entries"] >= 1 for a in after)
        dist_model.remote_layers.keep_activations = True  # a training stream's forward names them by digest too
        dist_model(input_ids, labels=input_ids).loss.backward()
        again = [_server_info(connection, step.peer_id)["lora_cache"] for step in route]
        assert [a["hits"] - b["hits"] for a, b in zip(again, after, strict=True)] == [1, 1, 1]
        with torch.no_grad():
            expected = dist_model(input_ids).logits

        # A second client (another peer) that believes these uploads are its own: servers refuse to serve
        # another peer's upload, so it falls back to sending the tensors, and the result is the same.
        other = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers))
        try:
            other.remote_layers.lora = lora
            other_connection = other.remote_layers.connection
            other_connection._lora_uploads.update(connection._lora_uploads)
            with torch.no_grad():
                torch.testing.assert_close(other(input_ids).logits, expected, rtol=0, atol=0)
            misses = [_server_info(connection, step.peer_id)["lora_cache"]["misses"] for step in route]
            assert all(m >= 1 for m in misses)
        finally:
            other.remote_layers.connection.shutdown()
    finally:
        dist_model.remote_layers.keep_activations = True
        dist_model.remote_layers.lora = None


def test_digest_requests_are_checked(dist_model):
    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]
    inputs = [torch.randn(1, 3, 64), torch.arange(3)[None]]
    pair = [torch.randn(2, 64), torch.randn(64, 2)]
    with pytest.raises(RemoteError, match="lora_digest does not match"):
        aio.run(raw_span_call(connection, "forward", step, [*inputs, *pair], NAMES, 2.0, lora_digest="ab" * 16))
    with pytest.raises(RemoteError, match="not \\(or no longer\\) cached") as error:
        aio.run(raw_span_call(connection, "forward", step, inputs, NAMES, 2.0, lora_digest="cd" * 16, lora_by_digest=True))
    assert error.value.code == "lora_not_cached"
    with pytest.raises(RemoteError, match="needs lora_digest"):
        aio.run(raw_span_call(connection, "forward", step, inputs, NAMES, 2.0, lora_by_digest=True))


def test_oversized_uploads_are_refused_and_the_server_keeps_serving(dist_model, reference_model):
    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]  # blocks 0:2; the test swarm allows 1 MiB of LoRA per request
    inputs = [torch.randn(1, 3, 64), torch.arange(3)[None]]
    names, big = [], []
    for block in (0, 1):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            names += [f"{block}.{module}.A", f"{block}.{module}.B"]
            big += [torch.zeros(256, 64), torch.zeros(64, 256)]  # 8 x 128 KiB: 1 MiB
    names += ["0.mlp.down_proj.A", "0.mlp.down_proj.B"]
    big += [torch.zeros(256, 128), torch.zeros(64, 256)]
    with pytest.raises(RemoteError, match=re.escape("MiB exceed this server's limit of 1.0 MiB per request")):
        aio.run(raw_span_call(connection, "forward", step, [*inputs, *big], names, 1.0))

    # A stream that outgrows any valid request is cut off while it arrives.
    async def flood():
        stub = BlockService.get_stub(connection.p2p, step.peer_id, namespace=connection.prefix)
        junk = pack_tensor(torch.zeros(16 << 20, dtype=torch.uint8).view(torch.float32))  # 16 MiB
        messages = split_message(SpanRequest(start=0, end=2), [pack_tensor(inputs[0]), junk])

        async def requests():
            for message in messages:
                yield message

        return [reply async for reply in await stub.rpc_forward_stream(requests())]

    with pytest.raises(Exception, match="streamed request exceeds this server's limit"):
        aio.run(flood(), timeout=60)
    input_ids = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(dist_model(input_ids).logits, reference_model(input_ids).logits, atol=1e-4, rtol=1e-4)
