"""Generation through a swarm whose servers die mid-session: recovery time and the cost of a failure.

A LocalSwarm with two servers for every span (SmolLM2-135M-Instruct by default, float32). Per round: one greedy
generation of N tokens undisturbed, then the same generation with the server of the middle span killed (SIGKILL or
SIGTERM) after K tokens, and a replacement started for the next round. Printed: whether the outputs are
token-identical, the time the session took to move the span (re-route, open, replay, retry), and the wall time of
the disturbed generation over the undisturbed one (median over rounds).

Run: python bench/fault.py [--model tiny|smollm2] [--rounds 3] [--new-tokens 64] [--kill-after 20] [--signal KILL|TERM]
"""

# ruff: noqa: E402  (the OpenMP waiting settings must be set before torch is imported)
from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()
import torch
from common import build_tiny  # bench/common.py
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from swarm.assets import ensure_smollm2
from swarm.launch import LocalSwarm, even_spans


class AtLength(StoppingCriteria):
    def __init__(self, length: int, action):
        self.length, self.action, self.done = length, action, False

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] >= self.length and not self.done:
            self.done = True
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=20, help="generated tokens before the server is killed")
    parser.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    sig = signal.Signals[f"SIG{args.signal}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny(Path(tmp)) if args.model == "tiny" else ensure_smollm2())
        spans = even_spans(AutoConfig.from_pretrained(path).num_hidden_layers, 3)
        server_args = ["--torch-dtype", "float32", "--shutdown-timeout", "5"]
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            swarm.start_servers(path, spans + spans, server_args)
            model = DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=30)
            prompt = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
            kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            moves, ratios, identical = [], [], 0
            try:
                for round_ in range(args.rounds):
                    began = time.perf_counter()
                    expected = model.generate(prompt, **kwargs)
                    undisturbed = time.perf_counter() - began
                    with model.inference_session(max_length=8 + args.new_tokens) as session:
                        killed = []

                        def kill(session=session, killed=killed):
                            victim = session.streams[1].step
                            (process,) = [p for p in swarm.servers if any(str(victim.peer_id) in m for m in p.maddrs)]
                            swarm.servers.remove(process)
                            if sig == signal.SIGKILL:
                                process.stop(sig)
                            else:  # it announces offline and tells the session to move on its next step
                                process.process.send_signal(sig)
                            killed.append((process, (victim.start, victim.end)))

                        began = time.perf_counter()
                        ours = model.generate(prompt, stopping_criteria=StoppingCriteriaList(
                            [AtLength(8 + args.kill_after, kill)]), **kwargs)
                        disturbed = time.perf_counter() - began
                        moves += session.recoveries
                    process, span = killed[0]
                    process.stop(timeout=30)
                    identical += torch.equal(ours, expected)
                    ratios.append(disturbed / undisturbed)
                    print(f"round {round_ + 1}: blocks {span[0]}:{span[1]} moved in "
                          f"{', '.join(f'{m:.2f} s' for m in session.recoveries) or '(no move)'}; generation "
                          f"{disturbed:.2f} s against {undisturbed:.2f} s undisturbed; identical: {torch.equal(ours, expected)}",
                          flush=True)
                    swarm.start_servers(path, [span], server_args)
            finally:
                model.remote_layers.connection.shutdown()
    print(f"\n{args.model}, SIG{args.signal} after {args.kill_after} of {args.new_tokens} tokens, {args.rounds} rounds: "
          f"{identical}/{args.rounds} token-identical; span moved in median {statistics.median(moves or [0]):.2f} s "
          f"(max {max(moves or [0]):.2f} s, {len(moves)} moves); disturbed / undisturbed wall time: median "
          f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
