"""A client's link to the swarm: its DHT peer, the server list, and typed remote calls."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import hivemind
import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from client import aio
from client.measurements import InFlight, Pinger
from client.routing import NoRouteError, RouteStep, ServerChoice, ban_seconds, plan_route, plan_training_route
from swarm.compression import wire
from swarm.config import CLIENT, MAX_UNARY_PAYLOAD_BYTES
from swarm.dht_records import ServerInfo, ServerState, fetch_servers
from swarm.forwarding import ForwardHop, ForwardStep
from swarm.join import start_joining, wait_joined
from swarm.protocol import (
    BlockService,
    InferenceOpen,
    InferenceReply,
    RemoteError,
    SpanRequest,
    Traffic,
    TrainGrad,
    hidden_slots,
    join_message,
    pack_tensor,
    split_message,
    unpack_tensor,
)

logger = logging.getLogger(__name__)

# What a call raises when the server cannot be reached or the link breaks (turned into RemoteError "transport").
TRANSPORT_ERRORS = (P2PHandlerError, P2PDaemonError, asyncio.TimeoutError, ConnectionError, OSError)


class SwarmConnection:
    """Joins the DHT as a client (it accepts no incoming connections) and talks to servers.

    `allowed_servers` (only these; None: any) and `blocked_servers` (never these) are peer ids; servers left out
    by them are never contacted, not even pinged. `dht`: a client DHT peer already joining through `initial_peers`
    (swarm.join.start_joining(..., client_mode=True)), so the caller can do other work meanwhile.
    """

    def __init__(self, initial_peers: Sequence[str], prefix: str, num_blocks: int,
                 request_timeout: float = CLIENT.request_timeout, servers_max_age: float = 5.0,
                 allowed_servers: Iterable | None = None, blocked_servers: Iterable = (), dht: hivemind.DHT | None = None):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddress printed by `swarm dht` or `swarm server`")
        self.choice = ServerChoice.of(allowed_servers, blocked_servers, check=_check_peer_id)
        self.prefix, self.num_blocks = prefix, num_blocks
        self.request_timeout = request_timeout
        self.servers_max_age = servers_max_age
        self.dht = wait_joined(dht if dht is not None else start_joining(initial_peers, client_mode=True))
        self.p2p = aio.run(self.dht.replicate_p2p())
        self._servers: list[ServerInfo] = []
        self._servers_time = 0.0
        self._servers_lock = threading.Lock()  # the caller's thread and the client loop may both refresh
        self.traffic = Traffic()  # every tensor this client sent and received, raw and on the wire
        self.hidden_traffic = Traffic()  # the part of it that is hidden states and their gradients (hidden_slots)
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures in a row)
        # (server, digest) of LoRA tensors a server has accepted from us: later requests name them by digest.
        self._lora_uploads: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.in_flight = InFlight()  # training requests awaiting a reply, by server (training routes spread by it)
        self.rng = random.Random()  # draws of training routes (replace it with a seeded one to repeat them)
        self.pinger = Pinger(self._ping)
        self.pinger.start()

    # ------------------------------------------------------------------------------------ discovery

    def servers(self, refresh: bool = False) -> list[ServerInfo]:
        with self._servers_lock:
            if refresh or time.monotonic() - self._servers_time > self.servers_max_age:
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
        _, strikes = self._bans.get(str(peer_id), (0.0, 0))
        seconds = ban_seconds(strikes + 1)
        self._bans[str(peer_id)] = (time.monotonic() + seconds, strikes + 1)
        logger.info("server %s failed; leaving it out of routes for %.0f s", peer_id, seconds)
        return seconds

    def failed(self, peer_id, error: BaseException) -> None:
        """A server failed a call. Gone (no answer): banned for a while. Leaving or moved to other blocks (it said
        so, and its DHT record says so too): the view of the swarm is refreshed instead, so its new blocks stay
        usable."""
        if isinstance(error, RemoteError) and error.server_moved:
            logger.info("server %s is leaving or moved (%s); refreshing the view of the swarm", peer_id, error.code)
            self.servers(refresh=True)
        else:
            self.ban(peer_id)

    def banned(self) -> set:
        now = time.monotonic()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    def _rules(self, adapter: str | None) -> dict:
        """What both planners leave out or weigh: bans, the adapter, measured round trips, allowed/blocked servers."""
        return dict(banned=self.banned(), adapter=adapter, rtt_ms=self.pings, choice=self.choice)

    def plan(self, start: int = 0, end: int | None = None, adapter: str | None = None, *,
             session_tokens: int = 0) -> list[RouteStep]:
        """The least-latency route (client.routing.plan_route) over the measured pings; `session_tokens`
        (batch x max_length) leaves out servers that announce less free KV cache."""
        end = self.num_blocks if end is None else end
        rules = self._rules(adapter)
        try:
            return plan_route(self.servers(), start, end, session_tokens=session_tokens, **rules)
        except NoRouteError:  # the swarm may have changed
            servers = self.servers(refresh=True)
        try:
            return plan_route(servers, start, end, session_tokens=session_tokens, **rules)
        except NoRouteError as exc:
            if exc.reasons != {"cache"}:
                raise
            # Announced free cache is up to an update period old: the servers decide (they refuse clearly if full).
            logger.debug("%s; trying the route regardless", exc)
            return plan_route(servers, start, end, **rules)

    def plan_training(self, start: int = 0, end: int | None = None, adapter: str | None = None,
                      planned: Mapping[str, int] | None = None) -> list[RouteStep]:
        """A training route drawn by throughput (client.routing.plan_training_route), counting the requests this
        client has in flight and `planned` ones (by peer id) as load."""
        end = self.num_blocks if end is None else end
        load = Counter(self.in_flight.counts())
        load.update(planned or {})
        rules = self._rules(adapter)
        try:
            return plan_training_route(self.servers(), start, end, self.rng, load, **rules)
        except NoRouteError:
            return plan_training_route(self.servers(refresh=True), start, end, self.rng, load, **rules)

    def stub(self, peer_id):
        return BlockService.get_stub(self.p2p, peer_id, namespace=self.prefix)

    def count(self, sent: Sequence[runtime_pb2.Tensor], received: Sequence[runtime_pb2.Tensor]) -> Traffic:
        """Add a call's tensors to the traffic totals; returns that call's traffic."""
        step = Traffic.of(sent, received)
        self.traffic += step
        self.hidden_traffic += Traffic.of(hidden_slots(sent), hidden_slots(received))
        return step

    # ------------------------------------------------------------------------------------ stateless calls

    async def _upload_once(self, step: RouteStep, digest: str, has_lora: bool, send):
        """`await send(by_digest)`, naming the LoRA tensors by digest when this server accepted them before.

        If the server no longer holds them (`lora_not_cached`), they are sent again; an accepted upload is
        remembered (the last 1024).
        """
        key = (str(step.peer_id), digest)
        if has_lora and key in self._lora_uploads:
            try:
                return await send(True)
            except RemoteError as exc:
                if exc.code != "lora_not_cached":
                    raise
                self._lora_uploads.pop(key, None)  # expired or evicted there: upload again
        result = await send(False)
        if has_lora:
            self._lora_uploads[key] = None
            while len(self._lora_uploads) > 1024:
                self._lora_uploads.popitem(last=False)
        return result

    async def lora_span_call(self, kind: str, step: RouteStep, tensors: Sequence[torch.Tensor], lora_names: Sequence[str],
                             lora_tensors: Sequence[torch.Tensor], lora_scaling: float, digest: str,
                             codecs: Sequence[str | None] = (), **fields) -> list[torch.Tensor]:
        """span_call with a client's LoRA tensors, which are sent only when the server does not hold them yet."""
        async def send(by_digest: bool):
            sent = list(tensors) if by_digest else [*tensors, *lora_tensors]
            return await self.span_call(kind, step, sent, lora_names, lora_scaling, codecs, lora_digest=digest,
                                        lora_by_digest=by_digest, **fields)

        return await self._upload_once(step, digest, True, send)

    async def span_call(self, kind: str, step: RouteStep, tensors: Sequence[torch.Tensor],
                        lora_names: Sequence[str] = (), lora_scaling: float = 1.0, codecs: Sequence[str | None] = (),
                        **fields) -> list[torch.Tensor]:
        """Forward or backward through one route step; payloads over the unary limit go over a stream.

        `tensors` are laid out as swarm.protocol.SpanRequest describes, ending with the LoRA tensors named by
        `lora_names` (unless `lora_by_digest` names uploaded ones); `fields` are other SpanRequest fields.
        Returns the server's tensors: [output] for a forward; for a backward, the gradients w.r.t. the input,
        each LoRA tensor and the deep prompts.
        """
        meta = SpanRequest(start=step.start, end=step.end, lora=list(lora_names), lora_scaling=lora_scaling, **fields)
        stub = self.stub(step.peer_id)
        try:
            packed = _pack(tensors, codecs)
            if sum(len(p.buffer) for p in packed) <= MAX_UNARY_PAYLOAD_BYTES:
                method = stub.rpc_forward if kind == "forward" else stub.rpc_backward
                request = runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=packed)
                response = await method(request, timeout=self.request_timeout)
                self.count(packed, response.tensors)
                return [unpack_tensor(t, "server output") for t in response.tensors]
            method = stub.rpc_forward_stream if kind == "forward" else stub.rpc_backward_stream
            messages = split_message(meta, packed)

            async def requests():
                for message in messages:
                    yield message

            async def call():
                replies = [reply async for reply in await method(requests())]
                if not replies:
                    raise RemoteError("transport", "server closed the stream without replying")
                received = join_message(replies[0], replies[1:])
                self.count(packed, received)
                return [unpack_tensor(t, "server output") for t in received]

            return await asyncio.wait_for(call(), timeout=self.request_timeout)
        except TRANSPORT_ERRORS as exc:
            raise RemoteError.from_exception(exc, str(step.peer_id)) from None

    async def train_forward(self, step: RouteStep, tensors: Sequence[torch.Tensor], lora_names: Sequence[str] = (),
                            lora_tensors: Sequence[torch.Tensor] = (), lora_scaling: float = 1.0, digest: str = "",
                            codecs: Sequence[str | None] = (), grad_codec: str | None = None, decode_reply=None,
                            **fields) -> tuple[TrainStream, torch.Tensor]:
        """Open a training stream (see TrainStream) and run its forward; LoRA tensors go by digest when uploaded."""
        async def send(by_digest: bool):
            stream = TrainStream(self, step, grad_codec)
            sent = list(tensors) if by_digest else [*tensors, *lora_tensors]
            return stream, await stream.forward(sent, lora_names, lora_scaling, codecs, decode_reply, lora_digest=digest,
                                                lora_by_digest=by_digest, **fields)

        return await self._upload_once(step, digest, bool(lora_names), send)

    def shutdown(self) -> None:
        self.pinger.stop()
        try:
            aio.run(self.p2p.shutdown(), timeout=5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.dht.shutdown()


class SpanStream:
    """An open inference stream with one server: a KV cache there, one message per step."""

    def __init__(self, connection: SwarmConnection, step: RouteStep, batch_size: int, max_length: int,
                 lora_names: Sequence[str] = (), lora_tensors: Sequence[torch.Tensor] = (), lora_scaling: float = 1.0,
                 adapter: str = "", prompts: torch.Tensor | None = None, codec: str = "none", reply_codec: str | None = None):
        self.connection, self.step, self.adapter, self.prompts, self.codec = connection, step, adapter, prompts, codec
        self.reply_codec = codec if reply_codec is None else reply_codec
        self.traffic = Traffic()  # this stream's steps, raw and on the wire
        self.lora_names, self.lora_tensors, self.lora_scaling = list(lora_names), list(lora_tensors), lora_scaling
        self.batch_size, self.max_length = batch_size, max_length
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replies = None
        self.position = 0
        self.step_id = 0
        # Every step's inputs, to replay on a replacement server. The hidden states may be a packed wire tensor: the
        # exact bytes the server took (pushed by the previous server, or relayed as that server sent them).
        self.history: list[list[torch.Tensor | runtime_pb2.Tensor]] = []
        self.failed = False
        # The id the previous server of the route pushes steps into this session under (swarm.forwarding); False
        # once a push into it failed, after which the client sends this stream its steps itself.
        self.session_id = secrets.token_hex(16)
        self.accepts_pushes = True

    async def open(self) -> None:
        async def requests():
            while (message := await self._queue.get()) is not None:
                yield message

        meta = InferenceOpen(start=self.step.start, end=self.step.end, max_length=self.max_length, batch_size=self.batch_size,
                             lora=self.lora_names, lora_scaling=self.lora_scaling, adapter=self.adapter,
                             deep_prompts=self.prompts is not None, reply_codec=self.reply_codec,
                             session_id=self.session_id, input_codec=self.codec)
        opening = ([self.prompts] if self.prompts is not None else []) + self.lora_tensors
        try:
            self._replies = await asyncio.wait_for(
                open_stream(self.connection.p2p, self.connection.prefix, self.step.peer_id, "rpc_inference", requests()),
                CLIENT.connect_timeout)
            self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=[pack_tensor(t) for t in opening]))
            await self._next_reply()
        except TRANSPORT_ERRORS as exc:
            self._queue.put_nowait(None)
            self.failed = True
            raise RemoteError.from_exception(exc, str(self.step.peer_id)) from None
        except BaseException as exc:
            self._queue.put_nowait(None)
            self.failed = isinstance(exc, RemoteError) and exc.server_gone
            raise

    async def _next_reply(self) -> runtime_pb2.ExpertResponse:
        return await _next_reply(self._replies, self.connection.request_timeout, self.step, "inference stream")

    def submit(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor], forward: Sequence[ForwardHop] = ()) -> None:
        """Send a step's inputs without waiting; the server pushes its output along `forward` (later route hops)."""
        message = runtime_pb2.ExpertRequest(metadata=ForwardStep(step=self.step_id, forward=list(forward)).encode(),
                                            tensors=_pack(tensors, [self.codec]))
        self._queue.put_nowait(message)
        self.traffic += self.connection.count(message.tensors, ())

    async def result(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor]) -> tuple[runtime_pb2.Tensor, InferenceReply]:
        """The output of the next step, submitted here or pushed by the previous server, as the server packed it; the
        step's `tensors` (its inputs) go into the history."""
        try:
            reply = await self._next_reply()
        except RemoteError as exc:
            self.failed = exc.server_gone  # not a refusal
            raise
        meta = InferenceReply.decode(reply.metadata)
        if len(reply.tensors) != 1:
            raise RemoteError("bad_reply", f"an inference step's reply has {len(reply.tensors)} tensors, not 1", str(self.step.peer_id))
        self.history.append(list(tensors))
        self.traffic += self.connection.count((), reply.tensors)
        self.position = meta.position
        self.step_id += 1
        return reply.tensors[0], meta

    async def send(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor]) -> torch.Tensor:
        self.submit(tensors)
        output, _ = await self.result(tensors)
        return unpack_tensor(output, "server output")

    async def close(self) -> None:
        self._queue.put_nowait(None)
        if self._replies is not None:
            try:
                await asyncio.wait_for(anext(self._replies, None), 1.0)
            except Exception:  # noqa: BLE001 - the server may already be gone; nothing to recover
                pass


