"""RPC handlers of a server: decode and validate each request, run it on the compute thread, reply.

One code path per operation; unary and streamed transports are thin wrappers around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from server.backend import Adaptation, SpanBackend, check_codec, check_tensor_count, unpack_request
from server.cache_budget import ActivationBudget, SessionBudget
from server.compute_queue import FairCompute
from server.delta_state import ServerDelta
from server.inference import InferenceRpcs
from server.lora_cache import LoraCache
from swarm import lora
from swarm.config import ServerConfig
from swarm.errors import BadRequest, LoraNotCached, SwarmError
from swarm.protocol import SpanReply, SpanRequest, TrainGrad
from swarm.streaming import join_message, split_message
from swarm.tensors import pack_tensor, payload_bytes, raw_bytes, tensor_bytes, unpack_tensor

logger = logging.getLogger(__name__)


# The streamed requests whose every message is kept until the request ends (a forward or backward in chunks, a
# training stream's forward until its backward): their messages stay charged to the in-flight budget until then.
KEEPS_MESSAGES = ("rpc_forward_stream", "rpc_backward_stream", "rpc_train")


@dataclass
class TrafficStats:
    requests: int = 0
    errors: int = 0  # requests refused or failed (counted apart from `requests`)
    sessions_open: int = 0
    bytes_in: int = 0  # on the wire
    bytes_out: int = 0
    raw_in: int = 0  # the same tensors uncompressed
    raw_out: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # requests served, by kind
    compute_s: dict[str, float] = field(default_factory=dict)  # seconds on the compute thread, by request kind


class BlockHandler(InferenceRpcs):
    """Implements the methods of swarm.service.BlockService for one span (inference sessions: server.inference)."""

    def __init__(self, backend: SpanBackend, budget: SessionBudget, info: Callable[[], dict], config: ServerConfig):
        self.backend, self.budget, self.info = backend, budget, info
        self.session_timeout = config.request_timeout
        self.max_lora_bytes = int(config.max_lora_mb * 2**20)
        self.lora_cache = LoraCache(int(config.lora_cache_mb * 2**20), config.lora_cache_ttl)
        self.activations = ActivationBudget(int(config.train_activation_mb * 2**20))
        self.delta = ServerDelta(int(config.delta_state_mb * 2**20), config.delta_state_ttl)
        # The largest forward/backward a client can need: hidden states and their gradient for the most tokens a
        # request may hold, positions and mask, and the most LoRA bytes. Streams are cut off beyond it.
        tokens, hidden = backend.limits.max_chunk_tokens, backend.hidden_size
        self.max_request_bytes = 2 * tokens * hidden * 4 + 16 * tokens + self.max_lora_bytes + (1 << 20)
        # The compute queue: requests run one batch or chunk at a time, off the event loop, each peer in its fair turn.
        self.stats = TrafficStats()
        self.compute = FairCompute(int(config.inflight_mb * 2**20), max_batch_rows=config.batch_rows,
                                   account=self._account)
        self.leaving = False  # set on shutdown: open inference sessions are told to move on their next step
        self._init_inference(config.push_timeout, config.cache_wait)

    async def _compute(self, peer: str, nbytes: int, fn, *args, ticket=None, step=None):
        """`fn(*args)` (or the decode `step`, server.compute_queue.Batchable) on the compute thread in `peer`'s turn,
        for a request of `nbytes` (the in-flight budget), or that holds the charge `ticket` since it arrived
        (swarm.ingress)."""
        return await self.compute.run(peer, nbytes, fn, *args, ticket=ticket, step=step)

    def _account(self, kind: str, seconds: float) -> None:
        self.stats.compute_s[kind] = self.stats.compute_s.get(kind, 0.0) + seconds

    def _count(self, kind: str, request_tensors, response_tensors=()) -> None:
        self.stats.requests += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self.stats.bytes_in += payload_bytes(request_tensors)
        self.stats.bytes_out += payload_bytes(response_tensors)
        self.stats.raw_in += raw_bytes(request_tensors)
        self.stats.raw_out += raw_bytes(response_tensors)

    @contextlib.contextmanager
    def _guarded(self, kind: str):
        """Count and log failures; unexpected ones become a clear remote error, expected ones pass as they are."""
        try:
            yield
        except SwarmError as exc:
            self.stats.errors += 1
            logger.info("%s rejected: %s", kind, exc)
            raise
        except Exception as exc:
            self.stats.errors += 1
            logger.exception("%s failed", kind)
            raise SwarmError(f"internal server error in {kind}: {type(exc).__name__}: {exc}") from None

    async def _guard(self, kind: str, coro):
        with self._guarded(kind):
            return await coro

    # ------------------------------------------------------------------------------------ info

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=json.dumps(self.info()).encode())

    # ------------------------------------------------------------------------------------ forward / backward

    def _prepare(self, kind: str, meta: SpanRequest, tensors: list[torch.Tensor], peer: str):
        """Validate a forward/backward request (its tensors: see SpanRequest): (inputs, output gradient or None,
        adaptation, reference tensors, which give each gradient's dtype: the input, each LoRA tensor, the prompts)."""
        self.backend.check_span(meta.start, meta.end)
        check_codec(meta.reply_codec)
        check_codec(meta.grad_reply_codec)
        tensors, lora_tensors = self._lora_tensors(meta, tensors, peer)
        needed = 2 + (kind == "backward") + meta.deep_prompts
        if len(tensors) < needed:
            extras = (", deep prompts" if meta.deep_prompts else "") + (", the output gradient" if kind == "backward" else "")
            raise BadRequest(f"expected hidden states, position ids, an optional attention mask{extras} and LoRA tensors "
                             f"as named; got {len(tensors)} tensors besides LoRA")
        grad_output = tensors.pop() if kind == "backward" else None
        raw_prompts = tensors.pop() if meta.deep_prompts else None
        inputs = self.backend.check_inputs(tensors)
        prompts = None
        if raw_prompts is not None:
            prompts = self.backend.check_prompts(raw_prompts, meta.start, meta.end, inputs.hidden.shape[0])
        adapt = Adaptation(meta.lora, lora_tensors, meta.lora_scaling, meta.adapter, meta.lora_dropout, meta.dropout_seed, prompts)
        reference = [tensors[0], *lora_tensors] + ([raw_prompts] if raw_prompts is not None else [])
        return inputs, grad_output, adapt, reference

    async def _span_call(self, kind: str, metadata: bytes, protos, peer: str, ticket=None) -> list[runtime_pb2.Tensor]:
        """Forward: [output]. Backward: [grad w.r.t. input (if meta.input_grad), each LoRA tensor in request order,
        deep prompts if sent]. `ticket`: the charge the request holds since it arrived (a unary one)."""
        meta = SpanRequest.decode(metadata)
        tensors = unpack_request(protos, self.backend.limits)
        nbytes = tensor_bytes(tensors)
        inputs, grad_output, adapt, reference = self._prepare(kind, meta, tensors, peer)
        if kind == "forward":
            output = await self._compute(peer, nbytes, self.backend.forward, inputs, meta.start, meta.end, adapt,
                                         ticket=ticket)
            return _pack_reply([output.to(reference[0].dtype)], meta.reply_codec)
        grads = await self._compute(peer, nbytes, self.backend.backward, inputs, grad_output, meta.start, meta.end,
                                    adapt, meta.input_grad, ticket=ticket)
        return _pack_grads(grads, reference, meta.reply_codec, meta.input_grad)

    def _lora_tensors(self, meta: SpanRequest, tensors: list[torch.Tensor], peer: str):
        """Split the request's tensors into inputs and LoRA tensors, or find the LoRA tensors it names by digest."""
        if meta.lora_by_digest:
            if not meta.lora_digest or not meta.lora:
                raise BadRequest("lora_by_digest needs lora_digest and the LoRA tensor names")
            cached = self.lora_cache.get(peer, meta.lora_digest, meta.lora)
            if cached is None:
                raise LoraNotCached(f"LoRA tensors {meta.lora_digest} are not (or no longer) cached here; send them again")
            return tensors, cached
        if len(meta.lora) >= len(tensors):
            raise BadRequest(f"metadata names {len(meta.lora)} LoRA tensors but the request carries {len(tensors)} tensors")
        split = len(tensors) - len(meta.lora)
        tensors, lora_tensors = tensors[:split], tensors[split:]
        nbytes = sum(t.numel() * t.element_size() for t in lora_tensors)
        if nbytes > self.max_lora_bytes:
            raise BadRequest(f"LoRA tensors of {nbytes / 2**20:.1f} MiB exceed this server's limit of "
                             f"{self.max_lora_bytes / 2**20:.1f} MiB per request; use a lower rank or fewer target modules")
        if meta.lora_digest and lora_tensors:
            if lora.digest(meta.lora, lora_tensors) != meta.lora_digest:
                raise BadRequest("lora_digest does not match the LoRA tensors of the request")
            lora.parse_lora(meta.lora, lora_tensors, self.backend.layers(meta.start, meta.end), self.backend.dtype)  # validate first
            lora_tensors = self.backend.lora_on_device(meta.lora, lora_tensors)  # cached where they are used
            self.lora_cache.put(peer, meta.lora_digest, meta.lora, lora_tensors)
        return tensors, lora_tensors

    async def _unary(self, kind: str, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        outputs = await self._guard(kind, self._span_call(kind, request.metadata, request.tensors, str(context.remote_id),
                                                          getattr(context, "ticket", None)))
        response = runtime_pb2.ExpertResponse(tensors=outputs, metadata=SpanReply().encode())
        self._count(kind, request.tensors, response.tensors)
        return response

    async def _stream(self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest], context):
        async def call():
            first = await anext(requests, None)
            if first is None:
                raise BadRequest("empty request stream")
            check_tensor_count(len(first.tensors), self.backend.limits)  # before any of their bytes are kept
            rest, total = [], 0
            async for message in requests:  # stop keeping messages as soon as the stream outgrows any valid request
                total += sum(len(chunk.buffer) for chunk in message.tensors)
                if total <= self.max_request_bytes:
                    rest.append(message)
                elif total > 2 * self.max_request_bytes:
                    break  # a bounded rest was read (and dropped), so a client still writing gets the error, not a reset
            if total > self.max_request_bytes:
                raise BadRequest(f"streamed request exceeds this server's limit of {self.max_request_bytes} bytes")
            protos = join_message(first, rest)
            return protos, await self._span_call(kind, first.metadata, protos, str(context.remote_id))

        protos, outputs = await self._guard(kind, call())
        messages = split_message(SpanReply(), outputs, runtime_pb2.ExpertResponse)
        self._count(kind, protos, [chunk for message in messages for chunk in message.tensors])
        for message in messages:
            yield message

    rpc_forward = functools.partialmethod(_unary, "forward")
    rpc_backward = functools.partialmethod(_unary, "backward")
    rpc_forward_stream = functools.partialmethod(_stream, "forward")
    rpc_backward_stream = functools.partialmethod(_stream, "backward")

    # ------------------------------------------------------------------------------------ training stream

    async def rpc_train(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        """A forward and, on the same stream, its backward: the activations live only as long as this request."""
        first = await anext(requests, None)
        if first is None:
            return
        peer = str(context.remote_id)
        with self._guarded("training stream"):
            meta = SpanRequest.decode(first.metadata)
            protos, commit = first.tensors, None
            check_tensor_count(len(protos), self.backend.limits)
            if meta.delta is None:
                tensors = unpack_request(protos, self.backend.limits)
            else:  # hidden states as full rows and deltas against earlier epochs' references
                check_codec(meta.delta.codec)
                if len(protos) < 2:
                    raise BadRequest("a delta-coded request starts with two tensors: the full rows and the deltas")
                hidden, commit = self.delta.decode_input(meta.delta, protos[0], protos[1], peer, meta.start, meta.end)
                tensors = [hidden, *unpack_request(protos[2:], self.backend.limits, first=2)]
            request_bytes = tensor_bytes(tensors)
            inputs, _, adapt, reference = self._prepare("forward", meta, tensors, peer)
            if commit is not None:
                commit()
            nbytes = self.backend.activation_bytes(*inputs.hidden.shape[:2], meta.start, meta.end)
            stream = object()  # this stream's holding of the activation budget
            self.activations.acquire(peer, stream, nbytes)  # kept activations are in use until the backward: never ended
        kept = None
        try:
            kept = await self._guard("train", self._compute(peer, request_bytes, self.backend.forward_for_backward,
                                                            inputs, meta.start, meta.end, adapt, meta.input_grad))
            output = kept.host_output.to(reference[0].dtype)
            if meta.delta is not None:
                modes, tensors = self.delta.encode_output(meta.delta, output, meta.reply_codec, peer, meta.start, meta.end)
                response = runtime_pb2.ExpertResponse(tensors=tensors, metadata=SpanReply(delta_modes=modes).encode())
            else:
                response = runtime_pb2.ExpertResponse(tensors=_pack_reply([output], meta.reply_codec), metadata=SpanReply().encode())
            self._count("train_forward", first.tensors, response.tensors)
            yield response
            try:
                message = await asyncio.wait_for(anext(requests, None), timeout=self.session_timeout)
            except asyncio.TimeoutError:
                raise BadRequest(f"no gradient came within {self.session_timeout:.0f} s of the forward") from None
            if message is None:
                return  # the client needed no backward after all

            async def backward() -> list[torch.Tensor]:
                TrainGrad.decode(message.metadata)
                if len(message.tensors) != 1:
                    raise BadRequest(f"a gradient message carries one tensor, got {len(message.tensors)}")
                grad_output = unpack_tensor(message.tensors[0], "output gradient")
                self.backend.check_hidden(grad_output, "output gradient")
                grads = await self._compute(peer, tensor_bytes([grad_output]), self.backend.backward_kept, kept, grad_output)
                return _pack_grads(grads, reference, meta.grad_reply_codec, meta.input_grad)

            response = runtime_pb2.ExpertResponse(tensors=await self._guard("train", backward()), metadata=SpanReply().encode())
            self._count("train_backward", message.tensors, response.tensors)
            yield response
        finally:
            kept = None  # noqa: F841 - drop the graph before giving its memory back to the budget
            self.activations.release(stream)

    def shutdown(self) -> None:
        self.compute.shutdown()


def _pack_grads(grads, reference: list[torch.Tensor], codec: str, input_grad: bool) -> list[runtime_pb2.Tensor]:
    """A backward's reply: each gradient in the dtype of the tensor it belongs to (zeros where autograd found no
    path), the input's (if `input_grad`) with `codec`. `reference` lists the input, the LoRA tensors, the prompts."""
    if not input_grad:
        reference, codec = reference[1:], ""
    grads = [(g if g is not None else torch.zeros_like(r)).to(r.dtype) for g, r in zip(grads, reference, strict=True)]
    return _pack_reply(grads, codec)


def _pack_reply(tensors: list[torch.Tensor], codec: str) -> list[runtime_pb2.Tensor]:
    """The reply's tensors on the wire: the first (hidden states or their gradient) with `codec`, the rest as is."""
    return [pack_tensor(t, codec if i == 0 else None) for i, t in enumerate(tensors)]
