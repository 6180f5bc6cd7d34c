"""RPC handlers of a server: decode and validate each request, run it on the compute thread, reply.

One code path per operation; unary and streamed transports are thin wrappers around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from server.backend import InferenceState, SpanBackend
from server.cache_budget import CacheBudget
from swarm.config import SERVER
from swarm.protocol import (
    BadRequest,
    InferenceOpen,
    InferenceReply,
    InferenceStep,
    SpanReply,
    SpanRequest,
    SwarmError,
    join_message,
    pack_tensor,
    split_message,
    unpack_tensor,
)

logger = logging.getLogger(__name__)


@dataclass
class TrafficStats:
    requests: int = 0
    errors: int = 0
    sessions_open: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class BlockHandler:
    """Implements the methods of swarm.protocol.BlockService for one span."""

    def __init__(self, backend: SpanBackend, budget: CacheBudget, info: Callable[[], dict],
                 session_timeout: float = SERVER.request_timeout):
        self.backend, self.budget, self.info = backend, budget, info
        self.session_timeout = session_timeout
        # One compute thread: requests run one at a time, in arrival order, off the event loop.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.stats = TrafficStats()

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _count(self, kind: str, request_tensors, response_tensors=()) -> None:
        self.stats.requests += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self.stats.bytes_in += sum(len(t.buffer) for t in request_tensors)
        self.stats.bytes_out += sum(len(t.buffer) for t in response_tensors)

    async def _guard(self, kind: str, coro):
        """Turn unexpected failures into a clear remote error; expected ones pass through as they are."""
        try:
            return await coro
        except SwarmError as exc:
            self.stats.errors += 1
            logger.info("%s rejected: %s", kind, exc)
            raise
        except Exception as exc:
            self.stats.errors += 1
            logger.exception("%s failed", kind)
            raise SwarmError(f"internal server error in {kind}: {type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------------------------ info

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=json.dumps(self.info()).encode())

    # ------------------------------------------------------------------------------------ forward / backward

    async def _span_call(self, kind: str, metadata: bytes, protos) -> list[torch.Tensor]:
        """Forward: [output]. Backward: [grad w.r.t. input, grad w.r.t. each LoRA tensor in request order]."""
        meta = SpanRequest.decode(metadata)
        self.backend.check_span(meta.start, meta.end)
        tensors = [unpack_tensor(t, f"tensor {i}") for i, t in enumerate(protos)]
        if len(meta.lora) >= len(tensors):
            raise BadRequest(f"metadata names {len(meta.lora)} LoRA tensors but the request carries {len(tensors)} tensors")
        split = len(tensors) - len(meta.lora)
        tensors, lora_tensors = tensors[:split], tensors[split:]
        lora_args = (meta.lora, lora_tensors, meta.lora_scaling, meta.adapter)
        if kind == "forward":
            inputs = self.backend.check_inputs(tensors)
            outputs = [await self._compute(self.backend.forward, inputs, meta.start, meta.end, *lora_args)]
        else:
            inputs = self.backend.check_inputs(tensors[:-1])
            outputs = await self._compute(self.backend.backward, inputs, tensors[-1], meta.start, meta.end, *lora_args)
            outputs = [g if g is not None else torch.zeros_like(t) for g, t in zip(outputs, [tensors[0], *lora_tensors], strict=True)]
        reference = [tensors[0], *lora_tensors]
        return [out.to(ref.dtype) for out, ref in zip(outputs, reference, strict=False)]

    async def _unary(self, kind: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        outputs = await self._guard(kind, self._span_call(kind, request.metadata, request.tensors))
        response = runtime_pb2.ExpertResponse(tensors=[pack_tensor(t) for t in outputs], metadata=SpanReply().encode())
        self._count(kind, request.tensors, response.tensors)
        return response

    async def _stream(self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        async def call():
            first = await anext(requests, None)
            if first is None:
                raise BadRequest("empty request stream")
            rest = [message async for message in requests]
            protos = join_message(first, rest)
            return protos, await self._span_call(kind, first.metadata, protos)

        protos, outputs = await self._guard(kind, call())
        messages = split_message(SpanReply(), [pack_tensor(t) for t in outputs], runtime_pb2.ExpertResponse)
        self._count(kind, protos, [chunk for message in messages for chunk in message.tensors])
        for message in messages:
            yield message

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        return await self._unary("forward", request)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        return await self._unary("backward", request)

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        async for message in self._stream("forward", requests):
            yield message

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        async for message in self._stream("backward", requests):
            yield message

    # ------------------------------------------------------------------------------------ inference

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        first = await anext(requests, None)
        if first is None:
            return
        try:
            meta = InferenceOpen.decode(first.metadata)
            self.backend.check_span(meta.start, meta.end)
            if meta.batch_size > self.backend.limits.max_batch_size:
                raise BadRequest(f"batch size {meta.batch_size} exceeds this server's limit of {self.backend.limits.max_batch_size}")
            if meta.max_length > self.backend.max_position:
                raise BadRequest(f"max_length {meta.max_length} exceeds the model's {self.backend.max_position} positions")
            lora_tensors = [unpack_tensor(t, f"LoRA tensor {i}") for i, t in enumerate(first.tensors)]
            lora_pairs, lora_scaling = self.backend.resolve_lora(meta.start, meta.end, meta.adapter, meta.lora, lora_tensors,
                                                                 meta.lora_scaling)
            tokens = meta.batch_size * meta.max_length
            self.budget.acquire(tokens)
        except SwarmError as exc:
            self.stats.errors += 1
            logger.info("inference session refused: %s", exc)
            raise
        self.stats.sessions_open += 1
        try:
            state = InferenceState(self.backend, meta.start, meta.end, meta.batch_size, meta.max_length,
                                   lora_pairs, lora_scaling)
            yield runtime_pb2.ExpertResponse(metadata=InferenceReply(cache_tokens_left=self.budget.free).encode())
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests, None), timeout=self.session_timeout)
                except asyncio.TimeoutError:
                    raise BadRequest(f"session was idle for over {self.session_timeout:.0f} s and was closed") from None
                if request is None:
                    break
                output = await self._guard("inference", self._inference_step(state, request))
                response = runtime_pb2.ExpertResponse(
                    tensors=[pack_tensor(output)],
                    metadata=InferenceReply(position=state.position, cache_tokens_left=self.budget.free).encode(),
                )
                self._count("inference", request.tensors, response.tensors)
                yield response
        finally:
            self.stats.sessions_open -= 1
            self.budget.release(tokens)

    async def _inference_step(self, state: InferenceState, request: runtime_pb2.ExpertRequest) -> torch.Tensor:
        InferenceStep.decode(request.metadata)
        tensors = [unpack_tensor(t, f"tensor {i}") for i, t in enumerate(request.tensors)]
        inputs = self.backend.check_inputs(tensors)
        output = await self._compute(state.step, inputs)
        return output.to(tensors[0].dtype)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
