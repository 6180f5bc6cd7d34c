"""Greedy generation through a local swarm against plain transformers on the same machine.

For each model: tokens/s of `generate()` locally and through a LocalSwarm of N servers, steady-state
per-token decode latency (prefill excluded), their ratio, and the overhead each server hop adds. Then, through a
LocalSwarm of M servers (4 by default), the per-token latency with server-to-server forwarding (each server pushes
its output to the next) against client-driven hops (every output comes back to the client, which sends it on), the two
alternating token by token in the same generations, and their ratio. With --compare auth: an open swarm and a
private one (a swarm key) of the same N servers side by side, generations alternating between them run by run, and
the cost of authentication per token per hop (the keyed decode step's extra time over the hops); then a
micro-benchmark of sealing one inference step's request and reply (swarm.keyed_p2p) alone.
Run: python bench/generation.py [--models tiny,smollm2] [--runs 5] [--compare local,forwarding,auth] [--server-env OMP_NUM_THREADS=1]

Each side runs as it would on its own: the local baseline in a separate process with the default OpenMP
settings (busy-waiting threads suit a process that has the machine to itself), the swarm client here with
passive OpenMP waiting, as the `swarm` command and LocalSwarm's servers use when peers share a machine.
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
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
from common import StepClock, build_tiny, run_baseline, warn_if_busy  # bench/common.py
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from client import ClientConfig
from client.model import DistributedModelForCausalLM
from swarm.assets import ensure_smollm2
from swarm.auth import ENV_VAR, generate_key_file
from swarm.launch import LocalSwarm, even_spans

MODELS = ("tiny", "smollm2")


@dataclass
class Timing:
    """Per-run measurements of one side (local or swarm), in seconds."""

    totals: list[float] = field(default_factory=list)
    prefills: list[float] = field(default_factory=list)
    decode_steps: list[float] = field(default_factory=list)  # every decode step of every measured run

    def tokens_per_s(self, new_tokens: int) -> float:
        return new_tokens / statistics.median(self.totals)

    @property
    def step_ms(self) -> float:
        return 1000 * statistics.median(self.decode_steps)

    @property
    def prefill_ms(self) -> float:
        return 1000 * statistics.median(self.prefills)


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, timing: Timing | None) -> torch.Tensor:
    """One greedy generate() of exactly `new_tokens` tokens; adds its timings to `timing` unless it is None."""
    clock = StepClock()
    start = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                            stopping_criteria=StoppingCriteriaList([clock]))
    total = time.perf_counter() - start
    if timing is not None:
        timing.totals.append(total)
        timing.prefills.append(clock.times[0] - start)  # first forward over the prompt plus the first token
        timing.decode_steps += [b - a for a, b in pairwise(clock.times)]
    return output


def measure(model, input_ids: torch.Tensor, new_tokens: int, runs: int) -> tuple[Timing, torch.Tensor]:
    """A warm-up run, then `runs` measured ones; returns the timings and the (greedy, hence fixed) output."""
    output = timed_generate(model, input_ids, new_tokens, None)
    timing = Timing()
    for _ in range(runs):
        timed_generate(model, input_ids, new_tokens, timing)
    return timing, output






@dataclass
class Result:
    name: str
    dtype: str
    spans: list[tuple[int, int]]
    local: Timing
    swarm: Timing
    new_tokens: int
    same_output: bool
    prompt_tokens: int = 16

    @property
    def ratio(self) -> float:
        return self.swarm.tokens_per_s(self.new_tokens) / self.local.tokens_per_s(self.new_tokens)

    @property
    def hop_overhead_ms(self) -> float:
        return (self.swarm.step_ms - self.local.step_ms) / len(self.spans)

    def table(self) -> str:
        rows = [f"prompt of {self.prompt_tokens} tokens", f"{'':8}{'tok/s':>9}{'total s':>10}{'prefill ms':>12}{'decode ms/tok':>15}"]
        for label, t in (("local", self.local), ("swarm", self.swarm)):
            rows.append(f"{label:8}{t.tokens_per_s(self.new_tokens):9.1f}{statistics.median(t.totals):10.3f}"
                        f"{t.prefill_ms:12.1f}{t.step_ms:15.2f}")
        rows.append(f"ratio swarm/local tok/s: {self.ratio:.2f}x; steady-state decode ratio "
                    f"{self.local.step_ms / self.swarm.step_ms:.2f}x; per-hop overhead {self.hop_overhead_ms:.2f} ms "
                    f"({len(self.spans)} hops)")
        rows.append(f"greedy output identical to local: {'yes' if self.same_output else 'NO'}")
        return "\n".join(rows)

    def summary(self) -> str:
        return (f"{self.name} {self.dtype}, prompt {self.prompt_tokens}: swarm {self.swarm.tokens_per_s(self.new_tokens):.1f} "
                f"tok/s, local {self.local.tokens_per_s(self.new_tokens):.1f} tok/s, ratio {self.ratio:.2f}x, decode "
                f"ratio {self.local.step_ms / self.swarm.step_ms:.2f}x, per-hop overhead {self.hop_overhead_ms:.2f} ms")


def prompt_ids(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def baseline_worker(path: str, dtype: str, prompt_tokens: int, new_tokens: int, runs: int) -> None:
    """Runs in a child process: local generate() timings and output, printed as one JSON line."""
    local = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    input_ids = prompt_ids(local.config.vocab_size, prompt_tokens)
    with torch.inference_mode():
        timing, output = measure(local, input_ids, new_tokens, runs)
    print(json.dumps({"totals": timing.totals, "prefills": timing.prefills, "decode_steps": timing.decode_steps,
                      "output": output.tolist()}))


def measure_local(path: Path, args: argparse.Namespace, prompt_tokens: int) -> tuple[Timing, torch.Tensor]:
    data = run_baseline(__file__, [path, args.dtype, prompt_tokens, args.new_tokens, args.runs], _USER_OMP_ENV)
    return Timing(data["totals"], data["prefills"], data["decode_steps"]), torch.tensor(data["output"])


def bench_model(name: str, path: Path, args: argparse.Namespace) -> list[Result]:
    """The swarm against local transformers at each of --contexts prompt lengths (those the model holds), through
    one swarm."""
    config = AutoConfig.from_pretrained(path)
    spans = even_spans(config.num_hidden_layers, args.servers)
    contexts = [n for n in args.contexts if n + args.new_tokens <= config.max_position_embeddings]
    if skipped := sorted(set(args.contexts) - set(contexts)):
        print(f"  contexts {skipped} skipped: {name} holds {config.max_position_embeddings} positions")
    env = dict(item.split("=", 1) for item in args.server_env)
    results = []
    with LocalSwarm() as swarm:
        started = time.perf_counter()
        swarm.start_bootstrap()
        swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", args.dtype], env=env)
        print(f"  swarm of {len(spans)} servers {spans} ready in {time.perf_counter() - started:.1f} s"
              f" (server env: {' '.join(args.server_env) or 'inherited'})")
        model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype=args.dtype,
                                                            inference_codec=args.codec)
        try:
            for prompt_tokens in contexts:
                local_timing, local_output = measure_local(path, args, prompt_tokens)
                input_ids = prompt_ids(config.vocab_size, prompt_tokens)
                with torch.inference_mode():
                    swarm_timing, swarm_output = measure(model, input_ids, args.new_tokens, args.runs)
                same = torch.equal(local_output, swarm_output)
                if not same:
                    mismatch = (local_output != swarm_output).nonzero()[0, 1].item() - prompt_tokens
                    print(f"  WARNING: swarm greedy output differs from local from new token {mismatch} on")
                results.append(Result(name, args.dtype, spans, local_timing, swarm_timing, args.new_tokens, same,
                                      prompt_tokens))
        finally:
            model.model.layers.connection.shutdown()
    return results


class AlternatingClock(StoppingCriteria):
    """Never stops generation; switches the session between forwarding and client-driven hops after every token and
    files each decode step's time under the mode it ran with, so both modes see the same load, token by token."""

    def __init__(self, session, first: bool):
        self.session, self.last = session, None
        self.session.forwarding = first
        self.steps: dict[bool, list[float]] = {True: [], False: []}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        if self.last is not None:  # the first call ends the prefill
            self.steps[self.session.forwarding].append(now - self.last)
        self.session.forwarding = not self.session.forwarding
        self.last = now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class ForwardingResult:
    name: str
    spans: list[tuple[int, int]]
    runs: list[dict[bool, list[float]]]  # per measured run: forwarding on / off -> its decode steps' seconds
    same_output: bool

    def step_ms(self, forwarding: bool, runs: list | None = None) -> float:
        return 1000 * statistics.median([s for run in (runs or self.runs) for s in run[forwarding]])

    @property
    def ratio(self) -> float:
        """Per-token latency of client-driven hops over that of forwarding (above 1: forwarding is faster)."""
        return self.step_ms(False) / self.step_ms(True)

    def table(self) -> str:
        rows = [f"{'':16}{'decode ms/tok':>14}   per-run medians (ms/tok)"]
        for label, forwarding in (("forwarding", True), ("client-driven", False)):
            per_run = " ".join(f"{self.step_ms(forwarding, [run]):.2f}" for run in self.runs)
            rows.append(f"{label:16}{self.step_ms(forwarding):14.2f}   {per_run}")
        ratios = " ".join(f"{self.step_ms(False, [run]) / self.step_ms(True, [run]):.2f}" for run in self.runs)
        saved = (self.step_ms(False) - self.step_ms(True)) / max(len(self.spans) - 1, 1)
        rows.append(f"ratio client-driven/forwarding per-token latency: {self.ratio:.2f}x (per run: {ratios}; "
                    f"{saved:+.2f} ms saved per server-to-server link, {len(self.spans)} hops)")
        rows.append(f"greedy outputs identical (forwarding, client-driven, alternating): {'yes' if self.same_output else 'NO'}")
        return "\n".join(rows)

    def summary(self) -> str:
        return (f"{self.name} forwarding on {len(self.spans)} servers: {self.step_ms(True):.2f} ms/token vs "
                f"{self.step_ms(False):.2f} client-driven, ratio {self.ratio:.2f}x")


