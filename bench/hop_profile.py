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
from transformers import AutoConfig, StoppingCriteriaList  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from client.model import DistributedModelForCausalLM  # noqa: E402
from swarm.assets import ensure_smollm2  # noqa: E402
from swarm.launch import LocalSwarm, even_spans  # noqa: E402

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


def table(title: str, counts: Counter, step_ms: float, seconds: float, steps: int) -> str:
    total = sum(counts.values()) or 1
    per_step = total / max(steps, 1)  # samples per decode step, at 200 per second
    rows = [f"{title}: {total} busy samples in {seconds:.0f} s ({per_step / 200 * 1000:.1f} ms of CPU per decode step "
            f"over all its threads; a step takes {step_ms:.1f} ms)"]
    for name, count in counts.most_common():
        rows.append(f"  {name:42}{100 * count / total:6.1f}%{count / 200 * 1000 / max(steps, 1):8.2f} ms/step")
    return "\n".join(rows)


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
            prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
            steps: list[float] = []
            stop = threading.Event()

            def generate() -> None:
                while not stop.is_set():
                    clock = StepClock()
                    with torch.inference_mode():
                        model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0,
                                       stopping_criteria=StoppingCriteriaList([clock]))
                    steps.extend(b - a for a, b in pairwise(clock.times))

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            time.sleep(5)  # warm-up
            results = []
            for title, pid in (("client", os.getpid()), (f"server {spans[len(spans) // 2]}", servers[len(spans) // 2].process.pid)):
                before = len(steps)
                counts = record(pid, args.seconds, Path(tmp) / f"{pid}.txt")
                done = steps[before:]
                results.append(table(title, counts, 1000 * statistics.median(done), args.seconds, len(done)))
            stop.set()
            worker.join(60)
            model.model.layers.connection.shutdown()
    print(f"{args.model}, {len(spans)} servers {spans}, greedy batch 1, codec none, torch {torch.__version__}")
    print("\n".join(results))


if __name__ == "__main__":
    main()
