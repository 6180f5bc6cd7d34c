"""Helpers the benchmarks share: the tiny model, a clock of generated tokens, the baseline's environment, and a
busy-machine warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria

from swarm.config import OMP_WAIT_VARIABLES


def build_tiny(folder: Path, sharpen: bool = True) -> Path:
    """A random Llama small enough that the swarm's overhead, not compute, dominates."""
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if sharpen:  # random init gives flat logits; sharpen them so a greedy comparison means something
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.mul_(8.0 if "embed" in name or "lm_head" in name else 2.0)
    path = folder / "tiny-llama"
    model.save_pretrained(path)
    return path


class StepClock(StoppingCriteria):
    """Never stops generation; records when each new token is ready (called once per generated token). `clock`:
    time.perf_counter within one process, time.time where times from several processes are compared."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_baseline(script: str, worker_args: list, user_env: dict[str, str]) -> dict:
    """Run `script --baseline-worker ARGS...` in its own process and return the JSON it prints last.

    That process gets default OpenMP waiting (unless the user chose otherwise): busy-waiting threads suit a
    process that has the machine to itself, as a local baseline does.
    """
    env = {k: v for k, v in os.environ.items() if k not in OMP_WAIT_VARIABLES} | user_env
    command = [sys.executable, script, "--baseline-worker", *map(str, worker_args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat; None where it does not exist)."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def warn_if_busy() -> None:
    """Timings on a few CPU cores mean little while other processes keep them busy: say so."""
    busy = cpu_busy()
    if busy is not None and busy > 0.2:
        print(f"  WARNING: other processes keep {100 * busy:.0f}% of the {os.cpu_count()} CPUs busy: timings will be skewed")