def bench_forwarding(name: str, path: Path, args: argparse.Namespace) -> ForwardingResult:
    """Forwarding against client-driven hops on one swarm and client: each measured run alternates the two modes
    token by token (starting with either in turn), so a shared machine's changing load falls on both alike."""
    config = AutoConfig.from_pretrained(path)
    spans = even_spans(config.num_hidden_layers, args.forwarding_servers)
    input_ids = prompt_ids(config.vocab_size, args.prompt_tokens)
    env = dict(item.split("=", 1) for item in args.server_env)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    runs, outputs = [], []
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", args.dtype], env=env)
        print(f"  swarm of {len(spans)} servers {spans} for forwarding vs client-driven hops")
        model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype=args.dtype,
                                                            inference_codec=args.codec)
        try:
            with torch.inference_mode():
                for forwarding in (True, False):  # warm-up, and each mode's output alone
                    with model.inference_session(input_ids.shape[1] + args.new_tokens, forwarding=forwarding):
                        outputs.append(model.generate(input_ids, **kwargs))
                for run in range(args.runs):
                    with model.inference_session(input_ids.shape[1] + args.new_tokens) as session:
                        clock = AlternatingClock(session, first=run % 2 == 0)
                        outputs.append(model.generate(input_ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs))
                    runs.append(clock.steps)
        finally:
            model.model.layers.connection.shutdown()
    return ForwardingResult(name, spans, runs, all(torch.equal(outputs[0], output) for output in outputs))


