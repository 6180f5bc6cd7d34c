"""What each wire codec for hidden states costs in bytes and accuracy, through a local swarm of SmolLM2 servers.

One LocalSwarm of SmolLM2-135M-Instruct (float32) servers for the whole run; the client switches codecs with
`model.set_codecs(...)`. The uncompressed run ("none", float32 on the wire) is the reference, measured in the same
run. Per codec:

- B/tok/hop: bytes of hidden states on the wire per token, hop and direction during the perplexity pass (the
  client's `hidden_traffic`: payload headers included, position ids not). ratio: the "none" row's bytes over
  these. gen ratio: the same over the greedy generations (prefill and every decode step, one token each).
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

Training rows (role "training"): see bench/compression_train.py; per set of training codecs (activations
forward / gradients backward / deltas from the second epoch), bytes per token per hop of hidden states and their
gradients over the whole run, the ratio to the uncompressed run, the held-out loss change and the largest gap
between the 10-step moving averages of the training loss. enc/dec ms/MB there are the activation codec's.

Run: python bench/compression.py [--codecs none,int8_outlier] [--positions 2000] [--prompts 20] [--new-tokens 32]
                                 [--train-epochs 4] [--train-samples 64] [--held-out 32] [--train-seed 0]
                                 [--training CONFIGS | --no-training]
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
from compression_train import TrainingConfig, load_data, max_ma_deviation, train  # bench/compression_train.py
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from swarm import compression
from swarm.assets import ensure_smollm2
from swarm.launch import LocalSwarm, even_spans

HERE = Path(__file__).resolve().parent
DEFAULT_CODECS = "none,float16,bfloat16,int8_outlier,hadamard_int8,int4_outlier"
TRAINING = {  # name: (activations, gradients, deltas); "int8/int5g/d6" is the default (client.config.CLIENT)
    "none": TrainingConfig("none", "none", "none"),
    "int8": TrainingConfig("int8", "int8_outlier", "int8_outlier"),
    "int8/int5g": TrainingConfig("int8/int5g", "int8_outlier", "int5_outlier"),
    "int8/int5g/d6": TrainingConfig("int8/int5g/d6", "int8_outlier", "int5_outlier", "int6_outlier"),
    "int8/int5g/d5": TrainingConfig("int8/int5g/d5", "int8_outlier", "int5_outlier", "int5_outlier"),
    "int8/int4g/d6": TrainingConfig("int8/int4g/d6", "int8_outlier", "int4_outlier", "int6_outlier"),
}


def hidden_bytes(connection) -> int:
    """Bytes of hidden states (and gradients) the client has sent and received on the wire so far."""
    traffic = connection.hidden_traffic
    return traffic.sent_wire + traffic.received_wire


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
    parser.add_argument("--training", default=",".join(TRAINING),
                        help="training codec sets to run ('none' always runs first as the reference): one of "
                        f"{', '.join(TRAINING)}, or ACTIVATIONS/GRADIENTS/DELTAS codec ids (e.g. bfloat16/bfloat16/none)")
    parser.add_argument("--no-training", action="store_true", help="skip the fine-tuning half")
    parser.add_argument("--losses", type=Path, help="write every training step's loss per codec set to this JSON file")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference half")
    parser.add_argument("--train-epochs", type=int, default=4, help="epochs of LoRA fine-tuning per codec set")
    parser.add_argument("--train-samples", type=int, default=64, help="training pairs")
    parser.add_argument("--held-out", type=int, default=32, help="pairs held out to measure the trained adapter")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of the adapter's initial values and of the "
                        "epochs' order (the same for every codec set, the reference included)")
    args = parser.parse_args()
    training = [t for t in args.training.split(",") if t]
    for name in (t for t in training if t not in TRAINING):
        parts = name.split("/")
        if len(parts) != 3 or set(parts) - set(compression.available()):
            parser.error(f"unknown training set {name!r}: name one of {list(TRAINING)} or give three codec ids "
                         f"ACTIVATIONS/GRADIENTS/DELTAS from {compression.available()}")
        TRAINING[name] = TrainingConfig(name, *parts)
    args.training = [] if args.no_training else ["none"] + [t for t in dict.fromkeys(training) if t != "none"]
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = set(codecs) - set(compression.available())
    if unknown:
        parser.error(f"unknown codecs {sorted(unknown)}; choose from {compression.available()}")
    args.codecs = [] if args.no_inference else ["none"] + [c for c in dict.fromkeys(codecs) if c != "none"]
    return args


def training_rows(model, tokenizer, args, capture) -> list[dict]:
    """One table row per training codec set, the uncompressed one first (the reference)."""
    train_data, held_out = load_data(tokenizer, args.train_samples, args.held_out)
    rows, ref, losses = [], None, {}
    for name in args.training:
        config = TRAINING[name]
        print(f"training {name} (activations {config.activations}, gradients {config.gradients}, deltas {config.delta}):",
              flush=True)
        result = train(model, config, train_data, held_out, args.train_epochs, args.train_seed)
        ref = ref or result
        losses[name] = {"steps": result.losses, "held_out": result.held_out}
        if args.losses:
            args.losses.write_text(json.dumps(losses))
        per_token = result.hidden_bytes / result.tokens_hops
        print(f"  held-out loss {result.held_out:.4f}, last training losses {[round(x, 3) for x in result.losses[-3:]]}, "
              f"{per_token:.0f} B/tok/hop, {result.fallbacks} fallbacks")
        rows.append({"codec": name, "role": "training", "bytes": per_token, "ratio": ref.hidden_bytes / result.hidden_bytes,
                     "held": 100 * (result.held_out / ref.held_out - 1), "ma": max_ma_deviation(result.losses, ref.losses),
                     "wall": result.wall})
        if capture:  # timed on the inference half's hidden state ("-" in the table without it)
            rows[-1]["enc"], rows[-1]["dec"] = codec_ms_per_mb(config.activations, capture[0], args.repeats)
    return rows


def print_table(rows: list[dict], prompts: int) -> None:
    columns = [("codec", 14, "{}"), ("role", 10, "{}"), ("B/tok/hop", 10, "{:.1f}"), ("ratio", 7, "{:.2f}x"),
               ("gen ratio", 10, "{:.2f}x"), ("top-1", 8, "{:.2f}%"), ("greedy", 7, "{}/" + str(prompts)),
               ("ppl d", 8, "{:+.3f}%"), ("held-out d", 11, "{:+.2f}%"), ("MA dev", 8, "{:.2f}%"),
               ("enc ms/MB", 10, "{:.2f}"), ("dec ms/MB", 10, "{:.2f}"), ("wall s", 8, "{:.1f}")]
    keys = ["codec", "role", "bytes", "ratio", "gen", "top1", "greedy", "ppl", "held", "ma", "enc", "dec", "wall"]
    print("".join(f"{name:>{width}}" if i > 1 else f"{name:{width}}" for i, (name, width, _) in enumerate(columns)))
    print("-" * sum(width for _, width, _ in columns))
    for row in rows:
        cells = []
        for i, ((_, width, fmt), key) in enumerate(zip(columns, keys, strict=True)):
            text = fmt.format(row[key]) if key in row else "-"
            cells.append(f"{text:>{width}}" if i > 1 else f"{text:{width}}")
        print("".join(cells))


def smollm2_inputs(args: argparse.Namespace):
    """SmolLM2's folder, tokenizer, teacher-forced windows of args.text, chat prompts, and args.servers even spans
    (the parts of a SmolLM2 bench run that bench/quantization.py shares)."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the text is longer than the model's context; it is cut into windows
    path = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = text_windows(tokenizer, args.text, args.window, args.positions)
    prompts = load_prompts(tokenizer, args.prompts)
    spans = even_spans(AutoConfig.from_pretrained(path).num_hidden_layers, args.servers)
    warn_if_busy()
    return path, tokenizer, windows, prompts, spans


