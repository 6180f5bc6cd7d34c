"""Inference sessions of a server: KV-cached steps that come on the client's stream or are pushed by the previous
server of the client's route, and the push of each step's output straight to the next server (swarm.forwarding)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from server.backend import InferenceState, check_codec, check_hypo_ids, check_tensor_count, unpack_request
from server.batching import DECODE_TOKENS, Step, batch_key, run_steps
from server.compute_queue import Batchable
from swarm.compression import wire
from swarm.config import MAX_UNARY_PAYLOAD_BYTES
from swarm.errors import BadRequest, LimitReached, RemoteError, ServerLeaving
from swarm.forwarding import ForwardHop, ForwardStep, PushStep
from swarm.ingress import Ticket
from swarm.kv_cache import session_bytes
from swarm.protocol import InferenceOpen, InferenceReply
from swarm.service import BlockService
from swarm.tensors import pack_tensor, payload_bytes, raw_bytes, tensor_bytes, unpack_tensor

logger = logging.getLogger(__name__)


@dataclass
class OpenSession:
    """One open inference stream: its KV cache, and the steps waiting for it (from the client or pushed)."""

    meta: InferenceOpen
    state: InferenceState
    peer: str  # the client's peer id: whose budget share the session holds
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # ExpertRequest | (PushStep, tensors, charge) | PushFailed | Evicted | None
    steps: int = 0  # steps done: the next one must carry this number
    pushed: int = -1  # the last step a push was accepted for (one push per step may wait in the inbox)
    # Released when the client's message in the inbox has been handled: the stream is read one message at a time,
    # so a client cannot pile up messages here (each is charged only until the next is read: swarm.ingress).
    handled: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    link: PushLink | None = None  # the stream this session's steps are pushed on to the next server with
    push_task: asyncio.Task | None = None  # the latest push (each waits for the one before it)


@dataclass(frozen=True)
class Evicted:
    """An inbox item: the session was ended to make room for a peer that holds less (server.fair_share)."""

    reason: str


@dataclass(frozen=True)
class PushFailed:
    """An inbox item: the push of the session's step `step` failed after its reply went; tell the client."""

    step: int
    error: str


class PushLink:
    """A stream to the next server of a session's route that carries the session's pushed steps, one acceptance
    per step. A message on an open stream costs about half a unary call (0.45 vs 0.8-1.0 ms round trip here)."""

    def __init__(self, peer_id: str, session_id: str):
        self.target = (peer_id, session_id)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replies = None

    async def open(self, p2p, prefix: str, timeout: float) -> None:
        async def requests():
            while (message := await self._queue.get()) is not None:
                yield message

        stub = BlockService.get_stub(p2p, PeerID.from_base58(self.target[0]), namespace=prefix)
        self._replies = await asyncio.wait_for(stub.rpc_push_stream(requests()), timeout)

    async def push(self, request: runtime_pb2.ExpertRequest, timeout: float) -> None:
        self._queue.put_nowait(request)
        if await asyncio.wait_for(anext(self._replies, None), timeout) is None:
            raise ConnectionError("the next server closed the push stream")

    def close(self) -> None:
        self._queue.put_nowait(None)


