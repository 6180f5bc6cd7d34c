"""What each wire codec for hidden states costs in bytes and accuracy, through a local swarm of SmolLM2 servers.

One LocalSwarm of SmolLM2-135M-Instruct (float32) servers for the whole run; the client switches codecs with
`model.set_codecs(...)`. The uncompressed run ("none", float32 on the wire) is the reference, measured in the same
run. Per codec:

- wire B/tok/hop: bytes the servers received (in) and sent (out) per token per hop during the perplexity pass,
  from the deltas of each server's `rpc_info` bytes_in/bytes_out. "in" also carries the position ids of each
  request; "out" is the hidden states alone. x f32: (in + out) relative to the "none" row. gen x f32: the same for
  all the bytes the servers moved during the greedy generations (prefill and every decode step).
- top-1 agree: share of the N teacher-forced positions (forward passes without a session, so the "activations"
  codec, both ways on every hop) whose argmax next token equals the reference's. Text: bench/heldout_en.txt (the
  GPL-3 and Apache-2.0 texts as Debian ships them), in windows of --window tokens.
- ppl delta: perplexity over the same positions relative to the reference's, in %.
- greedy same: prompts (from client/data/instructions.jsonl, chat template) whose greedy continuation of
  --new-tokens tokens from `model.generate()` (an inference session, so the "inference" codec) is identical to
  the reference's.
- enc/dec ms/MB: median time of `swarm.compression.get(id).encode` / `.decode` on a real [1, window, 576] hidden
  state (the last block's output of the first window, outliers included), per MiB of float32 input.
- wall s: the run's wall time for that codec (perplexity pass plus greedy generations).

Run: python bench/compression.py [--codecs none,int8_outlier] [--positions 2000] [--prompts 20] [--new-tokens 32]
"""

# ruff: noqa: E402  (the OpenMP waiting settings must be set before torch is imported)
from __future__ import annotations

import argparse
import sys

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()  # before torch starts its OpenMP runtime; the servers share the machine
import json
import statistics
import time
from pathlib import Path

import torch
from common import warn_if_busy  # bench/common.py
from hivemind.proto import runtime_pb2
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from client import aio
from client.model import DistributedModelForCausalLM
from swarm import compression
from swarm.assets import ensure_smollm2
from swarm.launch import LocalSwarm, even_spans
from swarm.protocol import BlockService

HERE = Path(__file__).resolve().parent
DEFAULT_CODECS = "none,float16,bfloat16,int8_outlier,hadamard_int8,int4_outlier"


def server_bytes(connection, route) -> tuple[int, int]:
    """Sum of bytes_in and bytes_out over the servers of the route."""
    total_in = total_out = 0
    for step in route:
        stub = BlockService.get_stub(connection.p2p, step.peer_id, namespace=connection.prefix)
        info = json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)
        total_in, total_out = total_in + info["bytes_in"], total_out + info["bytes_out"]
    return total_in, total_out


