"""Training streams: a forward and its backward in one request, the server keeping the activations in between.
Without a backward they are freed at once; a server without room for them makes the client recompute instead."""

from __future__ import annotations

import json
import time

import torch
from hivemind.proto import runtime_pb2
from peft import LoraConfig

from client import aio
from swarm.service import BlockService
from tests.conftest import exact


def _info(connection, peer_id) -> dict:
    stub = BlockService.get_stub(connection.p2p, peer_id, namespace=connection.prefix)
    return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


def _wait_until_freed(connection, route, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        held = [_info(connection, step.peer_id)["train_activation_bytes"] for step in route]
        if not any(held) or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def test_activations_live_only_until_the_backward_or_until_dropped(dist_model):
    connection = dist_model.remote_layers.connection
    route = connection.plan()
    before = _compute_seconds(connection, route)
    embeds = torch.randn(2, 6, 64, requires_grad=True)
    output = dist_model.remote_layers(embeds)
    held = [_info(connection, step.peer_id)["train_activation_bytes"] for step in route]
    assert all(h > 0 for h in held)  # every server keeps this forward's activations for its backward
    output.sum().backward()
    assert embeds.grad is not None and _wait_until_freed(connection, route) == [0, 0, 0]
    after = _compute_seconds(connection, route)
    for server_before, server_after in zip(before, after, strict=True):  # every server: kept forward, its backward,
        assert server_after["forward_for_backward"] > server_before["forward_for_backward"]
        assert server_after["backward_kept"] > server_before["backward_kept"]
        assert server_after["backward"] == server_before["backward"]  # and no recomputing backward

    output = dist_model.remote_layers(torch.randn(2, 6, 64, requires_grad=True))
    assert all(_info(connection, step.peer_id)["train_activation_bytes"] > 0 for step in route)
    del output  # no backward will come: the client ends the streams and the servers free the memory
    assert _wait_until_freed(connection, route) == [0, 0, 0]

    before = _compute_seconds(connection, route)
    with torch.no_grad():  # no backward expected: plain forward requests, nothing kept
        dist_model.remote_layers(torch.randn(2, 6, 64))
    assert [_info(connection, step.peer_id)["train_activation_bytes"] for step in route] == [0, 0, 0]
    after = _compute_seconds(connection, route)
    for server_before, server_after in zip(before, after, strict=True):
        assert server_after["forward"] > server_before["forward"]
        assert server_after["forward_for_backward"] == server_before["forward_for_backward"]


def _compute_seconds(connection, route) -> list[dict[str, float]]:
    """Each server's compute seconds by kind of work (0 for kinds it has not done)."""
    kinds = ("forward", "backward", "forward_for_backward", "backward_kept")
    return [{kind: _info(connection, step.peer_id)["compute_s"].get(kind, 0.0) for kind in kinds} for step in route]


def test_a_server_without_room_for_activations_makes_the_client_recompute(tiny_model_path, reference_model):
    from client.model import DistributedModelForCausalLM
    from swarm.launch import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_servers(tiny_model_path, [(0, 6)], ["--torch-dtype", "float32", "--train-activation-mb", "0"])
        model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, swarm.initial_peers))
        try:
            model.add_lora_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
            input_ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(8))
            embeds = reference_model.get_input_embeddings()(input_ids).detach()
            ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
            model(inputs_embeds=ours_in, labels=input_ids).loss.backward()
            reference_model(inputs_embeds=theirs_in, labels=input_ids).loss.backward()
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)
            kinds = _info(model.remote_layers.connection, model.remote_layers.connection.plan()[0].peer_id)["compute_s"]
            assert "backward" in kinds and "forward_for_backward" not in kinds  # it recomputed; nothing was kept
        finally:
            model.remote_layers.connection.shutdown()
            reference_model.zero_grad(set_to_none=True)


def test_bad_gradients_on_a_training_stream_are_refused_and_memory_is_freed(dist_model, reference_model):
    import pytest

    from client.streams import TrainStream
    from swarm.errors import RemoteError
    from swarm.protocol import SpanRequest

    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]
    inputs = [torch.randn(1, 4, 64), torch.arange(4)[None]]
    for grad, message in ((torch.randn(1, 3, 64), "output gradient has shape"),
                          (torch.full((1, 4, 64), float("nan")), "NaN or Inf")):
        stream = TrainStream(connection, step)

        async def run(stream=stream, grad=grad):
            await stream.forward(SpanRequest(start=step.start, end=step.end), inputs)
            return await stream.backward(grad)

        with pytest.raises(RemoteError, match=message):
            aio.run(run())
    assert _wait_until_freed(connection, [step]) == [0]
    input_ids = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # the server goes on serving
        torch.testing.assert_close(dist_model(input_ids).logits, reference_model(input_ids).logits, atol=1e-4, rtol=1e-4)
