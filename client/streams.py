"""Streams to one server: an inference session's KV-cached steps (SpanStream), a training forward whose backward
follows on the same request (TrainStream), and the packing of a request's tensors."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from client.requests import Additions, Codecs, session_opening
from client.routing import RouteStep
from swarm.compression import wire
from swarm.errors import RemoteError
from swarm.forwarding import ForwardHop, ForwardStep
from swarm.keyed_p2p import KeyedP2P, Sealed
from swarm.protocol import InferenceReply, SpanRequest, TrainGrad
from swarm.service import BlockService
from swarm.tensors import Traffic, pack_tensor, unpack_tensor

if TYPE_CHECKING:
    from client.connection import SwarmConnection

# What a call raises when the server cannot be reached or the link breaks (turned into RemoteError "transport").
TRANSPORT_ERRORS = (P2PHandlerError, P2PDaemonError, asyncio.TimeoutError, ConnectionError, OSError)


class _Stream:
    """A streaming RPC with one server: requests go through a queue (None ends them), replies are read as they come."""

    def __init__(self, connection: SwarmConnection, step: RouteStep):
        self.connection, self.step = connection, step
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replies = None

    async def _open(self, method: str) -> None:
        async def requests():
            while (message := await self._queue.get()) is not None:
                yield message

        try:
            self._replies = await asyncio.wait_for(
                open_stream(self.connection.p2p, self.connection.prefix, self.step.peer_id, method, requests()),
                self.connection.config.connect_timeout)
        except TRANSPORT_ERRORS as exc:
            raise RemoteError.from_exception(exc, str(self.step.peer_id)) from None

    async def _next_reply(self, what: str) -> runtime_pb2.ExpertResponse:
        """The next message of the server's replies, with transport failures and an early end as RemoteError."""
        try:
            reply = await asyncio.wait_for(anext(self._replies, None), self.connection.config.request_timeout)
        except TRANSPORT_ERRORS as exc:
            raise RemoteError.from_exception(exc, str(self.step.peer_id)) from None
        if reply is None:
            raise RemoteError("transport", f"server closed the {what}", str(self.step.peer_id))
        return reply

    def abandon(self) -> None:
        """End the request (call on the client's loop); a training stream's server frees the activations it kept."""
        self._queue.put_nowait(None)


class SpanStream(_Stream):
    """An open inference stream with one server: a KV cache there, one message per step."""

    def __init__(self, connection: SwarmConnection, step: RouteStep, batch_size: int, max_length: int,
                 additions: Additions | None = None):
        super().__init__(connection, step)
        self.additions = additions if additions is not None else Additions(Codecs.uncompressed())
        self.codec = self.additions.codecs.inference  # of the hidden states this stream takes
        self.traffic = Traffic()  # this stream's steps, raw and on the wire
        self.batch_size, self.max_length = batch_size, max_length
        self.step_id = 0
        # Every step's inputs, to replay on a replacement server. The hidden states may be a packed wire tensor: the
        # exact bytes the server took (pushed by the previous server, or relayed as that server sent them).
        self.history: list[list[torch.Tensor | runtime_pb2.Tensor]] = []
        # The id the previous server of the route pushes steps into this session under (swarm.forwarding); False
        # once a push into it failed, after which the client sends this stream its steps itself.
        self.session_id = secrets.token_hex(16)
        self.accepts_pushes = True
        # The server's messages, read as they come: step replies (or the error that ended the stream) in order, and
        # reports that the push of one of this session's steps failed after its reply (by step: the error).
        self._results: asyncio.Queue = asyncio.Queue()
        self._push_failures: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._ended: str | None = None  # why pushes can no longer be confirmed, once the stream ended

    async def open(self) -> None:
        meta, opening = session_opening(self.additions, self.step, self.batch_size, self.max_length, self.session_id)
        try:
            await self._open("rpc_inference")
            self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=[pack_tensor(t) for t in opening]))
            await self._next_reply("inference stream")
            self._reader = asyncio.create_task(self._read())
        except BaseException:
            self.abandon()
            raise

    async def _read(self) -> None:
        """Sort the server's messages into step replies and push-failure reports until the stream ends."""
        peer = str(self.step.peer_id)
        try:
            async for reply in self._replies:
                meta = InferenceReply.decode(reply.metadata)
                if meta.push_failed >= 0:
                    self._push_failure(meta.push_failed).set_result(meta.forward_error or "the push failed")
                else:
                    self._results.put_nowait((reply, meta))
            ended: BaseException = RemoteError("transport", "server closed the inference stream", peer)
        except TRANSPORT_ERRORS as exc:
            ended = RemoteError.from_exception(exc, peer)
        except Exception as exc:  # noqa: BLE001 - e.g. malformed metadata: the stream is unusable, say why
            ended = RemoteError("bad_reply", f"{type(exc).__name__}: {exc}", peer)
        self._results.put_nowait(ended)
        # A push of a stream that ended cannot be confirmed any more: its sender drives that hop itself.
        self._ended = f"the stream of the server that pushes ended ({ended})"
        for future in self._push_failures.values():
            if not future.done():
                future.set_result(self._ended)

    def _push_failure(self, step: int) -> asyncio.Future:
        if step not in self._push_failures:
            self._push_failures[step] = asyncio.get_running_loop().create_future()
            if self._ended is not None:
                self._push_failures[step].set_result(self._ended)
        return self._push_failures[step]

    async def push_failed(self, step: int) -> str:
        """Wait until this server reports that it could not push its output of `step` to the next server (why)."""
        return await asyncio.shield(self._push_failure(step))

    def submit(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor], forward: Sequence[ForwardHop] = (),
               hypo_ids: Sequence[int] = ()) -> None:
        """Send a step's inputs without waiting; the server pushes its output along `forward` (later route hops).
        `hypo_ids` reorders the cached rows first (beam search)."""
        message = runtime_pb2.ExpertRequest(
            metadata=ForwardStep(step=self.step_id, forward=list(forward), hypo_ids=list(hypo_ids)).encode(),
            tensors=pack_inputs(tensors, [self.codec]))
        self._queue.put_nowait(message)
        self.traffic += self.connection.count(message.tensors, ())

    async def result(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor]) -> tuple[runtime_pb2.Tensor, InferenceReply]:
        """The output of the next step, submitted here or pushed by the previous server, as the server packed it; the
        step's `tensors` (its inputs) go into the history."""
        try:
            item = await asyncio.wait_for(self._results.get(), self.connection.config.request_timeout)
        except asyncio.TimeoutError as exc:
            raise RemoteError.from_exception(exc, str(self.step.peer_id)) from None
        if isinstance(item, BaseException):
            self._results.put_nowait(item)  # the stream is over: every later call gets the same error
            raise item
        reply, meta = item
        if len(reply.tensors) != 1:
            raise RemoteError("bad_reply", f"an inference step's reply has {len(reply.tensors)} tensors, not 1", str(self.step.peer_id))
        self.history.append(list(tensors))
        self.traffic += self.connection.count((), reply.tensors)
        self.step_id += 1
        return reply.tensors[0], meta

    async def send(self, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor]) -> torch.Tensor:
        self.submit(tensors)
        output, _ = await self.result(tensors)
        return unpack_tensor(output, "server output")

    async def close(self) -> None:
        self.abandon()
        if self._reader is not None:  # the server ends the stream once it has seen the end of ours
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
            except Exception:  # noqa: BLE001 - the server may already be gone; nothing to recover
                self._reader.cancel()


