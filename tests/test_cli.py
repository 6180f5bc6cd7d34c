"""The command line against the shared swarm: `swarm generate` streams the right text, `swarm status` tells the truth."""

from __future__ import annotations

import subprocess
import sys

import torch
from transformers import AutoTokenizer


def swarm_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_prints_the_local_models_continuation(tiny_swarm, tiny_model_path, reference_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = "The quick brown fox"
    inputs = tokenizer(prompt, return_tensors="pt")
    expected_ids = reference_model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(expected_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    result = swarm_cli("generate", tiny_model_path, prompt, "--initial-peers", *tiny_swarm.initial_peers,
                       "--max-new-tokens", "12", "--inference-codec", "none")
    assert result.returncode == 0, result.stderr
    assert expected.strip() and expected.strip() in result.stdout


def test_status_shows_servers_and_coverage(tiny_swarm):
    result = swarm_cli("status", "--initial-peers", *tiny_swarm.initial_peers)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tiny-llama: 6 blocks, 3 server(s)" in out
    for span in ("0:2", "2:4", "4:6"):
        assert span in out
    assert out.count("online") >= 3
    assert "0:6" in out and "not served" not in out  # one coverage run: every block served once


def test_bad_arguments_explain_themselves(tiny_model_path):
    result = swarm_cli("server", tiny_model_path, "--blocks", "3-5", "--new-swarm")
    assert result.returncode == 2 and "--blocks takes START:END" in result.stderr
    result = swarm_cli("server", tiny_model_path, "--blocks", "0:9", "--new-swarm", "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert result.returncode == 2 and "outside the model's 6 blocks" in result.stderr
    help_text = swarm_cli("server", "--help").stdout
    assert "--num-blocks" in help_text and "--cache-tokens" in help_text


def test_tokenizer_fixture_is_usable(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tokenizer("Hello world")["input_ids"]
    assert max(ids) < 320 and tokenizer.decode(ids) == "Hello world"
    assert torch.tensor(ids).numel() > 2
