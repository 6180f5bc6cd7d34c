"""Generation over a WAN-like link: every server behind a relay that delays each byte both ways (bench/relay.py).

A bootstrap node and --servers servers (the blocks split evenly) of the tiny random Llama (or SmolLM2); each server
listens on a private port and announces its relay's, so every link (client -> server, server -> server) crosses one
relay. For each one-way delay of --delays, greedy generations alternate server-to-server forwarding and client-driven
hops token by token (so both see the same load) and print per mode the per-token latency, tokens/s, and the physical
limit beside them: the mode's step at 0 ms plus what the delay must add (client-driven: 2 x delay per hop; forwarding:
one delay per link, the client's to the first server and the last server's back included). Outputs must be identical
in both modes and at every delay.

Where it can (Linux, root or user namespaces), the script runs itself in a network namespace of its own, so that
the loopback interface carries nothing but the swarm: bytes per token are then read from /proc/net/dev beside the
relays' own count. Run: python bench/wan.py [--model tiny|smollm2] [--servers 4] [--delays 0,10,25,50]
[--new-tokens 24] [--runs 3] [--rate-mbit 0] [--codec none]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from swarm.config import apply_colocated_omp_env

apply_colocated_omp_env()  # before torch starts its OpenMP runtime, as the swarm command does
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import build_tiny  # noqa: E402 - bench/common.py
from generation import AlternatingClock, prompt_ids  # noqa: E402 - bench/generation.py
from relay import Relays, Route, free_port  # noqa: E402 - bench/relay.py
from transformers import AutoConfig, StoppingCriteriaList  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from client import aio  # noqa: E402
from client.model import DistributedModelForCausalLM  # noqa: E402
from swarm.assets import ensure_smollm2  # noqa: E402
from swarm.forwarding import forwarding_pays  # noqa: E402
from swarm.launch import LocalSwarm, even_spans  # noqa: E402

NETNS_MARK = "SWARM_WAN_NETNS"  # set in the re-executed child, which runs inside the namespace


def in_own_namespace() -> bool:
    """Re-run this script in a new network namespace (loopback up) if we can; True if this process is the child."""
    if os.environ.get(NETNS_MARK) or "--no-netns" in sys.argv or not shutil.which("unshare") or not shutil.which("ip"):
        return bool(os.environ.get(NETNS_MARK))
    inner = f"ip link set lo up && exec {' '.join(map(_quote, [sys.executable, *sys.argv]))}"
    for flags in (["--net"], ["--net", "--map-root-user"]):
        probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
        if probe.returncode == 0:
            os.execvpe("unshare", ["unshare", *flags, "sh", "-c", inner], {**os.environ, NETNS_MARK: "1"})
    print("no network namespace here (unshare refused): running on the shared loopback, without OS byte counts")
    return False


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def loopback_bytes() -> int | None:
    """Bytes the loopback interface has carried (received; on lo each byte is received once), or None."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    return None


def start_behind_relays(swarm: LocalSwarm, path: Path, spans, dtype: str) -> Relays:
    routes = [Route(free_port(), free_port()) for _ in spans]
    relays = Relays(routes)
    servers = [swarm.start_servers(str(path), [span], wait=False, extra_args=[
        "--host-maddrs", f"/ip4/127.0.0.1/tcp/{route.target}",
        "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{route.listen}", "--torch-dtype", dtype])[0]
        for span, route in zip(spans, routes, strict=True)]
    for server in servers:
        server.wait_ready(180)
    return relays


def measure(model, input_ids, args, runs: int) -> tuple[dict[bool, float], torch.Tensor | None, list]:
    """Median decode step (s) per mode over `runs` generations alternating the modes token by token, the output if
    every run gave the same one (else None), and all outputs."""
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    steps: dict[bool, list[float]] = {True: [], False: []}
    outputs = []
    for run in range(runs):
        with model.inference_session(input_ids.shape[1] + args.new_tokens) as session:
            clock = AlternatingClock(session, first=run % 2 == 0)
            outputs.append(model.generate(input_ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs))
        for mode in (True, False):
            steps[mode] += clock.steps[mode]
    same = all(torch.equal(outputs[0], o) for o in outputs)
    return {mode: statistics.median(values) for mode, values in steps.items()}, outputs[0] if same else None, outputs


