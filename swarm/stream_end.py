"""Served streams that end so that the caller reads the server's last message (its last reply or its error).

hivemind closes a served stream as soon as its handler ends. If the caller still sends anything after that (its
next request, or only its end-of-stream marker), the server's p2pd fails to pass those bytes on and resets the
stream, and a reset stream loses what was still in flight to the caller: the caller sees the stream end (or a broken
pipe: asyncio fails a connection's reads once a write to it failed) instead of the error the server had sent.

So our streams are served here instead of by hivemind's stream handler, with the same framing (hivemind's
`P2P.send_protobuf`/`receive_protobuf`, so hivemind's callers and ours work unchanged): the handler's replies, or
its error, are sent first; then the server waits for the caller's end of stream (or its disconnection), discarding
whatever else it sends, and closes only then, or after END_WAIT_S for a caller that never ends its stream. A caller
ends its stream when it has read the error, or after its last request: about one round trip.

A server reads its streams through its `swarm.ingress.Ingress`: a message longer than a request may be is refused
before its body is read, and each message is charged to the in-flight budget before its body is read, until the
handler asks for the next one (or, for handlers that keep every message of a request, until the stream ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.errors import BadRequest, LimitReached, SwarmError
from swarm.ingress import STREAM_COPIES, Ingress, Ticket

logger = logging.getLogger(__name__)

END_WAIT_S = 10.0  # the longest a finished stream waits for its caller's end of stream (a stranger's may never come)
PREFETCH = 5  # requests read ahead of the handler, as hivemind's stream handler does

_END = object()
_SKIPPED = object()  # a request read and dropped (refused, or after the stream failed)


async def _skip(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        length -= len(await reader.readexactly(min(length, 1 << 16)))


class _Requests:
    """The caller's side of a served stream, read by one task: requests for the handler (at most PREFETCH ahead),
    then the end of stream; `ended` once the caller has ended its stream or gone, `gone` once the connection closed.
    With an `ingress`, each request is admitted before its body is read and its charge held until the handler asks for
    the next (`keep`: until the stream ends); a refusal, or a charge the budget ends, fails the handler's next read."""

    def __init__(self, reader: asyncio.StreamReader, input_type, ingress: Ingress | None = None, peer: str = "",
                 keep: bool = False):
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=PREFETCH)
        self._keep = True
        self.ingress, self.peer, self.keep_charges = ingress, peer, keep
        self.held: deque[Ticket] = deque()  # charges of the requests queued or handed out, oldest first
        self._failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.ended, self.gone = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._receive(reader, input_type))

    async def _receive(self, reader: asyncio.StreamReader, input_type) -> None:
        try:
            while True:
                if self.ingress is not None:
                    request = await self._admitted(reader, input_type)
                else:
                    request, _ = await P2P.receive_protobuf(input_type, reader)
                if request is None:  # the end-of-stream marker; anything after it is not kept
                    await self._end()
                elif self._keep and request is not _SKIPPED:
                    await self._queue.put(request)
        except Exception as exc:  # noqa: BLE001 - the connection closed or broke, or carried a malformed frame
            logger.debug("a served stream's caller ended the connection: %r", exc)
        self.gone.set()
        await self._end()

    async def _admitted(self, reader: asyncio.StreamReader, input_type):
        """The next request (None at the end of stream), charged before its body is read; after a refusal (told to
        the handler) what the caller still sends is read and dropped (_SKIPPED), unkept, to see its end of stream."""
        marker = await reader.readexactly(1)
        length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
        if marker != P2P.MESSAGE_MARKER or not self._keep or self._failed.done():
            await _skip(reader, length)
            return None if marker != P2P.MESSAGE_MARKER else _SKIPPED
        try:
            limit = self.ingress.max_message_bytes
            if length > limit:
                raise BadRequest(f"a stream message of {length} bytes exceeds this server's limit of {limit} bytes "
                                 "per message; split the request")
            ticket = self.ingress.charge(self.peer, STREAM_COPIES * length)
        except SwarmError as exc:
            self._fail(exc)
            await _skip(reader, length)
            return _SKIPPED
        ticket.on_end.append(lambda reason: self._fail(LimitReached(reason)))
        self.held.append(ticket)
        data = await reader.readexactly(length)
        try:
            return input_type.FromString(data)
        except DecodeError as exc:
            self.ingress.gate.release(self.held.pop())
            self._fail(BadRequest(f"a stream message is not a valid {input_type.DESCRIPTOR.name} ({exc})"))
            return _SKIPPED

    def _fail(self, error: SwarmError) -> None:
        if not self._failed.done():
            self._failed.set_result(error)

    def release(self, count: int | None = None) -> None:
        """Give back the charges of the oldest `count` requests read (None: of all)."""
        for _ in range(len(self.held) if count is None else min(count, len(self.held))):
            self.ingress.gate.release(self.held.popleft())

    async def _end(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            if self._keep:
                await self._queue.put(_END)

    async def messages(self) -> AsyncIterator:
        while True:
            getting = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait({getting, self._failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getting.cancel()  # a no-op when the request came
            if self._failed.done():
                raise self._failed.result()
            if (item := getting.result()) is _END:
                return
            yield item
            if not self.keep_charges:  # the handler asks for the next: done with this one
                self.release(1)

    def stop_keeping(self) -> None:
        """Keep nothing more the caller sends (its reader, blocked on a full queue, goes on)."""
        self._keep = False
        while not self._queue.empty():
            self._queue.get_nowait()


async def _respond(replies: AsyncIterator, writer: asyncio.StreamWriter, name: str) -> None:
    """Send the handler's replies, then its error if it failed; stop if the caller can no longer be written to."""
    try:
        async for reply in replies:
            try:
                await P2P.send_protobuf(reply, writer)
            except (ConnectionError, OSError) as exc:
                logger.debug("%s: the caller can no longer be written to: %r", name, exc)
                return
    except Exception as exc:  # noqa: BLE001 - the handler's error, for the caller (typed errors carry their code)
        logger.debug("%s failed: %r", name, exc)
        with contextlib.suppress(ConnectionError, OSError):
            await P2P.send_protobuf(RPCError(message=str(exc)), writer)
    finally:
        await replies.aclose()


async def add_stream_handler(p2p: P2P, name: str, handler: Callable, input_type, *, balanced: bool = False,
                             end_wait: float = END_WAIT_S, ingress: Ingress | None = None) -> None:
    """Serve `handler` (requests, context -> replies, both async iterators) as the stream RPC `name` of `p2p`, its
    requests read through `ingress` if given."""
    keep = ingress is not None and any(name.endswith(suffix) for suffix in ingress.keeps_messages)

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        requests = _Requests(reader, input_type, ingress, str(stream_info.peer_id), keep)
        responding = asyncio.create_task(_respond(handler(requests.messages(), context), writer, name))
        gone = asyncio.create_task(requests.gone.wait())
        try:
            await asyncio.wait({responding, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not responding.done():
                return  # the caller closed the connection: nobody reads the replies (finally cancels the handler)
            requests.stop_keeping()
            try:
                await asyncio.wait_for(requests.ended.wait(), end_wait)
            except asyncio.TimeoutError:
                logger.debug("%s: the caller did not end its stream within %.0f s", name, end_wait)
        finally:
            for task in (responding, gone, requests.task):
                task.cancel()
            writer.close()
            if ingress is not None:
                requests.release()

    await p2p.add_binary_stream_handler(name, handle, balanced=balanced)
