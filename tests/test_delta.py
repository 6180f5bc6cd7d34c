"""Delta-coded training activations (AC-SGD style): both ends keep identical references across epochs, unchanged
rows cost nothing, lost or different references fall back to full sends, and training matches uncompressed
training through the swarm."""

from __future__ import annotations

import time

import pytest
import torch
from peft import LoraConfig

from swarm import compression
from swarm.compression import CodecError
from swarm.compression.delta import DeltaStore, Reference, delta_decode, delta_encode, digest, row_keys
from swarm.tensors import pack_payload, unpack_tensor

FULL, DELTA = compression.get("int8_outlier"), compression.get("int4_outlier")


def activations(seed: int, rows: int = 3, length: int = 5, hidden: int = 64) -> torch.Tensor:
    x = torch.randn(rows, length, hidden, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 7] = 400.0  # an outlier channel at the first token
    return x


def over_the_wire(encoded, like):
    """What the receiver decodes from the encoded rows' slots."""
    full, delta = (unpack_tensor(pack_payload(p, like)) for p in (encoded.full, encoded.delta))
    return (full if full.shape[0] else None), (delta if delta.shape[0] else None)


def test_both_ends_hold_identical_references_and_errors_do_not_accumulate():
    x = activations(0)
    sender_refs: list = [None] * 3
    receiver_refs: list = [None] * 3
    drift = torch.Generator().manual_seed(1)
    for epoch in range(6):
        encoded = delta_encode(x, sender_refs, FULL, DELTA)
        assert encoded.modes == ("fff" if epoch == 0 else "ddd")
        sent = encoded.states
        received = delta_decode(encoded.modes, *over_the_wire(encoded, x), receiver_refs)
        for mine, theirs in zip(encoded.states, received, strict=True):
            assert torch.equal(mine, theirs)  # bit for bit: the next epoch's deltas are against the same values
        error = max(((s - r).norm() / r.norm()).item() for s, r in zip(received, x, strict=True))
        # each epoch's error is that of one epoch's (small) change in 4 bits, not of the whole value, nor a sum
        assert error < (2e-3 if epoch == 0 else 2e-4), (epoch, error)
        sender_refs = [Reference(state, digest(state), source) for state, source in zip(sent, encoded.sources, strict=True)]
        receiver_refs = received
        x = x + 0.01 * torch.randn(x.shape, generator=drift)


def test_unchanged_rows_are_not_sent_and_new_rows_go_in_full():
    x = activations(2)
    first = delta_encode(x, [None] * 3, FULL, DELTA)
    changed = x.clone()
    changed[1] += 0.05
    refs = [Reference(s, digest(s), source) for s, source in zip(first.states[:2], first.sources, strict=False)] + [None]
    encoded = delta_encode(torch.stack([x[0], changed[1], x[2]]), refs, FULL, DELTA)
    assert encoded.modes == "sdf"  # row 0 is the row its reference came from, though not equal to the reference
    assert not torch.equal(x[0], refs[0].tensor)
    assert encoded.full.meta["shape"][0] == 1 and encoded.delta.meta["shape"][0] == 1
    assert encoded.states[0] is refs[0].tensor
    received = delta_decode(encoded.modes, *over_the_wire(encoded, x), [r.tensor if r else None for r in refs])
    assert all(torch.equal(a, b) for a, b in zip(received, encoded.states, strict=True))


def test_inconsistent_rows_are_rejected():
    x = activations(3)
    encoded = delta_encode(x, [None] * 3, FULL, DELTA)
    full, _ = over_the_wire(encoded, x)
    ref = encoded.states[0]
    for modes, full_rows, delta_rows, refs, message in [
        ("ffx", full, None, [None] * 3, "must be one of"),
        ("ff", full, None, [None] * 3, "must be one of"),
        ("fff", full[:2], None, [None] * 3, "full rows: 2 sent"),
        ("ffd", full[:2], None, [None, None, ref], "delta rows: 0 sent"),
        ("ffs", full[:2], None, [None, None, None], "no reference"),
        ("ffs", full[:2], None, [None, None, ref[:, :32]], "disagree in shape"),
    ]:
        with pytest.raises(CodecError, match=message):
            delta_decode(modes, full_rows, delta_rows, refs)


def test_store_is_bounded_and_expires():
    row = torch.zeros(4, 8)  # 128 bytes
    store = DeltaStore(max_bytes=3 * 128, ttl=0.3)
    for i in range(4):
        store.put(("k", i), row + i)
    assert len(store) == 3 and store.get(("k", 0)) is None and store.evicted == 1  # least recently used first
    assert store.get(("k", 1)).digest == store.put(("k", 9), row + 1).digest  # the digest is of the content
    time.sleep(0.4)
    assert store.get(("k", 1)) is None and len(store) == 0 and store.bytes == 0