def auto_choice(model) -> tuple[float, bool]:
    """What forwarding "auto" chooses on this route now: the median of the client's round trips to the servers
    (three fresh ping rounds, as the pinger would measure them over time) and the verdict."""
    connection = model.model.layers.connection
    for _ in range(3):
        aio.run(connection.pinger.ping_round())
    rtts = list(connection.pings.values())
    return statistics.median(rtts), forwarding_pays(rtts, model.remote_layers.config.forwarding_min_rtt_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--servers", type=int, default=4, help="servers of the route, splitting the blocks evenly")
    parser.add_argument("--delays", default="0,10,25,50", help="comma-separated one-way delays per link, in ms")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per generation")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="generations per delay (each alternating both modes)")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth cap of every link each way (0: none)")
    parser.add_argument("--codec", default="none", help="inference codec of the client ('none': float32, exact)")
    parser.add_argument("--no-netns", action="store_true", help="stay on the shared loopback interface")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    own_netns = in_own_namespace()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm() as swarm:
        path = build_tiny(Path(tmp)) if args.model == "tiny" else ensure_smollm2()
        config = AutoConfig.from_pretrained(path)
        spans = even_spans(config.num_hidden_layers, args.servers)
        swarm.start_bootstrap()
        relays = start_behind_relays(swarm, path, spans, "float32")
        hops = len(spans)
        try:
            model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype="float32",
                                                                inference_codec=args.codec)
            input_ids = prompt_ids(config.vocab_size, args.prompt_tokens)
            rows, reference = [], None
            with torch.inference_mode():
                relays.set(0.0, args.rate_mbit)
                measure(model, input_ids, args, 1)  # warm-up: every connection dialled through the relays
                for delay in delays:
                    relays.set(delay, args.rate_mbit)
                    measure(model, input_ids, args, 1)  # connections settle at this delay
                    relayed_before, lo_before = relays.bytes_relayed(), loopback_bytes()
                    step, output, outputs = measure(model, input_ids, args, args.runs)
                    relayed = sum(b[0] + b[1] - a[0] - a[1]
                                  for a, b in zip(relayed_before, relays.bytes_relayed(), strict=True))
                    lo = loopback_bytes() - lo_before if own_netns and lo_before is not None else None
                    reference = outputs[0] if reference is None else reference
                    same = output is not None and torch.equal(output, reference)
                    rows.append((delay, step, same, relayed / (args.runs * args.new_tokens),
                                 None if lo is None else lo / (args.runs * args.new_tokens), auto_choice(model)))
        finally:
            model.model.layers.connection.shutdown()
            relays.stop()
    print(f"{args.model}, {hops} servers {spans} behind relays, greedy {args.new_tokens} tokens after a "
          f"{args.prompt_tokens}-token prompt, codec {args.codec}, {args.runs} runs per delay (modes alternating token "
          f"by token), bandwidth cap {args.rate_mbit or 'none'} Mbit/s, "
          f"{'own network namespace' if own_netns else 'shared loopback'}; torch {torch.__version__}")
    base = rows[0][1] if rows and rows[0][0] == 0 else None
    print(f"{'one-way':>7} | {'client-driven':^23} | {'forwarding':^23} | {'forwarding / client-driven':^27} | "
          f"{'same':>4} | {'bytes per token':^17} | {'auto':^12}")
    print(f"{'ms':>7} | {'ms/tok':>7} {'tok/s':>6} {'limit':>8} | {'ms/tok':>7} {'tok/s':>6} {'limit':>8} | "
          f"{'tok/s':>7} {'limit':>7} {'of it':>9} | {'':>4} | {'relays':>8} {'lo':>8} | {'rtt ms':>6} {'picks':>5}")
    for delay, step, same, relayed, lo, (rtt, picks) in rows:
        cd, fw = 1000 * step[False], 1000 * step[True]
        limit_cd = 1000 * base[False] + 2 * hops * delay if base else float("nan")
        limit_fw = 1000 * base[True] + (hops + 1) * delay if base else float("nan")
        gain, limit_gain = cd / fw, limit_cd / limit_fw
        print(f"{delay:7.0f} | {cd:7.1f} {1000 / cd:6.1f} {limit_cd:8.1f} | {fw:7.1f} {1000 / fw:6.1f} {limit_fw:8.1f} | "
              f"{gain:6.2f}x {limit_gain:6.2f}x {100 * gain / limit_gain:8.0f}% | {'yes' if same else 'NO':>4} | "
              f"{relayed:8.0f} {'-' if lo is None else f'{lo:.0f}':>8} | {rtt:6.1f} {'fwd' if picks else 'hops':>5}")
    print(f"limit: the mode's ms/token at 0 ms plus what the delay must add (client-driven: a round trip per hop, "
          f"2 x {hops} x delay; forwarding: {hops + 1} links one way); 'of it': the measured gain over the limit's. "
          "Bytes: both modes together, as the relays copied them and as the namespace's loopback carried them (each "
          "relayed byte crosses it twice: to the relay and on to the peer). auto: the median round trip the client "
          "measures and what --forwarding auto picks from it.")
    print("speculative steps: not built yet (issue 17)")


if __name__ == "__main__":
    main()
