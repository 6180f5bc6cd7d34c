"""`swarm finetune`: train a LoRA adapter through the swarm. Its tensors live on this client: every forward and backward
request carries them (the servers apply them and keep nothing), the local AdamW updates them, and the result is saved
in the peft format."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.config import FINETUNE_FLAGS, add_client_arguments, client_config_from
from client.data import INSTRUCTIONS

IGNORE = -100

DATA_HELP = (
    "training data: a .jsonl file with one JSON object per line, either {\"text\": ...} (loss on every token) or "
    "{\"prompt\": ..., \"completion\": ...} (loss on the completion only; formatted as a user/assistant chat when "
    "the tokenizer has a chat template, else prompt and completion are concatenated as they are), or a .txt file "
    "with one example per non-empty line. The default is the small instruction set shipped with the client "
    "(client/data/instructions.jsonl)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    parser.add_argument("model", help="folder (or hub repo id) with the model's config, tokenizer and client-side weights")
    add_swarm_arguments(parser)
    parser.add_argument("--data", default=str(INSTRUCTIONS), metavar="FILE", help=DATA_HELP)
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (the update is scaled by alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="dropout on the LoRA input while training (the servers apply it with masks the client seeds)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"], metavar="NAME",
                        help="names of the linear layers of each block that get an adapter")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over the training set (1 when neither --epochs nor --steps is given)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps, cycling over the training set")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the adapter's gradient norm (0 = off)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="fraction of the examples held out to measure the loss before and after training (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the shuffling and the adapter's init")
    parser.add_argument("--out", default="lora-adapter", metavar="DIR", help="folder to save the adapter to")
    parser.add_argument("--torch-dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                        help="dtype of the client-side embeddings, LM head and adapter")
    parser.add_argument("--dht-prefix", default=None, help="name the model is announced under (default: folder or repo name)")
    add_client_arguments(parser, FINETUNE_FLAGS)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Example:
    """One training example: either plain text, or a prompt whose tokens carry no loss and its completion."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None


