"""What a backward puts on the wire: no gradient for an input that needs none, and each hop's input gradient passed
on to the previous hop as the bytes it came in (encoded once per hop, not decoded and encoded again)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hivemind.proto import runtime_pb2

from client.streams import TrainStream
from swarm.compression import wire
from tests.conftest import local_peft


def _received_hidden_bytes(model, run):
    """(hidden-state bytes the client received on the wire during `run()`, what it returned)"""
    connection = model.remote_layers.connection
    before = replace(connection.hidden_traffic)
    result = run()
    return connection.hidden_traffic.received_wire - before.received_wire, result


@pytest.mark.parametrize("keep_activations", [True, False], ids=["training-stream", "recompute"])
def test_the_first_span_returns_no_gradient_for_an_input_that_needs_none(lora_model, tiny_model_path, keep_activations):
    model, lora = lora_model
    model.remote_layers.keep_activations = keep_activations
    reference = local_peft(tiny_model_path, lora)
    input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(21))
    embeds = reference.get_input_embeddings()(input_ids).detach()

    def step(requires_grad: bool):
        hidden = embeds.clone().requires_grad_(requires_grad)
        for param in lora.params:
            param.grad = None
        model(inputs_embeds=hidden, labels=input_ids).loss.backward()
        return hidden

    with_input_grad, _ = _received_hidden_bytes(model, lambda: step(True))
    without, frozen = _received_hidden_bytes(model, lambda: step(False))
    assert frozen.grad is None
    assert with_input_grad - without == 2 * 9 * 64 * 4  # exactly one float32 gradient of the first span's input

    # The adapter's gradients are those of local peft all the same (the first span's LoRA tensors included).
    reference(inputs_embeds=embeds, labels=input_ids).loss.backward()
    reference_grads = {k.replace(".default", ""): p.grad for k, p in reference.named_parameters() if "lora_" in k}
    for key, param in zip(lora.peft_state_dict(), lora.params, strict=True):
        assert reference_grads[key].abs().max() > 0, key
        torch.testing.assert_close(param.grad, reference_grads[key], atol=1e-6, rtol=1e-5, msg=key)


def _recording_backward(monkeypatch) -> list[tuple[int, object, runtime_pb2.Tensor, list[runtime_pb2.Tensor]]]:
    """Record each training stream's backward: (its first block, the gradient it was given, the gradient slot it
    sent on the wire, its packed reply)."""
    calls = []
    original = TrainStream.backward

    async def backward(self, grad_output):
        sent = []
        put = self._queue.put_nowait
        self._queue.put_nowait = lambda message: (sent.append(message), put(message))[1]
        reply = await original(self, grad_output)
        calls.append((self.step.start, grad_output, sent[0].tensors[0], reply))
        return reply

    monkeypatch.setattr(TrainStream, "backward", backward)
    return calls


def _codec(slot: runtime_pb2.Tensor) -> str:
    return wire.slot_codec(slot.dtype)


def test_input_gradients_go_to_the_previous_hop_as_the_bytes_they_came_in(lora_model, monkeypatch):
    model, _ = lora_model
    model.set_codecs(gradients="int5_outlier")
    calls = _recording_backward(monkeypatch)
    input_ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(22))
    hidden = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=hidden, labels=input_ids).loss.backward()

    assert [start for start, *_ in calls] == [4, 2, 0]  # the last span first
    for (*_, later_reply), (_, _, sent, _) in zip(calls, calls[1:], strict=False):  # each hop and the one before it
        assert _codec(later_reply[0]) == _codec(sent) == "int5_outlier"
        assert sent.buffer == later_reply[0].buffer  # relayed as it came, not decoded and encoded again
    given, sent = calls[0][1], calls[0][2]
    assert isinstance(given, torch.Tensor) and _codec(sent) == "int5_outlier"  # the client encodes only its own gradient

    # Encoded once per hop, the input's gradient stays close to the exact one.
    exact_in = hidden.detach().clone().requires_grad_(True)
    model.set_codecs(gradients="none")
    model(inputs_embeds=exact_in, labels=input_ids).loss.backward()
    assert (hidden.grad - exact_in.grad).norm() / exact_in.grad.norm() < 0.1


def test_relayed_passes_a_slot_on_only_in_the_codec_it_is_wanted_in():
    from client.streams import relayed
    from swarm.tensors import pack_tensor

    grad = torch.randn(2, 5, 64)
    slot = pack_tensor(grad, "int5_outlier")
    assert relayed(slot, "int5_outlier") is slot
    decoded = relayed(slot, "bfloat16")  # to be encoded again, in the codec the next request takes
    assert isinstance(decoded, torch.Tensor) and decoded.shape == grad.shape
    assert (decoded - grad).norm() / grad.norm() < 0.06
    raw = pack_tensor(grad)
    assert relayed(raw, None) is raw and relayed(raw, "none") is raw
    torch.testing.assert_close(relayed(raw, "int5_outlier"), grad, atol=0, rtol=0)


def test_replies_in_another_codec_than_the_requests_train_correctly(lora_model, monkeypatch):
    model, _ = lora_model
    model.set_codecs(gradients="int5_outlier", replies={"gradients": "bfloat16"})
    calls = _recording_backward(monkeypatch)
    input_ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(23))
    exact_in = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    hidden = exact_in.detach().clone().requires_grad_(True)
    model(inputs_embeds=hidden, labels=input_ids).loss.backward()
    assert all(_codec(reply[0]) == "bfloat16" for *_, reply in calls)
    assert all(_codec(sent) == "int5_outlier" for _, _, sent, _ in calls)  # decoded and encoded in the requests' codec
    model.set_codecs(gradients="none", replies={"gradients": "none"})
    model(inputs_embeds=exact_in, labels=input_ids).loss.backward()
    assert (hidden.grad - exact_in.grad).norm() / exact_in.grad.norm() < 0.1
