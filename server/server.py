"""A server: load a span of blocks, join the DHT, serve RPCs, announce itself, leave cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading

import hivemind

from server import memory_plan, throughput
from server.backend import Limits, SpanBackend
from server.block_selection import choose_span
from server.cache_budget import SessionBudget
from server.compute_queue import CurrentCompute
from server.handler import KEEPS_MESSAGES, BlockHandler
from server.metrics import MetricsEndpoint, ServerSample
from server.rebalance import ActiveHandler, Rebalancer, drain
from swarm import __version__, compression, versions
from swarm.checkpoint import Checkpoint, default_dht_prefix, resolve_dtype
from swarm.config import ServerConfig
from swarm.devices import DeviceFacts, describe_devices, probe, resolve_devices, split_span
from swarm.dht_records import ServerRecord, ServerState, announce_span, fetch_servers
from swarm.identity import ModelIdentity
from swarm.ingress import Ingress
from swarm.join import join_as_configured
from swarm.keyed_p2p import keyed
from swarm.kv_cache import cache_budget_bytes, kv_bytes_per_token
from swarm.lora import read_peft_adapter
from swarm.models import family_for
from swarm.models.span import BlockSpan, SpanPart
from swarm.quantize import quantizer, require_bitsandbytes
from swarm.service import BlockService

logger = logging.getLogger(__name__)


ServerOptions = ServerConfig  # the name of a server's options before they were declared in swarm.config


@dataclasses.dataclass
class Hosted:
    """The span a server serves, its handler and measured speed: replaced as one when the server moves."""

    start: int
    end: int
    handler: BlockHandler
    ms_per_block: float
    forward_tps: float
    weights_digest: str = ""  # of the span's blocks as stored in the checkpoint (swarm.identity)
    devices: str = ""  # what holds them, as records name it (swarm.devices.describe_devices)


class Server:
    def __init__(self, options: ServerConfig):
        if (options.blocks is None) == (options.num_blocks is None):
            raise ValueError("give exactly one of --blocks A:B or --num-blocks N")
        if not options.new_swarm and not options.initial_peers:
            raise ValueError("give --initial-peers MADDR... to join a swarm, or --new-swarm to start one")
        for name in ("cache_tokens", "max_sessions", "max_batch_size", "max_chunk_tokens", "batch_rows"):
            if getattr(options, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
        if options.rebalance_period < 0 or options.balance_margin < 0:
            raise ValueError(f"--rebalance-period ({options.rebalance_period}) and --balance-margin "
                             f"({options.balance_margin}) must be >= 0")
        if options.metrics_port is not None and not 0 <= options.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be a TCP port (0-65535; 0: any free one), got {options.metrics_port}")
        if options.quant != "none":
            require_bitsandbytes(options.quant)  # before joining: a clear error, not a traceback after the DHT starts
        self.options = options
        self.checkpoint = Checkpoint(options.model)
        self.config = self.checkpoint.config
        self.family = family_for(self.config)
        self.identity = ModelIdentity(self.checkpoint, self.family)  # what clients check this server's blocks against
        self.num_model_blocks = self.config.num_hidden_layers
        self.prefix = options.dht_prefix or default_dht_prefix(options.model)
        self.devices = resolve_devices(options.device)  # unknown or unavailable ones fail here, before anything loads
        facts = [probe(d) for d in self.devices]
        # One dtype for the whole span: bfloat16 only if every device has it natively.
        self.dtype = resolve_dtype(options.torch_dtype, self.config,
                                   DeviceFacts(facts[0].kind, all(f.fast_bf16 for f in facts), facts[0].name))
        # The span's split between the devices: equal parts, or with --num-blocks auto what each device's memory holds.
        self.part_weights = (1.0,) * len(self.devices)
        self.auto_blocks = self._plan_memory() if options.num_blocks == "auto" else None  # before joining: errors first
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self.dht: hivemind.DHT | None = None
        self.ready = threading.Event()
        self.hosted: Hosted | None = None
        self.active: ActiveHandler | None = None  # what the RPC layer calls: the current span's handler
        self.state = ServerState.JOINING  # what it last announced for its current span (its /metrics shows it)
        # One DHT call at a time from the event loop: announcements must land in order (the record that expires last
        # wins), and hivemind's DHT pipe is not meant for concurrent senders.
        self.dht_lock: asyncio.Lock | None = None
        # Only a server that chose its blocks itself moves; one given --blocks stays where its operator put it.
        self.rebalances = options.blocks is None and options.rebalance_period > 0

    # The current span's handler. Code that needs several parts of the span at once reads `hosted` once: a move
    # replaces it whole.
    @property
    def handler(self) -> BlockHandler | None:
        return self.hosted.handler if self.hosted is not None else None

    # ------------------------------------------------------------------------------------ setup

    def _plan_memory(self) -> int:
        """--num-blocks auto: how many blocks fit the devices' free memory (and what each device holds)."""
        plan = memory_plan.server_plan(self.options, self.family, self.config, self.dtype, self.devices)
        logger.info("%s", plan.describe())
        pairs = list(zip(self.devices, plan.device_weights, strict=True))
        if any(weight <= 0 for _, weight in pairs):
            logger.warning("--num-blocks auto: no block fits on %s; the span goes on the other devices",
                           ", ".join(str(d) for d, weight in pairs if weight <= 0))
        self.devices = tuple(d for d, weight in pairs if weight > 0)
        self.part_weights = tuple(weight for _, weight in pairs if weight > 0)
        return plan.num_blocks

    def _choose_blocks(self) -> tuple[int, int]:
        o = self.options
        if o.blocks is not None:
            start, end = o.blocks
            if not 0 <= start < end <= self.num_model_blocks:
                raise ValueError(f"--blocks {start}:{end} is outside the model's {self.num_model_blocks} blocks")
            return start, end
        servers = fetch_servers(self.dht, self.prefix, self.num_model_blocks)
        # Our own record may still be there from before a restart with the same identity: ignore it.
        spans = [(s.record.start, s.record.end) for s in servers
                 if s.record.state != ServerState.OFFLINE and s.peer_id != self.dht.peer_id]
        length = self.auto_blocks if self.auto_blocks is not None else o.num_blocks
        return choose_span(self.num_model_blocks, min(length, self.num_model_blocks), spans)

    def _record(self, state: ServerState, hosted: Hosted | None = None) -> ServerRecord:
        hosted = self.hosted if hosted is None else hosted
        stats = hosted.handler.stats
        return ServerRecord(
            state=state,
            start=hosted.start,
            end=hosted.end,
            public_name=self.options.public_name,
            version=__version__,
            torch_dtype=str(self.dtype).replace("torch.", ""),
            device=hosted.devices,
            quant=self.options.quant,
            ms_per_block=round(hosted.ms_per_block, 3),
            forward_tokens_per_s=round(hosted.forward_tps, 1),
            cache_tokens_left=self.budget.tokens_left,
            cache_bytes_left=self.budget.free,
            cache_bytes=self.budget.cache.total,
            adapters=tuple(sorted(self.options.adapters)),
            codecs=tuple(compression.available()),
            bytes_raw=stats.raw_in + stats.raw_out,
            bytes_wire=stats.bytes_in + stats.bytes_out,
            requests=stats.requests,
            errors=stats.errors,
            rebalances=self.rebalances,
            protocol_min=versions.ours()[0],
            protocol_max=versions.ours()[1],
            config_digest=self.identity.config,
            weights_digest=hosted.weights_digest,
            max_chunk_tokens=self.options.max_chunk_tokens,
            max_batch_size=self.options.max_batch_size,
        )

    def info(self) -> dict:
        return {
            **self._record(ServerState.ONLINE).to_dict(),
            "dht_prefix": self.prefix,
            "num_model_blocks": self.num_model_blocks,
            "hidden_size": self.config.hidden_size,
            "parts": [{"start": p.start, "end": p.end, "device": str(p.device)} for p in self.handler.backend.span.parts],
            **dataclasses.asdict(self.handler.stats),
            "compute_s": {kind: round(seconds, 6) for kind, seconds in self.handler.stats.compute_s.items()},
            "decode_batches": {"batches": self.handler.compute.batches, "steps": self.handler.compute.batched_steps},
            "train_activation_bytes": self.handler.activations.used,
            "lora_cache": {"entries": len(self.handler.lora_cache), "bytes": self.handler.lora_cache.nbytes,
                           "hits": self.handler.lora_cache.hits, "misses": self.handler.lora_cache.misses},
            "delta": self.handler.delta.info(),
        }

    def sample(self) -> ServerSample | None:
        """What --metrics-port shows now (read from its HTTP thread; None until blocks are loaded)."""
        hosted = self.hosted
        if hosted is None or self.dht is None:
            return None
        stats = hosted.handler.stats
        return ServerSample(self.prefix, self.dht.peer_id.to_base58(), self._record(self.state, hosted),
                            stats.sessions_open, stats.bytes_in, stats.bytes_out, stats.raw_in, stats.raw_out,
                            dict(stats.by_kind), dict(stats.compute_s))

    def _announce(self, state: ServerState, timeout: float = 10.0, hosted: Hosted | None = None) -> None:
        ttl = self.options.update_period * self.options.expiration_factor
        if hosted is None:
            self.state = state
        if not announce_span(self.dht, self.prefix, self.num_model_blocks, self._record(state, hosted), ttl, timeout):
            logger.warning("announcing %s to the DHT timed out after %.0f s; will retry", state.value, timeout)

    async def _publish(self, state: ServerState, timeout: float = 10.0, hosted: Hosted | None = None) -> None:
        """Announce from the event loop; one at a time, since the DHT keeps the record that expires last."""
        async with self.dht_lock:
            await asyncio.to_thread(self._announce, state, timeout, hosted)

    def span_parts(self, start: int, end: int) -> list[SpanPart]:
        """Blocks start:end split between the devices, a contiguous part each, in the order --device lists them."""
        bounds = split_span(start, end, self.part_weights)
        if len(bounds) < len(self.devices):
            logger.warning("%d blocks cannot be split between %d devices: using the first %d", end - start,
                           len(self.devices), len(bounds))
        return [SpanPart(a, b, device) for (a, b), device in zip(bounds, self.devices)]  # noqa: B905 - fewer parts

    def load(self, start: int, end: int) -> Hosted:
        """Read blocks start:end from the checkpoint and build their handler (blocking: call it off the event loop)."""
        o = self.options
        parts = self.span_parts(start, end)
        logger.info("loading blocks %d:%d of %s (%s%s) on %s", start, end, o.model, self.dtype,
                    f", {o.quant}" if o.quant != "none" else "", ", ".join(f"{p.start}:{p.end} {p.device}" for p in parts))
        span = BlockSpan.from_checkpoint(self.family, self.config, start, end, self.checkpoint, self.dtype, parts,
                                         quantizer(o.quant, self.dtype) if o.quant != "none" else None)
        # Measured once per kind of device (cached across starts): a move or a restart reads the figures back.
        speed = throughput.span_speed(span, self.dtype, o.quant, remeasure=o.remeasure and self.hosted is None)
        ms_per_block, forward_tps = speed.ms_per_block, speed.forward_tps
        backend = SpanBackend(span, self.dtype, Limits(o.max_batch_size, o.max_chunk_tokens, o.max_request_tensors))
        for name, path in o.adapters.items():
            backend.host_adapter(name, read_peft_adapter(path, range(start, end)))
            logger.info("hosting adapter %r from %s", name, path)
        # The sessions' budget (KV-cache tokens, open sessions) is the server's, shared by the spans it serves while it
        # moves.
        handler = BlockHandler(backend, self.budget, self.info, o)
        return Hosted(start, end, handler, ms_per_block, forward_tps, self.identity.span(start, end) or "",
                      describe_devices([probe(p.device).label for p in parts]))

    async def switch(self, new: Hosted) -> bool:
        """Serve `new` instead of the current span: new requests go to it, the old span is announced offline (its
        open sessions are told to move on their next step), then the new one online. False if the server is leaving."""
        async with self.dht_lock:
            if self._stop_event.is_set():
                return False
            old, self.hosted = self.hosted, new
            new.handler.attach(self.p2p, self.prefix)
            self.active.current = new.handler
            old.handler.leaving = True
            # Offline first: a client that sees neither span of this server routes elsewhere, which is safe (the
            # old blocks have other servers); the offline record expires after the online one it replaces.
            await asyncio.to_thread(self._announce, ServerState.OFFLINE, 10.0, old)
            await asyncio.to_thread(self._announce, ServerState.ONLINE)
        return True

    async def retire(self, old: Hosted) -> None:
        """Let a replaced span's sessions and requests finish (bounded, as on SIGTERM), then free it."""
        open_sessions = old.handler.stats.sessions_open
        if not await drain(old.handler, self.options.shutdown_timeout):
            logger.info("blocks %d:%d: %d session(s) still open after %.0f s (they are refused on their next step)",
                        old.start, old.end, old.handler.stats.sessions_open, self.options.shutdown_timeout)
        old.handler.shutdown()
        logger.info("blocks %d:%d retired (%d session(s) were open at the move)", old.start, old.end, open_sessions)

    # ------------------------------------------------------------------------------------ run

    def run(self, install_signal_handlers: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or `stop()`), then leave the swarm cleanly."""
        o = self.options
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            # Until the event loop takes over, SIGTERM during loading stops the server once it can (Ctrl-C aborts at once).
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
        self.dht = join_as_configured(o)
        metrics = None
        try:
            start, end = self._choose_blocks()
            # In bytes, sized for the first span's length; shared by the spans the server moves to.
            token_bytes = kv_bytes_per_token(self.config, self.dtype)
            self.budget = SessionBudget(cache_budget_bytes(o.cache_bytes, o.cache_tokens, self.config, self.dtype, end - start),
                                        o.max_sessions, token_bytes, end - start)
            self.hosted = self.load(start, end)
            if o.metrics_port is not None:
                metrics = MetricsEndpoint(o.metrics_host, o.metrics_port, self.sample)
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:  # pragma: no cover - uvloop is a dependency, but keep serving without it
                runner = asyncio.run
            runner(self._serve(install_signal_handlers))
        finally:
            if metrics is not None:
                metrics.stop()
            self.dht.shutdown()
            logger.info("server stopped")

    async def _serve(self, install_signal_handlers: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self.dht_lock = asyncio.Lock()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop_event.set)
        if self._stop.is_set():
            self._stop_event.set()
        # A private swarm's RPCs are sealed; every request is charged to the in-flight budget as it arrives.
        ingress = Ingress(CurrentCompute(lambda: self.handler.compute), self.handler.max_request_bytes,
                          keeps_messages=KEEPS_MESSAGES)
        p2p = keyed(await self.dht.replicate_p2p(), self.dht.keyring, ingress)
        self.p2p = p2p
        self.handler.attach(p2p, self.prefix)  # inference steps are pushed on to the next server with it
        self.active = ActiveHandler(self.handler)
        await BlockService().add_p2p_handlers(p2p, wrapper=self.active, namespace=self.prefix)
        await self._publish(ServerState.ONLINE)
        maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        hosted = self.hosted
        logger.info("serving blocks %d:%d of %s as %s (%.2f ms/block per decode step, %.0f tokens/s forward)",
                    hosted.start, hosted.end, self.prefix, p2p.peer_id, hosted.ms_per_block, hosted.forward_tps)
        print(f"Server ready: blocks {hosted.start}:{hosted.end} of {self.prefix}", flush=True)
        for maddr in maddrs:
            print(f"Join with: --initial-peers {maddr}", flush=True)
        self.ready.set()
        rebalancing = None
        if self.rebalances:
            rebalancer = Rebalancer(self, self.options.rebalance_period, self.options.rebalance_jitter,
                                   self.options.balance_margin)
            rebalancing = asyncio.create_task(rebalancer.run(self._stop_event))
        while not self._stop_event.is_set():
            try:
                await asyncio.wait_for(self._stop_event.wait(), timeout=self.options.update_period)
            except asyncio.TimeoutError:
                await self._publish(ServerState.ONLINE)
                stats = self.handler.stats
                logger.info("traffic so far: %d requests, %.1f MB in / %.1f MB out on the wire (%.1f / %.1f MB raw)",
                            stats.requests, stats.bytes_in / 1e6, stats.bytes_out / 1e6, stats.raw_in / 1e6, stats.raw_out / 1e6)
        if rebalancing is not None:
            rebalancing.cancel()
            await asyncio.gather(rebalancing, return_exceptions=True)
        logger.info("leaving: announcing offline and draining %d open session(s)", self.handler.stats.sessions_open)
        # The DHT keeps the entry that expires last, so the offline record must outlive the online one.
        await self._publish(ServerState.OFFLINE, timeout=3.0)
        self.handler.leaving = True  # sessions that send another step are told to move (they replay elsewhere)
        logger.info("offline: open sessions move on their next step; waiting up to %.0f s for them",
                    self.options.shutdown_timeout)
        await drain(self.handler, self.options.shutdown_timeout)
        await BlockService().remove_p2p_handlers(p2p, namespace=self.prefix)
        self.handler.shutdown()
        await p2p.shutdown()

    def stop(self) -> None:
        """Ask a running server to leave; safe to call from any thread."""
        self._stop.set()
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