class InferenceRpcs:
    """rpc_inference and rpc_push of server.handler.BlockHandler, which provides the backend, the cache budget, the
    compute thread, statistics and error handling (_compute, _guard, _guarded, _count)."""

    def _init_inference(self, push_timeout: float, cache_wait: float) -> None:
        self.cache_wait = cache_wait  # how long a session waits for KV-cache memory (ServerConfig.cache_wait)
        self.sessions: dict[str, OpenSession] = {}  # by the session id clients push under
        self.push_timeout = push_timeout
        self.p2p = None  # set by attach(): pushes need this server's own P2P node
        self.prefix = ""

    def attach(self, p2p, prefix: str) -> None:
        """Give the handler this server's P2P node and DHT prefix, so it can push steps to other servers."""
        self.p2p, self.prefix = p2p, prefix

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        first = await anext(requests, None)
        if first is None:
            return
        peer, holding, inbox = str(context.remote_id), object(), asyncio.Queue()
        with self._guarded("inference session"):
            if self.leaving:
                raise ServerLeaving("this server is leaving the swarm and takes no new sessions")
            meta = InferenceOpen.decode(first.metadata)
            self.backend.check_span(meta.start, meta.end)
            check_codec(meta.reply_codec)
            check_codec(meta.input_codec)
            if meta.session_id and meta.session_id in self.sessions:
                raise BadRequest(f"session id {meta.session_id} is already in use on this server; open with another")
            if meta.batch_size > self.backend.limits.max_batch_size:
                raise BadRequest(f"batch size {meta.batch_size} exceeds this server's limit of {self.backend.limits.max_batch_size}")
            if meta.max_length > self.backend.max_position:
                raise BadRequest(f"max_length {meta.max_length} exceeds the model's {self.backend.max_position} positions")
            check_tensor_count(len(first.tensors), self.backend.limits)
            lora_tensors = [unpack_tensor(t, f"opening tensor {i}") for i, t in enumerate(first.tensors)]
            first = None  # decoded: the message is not kept for the session's life (its charge ends at the next read)
            prompts = None
            if meta.deep_prompts:
                if not lora_tensors:
                    raise BadRequest("deep_prompts is set but the opening message carries no prompts tensor")
                prompts = self.backend.check_prompts(lora_tensors.pop(0), meta.start, meta.end, meta.batch_size)
            lora_pairs, lora_scaling = self.backend.resolve_lora(meta.start, meta.end, meta.adapter, meta.lora, lora_tensors,
                                                                 meta.lora_scaling)
            # A session that holds more than its share gives way to one that holds less: it ends on its next turn. The
            # tensors it opened with (LoRA, prompts) are kept as long as it lives: they hold in-flight memory as long.
            opening = self._keep(peer, tensor_bytes([*lora_tensors, *([prompts] if prompts is not None else [])]), inbox)
            try:
                nbytes = session_bytes(meta.batch_size, meta.max_length, meta.end - meta.start, self.backend.kv_token_bytes)
                await self.budget.acquire_waiting(peer, holding, nbytes, lambda reason: inbox.put_nowait(Evicted(reason)),
                                                  self.cache_wait)
            except BaseException:
                self.compute.release(opening)
                raise
        self.stats.sessions_open += 1
        reader = session = None
        try:
            state = InferenceState(self.backend, meta.start, meta.end, meta.batch_size, meta.max_length,
                                   lora_pairs, lora_scaling, prompts)
            session = OpenSession(meta, state, peer, inbox)
            if meta.session_id:
                self.sessions[meta.session_id] = session
            yield runtime_pb2.ExpertResponse(metadata=InferenceReply(cache_tokens_left=self.budget.tokens_left).encode())
            reader = asyncio.create_task(_read_stream(requests, session.inbox, session.handled))
            while True:
                try:
                    item = await asyncio.wait_for(session.inbox.get(), timeout=self.session_timeout)
                except asyncio.TimeoutError:
                    raise BadRequest(f"session was idle for over {self.session_timeout:.0f} s and was closed") from None
                if item is None:
                    break
                if isinstance(item, Evicted):
                    raise LimitReached(item.reason)
                self.budget.touch(holding)
                if self.leaving:
                    raise ServerLeaving(f"this server is leaving the swarm; continue the session elsewhere "
                                        f"(it held {state.position} tokens)")
                try:
                    response = await self._guard("inference", self._inference_step(session, item))
                finally:
                    if isinstance(item, runtime_pb2.ExpertRequest):
                        session.handled.release()
                    elif isinstance(item, tuple):  # a pushed step: its tensors are done with
                        self.compute.release(item[2])
                if response is not None:
                    yield response
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                if session.push_task is not None:
                    session.push_task.cancel()  # the client is gone: nobody waits for that push any more
                if session.link is not None:
                    session.link.close()
                if self.sessions.get(meta.session_id) is session:
                    del self.sessions[meta.session_id]
            self.stats.sessions_open -= 1
            self.budget.release(holding)
            self.compute.release(opening)
            while not inbox.empty():  # pushed steps that never ran
                if isinstance(item := inbox.get_nowait(), tuple):
                    self.compute.release(item[2])

    def _keep(self, peer: str, nbytes: int, inbox: asyncio.Queue) -> Ticket:
        """A charge of the in-flight budget for what a session keeps of `peer`'s (opening tensors, a pushed step
        waiting its turn); should the budget end it for a peer that holds less, the session ends on its next turn."""
        ticket = Ticket(peer, nbytes, on_end=[lambda reason: inbox.put_nowait(Evicted(reason))])
        if nbytes:
            self.compute.admit(ticket)
        return ticket

    async def _inference_step(self, session: OpenSession, item) -> runtime_pb2.ExpertResponse | None:
        """Run one step (a client's message or a validated push); None for a step that was already done."""
        if isinstance(item, PushFailed):  # a report for the client, on its stream, as soon as the push failed
            reply = InferenceReply(position=session.state.position, push_failed=item.step, forward_error=item.error)
            return runtime_pb2.ExpertResponse(metadata=reply.encode())
        if isinstance(item, runtime_pb2.ExpertRequest):
            meta, tensors, received = ForwardStep.decode(item.metadata), unpack_request(item.tensors, self.backend.limits), item.tensors
        else:
            (meta, tensors, _), received = item, ()  # a push: validated and counted by rpc_push
        if meta.step < session.steps:
            # Both the previous server's push and the client (after that push looked lost) sent it: the step is done
            # and answered once, with the same inputs either way.
            logger.debug("step %d arrived again; it was done already", meta.step)
            return None
        if meta.step > session.steps:
            raise BadRequest(f"step {meta.step} arrived before step {session.steps}")
        self._check_route(meta.forward)
        inputs = self.backend.check_inputs(tensors)
        step = Step(session.state, inputs, meta.hypo_ids)
        if inputs.hidden.shape[1] <= DECODE_TOKENS:  # batched with other sessions' steps, ahead of bulk work
            output = await self._compute(session.peer, tensor_bytes(tensors), None,
                                         step=Batchable(batch_key(step), step, run_steps, step.rows))
        else:  # a prefill: bulk work, a block at a time
            output = await self._compute(session.peer, tensor_bytes(tensors), session.state.step_chunks, inputs,
                                         meta.hypo_ids)
        output = output.to(tensors[0].dtype)
        session.steps += 1
        reply = InferenceReply(position=session.state.position, cache_tokens_left=self.budget.tokens_left)
        if meta.forward:
            # The next server and the client get the same bytes: the client's copy is that server's input history.
            hidden = pack_tensor(output, meta.forward[0].codec or None)
            error = self._start_push(session, meta, hidden, tensors[1:])
            reply = reply.model_copy(update={"forwarded": not error, "forward_error": error})
        else:
            hidden = pack_tensor(output, session.meta.reply_codec or None)
        response = runtime_pb2.ExpertResponse(tensors=[hidden], metadata=reply.encode())
        self._count("inference", received, response.tensors)
        return response

    def _check_route(self, hops: list[ForwardHop]) -> None:
        for hop in hops:
            check_codec(hop.codec)
            if self.p2p is not None and hop.peer_id == str(self.p2p.peer_id):
                raise BadRequest("the forward route names this server itself")

    def _start_push(self, session: OpenSession, meta: ForwardStep, hidden: runtime_pb2.Tensor,
                    extra: list[torch.Tensor]) -> str:
        """Start pushing a step's output into the next server's session, after the session's earlier pushes, without
        waiting for it (the reply to the client goes at once); returns "" or why it cannot be pushed at all. A push
        that fails later is reported on the client's stream (PushFailed), and the client sends that hop itself."""
        if self.p2p is None:
            return "this server has no P2P node to push with"
        hop = meta.forward[0]
        request = runtime_pb2.ExpertRequest(
            metadata=PushStep(step=hop.step, forward=meta.forward[1:], session_id=hop.session_id,
                              hypo_ids=meta.hypo_ids).encode(),
            tensors=[hidden, *(pack_tensor(t) for t in extra)])
        size = payload_bytes(request.tensors)
        if size > MAX_UNARY_PAYLOAD_BYTES:
            return f"a push of {size} bytes exceeds the {MAX_UNARY_PAYLOAD_BYTES}-byte message limit"
        session.push_task = asyncio.create_task(self._push_after(session, session.push_task, meta.step, hop, request))
        return ""

    async def _push_after(self, session: OpenSession, previous: asyncio.Task | None, step: int, hop: ForwardHop,
                          request: runtime_pb2.ExpertRequest) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # pushes of a session go out in order (its outcome is reported by itself)
        error = await self._push(session, hop, request)
        if error:
            session.inbox.put_nowait(PushFailed(step, error))

    async def _push(self, session: OpenSession, hop: ForwardHop, request: runtime_pb2.ExpertRequest) -> str:
        """Push a step into the next server's session, on the session's push stream to it (opened on first use);
        returns "" or why that failed."""
        try:
            if session.link is None or session.link.target != (hop.peer_id, hop.session_id):  # new, or the route changed
                if session.link is not None:
                    session.link.close()
                session.link = PushLink(hop.peer_id, hop.session_id)
                await session.link.open(self.p2p, self.prefix, self.push_timeout)
            await session.link.push(request, self.push_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means: let the client drive this hop
            if session.link is not None:
                session.link.close()
                session.link = None
            error = RemoteError.from_exception(exc, hop.peer_id)
            logger.info("could not push step %d to %s: [%s] %s", hop.step, hop.peer_id[-8:], error.code, error.message[:200])
            return f"[{error.code}] {error.message}"[:1000]
        self.stats.bytes_out += payload_bytes(request.tensors)
        self.stats.raw_out += raw_bytes(request.tensors)
        return ""

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        """Accept a step for an open session from the previous server of its route; it runs in the session's order."""
        with self._guarded("push"):
            meta = PushStep.decode(request.metadata)
            session = self.sessions.get(meta.session_id)
            if session is None:
                raise BadRequest(f"no inference session {meta.session_id} is open here (never opened, closed or expired)")
            if self.leaving:
                raise ServerLeaving("this server is leaving the swarm and takes no pushed steps")
            if meta.step != session.steps:
                raise BadRequest(f"pushed step {meta.step} does not follow this session's {session.steps} steps")
            if meta.step == session.pushed:
                raise BadRequest(f"step {meta.step} was pushed already")
            self._check_route(meta.forward)
            if not request.tensors:
                raise BadRequest("a push carries hidden states, position ids and an optional attention mask; got no tensors")
            codec, expected = wire.slot_codec(request.tensors[0].dtype), session.meta.input_codec or "none"
            if codec != expected:
                raise BadRequest(f"pushed hidden states are in codec {codec!r:.70}; this session takes {expected!r}")
            tensors = unpack_request(request.tensors, self.backend.limits)
            hidden = self.backend.check_inputs(tensors, on_device=False).hidden  # moved when its step runs
            if hidden.shape[0] != session.state.batch_size:
                raise BadRequest(f"session was opened for batch size {session.state.batch_size}, push has {hidden.shape[0]}")
            check_hypo_ids(meta.hypo_ids, session.state.batch_size)
            kept = self._keep(str(context.remote_id), tensor_bytes(tensors), session.inbox)  # until the step has run
            session.pushed = meta.step
            session.inbox.put_nowait((meta, tensors, kept))
        self._count("push", request.tensors)
        return runtime_pb2.ExpertResponse(metadata=InferenceReply(position=session.state.position).encode())

    async def rpc_push_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        """rpc_push for each message of a stream; a refused push ends the stream with its error."""
        async for request in requests:
            yield await self.rpc_push(request, context)


async def _read_stream(requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue,
                       handled: asyncio.Semaphore) -> None:
    """Move a client's messages into its session's inbox, each once the one before it was handled, then None when the
    client ends the stream (or it breaks)."""
    try:
        async for request in requests:
            inbox.put_nowait(request)
            await handled.acquire()
    except Exception as exc:  # noqa: BLE001 - a broken stream ends the session like a closed one
        logger.debug("inference stream broke: %s", exc)
    finally:
        inbox.put_nowait(None)