def test_row_keys_name_samples_by_content():
    ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 2, 3]])
    keys = row_keys(ids.float(), ids)
    assert keys[0] == keys[2] != keys[1] and len(keys[0]) == 32
    assert row_keys(ids.float()[:1], ids[:1]) == keys[:1]  # independent of the rest of the batch


# ------------------------------------------------------------------------------------------ through the swarm

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)


def _info(connection, peer_id) -> dict:
    import json

    from hivemind.proto import runtime_pb2

    from client import aio
    from swarm.service import BlockService

    stub = BlockService.get_stub(connection.p2p, peer_id, namespace=connection.prefix)
    return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


def _train(model, batches, epochs: int, between_epochs=None) -> list[float]:
    """LoRA training from a fixed initial adapter: the loss of every step."""
    torch.manual_seed(0)
    lora = model.add_lora_adapter(LoraConfig(**LORA))
    with torch.no_grad():
        for param in lora.params:
            param.normal_(0, 0.1)
    optimizer = torch.optim.AdamW(lora.params, lr=3e-3)
    losses = []
    try:
        for epoch in range(epochs):
            if between_epochs is not None:
                between_epochs(epoch)
            for ids in batches:
                loss = model(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
    finally:
        model.remote_layers.lora = None
    return losses


@pytest.fixture
def batches():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 320, (2, 12), generator=gen) for _ in range(3)]


@pytest.fixture
def delta_model(dist_model):
    layers = dist_model.remote_layers
    saved = layers.config
    dist_model.set_codecs(activations="int8_outlier", gradients="int8_outlier", delta="int4_outlier")
    layers.delta = None
    yield dist_model
    layers.config = saved
    layers.delta = None


def test_delta_training_follows_uncompressed_training(dist_model, delta_model, batches):
    layers = dist_model.remote_layers
    route = layers.connection.plan()
    before = [_info(layers.connection, step.peer_id)["delta"] for step in route]
    traffic_before = layers.connection.hidden_traffic.sent_wire
    ours = _train(dist_model, batches, epochs=4)
    counts = layers.delta.counts
    after = [_info(layers.connection, step.peer_id)["delta"] for step in route]
    rows_per_epoch = 2 * len(batches)
    hops = len(route)
    # epoch 1 goes in full; later epochs send deltas, and the first hop's input (the frozen embeddings' output
    # of a sample seen before) is not sent at all
    assert counts.rows_full == 2 * hops * rows_per_epoch and counts.fallbacks == 0
    assert counts.rows_same == 3 * rows_per_epoch
    assert counts.rows_delta == 3 * rows_per_epoch * (2 * hops - 1)
    for b, a in zip(before, after, strict=True):
        assert a["delta_rows_delta"] > b["delta_rows_delta"] and a["delta_refused"] == b["delta_refused"]
    sent_delta = layers.connection.hidden_traffic.sent_wire - traffic_before

    saved = layers.config
    dist_model.set_codecs(activations="none", gradients="none", delta="none")
    traffic_before = layers.connection.hidden_traffic.sent_wire
    reference = _train(dist_model, batches, epochs=4)
    sent_plain = layers.connection.hidden_traffic.sent_wire - traffic_before
    layers.config = saved

    deviation = max(abs(a - b) / b for a, b in zip(ours, reference, strict=True))
    assert deviation < 0.01, (ours, reference)
    assert reference[-1] < reference[0] - 0.1  # it trained, so following the curve means something
    # hidden size 64 here, so 16 outliers per token weigh much more than in a real model (see bench/compression.py)
    assert sent_plain / sent_delta > 2.8, (sent_plain, sent_delta)


def test_lost_or_different_references_fall_back_to_full_sends(dist_model, delta_model, batches):
    layers = dist_model.remote_layers

    def disturb(epoch: int) -> None:
        store = layers.delta.store if layers.delta is not None else None
        if epoch == 2:  # the client loses everything: it sends in full and asks for full outputs
            layers.delta.store = DeltaStore(store.max_bytes)
        if epoch == 3:  # the client's references differ from the servers' (as after a server restart or a new
            # route): the servers refuse the deltas and the client resends those rows in full
            for key in list(store._items):
                if key[2] == "in":
                    store.put(key, store.get(key).tensor + 1e-3)

    ours = _train(dist_model, batches, epochs=5, between_epochs=disturb)
    counts = layers.delta.counts
    rows = 2 * len(batches)
    hops = len(layers.connection.plan())
    assert counts.fallbacks == rows * hops  # epoch 4: every input row had a (wrong) reference
    # full rows: epoch 1 (in and out), epoch 3 (in and out, nothing held), epoch 4 (inputs resent in full)
    assert counts.rows_full == rows * hops * 5
    refused = sum(_info(layers.connection, step.peer_id)["delta"]["delta_refused"] for step in layers.connection.plan())
    assert refused >= hops

    saved = layers.config
    dist_model.set_codecs(activations="int8_outlier", gradients="int8_outlier", delta="none")
    reference = _train(dist_model, batches, epochs=5)
    layers.config = saved
    assert max(abs(a - b) / b for a, b in zip(ours, reference, strict=True)) < 0.01


