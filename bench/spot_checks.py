"""Spot checks against a server that returns wrong activations: how many steps it takes to catch it, and what the
checks cost in traffic.

A private LocalSwarm of a tiny random Llama (12 blocks, float32): blocks 0:6 on three servers, one of which scales
its outputs by 1.5 and announces itself as the fastest so every route goes through it (tests/dishonest.py), and 6:12
on one honest server. Per run (a seed for the client's draws and the prompt): a fresh client with verify_fraction
generates greedily until the liar is banned and --after tokens more. Printed: the generation step that banned it,
whether every token after the ban equals the local model's greedy continuation of the same prefix, and the bytes
(wire, both ways, as the client's Traffic counters count them). The cost of checks alone is measured with the liar
blocked: the same generations with verify_fraction and without, and the checks' own counter.

Run: PYTHONPATH=. python bench/spot_checks.py [--fraction 0.05] [--runs 7] [--after 16] [--max-steps 200]
     [--codec none]
"""

# ruff: noqa: E402  (the OpenMP waiting settings must be set before torch is imported)
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()
import torch
from common import build_tiny  # bench/common.py
from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from swarm.auth import generate_key_file
from swarm.launch import LocalSwarm
from tests.dishonest import ENTRY, lying

PROMPT = 8


class UntilBanned(StoppingCriteria):
    """Stops `after` tokens past the step whose spot check banned a server; remembers that step (1: the prompt's)."""

    def __init__(self, checks, after: int):
        self.checks, self.after, self.step = checks, after, None

    def __call__(self, input_ids, scores, **kwargs):
        steps = input_ids.shape[1] - PROMPT
        if self.step is None and self.checks.convictions:
            self.step = steps
        done = self.step is not None and steps >= self.step + self.after
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


def wire(traffic) -> int:
    return traffic.sent_wire + traffic.received_wire


def client(path: str, swarm: LocalSwarm, key: str, fraction: float, codec: str, blocked=()) -> DistributedModelForCausalLM:
    model = DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, swarm_key=key, request_timeout=30,
                                                        verify_fraction=fraction, blocked_servers=tuple(blocked))
    model.set_codecs(inference=codec)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.05, help="the clients' verify_fraction")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--after", type=int, default=16, help="tokens generated after the ban")
    parser.add_argument("--max-steps", type=int, default=200, help="give up on a run after this many steps")
    parser.add_argument("--codec", default="none", help="inference codec ('none': greedy output comparable exactly)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny(Path(tmp)))
        key = str(Path(tmp) / "swarm.key")
        generate_key_file(key)
        reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        server_args = ["--torch-dtype", "float32", "--cache-tokens", "16384"]
        with LocalSwarm(key) as swarm:
            swarm.start_bootstrap()
            (liar,) = swarm.start_servers(path, [(0, 6)], server_args, env=lying(1.5), python_args=ENTRY, wait=False)
            honest = swarm.start_servers(path, [(0, 6), (0, 6), (6, 12)], server_args, wait=False)
            for server in (liar, *honest):
                server.wait_ready(300)
            liar_id = liar.maddrs[0].rsplit("/p2p/", 1)[1]
            steps, identical, prompts = [], 0, []
            for run in range(args.runs):
                prompt = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(run))
                prompts.append(prompt)
                model = client(path, swarm, key, args.fraction, args.codec)
                checks = model.remote_layers.connection.spot_checks
                checks.rng.seed(run)
                stop = UntilBanned(checks, args.after)
                try:
                    tokens = model.generate(prompt, max_new_tokens=args.max_steps, min_new_tokens=args.max_steps,
                                            do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([stop]))
                    connection = model.remote_layers.connection
                finally:
                    model.remote_layers.connection.shutdown()
                if stop.step is None:
                    print(f"run {run}: not caught in {args.max_steps} steps ({checks.checks} checks)", flush=True)
                    continue
                (conviction,) = checks.convictions
                # Steps before the ban ran through the liar; from the banned step on, the session is rebuilt.
                prefix = tokens[:, : PROMPT + stop.step - 1]
                rest = tokens.shape[1] - prefix.shape[1]
                expected = reference.generate(prefix, max_new_tokens=rest, min_new_tokens=rest, do_sample=False, pad_token_id=0)
                same = torch.equal(tokens, expected)
                before = torch.equal(prefix, reference.generate(prompt, max_new_tokens=stop.step - 1,
                                                                min_new_tokens=stop.step - 1, do_sample=False,
                                                                pad_token_id=0)) if stop.step > 1 else True
                steps.append(stop.step)
                identical += same
                print(f"run {run}: banned {conviction.peer[-8:]} (the liar: {conviction.peer == liar_id}) at step "
                      f"{stop.step} (relative error {conviction.error:.3f}, {checks.checks} checks); after the ban "
                      f"equal to local: {same}; tokens before it equal to local: {before}; traffic "
                      f"{wire(connection.traffic):,} B, of it checks {wire(checks.traffic):,} B", flush=True)

            # The checks' cost alone: the liar blocked, the same prompts, a fixed length, with checks and without.
            length = args.max_steps // 2
            totals = {0.0: [], args.fraction: []}
            check_bytes = []
            for fraction in totals:
                for run, prompt in enumerate(prompts):
                    model = client(path, swarm, key, fraction, args.codec, blocked=[liar_id])
                    model.remote_layers.connection.spot_checks.rng.seed(run)
                    try:
                        model.generate(prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=0)
                        connection = model.remote_layers.connection
                        totals[fraction].append(wire(connection.traffic))
                        if fraction:
                            check_bytes.append(wire(connection.spot_checks.traffic))
                    finally:
                        model.remote_layers.connection.shutdown()
    base, checked = statistics.median(totals[0.0]), statistics.median(totals[args.fraction])
    print(f"\nverify_fraction={args.fraction}, codec {args.codec}, {len(steps)}/{args.runs} runs caught the liar: steps to "
          f"detection median {statistics.median(steps or [0])} (min {min(steps or [0])}, max {max(steps or [0])}; "
          f"expected 1/f = {1 / args.fraction:.0f}); greedy output after the ban equal to local in {identical}/{len(steps)}")
    print(f"honest swarm, {length} tokens: traffic without checks {base:,.0f} B, with checks {checked:,.0f} B "
          f"(+{checked - base:,.0f} B, +{100 * (checked - base) / base:.1f}%); the checks' own counter: median "
          f"{statistics.median(check_bytes):,.0f} B ({100 * statistics.median(check_bytes) / base:.1f}% of the traffic "
          "without checks)")


if __name__ == "__main__":
    main()
