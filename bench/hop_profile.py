"""Where a decode step's time goes: py-spy samples of the client and of one server while a client generates.

Starts --servers servers of the model, and a client that generates greedily, over and over, with codec "none"; while
it runs, py-spy samples the client process (this one, from a child) and the middle server for --seconds each (every
thread, idle ones excluded), then each sample is filed under the first category its stack matches, from the leaf
up: the math (torch and transformers), codecs and tensor packing, request validation, the thread hand-off (executors,
futures, locks), protocol records (pydantic, protobuf), the transport (hivemind's P2P and its p2pd connection),
the event loop itself, and the rest. Printed: per process, the share of busy samples per category, and the decode
step's median time, so each share reads as milliseconds per token. py-spy comes from PyPI (`pip install py-spy`);
it needs permission to trace processes (root, or ptrace_scope 0).
Run: python bench/hop_profile.py [--model smollm2|tiny] [--seconds 15] [--servers 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()  # before torch starts its OpenMP runtime, as the swarm command does
import torch  # noqa: E402
from common import StepClock, build_tiny  # noqa: E402 - bench/common.py
from hivemind.proto import runtime_pb2  # noqa: E402
from proc_cpu import cpu_by_role, process_table  # noqa: E402 - bench/proc_cpu.py
from transformers import AutoConfig, StoppingCriteriaList  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from client import aio  # noqa: E402
from client.inference_session import InferenceSession  # noqa: E402
from client.model import DistributedModelForCausalLM  # noqa: E402
from server.backend import InferenceState, SpanBackend, SpanInputs  # noqa: E402
from swarm.assets import ensure_smollm2  # noqa: E402
from swarm.checkpoint import Checkpoint  # noqa: E402
from swarm.launch import LocalSwarm, even_spans  # noqa: E402
from swarm.models import family_for  # noqa: E402
from swarm.models.span import BlockSpan  # noqa: E402

# (category, substrings of a frame's "function (file)"), tried in this order for each frame from the leaf up; a
# sample goes to the first category any of its frames matches.
CATEGORIES = [
    ("math (torch, transformers)", ("torch/nn/", "torch/functional", "transformers/models/", "transformers/integrations/",
                                    "transformers/masking_utils", "transformers/cache_utils", "transformers/modeling_",
                                    "swarm/models/", "swarm/lora.py", "transformers/generation/logits")),
    ("codecs and tensor packing", ("swarm/compression/", "swarm/tensors.py", "hivemind/compression/", "numpy")),
    ("validation", ("check_inputs", "check_hidden", "isfinite", "swarm/ingress.py", "unpack_request")),
    ("thread hand-off", ("concurrent/futures", "threading.py", "queue.py", "hivemind/utils/asyncio.py (run",
                         "call_soon_threadsafe", "run_coroutine_threadsafe", "aio.py")),
    ("records (pydantic, protobuf)", ("pydantic", "google/protobuf", "swarm/protocol.py", "swarm/forwarding.py",
                                      "swarm/versions.py")),
    ("transport (hivemind P2P, p2pd socket)", ("hivemind/p2p/", "swarm/stream_end.py", "swarm/keyed_p2p.py",
                                               "asyncio/streams.py", "sock_", "StreamReader", "StreamWriter")),
    ("event loop", ("asyncio/", "uvloop", "selectors.py")),
    ("client code (generate loop, sessions, routing)", ("client/", "transformers/generation/")),
    ("server code (handlers, queue, sessions)", ("server/",)),
]


# py-spy from this interpreter's environment (pip installs it beside python), else from PATH.
PY_SPY = str(Path(sys.executable).with_name("py-spy")) if Path(sys.executable).with_name("py-spy").exists() else "py-spy"


def categorize(stack: str) -> str:
    frames = stack.split(";")[::-1]  # leaf first
    for frame in frames:
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def record(pid: int, seconds: float, out: Path) -> Counter:
    """Busy samples of process `pid` (all threads) for `seconds`, by category."""
    subprocess.run([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                    "--format", "raw", "--output", str(out), "--nonblocking"], check=True, capture_output=True)
    counts: Counter = Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[categorize(stack)] += int(count)
    return counts


def table_of(title: str, counts: Counter, step_ms: float, seconds: float, steps: int) -> str:
    total = sum(counts.values()) or 1
    per_step = total / max(steps, 1)  # samples per decode step, at 200 per second
    rows = [f"{title}: {total} busy samples in {seconds:.0f} s ({per_step / 200 * 1000:.1f} ms of CPU per decode step "
            f"over all its threads; a step takes {step_ms:.1f} ms)"]
    for name, count in counts.most_common():
        rows.append(f"  {name:42}{100 * count / total:6.1f}%{count / 200 * 1000 / max(steps, 1):8.2f} ms/step")
    return "\n".join(rows)


def span_alone_ms(path: Path, start: int, end: int, pause_s: float, steps: int = 60) -> float:
    """Median time of one decode step through blocks [start, end) with the servers' own code, in this process (the
    swarm stopped), each step after a pause of `pause_s` (0: back to back)."""
    checkpoint = Checkpoint(str(path))
    family = family_for(checkpoint.config)
    prefixes = tuple(family.block_keys_prefix(i) for i in range(start, end))
    tensors = checkpoint.load(lambda key: key.startswith(prefixes), torch.float32)
    backend = SpanBackend(BlockSpan.from_state_dict(family, checkpoint.config, start, end, tensors, torch.float32),
                          torch.float32)
    state = InferenceState(backend, start, end, 1, 16 + steps)
    hidden = torch.randn(1, 16, backend.hidden_size)
    state.step(SpanInputs(hidden, torch.arange(16)[None], None))
    times = []
    for position in range(16, 16 + steps):
        time.sleep(pause_s)
        began = time.perf_counter()
        state.step(SpanInputs(torch.randn(1, 1, backend.hidden_size), torch.tensor([[position]]), None))
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times[5:])


def server_compute_s(connection, peers) -> list[tuple[float, int]]:
    """Seconds each server spent on decode steps so far by its own clock (rpc_info's compute_s, kind "step"), and the
    decode steps it ran."""
    infos = [json.loads(aio.run(connection.stub(peer).rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)
             for peer in peers]
    return [(info["compute_s"].get("step", 0.0), info["decode_batches"]["steps"]) for info in infos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--seconds", type=float, default=15.0, help="sampling time per process")
    parser.add_argument("--servers", type=int, default=3)
    args = parser.parse_args()
    if not Path(PY_SPY).exists() and shutil.which(PY_SPY) is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
        path = build_tiny(Path(tmp)) if args.model == "tiny" else ensure_smollm2()
        spans = even_spans(AutoConfig.from_pretrained(path).num_hidden_layers, args.servers)
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            servers = swarm.start_servers(str(path), spans, extra_args=["--torch-dtype", "float32"])
            model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype="float32")
            model.set_codecs(inference="none")
            connection = model.model.layers.connection
            prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
            steps: list[float] = []
            waits: list[float] = []  # time inside InferenceSession.step: the route's round trips, the servers' work
            stop = threading.Event()
            timed_step = InferenceSession.step

            def step(self, hidden, *a, **kw):
                began = time.perf_counter()
                try:
                    return timed_step(self, hidden, *a, **kw)
                finally:
                    if hidden.shape[1] == 1:  # decode steps only, not the prompt's prefill
                        waits.append(time.perf_counter() - began)

            def generate() -> None:
                while not stop.is_set():
                    clock = StepClock()
                    with torch.inference_mode():
                        model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0,
                                       stopping_criteria=StoppingCriteriaList([clock]))
                    steps.extend(b - a for a, b in pairwise(clock.times))

            InferenceSession.step = step
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            time.sleep(5)  # warm-up
            peers = [info.peer_id for info in sorted(connection.servers(), key=lambda s: s.record.start)]
            owners = {os.getpid(): "client", swarm.bootstrap.process.pid: "bootstrap",
                      **{s.process.pid: f"server {span}" for s, span in zip(servers, spans, strict=True)}}
            computed, table, counted, waited = server_compute_s(connection, peers), process_table(), len(steps), len(waits)
            time.sleep(args.seconds)
            computed = [(b[0] - a[0]) / max(b[1] - a[1], 1)  # seconds per decode step, each server's own count
                        for a, b in zip(computed, server_compute_s(connection, peers), strict=True)]
            cpu = cpu_by_role(table, process_table(), owners)
            window, window_waits = steps[counted:], waits[waited:]
            budget = step_budget(window, window_waits, computed, spans, cpu)
            results = []
            for title, pid in (("client", os.getpid()), (f"server {spans[len(spans) // 2]}", servers[len(spans) // 2].process.pid)):
                before = len(steps)
                counts = record(pid, args.seconds, Path(tmp) / f"{pid}.txt")
                done = steps[before:]
                results.append(table_of(title, counts, 1000 * statistics.median(done), args.seconds, len(done)))
            stop.set()
            worker.join(60)
            InferenceSession.step = timed_step
            connection.shutdown()
        middle = spans[len(spans) // 2]
        pause = max(statistics.median(window) - sum(computed) / len(spans), 0.0)
        alone = (span_alone_ms(path, *middle, 0.0), span_alone_ms(path, *middle, pause))
    print(f"{args.model}, {len(spans)} servers {spans}, greedy batch 1, codec none, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads per process")
    print(budget)
    print(f"  span {middle} in one process with the servers' code, the swarm stopped: {alone[0]:.2f} ms per step back "
          f"to back, {alone[1]:.2f} ms after a {1000 * pause:.0f} ms pause before each (as a server waits in the "
          "swarm while the others work)")
    print("Where the CPU goes (py-spy samples, the sampler running beside the swarm):")
    print("\n".join(results))


def step_budget(steps: list[float], waits: list[float], computed: list[float], spans, cpu) -> str:
    """The decode step's wall time split by the clocks that see it (means over the same window, so that the parts
    add up), and each process's CPU per step."""
    count = len(steps)
    step_ms, wait_ms = 1000 * statistics.fmean(steps), 1000 * statistics.fmean(waits)
    compute_ms = [1000 * seconds for seconds in computed]
    hop_ms = (wait_ms - sum(compute_ms)) / len(spans)
    rows = [f"A decode step, mean of {count} (median {1000 * statistics.median(steps):.2f} ms; no sampler attached): "
            f"{step_ms:.2f} ms",
            f"  the client's own work (embeddings, LM head, generate loop): {step_ms - wait_ms:.2f} ms",
            f"  waiting for the route (InferenceSession.step): {wait_ms:.2f} ms, of which",
            "    the servers' decode compute, by their own clocks: "
            + " + ".join(f"{ms:.2f}" for ms in compute_ms) + f" = {sum(compute_ms):.2f} ms",
            f"    the rest, per hop (client -> server -> client: p2pd both ways, event loops, hand-offs, codec, "
            f"validation): {hop_ms:.2f} ms x {len(spans)}",
            f"  CPU per decode step as the OS counts it (/proc), {1000 * sum(cpu.values()) / count:.1f} ms in all:"]
    rows += [f"    {name:40} {1000 * seconds / count:6.2f} ms" for name, seconds in cpu.most_common() if seconds > 0]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
