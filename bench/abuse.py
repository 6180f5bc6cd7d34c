"""One member abusing a private swarm's server while honest clients generate (issue 13, acceptance point 5).

An abuser spread over --abuser-ids peer ids (ids cost nothing) opens --abuser-sessions inference sessions and holds
them (opening new ones as the server ends some), and floods the server with large forward requests that upload LoRA
tensors to be cached; meanwhile --honest clients generate greedily. Printed: whether every honest client's output
equals local transformers', the abuser's errors counted by code and by message, each of the server's budgets, and the
server's resident memory (VmRSS of its process) after warm-up, its peak under load, and the bound "(RSS after warm-up
+ the sum of its configured budgets) + 10%", with pass/fail. Every request is charged to the in-flight budget as it
arrives, its copies included (swarm.ingress), so the budgets cover what the abuser can make the server hold. The
budgets are small, so the run takes a few minutes on 2 cores.
Run: python bench/abuse.py [--honest 8] [--abuser-ids 10] [--abuser-sessions 200] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import build_tiny  # bench/common.py
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from client.model import DistributedModelForCausalLM
from client.streams import open_stream
from swarm import lora
from swarm.auth import Keyring, generate_key_file
from swarm.errors import RemoteError
from swarm.keyed_p2p import keyed
from swarm.launch import LocalSwarm
from swarm.protocol import InferenceOpen, SpanRequest
from swarm.service import BlockService
from swarm.tensors import pack_tensor

PREFIX = "abuse-bench"
# The server's budgets: small, so that the abuser exhausts every one of them within seconds.
BUDGETS = dict(cache_tokens=4096, max_sessions=48, lora_cache_mb=8.0, inflight_mb=16.0, train_activation_mb=16.0,
               delta_state_mb=8.0)
LIMITS = dict(max_lora_mb=2.0, max_chunk_tokens=1024)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.stop = pid, period, threading.Event()
        self.samples: list[int] = []

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(rss_bytes(self.pid))
            time.sleep(self.period)

    def timeline(self, points: int = 8) -> str:
        """RSS in MiB at evenly spaced moments of the load: a plateau, or growth."""
        step = max(1, len(self.samples) // points)
        return " ".join(f"{rss / 2**20:.0f}" for rss in self.samples[::step])


def budget_bytes(config, budgets: dict) -> dict[str, int]:
    """The server's configured budgets in bytes, by flag: the KV cache (float32 keys and values of every block), the
    LoRA cache, requests in flight (every request is charged there as it arrives, copies included: swarm.ingress),
    kept activations and delta references."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    mib = {name: int(budgets[name] * 2**20) for name in ("lora_cache_mb", "inflight_mb", "train_activation_mb",
                                                        "delta_state_mb")}
    return {"cache_tokens": budgets["cache_tokens"] * kv_per_token, **mib}


def error_kind(exc: BaseException) -> str:
    """An error's message with its numbers masked, so that errors of one kind count together."""
    error = exc if isinstance(exc, RemoteError) else RemoteError.from_exception(exc)
    return f"[{error.code}] " + re.sub(r"\d+(\.\d+)?", "N", error.message)[:150]