def main() -> None:
    args = parse_args()
    path, tokenizer, windows, prompts, spans = smollm2_inputs(args)
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
                        before = hidden_bytes(connection)
                        top, nll = perplexity_pass(model, windows, args.batch, args.positions,
                                                   capture if ref is None else None)
                        after = hidden_bytes(connection)
                        outputs = greedy(model, prompts, args.new_tokens)
                        generated = hidden_bytes(connection) - after
                except Exception as exc:  # report the codec as failed and go on with the others
                    failures[codec] = f"{type(exc).__name__}: {exc}"
                    print(f"  FAILED: {failures[codec]}")
                    if ref is None:
                        raise
                    continue
                wall = time.perf_counter() - began
                wire = after - before
                ppl = nll.mean().exp().item()
                if ref is None:
                    ref = {"top": top, "ppl": ppl, "outputs": outputs, "wire": wire, "generated": generated}
                    print(f"  reference perplexity {ppl:.3f}")
                enc, dec = codec_ms_per_mb(codec, capture[0], args.repeats)
                rows.append({"codec": codec, "role": "inference", "bytes": wire / (2 * windows.numel() * hops),
                             "ratio": ref["wire"] / wire, "gen": ref["generated"] / generated,
                             "top1": 100 * (top == ref["top"]).float().mean().item(), "ppl": 100 * (ppl / ref["ppl"] - 1),
                             "greedy": sum(torch.equal(a, b) for a, b in zip(outputs, ref["outputs"], strict=True)),
                             "enc": enc, "dec": dec, "wall": wall})
            if args.training:
                rows += training_rows(model, tokenizer, args, capture)
        finally:
            connection.shutdown()

    if capture:
        print(f"\nhidden state for codec timings: {list(capture[0].shape)}, max |x| {capture[0].abs().max().item():.1f}; "
              f"inference: hidden-state bytes over {hops} hops, {windows.numel()} tokens per codec in the perplexity pass "
              f"(B/tok/hop: per direction)")
    print_table(rows, len(prompts))
    for codec, error in failures.items():
        print(f"{codec:14}FAILED: {error}")


if __name__ == "__main__":
    main()