class TrainStream:
    """A forward whose backward follows on the same stream (rpc_train), so the server need not recompute it.

    The server keeps the activations only while this request is open; `abandon()` ends it without a backward.
    """

    def __init__(self, connection: SwarmConnection, step: RouteStep, grad_codec: str | None = None):
        self.connection, self.step = connection, step
        self.grad_codec = grad_codec  # codec of the gradient message
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replies = None

    async def forward(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor], lora_names: Sequence[str],
                      lora_scaling: float, codecs: Sequence[str | None] = (), decode_reply=None, **fields) -> torch.Tensor:
        """Send the forward and return its output (`decode_reply(reply)` when given, e.g. for delta-coded replies)."""
        async def requests():
            while (message := await self._queue.get()) is not None:
                yield message

        meta = SpanRequest(start=self.step.start, end=self.step.end, lora=list(lora_names), lora_scaling=lora_scaling, **fields)
        packed = _pack(tensors, codecs)
        self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=packed))
        try:
            self._replies = await asyncio.wait_for(open_stream(self.connection.p2p, self.connection.prefix, self.step.peer_id,
                                                                   "rpc_train", requests()),
                                                   CLIENT.connect_timeout)
            reply = await self._next_reply()
        except TRANSPORT_ERRORS as exc:
            self.abandon()
            raise RemoteError.from_exception(exc, str(self.step.peer_id)) from None
        except BaseException:
            self.abandon()
            raise
        self.connection.count(packed, reply.tensors)
        return decode_reply(reply) if decode_reply is not None else unpack_tensor(reply.tensors[0], "server output")

    async def backward(self, grad_output: torch.Tensor | runtime_pb2.Tensor) -> list[runtime_pb2.Tensor]:
        """Send the output gradient (a packed slot goes as it is, see `relayed`); the reply's tensors, still packed:
        the input's gradient (if the forward asked for it), then the LoRA and deep-prompt gradients."""
        if isinstance(grad_output, runtime_pb2.Tensor):
            grad_output = relayed(grad_output, self.grad_codec, "server gradient")
        message = runtime_pb2.ExpertRequest(metadata=TrainGrad().encode(), tensors=_pack([grad_output], [self.grad_codec]))
        self._queue.put_nowait(message)
        try:
            reply = await self._next_reply()
        finally:
            self.abandon()
        self.connection.count(message.tensors, reply.tensors)
        return list(reply.tensors)

    def abandon(self) -> None:
        """End the request (call on the client's loop); the server frees the activations it kept."""
        self._queue.put_nowait(None)

    async def _next_reply(self) -> runtime_pb2.ExpertResponse:
        return await _next_reply(self._replies, self.connection.request_timeout, self.step, "training stream")