@dataclass
class AuthResult:
    name: str
    spans: list[tuple[int, int]]
    runs: list[dict[bool, float]]  # per round: keyed or not -> median decode step (s) of that run
    same_output: bool
    seal_us: float  # sealing and opening one inference step's request and reply, alone
    plain_us: float  # serializing and parsing the same messages unsealed

    def step_ms(self, keyed: bool) -> float:
        return 1000 * statistics.median(run[keyed] for run in self.runs)

    @property
    def per_hop_ms(self) -> float:
        """The median over rounds of (keyed - open) decode step, per hop."""
        return 1000 * statistics.median(run[True] - run[False] for run in self.runs) / len(self.spans)

    def table(self) -> str:
        per_run = {keyed: " ".join(f"{1000 * run[keyed]:.2f}" for run in self.runs) for keyed in (False, True)}
        verdict = "PASS" if self.per_hop_ms < 0.2 else "FAIL"
        return "\n".join([
            f"{'':8}{'decode ms/tok':>14}   per-run medians (ms/tok)",
            *(f"{label:8}{self.step_ms(keyed):14.3f}   {per_run[keyed]}" for label, keyed in (("open", False), ("keyed", True))),
            f"cost of authentication: {self.per_hop_ms:+.3f} ms per token per hop ({len(self.spans)} hops; target "
            f"< 0.2 ms: {verdict}); sealing alone (a step's request and reply, both ends) {self.seal_us:.1f} us per "
            f"hop against {self.plain_us:.1f} us unsealed",
            f"greedy outputs identical (open, keyed): {'yes' if self.same_output else 'NO'}"])

    def summary(self) -> str:
        added = self.seal_us - self.plain_us
        return (f"{self.name} auth, {len(self.spans)} servers: {self.per_hop_ms:+.3f} ms per token per hop (keyed "
                f"{self.step_ms(True):.2f} vs open {self.step_ms(False):.2f} ms/token); sealing adds {added:.1f} us/hop")


