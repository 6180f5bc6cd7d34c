"""What quantized blocks (`swarm server --quant int8|nf4`) cost in accuracy and speed, and save in memory, on SmolLM2.

SmolLM2-135M-Instruct through 3 servers (even spans of its 30 blocks), computing in float32, one swarm per mode, all in
one DHT (each mode under its own prefix); the float32 swarm ("none") is the reference, measured in the same run.
Hidden states travel uncompressed (codec "none"), so only the blocks' quantization differs. Per mode:

- weights/block: bytes of one block's weights as the servers hold them (swarm.quantize.weight_bytes of block 0 built
  by the servers' own loading code), and that over float32's.
- RSS/server: resident memory of each server process (VmRSS, its DHT child process not counted) once it serves.
- top-1 agree, ppl d: over --positions teacher-forced next-token positions of bench/heldout_en.txt (windows of
  --window tokens): the share whose argmax equals the float32 swarm's, and the perplexity change in %.
- greedy same: prompts of client/data/instructions.jsonl whose --new-tokens greedy tokens equal the float32 swarm's.
- ms/step: one decode step of an inference session through the 3 servers (median over --repeats of
  (time of generate(N + 1 tokens) - time of generate(1 token)) / N, with N = --new-tokens).
- span err: the largest relative error per token (client.spot_checks.relative_error) of each server's span output
  against float32 blocks given the same float32 input, over the first window: what spot checks must tolerate
  between a quantized replica and a float32 one (client.spot_checks.QUANT_ERROR).

Run: python bench/quantization.py [--modes none,int8,nf4] [--positions 2000] [--window 256] [--prompts 5]
"""

# ruff: noqa: E402  (the OpenMP waiting settings must be set before torch is imported)
from __future__ import annotations

import argparse

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()  # before torch starts its OpenMP runtime; the servers share the machine
import statistics
import time
from pathlib import Path

import torch
from compression import greedy, perplexity_pass, smollm2_inputs  # bench/compression.py
from transformers import LlamaForCausalLM

from client.model import DistributedModelForCausalLM
from client.spot_checks import relative_error
from swarm.checkpoint import Checkpoint
from swarm.launch import LocalSwarm
from swarm.models import family_for
from swarm.models.span import BlockSpan
from swarm.quantize import MODES, quantizer, weight_bytes

HERE = Path(__file__).resolve().parent
TARGETS = {"int8": 99.0, "nf4": 95.0}  # top-1 agreement with float32 the issue asks for (%)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024


def load_span(checkpoint: Checkpoint, start: int, end: int, mode: str) -> BlockSpan:
    """Blocks start:end exactly as a `--quant mode --torch-dtype float32` server loads them."""
    return BlockSpan.from_checkpoint(family_for(checkpoint.config), checkpoint.config, start, end, checkpoint,
                                     torch.float32, prepare=quantizer(mode, torch.float32) if mode != "none" else None)


def span_errors(path: Path, spans, modes, window: torch.Tensor) -> dict[str, list[float]]:
    """Per mode, the largest per-token relative error of each span's output against float32 blocks, same input (the
    float32 model's hidden state at the span's start)."""
    checkpoint = Checkpoint(str(path))
    embed = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).get_input_embeddings()
    positions = torch.arange(window.numel())[None]
    with torch.inference_mode():
        inputs = [embed(window[None])]
        for start, end in spans:
            inputs.append(load_span(checkpoint, start, end, "none")(inputs[-1], positions))
        return {mode: [relative_error(load_span(checkpoint, start, end, mode)(inputs[k], positions), inputs[k + 1])
                       for k, (start, end) in enumerate(spans)] for mode in modes}


