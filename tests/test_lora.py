"""Client-owned LoRA through remote blocks: gradients and training equal the same peft model run locally."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import LlamaForCausalLM

from tests.conftest import LORA, exact, local_peft, raw_span_call, run_concurrently


@pytest.mark.parametrize("keep_activations", [True, False], ids=["training-stream", "recompute"])
def test_lora_and_input_gradients_match_peft(lora_model, tiny_model_path, keep_activations):
    model, lora = lora_model
    model.remote_layers.keep_activations = keep_activations
    reference = local_peft(tiny_model_path, lora)
    input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    embeds = reference.get_input_embeddings()(input_ids).detach()
    ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    ours = model(inputs_embeds=ours_in, attention_mask=mask, labels=input_ids).loss
    theirs = reference(inputs_embeds=theirs_in, attention_mask=mask, labels=input_ids).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)
    reference_grads = {k.replace(".default", ""): p.grad for k, p in reference.named_parameters() if "lora_" in k}
    ours_by_key = dict(zip(lora.peft_state_dict(), lora.params, strict=True))
    assert set(ours_by_key) == set(reference_grads) and len(ours_by_key) == 6 * 5 * 2
    for key, param in ours_by_key.items():
        assert reference_grads[key].abs().max() > 0, key
        torch.testing.assert_close(param.grad, reference_grads[key], atol=1e-6, rtol=1e-5, msg=key)


def test_saved_adapter_loads_with_peft(lora_model, tiny_model_path, tmp_path):
    model, lora = lora_model
    model.save_lora_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    base = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    input_ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        without_adapter = base(input_ids).logits
        local = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        ours = model(input_ids).logits
        torch.testing.assert_close(ours, local(input_ids).logits, atol=1e-4, rtol=0)
    assert (ours - without_adapter).abs().max() > 0.1  # the adapter matters, so the comparison means something


def test_generation_with_client_adapter_matches_local_peft(lora_model, tiny_model_path):
    """The servers do not host this adapter: the session carries it, and no other session sees it."""
    model, lora = lora_model
    reference = local_peft(tiny_model_path, lora).eval()
    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(14))
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ours = model.generate(prompt, **kwargs)
    with torch.no_grad():
        theirs = reference.generate(input_ids=prompt, **kwargs)
        with reference.disable_adapter():
            plain = reference.generate(input_ids=prompt, **kwargs)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)  # the adapter changes the continuation


def test_training_loss_curve_matches_local_peft(dist_model, tiny_model_path):
    """50 AdamW steps on the same batches. Before each step the local model takes the swarm's current adapter, so
    every step's loss and gradients are compared from the same parameters: within 1e-5 and 1e-4 relative.

    (Left to run freely, AdamW at this learning rate turns float differences in the last bits, from summation order
    on a loaded machine, into loss differences of ~1e-3 within a few steps: the comparison would test the noise.)
    """
    torch.manual_seed(0)
    lora = dist_model.add_lora_adapter(LoraConfig(**LORA))
    try:
        reference = local_peft(tiny_model_path, lora)
        theirs_params = dict((k.replace(".default", ""), p) for k, p in reference.named_parameters() if "lora_" in k)
        ours_opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
        data = torch.randint(3, 320, (8, 4, 16), generator=torch.Generator().manual_seed(13))
        ours_losses = []
        for step in range(50):
            batch = data[step % 8]
            with torch.no_grad():
                for key, param in zip(lora.peft_state_dict(), lora.params, strict=True):
                    theirs_params[key].copy_(param)
            reference.zero_grad()
            theirs = reference(batch, labels=batch).loss
            theirs.backward()
            ours_opt.zero_grad()
            ours = dist_model(batch, labels=batch).loss
            ours.backward()
            assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item(), f"step {step}: {ours.item()} vs {theirs.item()}"
            for key, param in zip(lora.peft_state_dict(), lora.params, strict=True):
                expected = theirs_params[key].grad
                assert (param.grad - expected).norm() <= 1e-4 * expected.norm() + 1e-8, f"step {step}: {key}"
            ours_opt.step()
            ours_losses.append(ours.item())
    finally:
        dist_model.remote_layers.lora = None
    assert ours_losses[-1] < 0.8 * ours_losses[0]  # it learns


def test_bad_lora_tensors_are_rejected(dist_model):
    from client import aio
    from swarm.errors import RemoteError

    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]  # blocks 0:2
    inputs = [torch.randn(1, 3, 64), torch.arange(3)[None]]
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    cases = [
        (["0.self_attn.q_proj.A", "0.self_attn.q_proj.B"], [torch.randn(4, 32), b], "A must be [rank, 64]"),
        (["0.self_attn.q_proj.A"], [a], "needs both A and B"),
        (["0.self_attn.nope.A", "0.self_attn.nope.B"], [a, b], "has no linear layer 'self_attn.nope'"),
        (["5.self_attn.q_proj.A", "5.self_attn.q_proj.B"], [a, b], "block 5, which this request does not run"),
        (["0.self_attn.q_proj.A", "0.self_attn.q_proj.B"], [a, torch.full((64, 4), float("inf"))], "NaN or Inf"),
        (["0.self_attn.q_proj.A", "0.self_attn.q_proj.B"], [a.long(), b], "2-D floating-point"),
        (["import os", "0.self_attn.q_proj.B"], [a, b], "is not of the form"),
    ]
    for names, tensors, message in cases:
        with pytest.raises(RemoteError, match=re.escape(message)):
            aio.run(raw_span_call(connection, "forward", step, [*inputs, *tensors], names, 2.0))
    with pytest.raises(RemoteError, match="names 3 LoRA tensors but the request carries 2"):
        aio.run(raw_span_call(connection, "forward", step, inputs, ["a", "b", "c"], 2.0))


def test_sessions_with_and_without_adapter_do_not_mix(lora_model):
    from client.inference_session import InferenceSession

    model, lora = lora_model
    layers = model.remote_layers
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        with_adapter = layers(hidden)
        layers.lora = None
        without = layers(hidden)
        layers.lora = lora
    assert (with_adapter - without).abs().max() > 0.1
    adapted = InferenceSession(layers.connection, 8, additions=replace(layers.additions(), lora=lora))
    plain = InferenceSession(layers.connection, 8, additions=replace(layers.additions(), lora=None))
    with adapted, plain:
        outputs = [(adapted.step(hidden[:, i : i + 1]), plain.step(hidden[:, i : i + 1])) for i in range(8)]
    # Cached one-token steps sum in another order than one forward over 8 tokens: float noise, relative to values ~17.
    torch.testing.assert_close(torch.cat([a for a, _ in outputs], 1), with_adapter, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b for _, b in outputs], 1), without, atol=1e-4, rtol=1e-5)


def test_two_clients_train_different_adapters_at_once(tiny_swarm, tiny_model_path):
    """Both clients' requests interleave on the same servers; each run equals its own local peft run."""
    from client.model import DistributedModelForCausalLM

    data = torch.randint(3, 320, (2, 6, 2, 12), generator=torch.Generator().manual_seed(16))

    def train(model, params, batches) -> list[float]:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for batch in batches:
            optimizer.zero_grad()
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    clients, expected = [], []
    for index in range(2):
        model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers))
        torch.manual_seed(100 + index)
        lora = model.add_lora_adapter(LoraConfig(**{**LORA, "r": 2 + 2 * index}))
        with torch.no_grad():
            for param in lora.params:
                param.normal_(0, 0.2)
        reference = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                                   LoraConfig(**{**LORA, "r": 2 + 2 * index}))
        set_peft_model_state_dict(reference, lora.peft_state_dict())
        expected.append(train(reference, [p for n, p in reference.named_parameters() if "lora_" in n], data[index]))
        clients.append((model, lora))

    try:
        results = run_concurrently([
            lambda i=i: train(clients[i][0], list(clients[i][1].parameters()), data[i]) for i in range(2)
        ])
    finally:
        for model, _ in clients:
            model.model.layers.connection.shutdown()
    for index in range(2):
        for step, (ours, theirs) in enumerate(zip(results[index], expected[index], strict=True)):
            assert abs(ours - theirs) <= 1e-3 * abs(theirs), f"client {index} step {step}: {ours} vs {theirs}"