class Abuser:
    """`ids` peers of one member: each holds sessions and floods forwards with LoRA uploads, counting its errors."""

    def __init__(self, maddrs: list[str], keyring: Keyring, config, args: argparse.Namespace):
        self.maddrs, self.keyring, self.config, self.args = maddrs, keyring, config, args
        self.server = PeerID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])
        self.errors: collections.Counter = collections.Counter()
        self.held = self.opened = self.forwards = 0
        self.stop = asyncio.Event()

    async def warm_up(self, forwards: int = 3) -> None:
        """What the load will make the server do, once each, before its memory is taken as the baseline: forwards
        with LoRA uploads (one peer, one at a time) and a session opened and closed."""
        p2p = keyed(await P2P.create(initial_peers=self.maddrs), self.keyring)
        flood = asyncio.create_task(self._flood(p2p, seed=-1, limit=forwards))
        replies = await self._open(p2p)
        self.stop.set()
        await asyncio.gather(flood, self._hold(replies), return_exceptions=True)
        self.stop.clear()
        self.opened = self.forwards = 0
        await p2p.shutdown()

    async def run(self, ready: threading.Event, done: threading.Event) -> None:
        try:
            peers = [keyed(await P2P.create(initial_peers=self.maddrs), self.keyring) for _ in range(self.args.abuser_ids)]
        finally:
            ready.set()
        per_id = self.args.abuser_sessions // len(peers)
        tasks = [asyncio.create_task(self._sessions(p2p, per_id)) for p2p in peers]
        tasks += [asyncio.create_task(self._flood(p2p, seed)) for seed, p2p in enumerate(peers * 2)]
        await asyncio.to_thread(done.wait)
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p2p in peers:
            await p2p.shutdown()

    async def _sessions(self, p2p, count: int) -> None:
        """Keep `count` sessions open (a new one whenever the server ends one), never stepping them."""
        holding: set[asyncio.Task] = set()
        while not self.stop.is_set():
            while len(holding) < count and not self.stop.is_set():
                try:
                    replies = await self._open(p2p)
                except Exception as exc:  # noqa: BLE001 - a refusal: counted, tried again later
                    self.errors[error_kind(exc)] += 1
                    break
                holding.add(asyncio.create_task(self._hold(replies)))
            done, _ = await asyncio.wait(holding or [asyncio.create_task(asyncio.sleep(0.5))], timeout=0.5)
            holding -= done
        for task in holding:
            task.cancel()

    async def _open(self, p2p):
        meta = InferenceOpen(start=0, end=self.config.num_hidden_layers, max_length=128, batch_size=1)
        stop = self.stop

        async def requests():
            yield runtime_pb2.ExpertRequest(metadata=meta.encode())
            await stop.wait()

        replies = await open_stream(p2p, PREFIX, self.server, "rpc_inference", requests())
        await anext(replies)  # the session is open (or the refusal is raised)
        self.opened += 1
        return replies

    async def _hold(self, replies) -> None:
        self.held += 1
        try:
            await anext(replies)  # nothing comes until the server ends the session
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001
            self.errors[error_kind(exc)] += 1
        finally:
            self.held -= 1

    async def _flood(self, p2p, seed: int, limit: int | None = None) -> None:
        """Forwards of max_chunk_tokens tokens, each with new LoRA tensors to cache (another digest every time);
        `limit`: that many, even after stop."""
        stub = BlockService.get_stub(p2p, self.server, namespace=PREFIX)
        generator = torch.Generator().manual_seed(seed % 2**32)
        hidden, blocks = self.config.hidden_size, self.config.num_hidden_layers
        rank = max(1, int(LIMITS["max_lora_mb"] * 2**20 * 0.9) // (blocks * 2 * hidden * 4))
        tokens = LIMITS["max_chunk_tokens"] // 2  # two messages' worth of hidden states would not fit one message
        served = 0
        while (limit is None and not self.stop.is_set()) or (limit is not None and served < limit):
            names = [lora.lora_name(b, "self_attn.q_proj", kind) for b in range(blocks) for kind in "AB"]
            tensors = [torch.randn((rank, hidden) if name.endswith("A") else (hidden, rank), generator=generator) * 0.01
                       for name in names]
            meta = SpanRequest(start=0, end=blocks, lora=names, lora_digest=lora.digest(names, tensors))
            inputs = [torch.randn(1, tokens, hidden, generator=generator), torch.arange(tokens)[None]]
            request = runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=[pack_tensor(t) for t in [*inputs, *tensors]])
            try:
                await stub.rpc_forward(request, timeout=60)
                self.forwards += 1
                served += 1
            except Exception as exc:  # noqa: BLE001
                self.errors[error_kind(exc)] += 1
                await asyncio.sleep(0.05)