def seal_microbench(hidden_size: int, repeats: int = 2000) -> tuple[float, float]:
    """Microseconds to seal and open one inference step's request (a later message of the session's stream) and its
    reply, both ends' work, for a batch-1 step of `hidden_size` floats plus its metadata; and to serialize and parse
    the same two messages unsealed, as an open swarm does. Medians of 5 rounds."""
    import secrets
    from types import SimpleNamespace

    from hivemind.proto import runtime_pb2

    from swarm.auth import Keyring, SwarmKey
    from swarm.forwarding import ForwardStep
    from swarm.keyed_p2p import KeyedP2P, SealedCall
    from swarm.protocol import InferenceReply
    from swarm.tensors import pack_tensor

    def peer():  # what sealing reads of a peer id
        raw = secrets.token_bytes(34)
        return SimpleNamespace(to_bytes=lambda: raw)

    keyring = Keyring([SwarmKey.from_bytes(secrets.token_bytes(32))])
    client, server = peer(), peer()
    name = "tiny.BlockService.rpc_inference"
    step = [pack_tensor(torch.randn(1, 1, hidden_size)), pack_tensor(torch.tensor([[7]]))]
    request = runtime_pb2.ExpertRequest(metadata=ForwardStep(step=7).encode(), tensors=step)
    reply = runtime_pb2.ExpertResponse(metadata=InferenceReply(position=8).encode(), tensors=step[:1])
    serving = KeyedP2P(None, keyring)
    context = SimpleNamespace(remote_id=client, local_id=server)
    call = SealedCall(SimpleNamespace(keyring=keyring, peer_id=client), name, server)
    _, nonce = serving._open(name, context, call.seal(request), runtime_pb2.ExpertRequest)  # the first: a token
    rounds, plain = [], []
    for _ in range(5):
        call.sent, call.received = 1, 0  # the steps after the first carry seals, numbered on
        started = time.perf_counter()
        for seq in range(1, repeats + 1):
            serving._open_later(name, context, nonce, seq, call.seal(request), runtime_pb2.ExpertRequest)
            call.open(serving._seal_reply(name, context, nonce, seq - 1, reply), runtime_pb2.ExpertResponse)
        rounds.append((time.perf_counter() - started) / repeats * 1e6)
        started = time.perf_counter()
        for _ in range(repeats):
            runtime_pb2.ExpertRequest.FromString(request.SerializeToString())
            runtime_pb2.ExpertResponse.FromString(reply.SerializeToString())
        plain.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(rounds), statistics.median(plain)


