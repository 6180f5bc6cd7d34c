"""Batching across sessions through the shared swarm (3 servers): 8 clients at once, with mixed prompt lengths, two
LoRA adapters of their own and seeded sampling, codec "none", each get the logits and tokens they get alone."""

from __future__ import annotations

import torch
from peft import LoraConfig

from client.base_model import RemoteSessionCache
from client.model import DistributedModelForCausalLM
from tests.conftest import LORA, exact, run_concurrently
from tests.test_training_stream import _info

NEW_TOKENS = 10


def _client(model, prompt: torch.Tensor, seed: int | None):
    """Generate NEW_TOKENS tokens in an inference session of its own: greedy, or sampled with its own generator.
    Returns the tokens and each step's last-position logits."""
    def run():
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tokens, logits, inputs = [], [], prompt
        with torch.no_grad(), model.remote_layers.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
            cache = RemoteSessionCache(session)
            for _ in range(NEW_TOKENS):
                last = model(input_ids=inputs, use_cache=True, logits_to_keep=1, cache=cache).logits[0, -1]
                if generator is None:
                    token = int(last.argmax())
                else:
                    token = int(torch.multinomial((last / 0.8).softmax(-1), 1, generator=generator))
                tokens.append(token)
                logits.append(last)
                inputs = torch.tensor([[token]])
        return tokens, torch.stack(logits)

    return run


def _batches(model) -> list[dict]:
    """Each server's count of decode batches and of the steps in them (rpc_info)."""
    return [_info(model.remote_layers.connection, step.peer_id)["decode_batches"] for step in model.remote_layers.connection.plan()]


def test_eight_clients_batched_get_what_they_get_alone(tiny_swarm, tiny_model_path, dist_model, reference_model):
    adapted = []
    for seed in (1, 2):
        model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers))
        torch.manual_seed(seed)
        lora = model.add_lora_adapter(LoraConfig(**LORA))
        with torch.no_grad():
            for param in lora.params:
                param.normal_(0, 0.3)
        adapted.append(model)
    try:
        prompt = lambda n, s: torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(s))  # noqa: E731
        specs = [(dist_model, prompt(3, 1), None), (dist_model, prompt(9, 2), None), (dist_model, prompt(17, 3), None),
                 (dist_model, prompt(6, 4), 11), (adapted[0], prompt(5, 5), None), (adapted[0], prompt(8, 6), 12),
                 (adapted[1], prompt(12, 7), None), (adapted[1], prompt(2, 8), None)]
        alone = [_client(*spec)() for spec in specs]
        before = _batches(dist_model)
        together = run_concurrently([_client(*spec) for spec in specs])
        after = _batches(dist_model)
    finally:
        for model in adapted:
            model.model.layers.connection.shutdown()
    for index, ((tokens, logits), (their_tokens, their_logits)) in enumerate(zip(together, alone, strict=True)):
        assert tokens == their_tokens, f"client {index} got other tokens in company than alone"
        torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=0, msg=f"client {index}")
    for index in (0, 1, 2):  # and alone, the plain greedy clients get what transformers gets
        model_prompt = specs[index][1]
        expected = reference_model.generate(model_prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert expected[0, model_prompt.shape[1]:].tolist() == alone[index][0]
    # The servers did batch: more steps than batches ran on some server.
    grew = [(a["steps"] - b["steps"], a["batches"] - b["batches"]) for a, b in zip(after, before, strict=True)]
    assert any(steps > batches > 0 for steps, batches in grew), grew
