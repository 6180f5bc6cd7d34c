"""How long a newcomer waits: `swarm generate` and `swarm status` against the imports they cannot avoid.

With warm caches, SmolLM2-135M-Instruct and a local swarm started once, side by side and several runs each:
  (a) `python -c "from transformers import LlamaForCausalLM; import hivemind"` until the imports are done,
  (b) `swarm generate SMOLLM2 "What is the capital of France?" --chat --initial-peers ...` until its first generated
      text appears on stdout,
  (c) `python -c "import hivemind"` until the import is done,
  (d) `swarm status --initial-peers ...` until its tables appear on stdout.
Every figure is the time until the command's first output ((a) and (c) print a line once they have imported): the
interpreter's exit after importing torch and transformers takes another 1.5-2 s here, which (b) and (d) do not wait for
either.
Targets (issue 12): median (b) - (a) <= 4 s and median (d) - (c) <= 2 s; the script exits 1 when one is missed.
Run: python bench/startup.py [--runs 5] [--servers 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import warn_if_busy  # bench/common.py

from swarm.assets import ensure_smollm2
from swarm.launch import LocalSwarm, even_spans

GENERATE_TARGET_S = 4.0  # (b) - (a)
STATUS_TARGET_S = 2.0  # (d) - (c)
QUESTION = "What is the capital of France?"


def time_first_output(command: list[str], timeout: float = 120.0) -> tuple[float, str]:
    """Seconds until `command` writes its first byte to stdout, and all it wrote (it must succeed)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty stderr cannot block the command
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            first = process.stdout.read1(1)  # blocks until the command prints something (or exits)
            elapsed = time.perf_counter() - started
            rest = process.stdout.read()
            process.wait(timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0 or not first:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit code {process.returncode}):\n"
                               f"{errors.read().decode(errors='replace')[-2000:]}")
    return elapsed, (first + rest).decode(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each measurement (medians are compared)")
    parser.add_argument("--servers", type=int, default=3, help="servers of the local swarm")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens `swarm generate` produces each run")
    args = parser.parse_args()

    model = str(ensure_smollm2())
    python = sys.executable
    swarm = [python, "-m", "swarm.cli"]
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.start_servers(model, even_spans(30, args.servers))
        peers = local.initial_peers
        commands = {
            "a": [python, "-c", "from transformers import LlamaForCausalLM; import hivemind; print('imported')"],
            "b": [*swarm, "generate", model, QUESTION, "--chat", "--max-new-tokens", str(args.max_new_tokens),
                  "--initial-peers", *peers],
            "c": [python, "-c", "import hivemind; print('imported')"],
            "d": [*swarm, "status", "--initial-peers", *peers],
        }
        # One run of each first, unmeasured: it warms the file cache and checks that every command works.
        _, answer = time_first_output(commands["b"])
        print(f"swarm generate answers: {answer.strip()!r}")
        time_first_output(commands["d"])
        warn_if_busy()
        times: dict[str, list[float]] = {key: [] for key in commands}
        for run in range(args.runs):
            # Interleaved, so that a change in the machine's load affects all four alike.
            for key, command in commands.items():
                times[key].append(time_first_output(command)[0])
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"({k}) {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    labels = {
        "a": "import transformers' LlamaForCausalLM and hivemind",
        "b": "swarm generate --chat: first generated text",
        "c": "import hivemind",
        "d": "swarm status: tables printed",
    }
    print(f"\nmedians of {args.runs} runs ({args.servers} servers, SmolLM2-135M-Instruct):")
    for key, label in labels.items():
        print(f"  ({key}) {label:<52} {median[key]:6.2f} s   (min {min(times[key]):.2f}, max {max(times[key]):.2f})")
    generate_gap, status_gap = median["b"] - median["a"], median["d"] - median["c"]
    ok_generate, ok_status = generate_gap <= GENERATE_TARGET_S, status_gap <= STATUS_TARGET_S
    print(f"  (b) - (a) = {generate_gap:5.2f} s  (target <= {GENERATE_TARGET_S:.0f} s: {'met' if ok_generate else 'MISSED'})")
    print(f"  (d) - (c) = {status_gap:5.2f} s  (target <= {STATUS_TARGET_S:.0f} s: {'met' if ok_status else 'MISSED'})")
    return 0 if ok_generate and ok_status else 1


if __name__ == "__main__":
    sys.exit(main())