def decode_ms(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    def timed(tokens: int) -> float:
        began = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - began

    timed(2)  # warm up: the route and the streams
    samples = [(timed(new_tokens + 1) - timed(1)) / new_tokens for _ in range(repeats)]
    return 1000 * statistics.median(samples)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated quantizations; 'none' always runs "
                        "as the reference")
    parser.add_argument("--positions", type=int, default=2000, help="teacher-forced next-token positions")
    parser.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--prompts", type=int, default=5, help="prompts for the greedy comparison")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt, and decode steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per mode")
    parser.add_argument("--servers", type=int, default=3, help="servers per mode, splitting the blocks evenly")
    parser.add_argument("--text", type=Path, default=HERE / "heldout_en.txt", help="English text for perplexity")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    args.modes = ["none"] + [m for m in dict.fromkeys(modes) if m != "none"]
    return args


def main() -> None:
    args = parse_args()
    path, _, windows, prompts, spans = smollm2_inputs(args)
    checkpoint = Checkpoint(str(path))
    print(f"SmolLM2-135M-Instruct, float32 compute, {len(spans)} servers {spans} per mode; {args.positions} positions in "
          f"{len(windows)} windows of {args.window}; {len(prompts)} prompts x {args.new_tokens} greedy tokens; "
          f"torch {torch.__version__}")
    rows = {}
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        began = time.perf_counter()
        servers = {mode: swarm.start_servers(str(path), spans, wait=False, extra_args=[
            "--torch-dtype", "float32", "--quant", mode, "--dht-prefix", f"smollm2-{mode}"]) for mode in args.modes}
        for started in servers.values():
            for server in started:
                server.wait_ready(600)
        print(f"{len(args.modes) * len(spans)} servers ready in {time.perf_counter() - began:.1f} s")
        reference = None
        for mode in args.modes:
            print(f"{mode}:", flush=True)
            rss = [resident_bytes(server.process.pid) for server in servers[mode]]
            model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype="float32",
                                                                dht_prefix=f"smollm2-{mode}")
            model.set_codecs(inference="none", activations="none")
            try:
                with torch.inference_mode():
                    top, nll = perplexity_pass(model, windows, args.batch, args.positions, None)
                    outputs = greedy(model, prompts, args.new_tokens)
                    step_ms = decode_ms(model, prompts[0], args.new_tokens, args.repeats)
            finally:
                model.remote_layers.connection.shutdown()
            ppl = nll.mean().exp().item()
            reference = reference or {"top": top, "ppl": ppl, "outputs": outputs}
            rows[mode] = {"bytes": weight_bytes(load_span(checkpoint, 0, 1, mode)), "rss": rss, "ppl": ppl,
                          "top1": 100 * (top == reference["top"]).float().mean().item(),
                          "greedy": sum(torch.equal(a, b) for a, b in zip(outputs, reference["outputs"], strict=True)),
                          "ms": step_ms}
            print(f"  perplexity {ppl:.3f}, {step_ms:.1f} ms per decode step", flush=True)
    errors = span_errors(path, spans, args.modes, windows[0])

    print(f"\n{'mode':6}{'weights/block':>15}{'x fp32':>8}{'RSS/server MB':>22}{'top-1':>9}{'ppl d':>9}"
          f"{'greedy':>8}{'ms/step':>9}   span err (per server)")
    base = rows["none"]
    for mode, row in rows.items():
        rss = "/".join(f"{r / 2**20:.0f}" for r in row["rss"])
        print(f"{mode:6}{row['bytes'] / 2**20:>12.2f} MB{row['bytes'] / base['bytes']:>7.3f}x{rss:>22}"
              f"{row['top1']:>8.2f}%{100 * (row['ppl'] / base['ppl'] - 1):>+8.2f}%{row['greedy']:>5}/{len(prompts)}"
              f"{row['ms']:>9.1f}   {' '.join(f'{e:.3g}' for e in errors[mode])}")
    print(f"\nfloat32 perplexity {base['ppl']:.3f} over {args.positions} positions")
    for mode, target in TARGETS.items():
        if mode in rows:
            verdict = "meets" if rows[mode]["top1"] >= target else "MISSES"
            print(f"{mode}: top-1 agreement {rows[mode]['top1']:.2f}% {verdict} the target of {target:.0f}%")


if __name__ == "__main__":
    main()
