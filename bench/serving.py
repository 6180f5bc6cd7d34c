"""Many clients at once through one swarm: today's throughput and latency, the baseline for batching (issue 16).

A bootstrap node and --servers servers (the blocks split evenly) host the model; then, for each N of --clients,
N client processes (each its own DistributedModelForCausalLM, as separate users are) generate greedily together,
released by one start time (a barrier), each on its own prompt (mixed lengths). Printed per N, medians over
--repeats interleaved rounds: aggregate tokens/s (all new tokens / time from the start to the last finish),
per-client tokens/s (median and slowest), per-token latency p50/p95 (time between consecutive tokens, prefill
excluded), the aggregate over N=1's, and how many outputs differ from the same prompt's output generated alone
(greedy: must be 0 with --codec none). With --with-training: --training-clients N generating clients, each round
once alone and once beside one more client process doing LoRA fine-tuning steps (bench/finetune.py's step) through
the same servers, and the generating clients' p95 latency in both and its ratio. With --compare-unbatched, a second
set of servers (--batch-rows 1: each decode step alone, as before batching) runs beside the first under another DHT
prefix, every client holds a model for each, and the rounds alternate between them: both tables, and per N the
ratio of aggregate tokens/s batched / unbatched.
Run: python bench/serving.py [--model smollm2|tiny] [--clients 1,2,4,8,16] [--repeats 3] [--new-tokens 32]
                             [--codec none] [--with-training [--training-clients 4]] [--compare-unbatched]

Clients and servers share this machine's cores, as in bench/generation.py: every process spins only briefly when
idle (GOMP_SPINCOUNT=1000, swarm.config), else each would steal the cores the others need.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
from common import StepClock, build_tiny, warn_if_busy  # bench/common.py
from transformers import AutoConfig, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from swarm.assets import ensure_smollm2
from swarm.checkpoint import default_dht_prefix
from swarm.config import COLOCATED_OMP_ENV
from swarm.launch import LocalSwarm, even_spans

PROMPT_LENGTHS = (16, 64, 128, 32, 200, 8, 96, 48)  # client i gets PROMPT_LENGTHS[i % 8] tokens
TAG = "SERVING "  # marks a worker's replies on its stdout (libraries may print there too)
HELDOUT = Path(__file__).with_name("heldout_en.txt")


def reply(payload: dict) -> None:
    print(TAG + json.dumps(payload), flush=True)


UNBATCHED = "-unbatched"  # the DHT prefix suffix of the --compare-unbatched servers


def load_client(path: str, peers: list[str], codec: str | None, prefix: str | None = None) -> DistributedModelForCausalLM:
    model = DistributedModelForCausalLM.from_pretrained(path, peers, torch_dtype="float32", dht_prefix=prefix)
    if codec is not None:
        model.set_codecs(inference=codec)
    return model


def generate_worker(path: str, peers: list[str], codec: str | None, new_tokens: int, prefixes: list[str | None]) -> None:
    """A client process: for each command line {"prompt", "start_at", "swarm"}, waits for the start time, generates
    greedily through that swarm (an index into `prefixes`) and replies with its new tokens and when each came."""
    models = [load_client(path, peers, codec, prefix) for prefix in prefixes]
    reply({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        prompt, model = torch.tensor([command["prompt"]]), models[command.get("swarm", 0)]
        time.sleep(max(0.0, command["start_at"] - time.time()))
        clock, started = StepClock(time.time), time.time()  # wall clock: compared across processes
        with torch.inference_mode():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                    stopping_criteria=StoppingCriteriaList([clock]))
        reply({"tokens": output[0, prompt.shape[1]:].tolist(), "started": started, "times": clock.times})
    for model in models:
        model.model.layers.connection.shutdown()


def train_worker(path: str, peers: list[str], batch: int, seq_len: int) -> None:
    """A fine-tuning client: LoRA steps (bench/finetune.py's adapter, AdamW) from "start" until "stop", then a reply
    with the steps' times. One warm-up step before it says it is ready."""
    from finetune import LR, batch_ids, lora_config  # bench/finetune.py; peft only here

    model = DistributedModelForCausalLM.from_pretrained(path, peers, torch_dtype="float32")
    lora = model.add_lora_adapter(lora_config())
    optimizer = torch.optim.AdamW(list(lora.parameters()), lr=LR)
    input_ids = batch_ids(model.config.vocab_size, batch, seq_len)

    def step() -> float:
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        return time.perf_counter() - began

    step()
    reply({"ready": True})
    running, commands = threading.Event(), []
    wake = threading.Condition()

    def read_commands() -> None:  # "stop" must reach the loop while it trains, so stdin is read beside it
        for line in sys.stdin:
            word = line.strip()
            if word == "start":
                running.set()
            else:
                running.clear()
            with wake:
                commands.append(word)
                wake.notify()

    threading.Thread(target=read_commands, daemon=True).start()
    while True:
        with wake:
            wake.wait_for(lambda: commands)
            word = commands.pop(0)
        if word == "start":
            reply({"training": True})
            times = []
            while running.is_set():
                times.append(step())
            reply({"steps": times})
        elif word == "quit":
            break
    model.model.layers.connection.shutdown()


class Worker:
    """A worker process of this script and its line protocol (JSON commands in, tagged JSON replies out)."""

    def __init__(self, role: str, args: list[str], logs: Path, name: str):
        self.name, self.log_path = name, logs / f"{name}.log"
        with open(self.log_path, "wb") as log:
            # Brief OpenMP spinning, as LocalSwarm's servers have (the user's own setting wins).
            self.process = subprocess.Popen([sys.executable, __file__, "--worker", role, *args], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                                            env={**COLOCATED_OMP_ENV, **os.environ})

    def send(self, command: dict | str) -> None:
        self.process.stdin.write((command if isinstance(command, str) else json.dumps(command)) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"{self.name} exited with code {self.process.wait()}:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"quit": True} if self.name != "trainer" else "quit")
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


@dataclass
class Round:
    """One round: N clients released together; per client its new tokens, start and token times (wall clock)."""

    start_at: float
    clients: list[dict]
    mismatches: int
    training_steps: list[float] = field(default_factory=list)

    @property
    def aggregate(self) -> float:
        tokens = sum(len(c["tokens"]) for c in self.clients)
        return tokens / (max(c["times"][-1] for c in self.clients) - self.start_at)

    @property
    def per_client(self) -> list[float]:
        return [len(c["tokens"]) / (c["times"][-1] - c["started"]) for c in self.clients]

    @property
    def gaps_ms(self) -> list[float]:
        return [1000 * (b - a) for c in self.clients for a, b in pairwise(c["times"])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_round(workers: list[Worker], prompts: list[list[int]], references: list | None, delay: float = 0.5,
              swarm: int = 0) -> Round:
    """Release `workers` together on their prompts; count outputs that differ from `references` (the alone runs)."""
    start_at = time.time() + delay
    for worker, prompt in zip(workers, prompts, strict=False):
        worker.send({"prompt": prompt, "start_at": start_at, "swarm": swarm})
    clients = [worker.receive() for worker in workers]
    if max(c["started"] for c in clients) > start_at + 0.2:
        print(f"  note: a client started {max(c['started'] for c in clients) - start_at:.2f} s after the barrier")
    mismatches = sum(c["tokens"] != ref for c, ref in zip(clients, references or [], strict=False))
    return Round(start_at, clients, mismatches)


def make_prompts(path: Path, count: int, vocab_size: int) -> list[list[int]]:
    """Mixed lengths; English text where the model has a tokenizer (SmolLM2), else random ids (the tiny model)."""
    try:
        from transformers import AutoTokenizer

        stream = AutoTokenizer.from_pretrained(path)(HELDOUT.read_text()[:30000])["input_ids"]  # < max length
    except (OSError, ValueError):
        stream = torch.randint(3, vocab_size, (8192,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = []
    for i in range(count):
        length, offset = PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], (i * 257) % (len(stream) - 256)
        prompts.append(stream[offset:offset + length])
    return prompts


def sweep_table(rounds: dict[int, list[Round]]) -> str:
    rows = [f"{'clients':>7}{'agg tok/s':>11}{'client tok/s':>14}{'slowest':>9}{'p50 ms/tok':>12}{'p95 ms/tok':>12}"
            f"{'agg / N=1':>11}{'mismatches':>12}   aggregate per repeat"]
    base = statistics.median(r.aggregate for r in rounds[min(rounds)])
    for n, runs in rounds.items():
        agg = statistics.median(r.aggregate for r in runs)
        per_client = statistics.median(statistics.median(r.per_client) for r in runs)
        slowest = statistics.median(min(r.per_client) for r in runs)
        p50 = statistics.median(percentile(r.gaps_ms, 0.5) for r in runs)
        p95 = statistics.median(percentile(r.gaps_ms, 0.95) for r in runs)
        rows.append(f"{n:7d}{agg:11.1f}{per_client:14.2f}{slowest:9.2f}{p50:12.1f}{p95:12.1f}{agg / base:10.2f}x"
                    f"{sum(r.mismatches for r in runs):12d}   " + " ".join(f"{r.aggregate:.1f}" for r in runs))
    return "\n".join(rows)


def training_table(n: int, alone: list[Round], beside: list[Round]) -> str:
    def p(runs: list[Round], q: float) -> float:
        return statistics.median(percentile(r.gaps_ms, q) for r in runs)

    steps = [s for r in beside for s in r.training_steps]
    rows = [f"{n} generating clients{'':7}{'agg tok/s':>11}{'p50 ms/tok':>12}{'p95 ms/tok':>12}{'mismatches':>12}"]
    for label, runs in (("without training", alone), ("with one training client", beside)):
        rows.append(f"{label:27}{statistics.median(r.aggregate for r in runs):11.1f}{p(runs, 0.5):12.1f}"
                    f"{p(runs, 0.95):12.1f}{sum(r.mismatches for r in runs):12d}")
    rows.append(f"p95 latency with training / without: {p(beside, 0.95) / p(alone, 0.95):.2f}x (issue 16's target: "
                f"<= 1.5x); per repeat: " + " ".join(f"{percentile(b.gaps_ms, 0.95) / percentile(a.gaps_ms, 0.95):.2f}"
                                                      for a, b in zip(alone, beside, strict=True)))
    if steps:
        rows.append(f"training client: {len(steps)} steps during the rounds, median {statistics.median(steps):.2f} s/step")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                        help="SmolLM2-135M-Instruct (swarm.assets) or a tiny random Llama (bench/common.py)")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per N, interleaved across N; medians")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each client generates (never fewer)")
    parser.add_argument("--servers", type=int, default=3, help="servers, splitting the blocks evenly")
    parser.add_argument("--codec", default=None, help="inference codec of the generating clients (default: the "
                                                      "client's; 'none' sends float32 as it is)")
    parser.add_argument("--with-training", action="store_true",
                        help="instead of the sweep: --training-clients clients with and without a fine-tuning client")
    parser.add_argument("--training-clients", type=int, default=4, help="generating clients beside the training one")
    parser.add_argument("--train-batch", type=int, default=4, help="the training client's sequences per step")
    parser.add_argument("--train-seq-len", type=int, default=128, help="the training client's tokens per sequence")
    parser.add_argument("--compare-unbatched", action="store_true",
                        help="also servers that run each decode step alone (--batch-rows 1), rounds alternating")
    args = parser.parse_args()
    try:
        args.clients = sorted({int(n) for n in args.clients.split(",")})
    except ValueError:
        parser.error(f"--clients takes comma-separated whole numbers, e.g. 1,2,4; got {args.clients!r}")
    if min(args.clients) < 1 or args.repeats < 1 or args.new_tokens < 2 or args.training_clients < 1:
        parser.error("--clients, --repeats and --training-clients must be at least 1, --new-tokens at least 2")
    if args.codec is not None:
        from swarm import compression

        if args.codec not in compression.available():
            parser.error(f"unknown --codec {args.codec!r}; available: {', '.join(compression.available())}")
    return args


def measure(args: argparse.Namespace, path: Path, peers: list[str], logs: Path) -> None:
    count = args.training_clients if args.with_training else max(args.clients)
    prefixes = [None] + ([default_dht_prefix(str(path)) + UNBATCHED] if args.compare_unbatched else [])
    swarms = range(len(prefixes))
    worker_args = [str(path), json.dumps(peers), json.dumps(args.codec), str(args.new_tokens), json.dumps(prefixes)]
    started = time.perf_counter()
    workers = [Worker("generate", worker_args, logs, f"client-{i}") for i in range(count)]
    trainer = (Worker("train", [str(path), json.dumps(peers), str(args.train_batch), str(args.train_seq_len)], logs,
                      "trainer") if args.with_training else None)
    try:
        for worker in [*workers, *([trainer] if trainer else [])]:
            worker.receive()  # ready
        print(f"  {count} client processes{' and a training one' if trainer else ''} ready in "
              f"{time.perf_counter() - started:.1f} s")
        prompts = make_prompts(path, count, AutoConfig.from_pretrained(path).vocab_size)
        # Each client alone first: a warm-up, and the output its prompt must get in every round.
        references = [run_round([w], [p], None, delay=0.05).clients[0]["tokens"] for w, p in zip(workers, prompts, strict=True)]
        for swarm in swarms[1:]:  # a warm-up there too, checked against the same references
            for worker, prompt, reference in zip(workers, prompts, references, strict=True):
                if run_round([worker], [prompt], [reference], delay=0.05, swarm=swarm).mismatches:
                    print(f"  FAIL: {worker.name} alone got another output from the unbatched servers")
        print(f"  prompts of {sorted({len(p) for p in prompts})} tokens; each generated alone once (warm-up, reference)")
        warn_if_busy()
        if trainer:
            alone, beside = [], []
            for repeat in range(args.repeats):
                for training in ((False, True) if repeat % 2 == 0 else (True, False)):
                    if training:
                        trainer.send("start")
                        trainer.receive()  # its loop runs: the generating clients start beside a training step
                    result = run_round(workers, prompts, references)
                    if training:
                        trainer.send("stop")
                        result.training_steps = trainer.receive()["steps"]
                    (beside if training else alone).append(result)
            print(training_table(count, alone, beside))
            mismatches = sum(r.mismatches for r in alone + beside)
        else:
            rounds: list[dict[int, list[Round]]] = [{n: [] for n in args.clients} for _ in swarms]
            for repeat in range(args.repeats):
                for n in args.clients if repeat % 2 == 0 else reversed(args.clients):
                    for swarm in swarms if repeat % 2 == 0 else reversed(swarms):
                        rounds[swarm][n].append(run_round(workers[:n], prompts[:n], references[:n], swarm=swarm))
            for swarm in swarms:
                if len(prefixes) > 1:
                    print(["batched (the default)", "unbatched (--batch-rows 1)"][swarm])
                print(sweep_table(rounds[swarm]))
            if len(prefixes) > 1:
                print("aggregate tok/s batched / unbatched: " + ", ".join(
                    f"N={n}: {statistics.median(r.aggregate for r in rounds[0][n]) / statistics.median(r.aggregate for r in rounds[1][n]):.2f}x"
                    for n in args.clients))
            mismatches = sum(r.mismatches for swarm in rounds for runs in swarm.values() for r in runs)
        if mismatches and args.codec == "none":
            print(f"  FAIL: {mismatches} outputs differ from their prompt's output alone (greedy, codec none)")
    finally:
        for worker in [*workers, *([trainer] if trainer else [])]:
            worker.stop()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        role, path, peers, *rest = sys.argv[2:]
        hf_logging.disable_progress_bar()
        if role == "generate":
            generate_worker(path, json.loads(peers), json.loads(rest[0]), int(rest[1]), json.loads(rest[2]))
        else:
            train_worker(path, json.loads(peers), int(rest[0]), int(rest[1]))
        return
    args = parse_args()
    began = time.perf_counter()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        path = build_tiny(Path(tmp)) if args.model == "tiny" else ensure_smollm2()
        spans = even_spans(AutoConfig.from_pretrained(path).num_hidden_layers, args.servers)
        print(f"{args.model} float32, {len(spans)} servers {spans}, greedy {args.new_tokens} new tokens per client, "
              f"codec {args.codec or 'the client default'}, {args.repeats} interleaved repeats (medians), "
              f"torch {torch.__version__} with {torch.get_num_threads()} threads per process")
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", "float32"])
            if args.compare_unbatched:
                swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", "float32", "--batch-rows", "1",
                                                                  "--dht-prefix", default_dht_prefix(str(path)) + UNBATCHED])
            measure(args, path, swarm.initial_peers, Path(tmp))  # a failing worker's error shows its log's tail
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
