"""A client's link to the swarm: its DHT peer, the server list, and typed remote calls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping, Sequence

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from client import aio
from client.compatibility import Compatibility
from client.config import CLIENT, ClientConfig
from client.measurements import InFlight, Pinger
from client.requests import SpanCall
from client.routing import NoRouteError, RouteStep, ServerChoice, ban_seconds, plan_route, plan_training_route
from client.streams import TRANSPORT_ERRORS, TrainStream, pack_inputs
from client.verification import SpotChecks
from swarm.config import MAX_UNARY_PAYLOAD_BYTES
from swarm.dht_records import ServerInfo, ServerState, fetch_servers
from swarm.errors import RemoteError
from swarm.join import start_joining, wait_joined
from swarm.keyed_p2p import keyed
from swarm.protocol import SpanRequest
from swarm.service import BlockService
from swarm.streaming import join_message, split_message
from swarm.tensors import Traffic, hidden_slots, unpack_tensor

logger = logging.getLogger(__name__)


class SwarmConnection:
    """Joins the DHT as a client (it accepts no incoming connections) and talks to servers, as `config` says; servers
    that its allowed/blocked lists leave out are never contacted, not even pinged. `dht`: a client DHT peer already
    joining (swarm.join.start_joining), so the caller can do other work meanwhile."""

    def __init__(self, initial_peers: Sequence[str], prefix: str, num_blocks: int, config: ClientConfig = CLIENT,
                 identity=None, dht: hivemind.DHT | None = None, swarm_key=None):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddress printed by `swarm dht` or `swarm server`")
        self.config = config
        self.choice = ServerChoice.of(config.allowed_servers, config.blocked_servers, check=_check_peer_id)
        self.compatibility = Compatibility(identity)  # identity: the client's swarm.identity.ModelIdentity, if any
        self.prefix, self.num_blocks = prefix, num_blocks
        self.dht = wait_joined(dht if dht is not None else start_joining(initial_peers, swarm_key, client_mode=True))
        # In a private swarm every call is sealed with the key the DHT peer joined with (swarm.keyed_p2p).
        self.p2p = keyed(aio.run(self.dht.replicate_p2p()), getattr(self.dht, "keyring", None))
        self._servers: list[ServerInfo] = []
        self._servers_time = 0.0
        self._servers_lock = threading.Lock()  # refreshes run on the caller's thread or in a worker thread
        self.traffic = Traffic()  # every tensor this client sent and received, raw and on the wire
        self.hidden_traffic = Traffic()  # the part of it that is hidden states and their gradients (hidden_slots)
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures in a row)
        self._full: dict[str, float] = {}  # peer id -> until when it is avoided: it said it had no room
        # (server, digest) of LoRA tensors a server has accepted from us: later requests name them by digest.
        self._lora_uploads: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.in_flight = InFlight()  # training requests awaiting a reply, by server (training routes spread by it)
        self.rng = random.Random()  # draws of training routes (replace it with a seeded one to repeat them)
        self.pinger = Pinger(self._ping, config.ping_period_s, config.ping_timeout_s, config.ping_smoothing)
        self.pinger.start()
        self.spot_checks = SpotChecks(self)  # what config.verify_fraction samples (client.verification)

    # ------------------------------------------------------------------------------------ discovery

    def servers(self, refresh: bool = False) -> list[ServerInfo]:
        with self._servers_lock:
            if refresh or time.monotonic() - self._servers_time > self.config.servers_max_age:
                self._servers = fetch_servers(self.dht, self.prefix, self.num_blocks)
                self._servers_time = time.monotonic()
                self.pinger.watch(s.peer_id for s in self._servers
                                  if s.record.state == ServerState.ONLINE and self.choice.refusal(str(s.peer_id)) is None)
            return self._servers

    @property
    def pings(self) -> dict[str, float]:
        """Measured round trips in ms by peer id string (inf: its last ping failed); servers not pinged yet are absent."""
        return self.pinger.rtt_ms

    async def _ping(self, peer_id) -> None:
        await self.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(), timeout=self.pinger.timeout)

    def ban(self, peer_id) -> float:
        """Keep a server that failed a call out of routes for a while (longer after each failure in a row)."""
        until, strikes = self._bans.get(str(peer_id), (0.0, 0))
        if math.isinf(until):
            return math.inf  # banned for good by a spot check
        seconds = ban_seconds(strikes + 1, self.config.ban_base_s, self.config.ban_max_s)
        self._bans[str(peer_id)] = (time.monotonic() + seconds, strikes + 1)
        logger.info("server %s failed; leaving it out of routes for %.0f s", peer_id, seconds)
        return seconds

    def ban_for_session(self, peer_id) -> None:
        """Keep a server out of routes for this client's lifetime (a spot check caught it returning wrong outputs)."""
        _, strikes = self._bans.get(str(peer_id), (0.0, 0))
        self._bans[str(peer_id)] = (math.inf, strikes + 1)

    async def afailed(self, peer_id, refresh: bool = False) -> None:
        """A server failed a call. Gone (no answer): banned for a while. Leaving or moved to other blocks (it said
        so, and its DHT record says so too; `refresh`): the view of the swarm is read again instead, so its new
        blocks stay usable. The read runs off the client's event loop: there it would stall every open stream and
        the pinger."""
        if refresh:
            logger.info("server %s is leaving or moved; refreshing the view of the swarm", peer_id)
            await asyncio.to_thread(self.servers, True)
        else:
            self.ban(peer_id)

    def mark_full(self, peer_id) -> None:
        """A server answered that it has no room for this client now (limit reached, cache full): routes avoid it
        for a while where others host its blocks. It is alive, so it is not banned."""
        self._full[str(peer_id)] = time.monotonic() + self.config.full_backoff_s
        logger.info("server %s is full; routing around it where other servers host its blocks", peer_id)

    async def aplan(self, *args, **kwargs) -> list[RouteStep]:
        return await asyncio.to_thread(self.plan, *args, **kwargs)

    def banned(self) -> set:
        now = time.monotonic()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    def full(self) -> set:
        """Servers that said lately that they had no room for this client."""
        now = time.monotonic()
        return {peer for peer, until in list(self._full.items()) if until > now}

    def _rules(self, adapter: str | None) -> dict:
        return dict(banned=self.banned(), adapter=adapter, rtt_ms=self.pings, choice=self.choice,
                    compatibility=self.compatibility)

    def plan(self, start: int = 0, end: int | None = None, adapter: str | None = None, *,
             session_tokens: int = 0, batch_size: int = 0, full: Collection[str] = ()) -> list[RouteStep]:
        """The least-latency route (client.routing.plan_route); `session_tokens`: batch x max_length. Servers that
        said lately they had no room are used only where nothing else hosts their blocks; those in `full` (they
        said so during the current failover, client.failover.full_servers) never."""
        end = self.num_blocks if end is None else end
        rules = dict(self._rules(adapter), hop_ms=self.config.hop_overhead_ms,
                     default_ms_per_block=self.config.default_ms_per_block, batch_size=batch_size)
        avoided = self.full() | set(full)
        try:
            return plan_route(self.servers(), start, end, session_tokens=session_tokens, full=avoided, **rules)
        except NoRouteError:  # the swarm may have changed
            servers = self.servers(refresh=True)
        try:
            return plan_route(servers, start, end, session_tokens=session_tokens, full=avoided, **rules)
        except NoRouteError as exc:
            if not exc.reasons or not exc.reasons <= {"cache", "full"}:
                raise
            # Announced free cache is up to an update period old, and a server that was full a while ago may have
            # room again: the servers decide (they refuse clearly if full).
            logger.debug("%s; trying the route regardless", exc)
            return plan_route(servers, start, end, full=full, **rules)

    def plan_training(self, start: int = 0, end: int | None = None, adapter: str | None = None,
                      planned: Mapping[str, int] | None = None, batch_size: int = 0) -> list[RouteStep]:
        """A training route (client.routing.plan_training_route); requests in flight and `planned` ones count as load."""
        end = self.num_blocks if end is None else end
        load = Counter(self.in_flight.counts())
        load.update(planned or {})
        rules = dict(self._rules(adapter), batch_size=batch_size)
        try:
            return plan_training_route(self.servers(), start, end, self.rng, load, full=self.full(), **rules)
        except NoRouteError:  # the swarm may have changed, or only servers that were full host some blocks
            return plan_training_route(self.servers(refresh=True), start, end, self.rng, load, **rules)

    def stub(self, peer_id):
        return BlockService.get_stub(self.p2p, peer_id, namespace=self.prefix)

    def count(self, sent: Sequence[runtime_pb2.Tensor], received: Sequence[runtime_pb2.Tensor]) -> Traffic:
        step = Traffic.of(sent, received)
        self.traffic += step
        self.hidden_traffic += Traffic.of(hidden_slots(sent), hidden_slots(received))
        return step

    # ------------------------------------------------------------------------------------ stateless calls

    async def _upload_once(self, step: RouteStep, call: SpanCall, send):
        """`await send(*call.sent(by_digest))`, naming the LoRA tensors by digest when this server accepted them
        before. If it no longer holds them (`lora_not_cached`), they are sent again; an accepted upload is
        remembered (the last 1024)."""
        key = (str(step.peer_id), call.meta.lora_digest)
        has_lora = bool(call.meta.lora)
        if has_lora and key in self._lora_uploads:
            try:
                return await send(*call.sent(True))
            except RemoteError as exc:
                if exc.code != "lora_not_cached":
                    raise
                self._lora_uploads.pop(key, None)  # expired or evicted there: upload again
        result = await send(*call.sent(False))
        if has_lora:
            self._lora_uploads[key] = None
            while len(self._lora_uploads) > 1024:
                self._lora_uploads.popitem(last=False)
        return result

    async def call(self, kind: str, step: RouteStep, call: SpanCall, traffic: Traffic | None = None) -> list[torch.Tensor]:
        """A forward or backward request (client.requests.span_call), its LoRA tensors sent once per server; its bytes
        are also added to `traffic` if given."""
        extra = {} if traffic is None else {"traffic": traffic}
        return await self._upload_once(step, call, functools.partial(self.send, kind, step, **extra))

    async def train_forward(self, step: RouteStep, call: SpanCall, decode_reply=None) -> tuple[TrainStream, torch.Tensor]:
        async def send(meta, tensors, codecs):
            stream = TrainStream(self, step, call.grad_codec)
            return stream, await stream.forward(meta, tensors, codecs, decode_reply)

        return await self._upload_once(step, call, send)

    async def send(self, kind: str, step: RouteStep, meta: SpanRequest, tensors: Sequence, codecs: Sequence = (),
                   traffic: Traffic | None = None) -> list[torch.Tensor]:
        """Send one forward or backward request (laid out as swarm.protocol.SpanRequest describes) as it is; payloads
        over the unary limit go over a stream. Returns the server's tensors: [output] for a forward; for a backward,
        the gradients w.r.t. the input, each LoRA tensor and the deep prompts."""
        stub = self.stub(step.peer_id)
        packed = pack_inputs(tensors, codecs)
        try:
            if sum(len(p.buffer) for p in packed) <= MAX_UNARY_PAYLOAD_BYTES:
                request = runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=packed)
                received = (await getattr(stub, f"rpc_{kind}")(request, timeout=self.config.request_timeout)).tensors
            else:
                received = await asyncio.wait_for(self._send_stream(getattr(stub, f"rpc_{kind}_stream"), meta, packed),
                                                  timeout=self.config.request_timeout)
        except TRANSPORT_ERRORS as exc:
            raise RemoteError.from_exception(exc, str(step.peer_id)) from None
        counted = self.count(packed, received)
        if traffic is not None:
            traffic += counted
        return [unpack_tensor(t, "server output") for t in received]

    @staticmethod
    async def _send_stream(method, meta: SpanRequest, packed: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
        replies = [reply async for reply in await method(as_aiter(*split_message(meta, packed)))]
        if not replies:
            raise RemoteError("transport", "server closed the stream without replying")
        return join_message(replies[0], replies[1:])

    def shutdown(self) -> None:
        self.pinger.stop()
        with contextlib.suppress(Exception):  # best effort on the way out
            aio.run(self.p2p.shutdown(), timeout=5)
        self.dht.shutdown()


def _check_peer_id(text: str) -> None:
    """A peer id is a base58 multihash (a code, the digest's length, the digest), e.g. "Qm..." or "12D3Koo..."."""
    raw = PeerID.from_base58(text).to_bytes()
    if len(raw) < 3 or raw[1] != len(raw) - 2:
        raise ValueError(f"{text!r} is not a multihash")