def honest_client(path: str, peers: list[str], key_file: str, prompt: torch.Tensor, new_tokens: int, results: list,
                  index: int, start: threading.Barrier) -> None:
    model = DistributedModelForCausalLM.from_pretrained(path, peers, dht_prefix=PREFIX, swarm_key=key_file)
    model.set_codecs(inference="none", activations="none", gradients="none", delta="none")
    try:
        start.wait()
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        results[index] = (output, time.perf_counter() - began, None)
    except Exception as exc:  # noqa: BLE001 - reported
        results[index] = (None, 0.0, exc)
    finally:
        model.model.layers.connection.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--honest", type=int, default=8, help="honest clients, each its own peer")
    parser.add_argument("--abuser-ids", type=int, default=10, help="peer ids the abuser spreads itself over")
    parser.add_argument("--abuser-sessions", type=int, default=200, help="sessions the abuser tries to hold")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens each honest client generates")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="seconds of abuse before the honest clients start")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the server process, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = parser.parse_args()
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
        path = str(build_tiny(Path(tmp)))
        config = AutoConfig.from_pretrained(path)
        key_file = Path(tmp) / "swarm.key"
        generate_key_file(key_file)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = [torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(i))
                   for i in range(args.honest)]
        with torch.inference_mode():
            expected = [local.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0) for p in prompts]
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in {**BUDGETS, **LIMITS}.items()]
        with LocalSwarm(swarm_key_file=str(key_file)) as swarm:
            swarm.start_bootstrap()
            (server,) = swarm.start_servers(path, [(0, config.num_hidden_layers)],
                                            ["--torch-dtype", "float32", "--dht-prefix", PREFIX, *flags],
                                            env=dict(item.split("=", 1) for item in args.server_env))
            pid = server.process.pid
            # Warm-up: an honest generation, and what the abuser will send, so the server has run each kind once.
            warm: list = [None]
            honest_client(path, swarm.initial_peers, str(key_file), prompts[0], 4, warm, 0, threading.Barrier(1))
            abuser = Abuser(server.maddrs, Keyring.load(str(key_file)), config, args)
            asyncio.run(abuser.warm_up())
            warm_rss = rss_bytes(pid)
            sampler = RssSampler(pid)
            sampler.start()
            ready, done = threading.Event(), threading.Event()
            abusing = threading.Thread(target=lambda: asyncio.run(abuser.run(ready, done)), daemon=True)
            abusing.start()
            ready.wait(120)
            if not abusing.is_alive():
                raise RuntimeError("the abuser could not start (see its traceback above)")
            print(f"abuser: {args.abuser_ids} peer ids, trying to hold {args.abuser_sessions} sessions and flooding "
                  f"forwards with LoRA uploads; server budgets {BUDGETS}; server env: {' '.join(args.server_env) or '-'}")
            time.sleep(args.warmup_s)
            print(f"after {args.warmup_s:.0f} s of abuse: the abuser holds {abuser.held} sessions, "
                  f"{abuser.forwards} forwards served")
            results: list = [None] * args.honest
            barrier = threading.Barrier(args.honest)
            threads = [threading.Thread(target=honest_client, args=(path, swarm.initial_peers, str(key_file), prompts[i],
                                                                   args.new_tokens, results, i, barrier))
                       for i in range(args.honest)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(600)
            held_at_end = abuser.held
            done.set()
            abusing.join(60)
            sampler.stop.set()
            sampler.join()
            peak = max(sampler.peak, rss_bytes(pid))

    correct = 0
    for i, (output, seconds, error) in enumerate(results):
        ok = error is None and torch.equal(output, expected[i])
        correct += ok
        print(f"honest client {i}: {'correct' if ok else 'WRONG'}" + (f" in {seconds:.1f} s" if error is None else
                                                                    f": {error_kind(error)}"))
    print(f"honest clients correct: {correct} of {args.honest}")
    by_code = collections.Counter()
    for message, count in abuser.errors.items():
        by_code[message.split("]", 1)[0] + "]"] += count
    print(f"abuser: {abuser.opened} sessions opened, {held_at_end} held at the end, {abuser.forwards} forwards served; "
          f"errors by code: {dict(by_code.most_common())}; by message:")
    for message, count in abuser.errors.most_common():
        print(f"  {count:6d}  {message}")
    budgets = budget_bytes(config, BUDGETS)
    total = sum(budgets.values())
    bound = (warm_rss + total) * 1.1
    print("server budgets: " + ", ".join(f"--{name.replace('_', '-')} {BUDGETS[name]} = {nbytes / 2**20:.1f} MiB"
                                         for name, nbytes in budgets.items()) + f"; sum {total / 2**20:.1f} MiB")
    print(f"server RSS after warm-up {warm_rss / 2**20:.0f} MiB, peak under load {peak / 2**20:.0f} MiB "
          f"(+{(peak - warm_rss) / 2**20:.0f}); bound: (RSS after warm-up {warm_rss / 2**20:.0f} + budgets "
          f"{total / 2**20:.0f} MiB) + 10% = {bound / 2**20:.0f} MiB: {'PASS' if peak <= bound else 'FAIL'}")
    print(f"server RSS during the load (MiB, evenly spaced): {sampler.timeline()}")
    limited = sum(count for message, count in abuser.errors.items() if "limit reached" in message)
    print(f"overall: {'PASS' if correct == args.honest and peak <= bound and limited else 'FAIL'} (honest all correct, "
          f"memory within the bound, the abuser told 'limit reached' {limited} times)")


if __name__ == "__main__":
    main()
