"""Inference sessions: one KV-cached stream per route step, and the history needed to rebuild them."""

from __future__ import annotations

import logging
import time

import torch
from hivemind.proto import runtime_pb2

from client import aio
from client.connection import SpanStream, SwarmConnection, relayed
from client.limits import length_chunks, route_limit
from client.routing import NoRouteError
from swarm.config import CLIENT, MAX_UNARY_PAYLOAD_BYTES
from swarm.forwarding import HopTarget, forward_chain
from swarm.protocol import RemoteError, Traffic, unpack_tensor

logger = logging.getLogger(__name__)


class InferenceSession:
    """Sends new tokens' hidden states through a chain of servers that keep the past in their KV caches.

    Usable as a context manager; the streams open on the first step (when the batch size is known).
    `token_ids` keeps the tokens a model-level caller has fed, so `generate()` can continue the session.
    """

    def __init__(self, connection: SwarmConnection, max_length: int, start: int = 0, end: int | None = None,
                 batch_size: int | None = None, lora=None, adapter: str | None = None, prompts=None, codec: str = "none",
                 reply_codec: str | None = None, forwarding: bool = CLIENT.forwarding):
        self.connection, self.max_length = connection, max_length
        # Each server pushes its output straight to the next one (swarm.forwarding) instead of returning it here to be
        # sent on; any failure falls back to the client sending that hop's step itself.
        self.forwarding = forwarding
        self.prompts = prompts  # a client.prompts.RemotePrompts: deep prompts go to each server when its stream opens
        self.codec = codec  # for hidden states sent (see swarm.compression)
        self.reply_codec = codec if reply_codec is None else reply_codec  # for the servers' outputs
        self.virtual_tokens = 0  # shallow prompt tokens this session holds before the caller's tokens
        self.adapter = adapter  # a named adapter hosted by the servers
        self.lora = lora  # a client.lora.RemoteLora; its values are snapshotted when the streams open
        self.start, self.end = start, connection.num_blocks if end is None else end
        self.batch_size = batch_size
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed so far
        self.token_ids: torch.Tensor | None = None  # the last generate() output, kept by the model class
        self.closed = False
        self.recoveries: list[float] = []  # seconds each move of a failed span took (re-route, replay, retry)

    def _stream(self, step, batch_size: int) -> SpanStream:
        names, tensors, scaling = [], [], 1.0
        if self.lora is not None:
            names, params = self.lora.for_blocks(step.start, step.end)
            tensors, scaling = [p.detach().clone() for p in params], self.lora.scaling
        deep = None
        if self.prompts is not None:
            deep = self.prompts.deep_for_blocks(step.start - self.start, step.end - self.start)
        return SpanStream(self.connection, step, batch_size, self.max_length, names, tensors, scaling,
                          self.adapter or "", deep, self.codec, self.reply_codec)

    async def _open_route(self, start: int, end: int, batch_size: int, tried: list[str] | None = None) -> list[SpanStream]:
        """Open streams along a planned route for blocks [start, end).

        A server that is gone when we open (a crashed server's record stays in the DHT for up to 2.5 update
        periods) is banned, added to `tried` and the route planned again, without using up the caller's retries:
        under churn there are more such records than retries. Each server is passed over once, so this ends.
        """
        passed_over: set[str | None] = set()
        while True:
            streams = [self._stream(step, batch_size) for step in self.connection.plan(
                start, end, self.adapter, session_tokens=batch_size * self.max_length, batch_size=batch_size)]
            try:
                for stream in streams:
                    await stream.open()
                return streams
            except BaseException as exc:
                for stream in streams:
                    if stream.failed:
                        self.connection.failed(stream.step.peer_id, exc)
                    await stream.close()
                if not isinstance(exc, RemoteError) or not exc.server_gone or exc.peer in passed_over:
                    raise
                passed_over.add(exc.peer)
                if tried is not None:
                    tried.append(f"{str(exc.peer)[-8:]} ({exc.message[:120]})")

    async def _open(self, batch_size: int) -> None:
        for attempt in range(CLIENT.max_retries + 1):
            try:
                self.streams = await self._open_route(self.start, self.end, batch_size)
                break
            except RemoteError as exc:
                if not exc.server_gone or attempt == CLIENT.max_retries:
                    raise
        logger.debug("opened inference session through %s", [(str(s.step.peer_id)[-6:], s.step.start, s.step.end) for s in self.streams])

    async def _step(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not self.streams:
            await self._open(tensors[0].shape[0])
        step_bytes = sum(t.numel() * t.element_size() for t in tensors)
        inputs: list = list(tensors)  # of the stream at `index`; its hidden states may be a server's packed output
        index, pushed, chain_end = 0, False, 0  # streams index+1..chain_end were named in a forwarded step
        while index < len(self.streams):
            stream = self.streams[index]
            try:
                if not pushed:  # the client sends this hop itself, naming the later hops that take pushes
                    forward = forward_chain(self._targets(), index, step_bytes, MAX_UNARY_PAYLOAD_BYTES) if self.forwarding else []
                    stream.submit(inputs, forward)
                    chain_end = index + len(forward)
                output, reply = await stream.result(inputs)
            except RemoteError as exc:
                if not exc.server_gone:  # a refusal (bad input, a full cache) is the server's answer
                    raise
                output, count = await self._recover(index, inputs, exc)
                index, pushed = index + count, False
                inputs = [_input_for(output, self.streams[index] if index < len(self.streams) else None), *tensors[1:]]
                continue
            pushed = index < chain_end and reply.forwarded
            if index < chain_end and not reply.forwarded:
                following = self.streams[index + 1]
                following.accepts_pushes = False  # the client sends it its steps from now on
                logger.info("server %s could not push to %s (%s); sending that hop from the client instead",
                            str(stream.step.peer_id)[-6:], str(following.step.peer_id)[-6:], reply.forward_error[:200])
            index += 1
            inputs = [_input_for(output, self.streams[index] if index < len(self.streams) else None), *tensors[1:]]
        return inputs[0]  # decoded: no stream follows

    def _targets(self) -> list[HopTarget]:
        return [HopTarget(str(s.step.peer_id), s.session_id, s.step_id, s.codec, s.accepts_pushes) for s in self.streams]

    async def _recover(self, index: int, inputs: list, error: RemoteError) -> tuple[runtime_pb2.Tensor, int]:
        """Replace the failed stream `index` by a route of other servers for its blocks: open sessions there, replay
        every input that stream took (one message each, as first sent, so the new KV caches hold exactly the same
        values), then send `inputs`. Returns the packed output and how many streams took its place."""
        failed = self.streams[index]
        start, end, history = failed.step.start, failed.step.end, failed.history
        tried = [f"{str(failed.step.peer_id)[-8:]} ({error.message[:120]})"]
        began = time.perf_counter()
        self.connection.failed(failed.step.peer_id, error)
        await failed.close()
        for _ in range(CLIENT.max_retries):
            try:
                streams = await self._open_route(start, end, failed.batch_size, tried)  # bans servers that fail to open
            except NoRouteError as exc:
                tried.append(f"a new route ({exc})")
                break
            except RemoteError as exc:
                tried.append(f"{str(exc.peer)[-8:]} ({exc.message[:120]})")
                continue
            try:
                for past in [*history, inputs]:
                    hidden = past[0]
                    for i, stream in enumerate(streams):
                        step = [_input_for(hidden, stream) if i else hidden, *past[1:]]
                        stream.submit(step)
                        hidden, _ = await stream.result(step)
            except RemoteError as exc:
                culprit = next((s for s in streams if s.failed), streams[0])
                tried.append(f"{str(culprit.step.peer_id)[-8:]} ({exc.message[:120]})")
                self.connection.failed(culprit.step.peer_id, exc)
                for stream in streams:
                    await stream.close()
                continue
            self.streams[index : index + 1] = streams
            self.recoveries.append(time.perf_counter() - began)
            logger.info("blocks %d:%d moved to %s after a failure; replayed %d steps in %.2f s", start, end,
                        [str(s.step.peer_id)[-6:] for s in streams], len(history), self.recoveries[-1])
            return hidden, len(streams)
        raise RemoteError("transport", f"blocks {start}:{end} failed and could not be moved; tried: {'; '.join(tried)}")

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens [batch, length, hidden] through every block; returns the last block's output."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, length, _ = hidden.shape
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"session is for batch size {self.batch_size}, got {batch}")
        if self.position + length > self.max_length:
            raise ValueError(
                f"the session holds {self.position} tokens and max_length={self.max_length}: {length} more do not fit. "
                "Open the session with a larger max_length"
            )
        if position_ids is None:
            position_ids = torch.arange(self.position, self.position + length).expand(batch, length)
        tensors = [hidden.detach(), position_ids.expand(batch, length).to(torch.int64).contiguous()]
        if attention_mask is not None:
            tensors.append(attention_mask.to(torch.int64).contiguous())
        if not self.streams:
            aio.run(self._open(batch))
        # A long prompt goes in pieces that every server of the route takes (their KV caches make it one step).
        pieces = length_chunks(batch, length, route_limit([stream.step for stream in self.streams]))
        output = torch.cat([aio.run(self._step([t[:, piece] for t in tensors])) for piece in pieces], dim=1)
        self.batch_size = batch
        self.position += length
        return output.to(hidden.dtype)

    @property
    def traffic(self) -> Traffic:
        """Bytes of hidden states this session sent and received over all its hops, raw and on the wire."""
        total = Traffic()
        for stream in self.streams:
            total += stream.traffic
        return total

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        async def close_all():
            for stream in self.streams:
                await stream.close()

        aio.run(close_all())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _input_for(output: runtime_pb2.Tensor, stream: SpanStream | None) -> runtime_pb2.Tensor | torch.Tensor:
    """A server's packed output as the input of `stream` (see `relayed`: the same bytes with forwarding or without),
    or decoded as the route's result when no stream follows."""
    return relayed(output, stream.codec) if stream is not None else unpack_tensor(output, "server output")