def text_windows(tokenizer, path: Path, window: int, positions: int) -> torch.Tensor:
    """[W, window] token windows of the text, enough for `positions` next-token predictions (window - 1 each)."""
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[0]
    count = -(-positions // (window - 1))
    if count * window > len(ids):
        sys.exit(f"{path} has {len(ids)} tokens, fewer than {count} windows of {window}")
    return ids[: count * window].view(count, window)


def perplexity_pass(model, windows: torch.Tensor, batch: int, positions: int, capture: list | None):
    """Teacher-forced forwards: (argmax [positions], NLL [positions]) over the first `positions` predictions."""
    hook = None
    if capture is not None:  # keep the last block's output of the first window, for the codec timings
        hook = model.remote_layers.register_forward_hook(
            lambda module, inputs, output: capture.append((output[0] if isinstance(output, tuple) else output)[:1].clone())
            if not capture else None)
    top, nll = [], []
    try:
        for chunk in tqdm(windows.split(batch), desc="  perplexity", leave=False, file=sys.stdout):
            logits = model(chunk).logits[:, :-1].float()
            targets = chunk[:, 1:]
            top.append(logits.argmax(-1).flatten())
            nll.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"))
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(top)[:positions], torch.cat(nll)[:positions]


def greedy(model, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    outputs = []
    for ids in tqdm(prompts, desc="  greedy", leave=False, file=sys.stdout):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outputs.append(out[0, ids.shape[1]:])
    return outputs


def codec_ms_per_mb(codec_id: str, hidden: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median encode and decode times of one codec on `hidden`, in ms per MiB of float32 input."""
    codec = compression.get(codec_id)
    mb = hidden.float().numel() * 4 / 2**20
    enc, dec = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        payload = codec.encode(hidden)
        mid = time.perf_counter()
        compression.get(payload.codec).decode(payload)
        enc.append(mid - start)
        dec.append(time.perf_counter() - mid)
    return 1000 * statistics.median(enc[1:]) / mb, 1000 * statistics.median(dec[1:]) / mb


def load_prompts(tokenizer, count: int) -> list[torch.Tensor]:
    lines = (HERE.parent / "client" / "data" / "instructions.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines[:count]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec ids; 'none' is always run "
                        f"first as the reference (available: {', '.join(compression.available())})")
    parser.add_argument("--positions", type=int, default=2000, help="teacher-forced next-token positions")
    parser.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--prompts", type=int, default=20, help="prompts for the greedy comparison (at most 316)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--servers", type=int, default=3, help="servers, splitting the blocks evenly")
    parser.add_argument("--repeats", type=int, default=20, help="timed encode/decode rounds per codec")
    parser.add_argument("--text", type=Path, default=HERE / "heldout_en.txt", help="English text for perplexity")
    args = parser.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = set(codecs) - set(compression.available())
    if unknown:
        parser.error(f"unknown codecs {sorted(unknown)}; choose from {compression.available()}")
    args.codecs = ["none"] + [c for c in dict.fromkeys(codecs) if c != "none"]
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the text is longer than the model's context; it is cut into windows
    path = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = text_windows(tokenizer, args.text, args.window, args.positions)
    prompts = load_prompts(tokenizer, args.prompts)
    spans = even_spans(AutoConfig.from_pretrained(path).num_hidden_layers, args.servers)
    warn_if_busy()
    print(f"SmolLM2-135M-Instruct float32, {len(spans)} servers {spans}; {args.positions} positions in "
          f"{len(windows)} windows of {args.window} (batch {args.batch}); {len(prompts)} prompts x "
          f"{args.new_tokens} greedy tokens; torch {torch.__version__}, {torch.get_num_threads()} client threads")
    rows, failures = [], {}
    with LocalSwarm() as swarm:
        started = time.perf_counter()
        swarm.start_bootstrap()
        swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", "float32"])
        print(f"swarm ready in {time.perf_counter() - started:.1f} s")
        model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype="float32")
        connection = model.remote_layers.connection
        try:
            route = connection.plan()
            hops = len(route)
            capture: list[torch.Tensor] = []
            ref = None
            for codec in args.codecs:
                print(f"{codec}:", flush=True)
                model.set_codecs(inference=codec, activations=codec)
                began = time.perf_counter()
                try:
                    with torch.inference_mode():
                        before = server_bytes(connection, route)
                        top, nll = perplexity_pass(model, windows, args.batch, args.positions,
                                                   capture if ref is None else None)
                        after = server_bytes(connection, route)
                        outputs = greedy(model, prompts, args.new_tokens)
                        generated = sum(server_bytes(connection, route)) - sum(after)
                except Exception as exc:  # report the codec as failed and go on with the others
                    failures[codec] = f"{type(exc).__name__}: {exc}"
                    print(f"  FAILED: {failures[codec]}")
                    if ref is None:
                        raise
                    continue
                wall = time.perf_counter() - began
                tokens = windows.numel()
                wire_in, wire_out = ((a - b) / (tokens * hops) for a, b in zip(after, before, strict=True))
                ppl = nll.mean().exp().item()
                if ref is None:
                    ref = {"top": top, "ppl": ppl, "outputs": outputs, "wire": wire_in + wire_out, "generated": generated}
                    print(f"  reference perplexity {ppl:.3f}")
                enc, dec = codec_ms_per_mb(codec, capture[0], args.repeats)
                rows.append((codec, wire_in, wire_out, (wire_in + wire_out) / ref["wire"], generated / ref["generated"],
                             (top == ref["top"]).float().mean().item(), 100 * (ppl / ref["ppl"] - 1),
                             sum(torch.equal(a, b) for a, b in zip(outputs, ref["outputs"], strict=True)),
                             enc, dec, wall))
        finally:
            connection.shutdown()

    print(f"\nhidden state for codec timings: {list(capture[0].shape)}, max |x| {capture[0].abs().max().item():.1f}; "
          f"wire bytes over {hops} hops, {windows.numel()} tokens per codec in the perplexity pass")
    header = (f"{'codec':14}{'in B/tok/hop':>13}{'out B/tok/hop':>14}{'x f32':>7}{'gen x f32':>10}{'top-1 agree':>12}"
              f"{'ppl delta':>11}"
              f"{'greedy same':>12}{'enc ms/MB':>10}{'dec ms/MB':>10}{'wall s':>8}")
    print(header)
    print("-" * len(header))
    for codec, wire_in, wire_out, ratio, gen_ratio, agree, delta, same, enc, dec, wall in rows:
        print(f"{codec:14}{wire_in:13.1f}{wire_out:14.1f}{ratio:7.3f}{gen_ratio:10.3f}{100 * agree:11.2f}%{delta:+10.3f}%"
              f"{f'{same}/{len(prompts)}':>12}{enc:10.2f}{dec:10.2f}{wall:8.1f}")
    for codec, error in failures.items():
        print(f"{codec:14}FAILED: {error}")


if __name__ == "__main__":
    main()
