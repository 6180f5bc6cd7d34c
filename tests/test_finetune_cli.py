"""`swarm finetune` against the shared swarm: the held-out loss drops, the adapter loads with peft, bad data explains itself."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM


def swarm_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=timeout)


def write_examples(path, n: int = 40) -> None:
    rng = random.Random(0)
    words = ["fox", "dog", "brown", "lazy", "quick", "world", "swarm", "peers"]
    with open(path, "w") as f:
        for _ in range(n):
            word = rng.choice(words)
            f.write(json.dumps({"prompt": f"Say {word}:", "completion": f" {word} {word} {word}."}) + "\n")


def held_out_loss(output: str, when: str) -> float:
    match = re.search(rf"held-out loss {when} training: ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


def test_finetune_lowers_held_out_loss_and_saves_a_peft_adapter(tiny_swarm, tiny_model_path, tmp_path):
    data, out = tmp_path / "train.jsonl", tmp_path / "adapter"
    write_examples(data)
    result = swarm_cli("finetune", tiny_model_path, "--initial-peers", *tiny_swarm.initial_peers, "--data", str(data),
                       "--steps", "15", "--lr", "1e-2", "--batch-size", "4", "--max-length", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    before, after = held_out_loss(result.stdout, "before"), held_out_loss(result.stdout, "after")
    assert after < before, result.stdout
    assert "36 training and 4 held-out examples" in result.stdout
    assert str(out.resolve()) in result.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        without_adapter = base(input_ids).logits
        with_adapter = PeftModel.from_pretrained(base, out).eval()(input_ids).logits
    assert (with_adapter - without_adapter).abs().max() > 1e-3  # the trained adapter changes the model


def test_malformed_jsonl_names_the_line(tiny_model_path, tmp_path):
    # A well-formed address that nothing answers at: the data is checked before the swarm is joined (a malformed
    # address would be refused first, see tests/test_cli_errors.py).
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWH2C6vk6Dt2ezMxaBCLQiUw55mL9nGt28D7jDGmXd9W8c"
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    result = swarm_cli("finetune", tiny_model_path, "--initial-peers", peer, "--data", str(data))
    assert result.returncode == 2
    assert f"{data}, line 3" in result.stderr and '"completion"' in result.stderr, result.stderr
    data.write_text('{"text": "fine"}\n{"text": "broken\n')
    result = swarm_cli("finetune", tiny_model_path, "--initial-peers", peer, "--data", str(data))
    assert result.returncode == 2 and f"{data}, line 2: not valid JSON" in result.stderr, result.stderr