async def open_stream(p2p: P2P, prefix: str, peer_id, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest]
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Call a streaming RPC of BlockService: as `BlockService.get_stub(p2p, peer_id, namespace=prefix).<method>(requests)`,
    except that the replies end as soon as the connection closes.

    hivemind's stream call, on a closed connection, waits for the request stream to end before it ends the replies;
    ours waits for a reply before it sends more, so a server killed mid-session went unnoticed until the request timeout.
    """
    name = BlockService._get_handle_name(prefix, method)
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, name)

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    async def read() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            while True:
                try:
                    reply, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                except asyncio.IncompleteReadError:
                    return  # the connection closed: the server finished, or it is gone
                if error is not None:  # worded as hivemind's, which RemoteError.from_exception parses
                    raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {error.message}")
                yield reply
        finally:
            writing.cancel()
            if writing.done() and not writing.cancelled():
                writing.exception()  # a write to a closed connection: the read above has told the caller
            writer.close()

    writing = asyncio.create_task(write())
    return read()


async def _next_reply(replies, timeout: float, step: RouteStep, what: str) -> runtime_pb2.ExpertResponse:
    """The next message of a server's reply stream, with transport failures and an early end as RemoteError."""
    try:
        reply = await asyncio.wait_for(anext(replies, None), timeout)
    except TRANSPORT_ERRORS as exc:
        raise RemoteError.from_exception(exc, str(step.peer_id)) from None
    if reply is None:
        raise RemoteError("transport", f"server closed the {what}", str(step.peer_id))
    return reply