def bench_auth(name: str, path: Path, args: argparse.Namespace) -> AuthResult:
    """An open swarm and a keyed one of the same spans, both up at once; each round generates on one then the other
    (which first alternates), so a shared machine's load falls on both alike."""
    config = AutoConfig.from_pretrained(path)
    spans = even_spans(config.num_hidden_layers, args.servers)
    input_ids = prompt_ids(config.vocab_size, args.prompt_tokens)
    env = dict(item.split("=", 1) for item in args.server_env)
    saved_env = os.environ.pop(ENV_VAR, None)  # the open swarm's peers must find no key
    runs, outputs, models = [], [], {}
    key_file = Path(tempfile.mkdtemp(prefix="bench-auth-")) / "swarm.key"
    generate_key_file(key_file)
    try:
        with LocalSwarm() as open_swarm, LocalSwarm(swarm_key_file=str(key_file)) as keyed_swarm:
            for swarm in (open_swarm, keyed_swarm):
                swarm.start_bootstrap()
                swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", args.dtype], env=env, wait=False)
            for server in open_swarm.servers + keyed_swarm.servers:
                server.wait_ready(180)
            print(f"  an open and a keyed swarm of {len(spans)} servers {spans} each")
            for keyed, swarm in ((False, open_swarm), (True, keyed_swarm)):
                models[keyed] = DistributedModelForCausalLM.from_pretrained(
                    str(path), swarm.initial_peers, torch_dtype=args.dtype,
                    swarm_key=str(key_file) if keyed else None, inference_codec=args.codec)
            with torch.inference_mode():
                for keyed in (False, True):  # warm-up
                    outputs.append(timed_generate(models[keyed], input_ids, args.new_tokens, None))
                for run in range(args.runs):
                    medians = {}
                    for keyed in ((False, True) if run % 2 == 0 else (True, False)):
                        timing = Timing()
                        outputs.append(timed_generate(models[keyed], input_ids, args.new_tokens, timing))
                        medians[keyed] = statistics.median(timing.decode_steps)
                    runs.append(medians)
            for model in models.values():
                model.model.layers.connection.shutdown()
    finally:
        if saved_env is not None:
            os.environ[ENV_VAR] = saved_env
    same = all(torch.equal(outputs[0], output) for output in outputs)
    return AuthResult(name, spans, runs, same, *seal_microbench(config.hidden_size))


COMPARISONS = {"local": bench_model, "forwarding": bench_forwarding, "auth": bench_auth}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per side, after one warm-up run")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (never fewer)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length, batch 1 (forwarding, auth)")
    parser.add_argument("--contexts", default="16,1024,2000",
                        help="comma-separated prompt lengths of the local comparison (each one the model holds)")
    parser.add_argument("--servers", type=int, default=3, help="servers, splitting the blocks evenly")
    parser.add_argument("--compare", default="local,forwarding",
                        help="comma-separated: 'local' (swarm against local transformers), 'forwarding' "
                             "(server-to-server forwarding against client-driven hops), 'auth' (a private swarm "
                             "against an open one: the cost of the swarm key per token per hop)")
    parser.add_argument("--forwarding-servers", type=int, default=4, help="servers of the forwarding comparison's route")
    parser.add_argument("--codec", default="none",
                        help="inference codec of the swarm client ('none': float32 as it is, exact, as the local "
                             "baseline; 'default': the client's own default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype everywhere")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the server processes, e.g. OMP_NUM_THREADS=1 (repeatable)")
    args = parser.parse_args()
    if args.codec == "default":
        args.codec = ClientConfig.inference_codec
    try:
        args.contexts = [int(n) for n in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts takes comma-separated whole numbers, e.g. 16,1024; got {args.contexts!r}")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    if set(args.compare.split(",")) - set(COMPARISONS):
        parser.error(f"--compare takes some of {', '.join(COMPARISONS)}")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    return args


def main() -> None:
    if sys.argv[1:2] == ["--baseline-worker"]:
        path, dtype, prompt_tokens, new_tokens, runs = sys.argv[2:7]
        baseline_worker(path, dtype, int(prompt_tokens), int(new_tokens), int(runs))
        return
    args = parse_args()
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()  # what the distributed client runs with; the local baseline gets the same
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, codec {args.codec}, {threads} intra-op threads for the local baseline and the client; "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'default')}; batch 1, prompts {args.contexts} (local) and "
          f"{args.prompt_tokens} (forwarding, auth), "
          f"{args.new_tokens} new tokens, greedy, median of {args.runs} runs after a warm-up; "
          "swarm prefill includes opening the session")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        for name in args.models.split(","):
            path = build_tiny(Path(tmp)) if name == "tiny" else ensure_smollm2()
            print(f"\n== {name} ({args.dtype}) ==")
            for comparison in args.compare.split(","):
                warn_if_busy()
                result = COMPARISONS[comparison](name, path, args)
                for each in result if isinstance(result, list) else [result]:
                    print(each.table())
                    results.append(each)
    print()
    for result in results:
        print(result.summary())


if __name__ == "__main__":
    main()