def load_examples(path: str | Path) -> list[Example]:
    """Read a .jsonl or .txt file; raise ValueError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise ValueError(f"--data {path}: expected a .jsonl or .txt file")
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if suffix == ".txt":
                examples.append(Example(text=line.rstrip("\r\n")))
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "text" in row:
                if not isinstance(row["text"], str) or not row["text"]:
                    raise ValueError(f"{where}: \"text\" must be a non-empty string")
                examples.append(Example(text=row["text"]))
            elif "prompt" in row or "completion" in row:
                for key in ("prompt", "completion"):
                    if key not in row:
                        raise ValueError(f"{where}: has \"{'prompt' if key == 'completion' else 'completion'}\" "
                                         f"but no \"{key}\"")
                    if not isinstance(row[key], str):
                        raise ValueError(f"{where}: \"{key}\" must be a string, got {type(row[key]).__name__}")
                if not row["completion"]:
                    raise ValueError(f"{where}: \"completion\" is empty")
                examples.append(Example(prompt=row["prompt"], completion=row["completion"]))
            else:
                raise ValueError(f"{where}: expected a \"text\" key or \"prompt\" and \"completion\" keys, "
                                 f"got {sorted(row)}")
    if not examples:
        raise ValueError(f"--data {path}: no examples")
    return examples


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE on the prompt), truncated to max_length."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"] + eos
        return ids[:max_length], ids[:max_length]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": example.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.completion}],
                                                  tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if full_text.startswith(prompt_text):
            completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        else:  # a template that rewrites earlier turns: fall back to the token count of the prompt
            completion_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][len(prompt_ids):]
    else:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return ids[:max_length], labels[:max_length]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None):
    """Right-pad to `length` (default: the longest example): input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    length = length or max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    if not 0 <= eval_fraction < 1:
        raise ValueError("--eval-fraction must be in [0, 1)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 or len(items) < 2 else min(len(items) - 1, max(1, round(eval_fraction * len(items))))
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


# ---------------------------------------------------------------------------------------------- training


def batch_loss(model, input_ids, mask, labels):
    """Summed cross-entropy over the label tokens of a batch, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


def evaluate(model, data, batch_size: int, pad_id: int) -> float:
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()  # no LoRA dropout while evaluating
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            loss, n = batch_loss(model, *collate(data[start: start + batch_size], pad_id))
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from client.model import DistributedModelForCausalLM

    for name in ("batch_size", "max_length", "lora_r"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if (args.steps is not None and args.steps < 1) or (args.epochs is not None and args.epochs < 1):
        raise ValueError("--steps and --epochs must be at least 1")

    examples = load_examples(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokenized = [tokenize_example(tokenizer, ex, args.max_length) for ex in examples]
    usable = [t for t in tokenized if sum(label != IGNORE for label in t[1][1:]) > 0]
    if len(usable) < len(tokenized):
        print(f"skipping {len(tokenized) - len(usable)} example(s) with no completion tokens left within "
              f"--max-length {args.max_length}", file=sys.stderr)
    if not usable:
        raise ValueError(f"--data {args.data}: no example has tokens to learn from within --max-length {args.max_length}")
    train, held_out = split(usable, args.eval_fraction, args.seed)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.steps if args.steps is not None else steps_per_epoch * (args.epochs or 1)
    print(f"data: {args.data}: {len(train)} training and {len(held_out)} held-out examples; "
          f"{total_steps} steps of {args.batch_size} ({steps_per_epoch} per epoch)", flush=True)

    model = DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers, dht_prefix=args.dht_prefix,
                                                        torch_dtype=args.torch_dtype, swarm_key=args.swarm_key,
                                                        client_config=client_config_from(args, FINETUNE_FLAGS))
    try:
        pad_to = args.max_length if args.delta_codec != "none" else None
        torch.manual_seed(args.seed)
        # Only the adapter trains: add_lora_adapter freezes the client-side weights.
        lora = model.add_lora_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 target_modules=list(args.target_modules), lora_dropout=args.lora_dropout))
        params = list(lora.parameters())
        print(f"adapter: r={args.lora_r}, alpha={args.lora_alpha:g}, {', '.join(args.target_modules)}: "
              f"{sum(p.numel() for p in params):,} trainable parameters", flush=True)

        if held_out:
            before = evaluate(model, held_out, args.batch_size, pad_id)
            print(f"held-out loss before training: {before:.4f}", flush=True)

        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        model.train()
        rng = random.Random(args.seed)
        step, epoch, seen_tokens, started = 0, 0, 0, time.perf_counter()
        progress = tqdm(total=total_steps, desc="finetune", unit="step", dynamic_ncols=True)
        while step < total_steps:
            epoch += 1
            order = list(range(len(train)))
            rng.shuffle(order)
            epoch_loss, epoch_tokens = 0.0, 0
            batches = range(0, len(order), args.batch_size)[: total_steps - step]
            for start in batches:
                input_ids, mask, labels = collate([train[i] for i in order[start: start + args.batch_size]], pad_id, pad_to)
                loss_sum, n = batch_loss(model, input_ids, mask, labels)
                loss = loss_sum / max(n, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                step += 1
                epoch_loss, epoch_tokens = epoch_loss + float(loss_sum), epoch_tokens + n
                seen_tokens += int(mask.sum())
                tokens_per_s = seen_tokens / max(time.perf_counter() - started, 1e-9)
                progress.set_postfix(loss=f"{float(loss):.4f}", tok_s=f"{tokens_per_s:.0f}")
                progress.update(1)
            progress.write(f"epoch {epoch}: {len(batches)} steps, train loss {epoch_loss / max(epoch_tokens, 1):.4f}"
                           + ("" if len(batches) * args.batch_size >= len(train) else " (partial)"), file=sys.stdout)
        progress.close()
        elapsed = time.perf_counter() - started
        traffic = model.remote_layers.connection.hidden_traffic
        print(f"trained {step} steps in {elapsed:.1f}s; hidden states and gradients on the wire: "
              f"{(traffic.sent_wire + traffic.received_wire) / 1e6:.1f} MB ({traffic.ratio:.2f}x fewer than uncompressed)",
              flush=True)

        if held_out:
            after = evaluate(model, held_out, args.batch_size, pad_id)
            print(f"held-out loss after training: {after:.4f} (before: {before:.4f})", flush=True)

        out = Path(args.out)
        model.save_lora_adapter(out)
        print(f"saved the adapter to {out.resolve()}")
        print(f"try it: swarm generate {args.model} \"...\" --initial-peers {' '.join(args.initial_peers)} "
              f"--adapter {out}" + (" --chat" if getattr(tokenizer, "chat_template", None) else ""))
    finally:
        model.remote_layers.connection.shutdown()
    return 0

