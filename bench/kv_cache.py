"""ms per decode step on SmolLM2-135M-Instruct with transformers' DynamicCache (concatenates every step) against the
servers' preallocated cache (swarm.models.preallocated: written in place, attention over views of the filled prefix).

All 30 blocks as one BlockSpan in this process, float32, batch --batch, as a server runs a session's steps (the 2-D
padding mask over cached + new tokens, positions given). Per context: prefill to --contexts tokens, then time
--steps decode steps one by one; the modes are interleaved within each of --repeats repetitions (the machine is
shared), and each mode's figure is the median over all timed steps of all repetitions. The preallocated cache
hands attention either strided views of the filled prefix ("prealloc-views": what servers do) or contiguous copies
of it ("prealloc-copies").
Run: python bench/kv_cache.py [--contexts 128 1024] [--steps 24] [--repeats 5] [--batch 1] [--threads N]
"""
# ruff: noqa: E402  (the OpenMP waiting settings must be set before torch is imported)
from __future__ import annotations

import argparse

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()

import statistics
import time

import torch
from common import warn_if_busy  # bench/common.py

from swarm.assets import ensure_smollm2
from swarm.checkpoint import Checkpoint
from swarm.models import family_for
from swarm.models.span import BlockSpan


def new_cache(span: BlockSpan, mode: str, batch: int, max_length: int):
    if mode == "dynamic":
        return span.new_cache()
    cache = span.new_cache(batch, max_length)
    for layer in cache.layers:
        layer.contiguous = {"prealloc-copies": True, "prealloc-views": False}[mode]
    return cache


@torch.inference_mode()
def step_times(span: BlockSpan, mode: str, batch: int, context: int, steps: int, generator: torch.Generator) -> list[float]:
    """Seconds of each of `steps` decode steps after a prefill of `context` tokens."""
    hidden_size = span.config.hidden_size
    cache = new_cache(span, mode, batch, context + steps)
    mask = torch.ones(batch, context + steps, dtype=torch.int64)
    positions = torch.arange(context + steps).expand(batch, -1)
    span(torch.randn(batch, context, hidden_size, generator=generator), positions[:, :context], mask[:, :context], cache=cache)
    times = []
    for i in range(context, context + steps):
        hidden = torch.randn(batch, 1, hidden_size, generator=generator)
        began = time.perf_counter()
        span(hidden, positions[:, i : i + 1], mask[:, : i + 1], cache=cache)
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", default=["dynamic", "prealloc-copies", "prealloc-views"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Checkpoint(str(ensure_smollm2()))
    config = checkpoint.config
    span = BlockSpan.from_checkpoint(family_for(config), config, 0, config.num_hidden_layers, checkpoint, torch.float32)
    print(f"SmolLM2-135M-Instruct, {config.num_hidden_layers} blocks in one span, float32, batch {args.batch}; "
          f"{args.steps} decode steps x {args.repeats} repetitions per context; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    warn_if_busy()
    generator = torch.Generator().manual_seed(0)
    for mode in args.modes:  # warm up each path once
        step_times(span, mode, args.batch, 16, 2, generator)
    for context in args.contexts:
        times: dict[str, list[float]] = {mode: [] for mode in args.modes}
        for repeat in range(args.repeats):
            for mode in args.modes[repeat % 2 :] + args.modes[: repeat % 2]:  # alternate which goes first
                times[mode] += step_times(span, mode, args.batch, context, args.steps, generator)
        medians = {mode: 1000 * statistics.median(t) for mode, t in times.items()}
        cells = ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in medians.items())
        ratios = ", ".join(f"{mode}/dynamic {medians[mode] / medians['dynamic']:.3f}" for mode in args.modes
                           if mode != "dynamic" and "dynamic" in medians)
        print(f"context {context:5d}: {cells}  ({ratios})", flush=True)


if __name__ == "__main__":
    main()
