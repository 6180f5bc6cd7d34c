"""LoRA fine-tuning steps through a local swarm against peft on plain transformers on the same machine.

For each model: seconds per training step (forward + backward + AdamW step, lr 1e-4) on a batch of random
token ids, LoRA r=8 on q,k,v,o, locally with peft and through a LocalSwarm of N servers, and their ratio
(target: swarm at most 1.5x local on smollm2). The first step's loss is compared between the two sides:
LoRA B starts at zero, so both must match the base model's loss.
Run: python bench/finetune.py [--models tiny,smollm2] [--steps 5] [--batch 4] [--seq-len 128] [--recompute]

The swarm uses training streams (each server keeps a step's activations from its forward to its backward, within
one request); --recompute also times separate requests whose backward recomputes the forward.
Each side runs as it would on its own: the local baseline in a separate process with the default OpenMP settings,
the swarm client and LocalSwarm's servers with brief OpenMP spinning (GOMP_SPINCOUNT=1000), as co-located peers use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from swarm.config import apply_colocated_omp_env, user_omp_env

_USER_OMP_ENV = user_omp_env()
if "--baseline-worker" not in sys.argv:
    apply_colocated_omp_env()  # before torch starts its OpenMP runtime
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import build_tiny, run_baseline, warn_if_busy  # bench/common.py
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from swarm.assets import ensure_smollm2
from swarm.launch import LocalSwarm, even_spans

MODELS = ("tiny", "smollm2")
LR = 1e-4
TARGET_RATIO = 1.5  # on smollm2


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)






def batch_ids(vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def train_steps(model, params, input_ids: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """One warm-up step, then `steps` timed ones; returns the first (warm-up) step's loss and the step times."""
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses, times = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses[0], times[1:]


@dataclass
class Result:
    name: str
    spans: list[tuple[int, int]]
    local_times: list[float]
    swarm_times: list[float]
    local_loss: float
    swarm_loss: float

    def __post_init__(self):
        self.local_s, self.swarm_s = statistics.median(self.local_times), statistics.median(self.swarm_times)
        self.ratio = self.swarm_s / self.local_s
        self.loss_rel_diff = abs(self.swarm_loss - self.local_loss) / abs(self.local_loss)

    def table(self) -> str:
        rows = [f"{'':8}{'s/step':>9}{'min s':>9}{'max s':>9}{'first loss':>13}"]
        for label, times, loss in (("local", self.local_times, self.local_loss),
                                   ("swarm", self.swarm_times, self.swarm_loss)):
            rows.append(f"{label:8}{statistics.median(times):9.3f}{min(times):9.3f}{max(times):9.3f}{loss:13.6f}")
        met = "met" if self.ratio <= TARGET_RATIO else "MISSED"
        target = f" (target <= {TARGET_RATIO}x: {met})" if self.name == "smollm2" else ""
        rows.append(f"ratio swarm/local s/step: {self.ratio:.2f}x{target}; {len(self.spans)} servers {self.spans}")
        rows.append(f"first-step loss relative difference: {self.loss_rel_diff:.2e}")
        return "\n".join(rows)

    def summary(self, dtype: str) -> str:
        return (f"{self.name} {dtype}: swarm {self.swarm_s:.2f} s/step, local {self.local_s:.2f} s/step, "
                f"ratio {self.ratio:.2f}x")


def baseline_worker(path: str, dtype: str, batch: int, seq_len: int, steps: int) -> None:
    """Runs in a child process: peft LoRA step timings and the first loss, printed as one JSON line."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = get_peft_model(base, lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    input_ids = batch_ids(base.config.vocab_size, batch, seq_len)
    first_loss, times = train_steps(model, params, input_ids, steps)
    print(json.dumps({"loss": first_loss, "times": times}))


def measure_local(path: Path, args: argparse.Namespace) -> tuple[float, list[float]]:
    data = run_baseline(__file__, [path, args.dtype, args.batch, args.seq_len, args.steps], _USER_OMP_ENV)
    return data["loss"], data["times"]


def bench_model(name: str, path: Path, args: argparse.Namespace) -> Result:
    local_loss, local_times = measure_local(path, args)
    config = AutoConfig.from_pretrained(path)
    spans = even_spans(config.num_hidden_layers, args.servers)
    input_ids = batch_ids(config.vocab_size, args.batch, args.seq_len)
    with LocalSwarm() as swarm:
        started = time.perf_counter()
        swarm.start_bootstrap()
        swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", args.dtype])
        print(f"  swarm of {len(spans)} servers {spans} ready in {time.perf_counter() - started:.1f} s")
        model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype=args.dtype)
        try:
            lora = model.add_lora_adapter(lora_config())
            swarm_loss, swarm_times = train_steps(model, list(lora.parameters()), input_ids, args.steps)
            if args.recompute:  # the other way: separate requests, the backward recomputing the forward on the server
                model.remote_layers.configure(keep_activations=False)
                _, recompute_times = train_steps(model, list(lora.parameters()), input_ids, args.steps)
                print(f"  without training streams (backward recomputes): {statistics.median(recompute_times):.3f} s/step, "
                      f"{statistics.median(recompute_times) / statistics.median(local_times):.2f}x local")
        finally:
            model.model.layers.connection.shutdown()
    result = Result(name, spans, local_times, swarm_times, local_loss, swarm_loss)
    if result.loss_rel_diff > 1e-4:
        print(f"  WARNING: first-step loss differs: swarm {swarm_loss:.6f} vs local {local_loss:.6f}")
    return result




def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per side, after one warm-up step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="random tokens per sequence")
    parser.add_argument("--servers", type=int, default=3, help="servers, splitting the blocks evenly")
    parser.add_argument("--recompute", action="store_true",
                        help="also time steps whose backward recomputes the forward (no activations kept between requests)")
    parser.add_argument("--dtype", default="float32", choices=["float32"], help="compute dtype everywhere")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main() -> None:
    if sys.argv[1:2] == ["--baseline-worker"]:
        path, dtype, batch, seq_len, steps = sys.argv[2:7]
        baseline_worker(path, dtype, int(batch), int(seq_len), int(steps))
        return
    args = parse_args()
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()  # what the distributed client runs with; the local baseline gets the same
    print(f"torch {torch.__version__}, {threads} intra-op threads; GOMP_SPINCOUNT="
          f"{os.environ.get('GOMP_SPINCOUNT', 'default')} for the client; batch {args.batch} x {args.seq_len} "
          f"random tokens, LoRA r=8 on q,k,v,o, AdamW lr {LR}; median of {args.steps} steps after a warm-up")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        for name in args.models.split(","):
            path = build_tiny(Path(tmp), sharpen=False) if name == "tiny" else ensure_smollm2()
            print(f"\n== {name} ({args.dtype}) ==")
            warn_if_busy()
            result = bench_model(name, path, args)
            print(result.table())
            results.append(result)
    print()
    for result in results:
        print(result.summary(args.dtype))


if __name__ == "__main__":
    main()