def _check_peer_id(text: str) -> None:
    """A peer id is a base58 multihash (a code, the digest's length, the digest), e.g. "Qm..." or "12D3Koo..."."""
    raw = PeerID.from_base58(text).to_bytes()
    if len(raw) < 3 or raw[1] != len(raw) - 2:
        raise ValueError(f"{text!r} is not a multihash")


def relayed(packed: runtime_pb2.Tensor, codec: str | None, what: str = "server output") -> runtime_pb2.Tensor | torch.Tensor:
    """A server's packed hidden states (or their gradient) as the input of a request that takes `codec`: the same
    bytes where they came in that codec, so that every hop's tensor is encoded once (encoding a decoded tensor again
    adds error: 2.5% relative for int5_outlier on real gradients); else decoded, to be encoded again."""
    if wire.slot_codec(packed.dtype) == (codec or "none"):
        return packed
    return unpack_tensor(packed, what)


def _pack(tensors: Sequence[torch.Tensor | runtime_pb2.Tensor], codecs: Sequence[str | None]) -> list[runtime_pb2.Tensor]:
    """Tensors for the wire, tensors[i] encoded with codecs[i] where one is given (see swarm.compression); slots
    already packed pass as they are."""
    return [t if isinstance(t, runtime_pb2.Tensor) else pack_tensor(t, codecs[i] if i < len(codecs) else None)
            for i, t in enumerate(tensors)]