class TrainStream(_Stream):
    """A forward whose backward follows on the same stream (rpc_train), so the server need not recompute it; it keeps
    the activations only while this request is open (`abandon()` ends it without a backward)."""

    def __init__(self, connection: SwarmConnection, step: RouteStep, grad_codec: str | None = None):
        super().__init__(connection, step)
        self.grad_codec = grad_codec  # codec of the gradient message

    async def forward(self, meta: SpanRequest, tensors: Sequence[torch.Tensor | runtime_pb2.Tensor],
                      codecs: Sequence[str | None] = (), decode_reply=None) -> torch.Tensor:
        """Send the forward and return its output (`decode_reply(reply)` when given, e.g. for delta-coded replies)."""
        packed = pack_inputs(tensors, codecs)
        self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=meta.encode(), tensors=packed))
        try:
            await self._open("rpc_train")
            reply = await self._next_reply("training stream")
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
        message = runtime_pb2.ExpertRequest(metadata=TrainGrad().encode(), tensors=pack_inputs([grad_output], [self.grad_codec]))
        self._queue.put_nowait(message)
        try:
            reply = await self._next_reply("training stream")
        finally:
            self.abandon()
        self.connection.count(message.tensors, reply.tensors)
        return list(reply.tensors)


async def open_stream(p2p: P2P, prefix: str, peer_id, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest]
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Call a streaming RPC of BlockService as its stub does, except that the replies end as soon as the connection
    closes. hivemind's stream call, on a closed connection, waits for the request stream to end before it ends the
    replies; ours waits for a reply before it sends more, so a server killed mid-session went unnoticed until the
    request timeout."""
    name = BlockService._get_handle_name(prefix, method)
    call = p2p.call(name, peer_id) if isinstance(p2p, KeyedP2P) else None  # a private swarm's envelopes
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, name)

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(call.seal(request) if call else request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    async def read() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            while True:
                try:
                    reply, error = await P2P.receive_protobuf(Sealed if call else runtime_pb2.ExpertResponse, reader)
                except asyncio.IncompleteReadError:
                    return  # the connection closed: the server finished, or it is gone
                if error is not None:  # worded as hivemind's, which RemoteError.from_exception parses
                    raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {error.message}")
                yield call.open(reply, runtime_pb2.ExpertResponse) if call else reply
        finally:
            writing.cancel()
            if writing.done() and not writing.cancelled():
                writing.exception()  # a write to a closed connection: the read above has told the caller
            writer.close()

    writing = asyncio.create_task(write())
    return read()


def relayed(packed: runtime_pb2.Tensor, codec: str | None, what: str = "server output") -> runtime_pb2.Tensor | torch.Tensor:
    """A server's packed hidden states (or their gradient) as the input of a request that takes `codec`: the same
    bytes where they came in that codec, so that every hop's tensor is encoded once (encoding a decoded tensor again
    adds error: 2.5% relative for int5_outlier on real gradients); else decoded, to be encoded again."""
    return packed if wire.slot_codec(packed.dtype) == (codec or "none") else unpack_tensor(packed, what)


def pack_inputs(tensors: Sequence[torch.Tensor | runtime_pb2.Tensor], codecs: Sequence[str | None]) -> list[runtime_pb2.Tensor]:
    """Tensors for the wire, tensors[i] encoded with codecs[i] where one is given (see swarm.compression); slots
    already packed pass as they are."""
    return [t if isinstance(t, runtime_pb2.Tensor) else pack_tensor(t, codecs[i] if i < len(codecs) else None)
            for i, t in enumerate(tensors)]