def test_a_new_route_refuses_old_references_and_training_goes_on(tiny_model_path, batches):
    """Server A holds the references; it leaves and server B (same blocks, no references) takes over."""
    from client.model import DistributedModelForCausalLM
    from swarm.launch import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        (first,) = swarm.start_servers(tiny_model_path, [(0, 6)], ["--torch-dtype", "float32"])
        model = DistributedModelForCausalLM.from_pretrained(tiny_model_path, swarm.initial_peers)
        model.set_codecs(activations="int8_outlier", gradients="int8_outlier", delta="int4_outlier")
        connection = model.remote_layers.connection

        def switch(epoch: int) -> None:
            if epoch == 2:
                old = connection.plan()[0].peer_id
                swarm.start_servers(tiny_model_path, [(0, 6)], ["--torch-dtype", "float32"])
                first.stop()
                swarm.servers.remove(first)
                deadline = time.monotonic() + 60
                while connection.plan()[0].peer_id == old or not connection.servers(refresh=True):
                    assert time.monotonic() < deadline, "the route did not move to the new server"
                    time.sleep(0.5)

        try:
            ours = _train(model, batches, epochs=4, between_epochs=switch)
            counts = model.remote_layers.delta.counts
            rows = 2 * len(batches)
            assert counts.fallbacks == 2 * rows  # epoch 3: the inputs (refused) and the outputs (sent in full)
            assert _info(connection, connection.plan()[0].peer_id)["delta"]["delta_refused"] == len(batches)
            model.set_codecs(delta="none")
            reference = _train(model, batches, epochs=4)
        finally:
            connection.shutdown()
    assert max(abs(a - b) / b for a, b in zip(ours, reference, strict=True)) < 0.01


def test_malformed_delta_requests_are_refused_and_the_server_keeps_serving(dist_model):
    from client import aio
    from client.requests import SpanCall
    from swarm.errors import RemoteError
    from swarm.protocol import DeltaInfo, SpanRequest
    from swarm.tensors import pack_tensor

    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]
    hidden = torch.randn(2, 4, 64)
    positions = torch.arange(4).expand(2, 4).contiguous()
    key = "ab" * 16

    def send(info: DeltaInfo, slots):
        call = SpanCall(SpanRequest(start=step.start, end=step.end, delta=info), [*slots, positions], [], [], "none")
        stream, output = aio.run(connection.train_forward(step, call, decode_reply=lambda reply: reply))
        aio.get_loop().call_soon_threadsafe(stream.abandon)
        return output

    empty = pack_tensor(torch.zeros(0, 4, 64))
    full = pack_tensor(hidden)
    cases = [
        (DeltaInfo(keys=[key, key], modes="fd", refs=["", "0" * 16], out_refs=["", ""], codec="int4_outlier"),
         [pack_tensor(hidden[:1]), empty], "delta_state_missing", "does not hold"),
        (DeltaInfo(keys=[key, key], modes="ff", refs=["", ""], out_refs=["", ""], codec="int4_outlier"),
         [pack_tensor(hidden[:1]), empty], "bad_request", "full rows: 1 sent, the modes name 2"),
        (DeltaInfo(keys=[key, key], modes="ff", refs=["", ""], out_refs=["", ""], codec="zstd"),
         [full, empty], "bad_request", "unknown codec 'zstd'"),
        (DeltaInfo(keys=[key, key], modes="ff", refs=["", ""], out_refs=["", ""], codec="int4_outlier"),
         [pack_tensor(torch.randn(2, 4, 32)), empty], "bad_request", "hidden"),
        (DeltaInfo(keys=[key, key], modes="ff", refs=["", ""], out_refs=["", ""], codec="int4_outlier"),
         [full], "bad_request", "delta rows must be a float tensor"),
    ]
    for info, slots, code, message in cases:
        with pytest.raises(RemoteError) as caught:
            send(info, slots)
        assert caught.value.code == code and message in caught.value.message, caught.value
    # a well-formed request still works: two rows in full, answered as full rows of the output
    reply = send(DeltaInfo(keys=[key, "cd" * 16], modes="ff", refs=["", ""], out_refs=["", ""], codec="int4_outlier"),
                 [full, empty])
    assert len(reply.tensors) == 2 and list(reply.tensors[0].size) == [2, 4, 64]
