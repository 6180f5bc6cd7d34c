"""The training half of bench/compression.py: LoRA fine-tuning of SmolLM2 through the swarm with each set of
training codecs, against the uncompressed run with the same seed, data and order.

Setup: LoRA r=8 (alpha 16) on q,k,v,o, AdamW lr 5e-4, gradient norm clipped at 1, batch 4; the first N training
pairs of client/data/instructions.jsonl (chat template, loss on the answer), each padded to a fixed 128 tokens so
a sample looks the same every epoch; E epochs, shuffled with one seed (which also draws the adapter's initial
values; every codec set of a run uses the same); the next H pairs held out. Measured:

- bytes: every byte of hidden states and their gradients the client sent and received over the run (activations
  forward, gradients backward, every hop; first-epoch full sends and fallbacks included), per token per hop;
  x f32 is the uncompressed run's bytes over these.
- held-out loss after training (evaluated without compression, so it measures the adapter trained) and its
  change against the uncompressed run's.
- MA dev: the largest relative gap between the 10-step moving averages of the training loss, over the whole run.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig
from tqdm import tqdm

from client.cli_finetune import IGNORE, batch_loss, load_examples, tokenize_example
from client.data import INSTRUCTIONS

LENGTH = 128
BATCH = 4
LR = 5e-4


@dataclass
class TrainingConfig:
    name: str
    activations: str
    gradients: str
    delta: str = "none"


@dataclass
class TrainingResult:
    config: TrainingConfig
    losses: list[float]
    held_out: float
    hidden_bytes: int
    tokens_hops: int  # tokens x hops over the run (for bytes per token per hop)
    fallbacks: int
    wall: float


def padded(tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [N, LENGTH], every example right-padded to LENGTH."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(examples), LENGTH), pad, dtype=torch.long)
    labels = torch.full((len(examples), LENGTH), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), LENGTH), dtype=torch.long)
    for row, example in enumerate(examples):
        tokens, labs = tokenize_example(tokenizer, example, LENGTH)
        ids[row, : len(tokens)], labels[row, : len(labs)], mask[row, : len(tokens)] = (
            torch.tensor(tokens), torch.tensor(labs), 1)
    return ids, mask, labels


def load_data(tokenizer, samples: int, held_out: int):
    examples = load_examples(INSTRUCTIONS)
    if samples + held_out > len(examples):
        sys.exit(f"--train-samples {samples} + --held-out {held_out} exceeds the {len(examples)} shipped examples")
    return padded(tokenizer, examples[:samples]), padded(tokenizer, examples[samples: samples + held_out])


def held_out_loss(model, data) -> float:
    ids, mask, labels = data
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), BATCH):
            part = slice(start, start + BATCH)
            loss, n = batch_loss(model, ids[part], mask[part], labels[part])
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def train(model, config: TrainingConfig, train_data, held_out, epochs: int, seed: int = 0) -> TrainingResult:
    layers = model.remote_layers
    layers.delta = None  # no references from an earlier configuration
    model.set_codecs(activations=config.activations, gradients=config.gradients, delta=config.delta)
    torch.manual_seed(seed)
    lora = model.add_lora_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW(lora.params, lr=LR)
    ids, mask, labels = train_data
    order_rng = random.Random(seed)
    losses: list[float] = []
    hops = len(layers.connection.plan())
    before = layers.connection.hidden_traffic
    start_bytes = before.sent_wire + before.received_wire
    began = time.perf_counter()
    model.train()
    steps = epochs * -(-len(ids) // BATCH)
    with tqdm(total=steps, desc=f"  train {config.name}", leave=False, file=sys.stdout) as progress:
        for _ in range(epochs):
            order = list(range(len(ids)))
            order_rng.shuffle(order)
            for start in range(0, len(order), BATCH):
                rows = order[start: start + BATCH]
                loss_sum, n = batch_loss(model, ids[rows], mask[rows], labels[rows])
                loss = loss_sum / max(n, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora.params, 1.0)
                optimizer.step()
                losses.append(float(loss))
                progress.set_postfix(loss=f"{float(loss):.4f}")
                progress.update(1)
    wall = time.perf_counter() - began
    after = layers.connection.hidden_traffic
    hidden_bytes = after.sent_wire + after.received_wire - start_bytes
    fallbacks = layers.delta.counts.fallbacks if layers.delta is not None else 0
    model.set_codecs(activations="none", gradients="none", delta="none")
    held = held_out_loss(model, held_out)
    layers.lora = None
    return TrainingResult(config, losses, held, hidden_bytes, epochs * len(ids) * LENGTH * hops, fallbacks, wall)


def moving_average(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window): i + 1]) for i in range(len(values))]


def max_ma_deviation(losses: list[float], reference: list[float]) -> float:
    """The largest |MA(losses) - MA(reference)| / MA(reference) over the run, in %."""
    ours, ref = moving_average(losses), moving_average(reference)
    return 100 * max(abs(a - b) / b for a, b in zip(ours, ref, strict=True))
