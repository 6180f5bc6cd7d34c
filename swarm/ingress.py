"""What a server's peers make it hold before any handler runs: every request is charged to a budget on arrival.

hivemind reads a stream's messages whole, however long they say they are (a 1 GiB message is read into memory
before anyone looks at it) and prefetches five of them per stream, for any number of streams; a unary request is
held in several copies (the daemon's message, its bytes, the parsed envelope, the parsed request, its tensors) for as
long as its handler runs. So a server's P2P serves through an `Ingress`: a unary request is charged `UNARY_COPIES`
times its size before its payload is parsed, for as long as its handler runs; a stream message longer than
`max_message_bytes` is refused before its body is read, and a shorter one is charged `STREAM_COPIES` times its size
before it is read, until its handler asks for the next message (or, for handlers that keep every message of a
request, until the stream ends). The charge goes to a `Gate` (the server's in-flight budget, shared fairly among
peers), which refuses a peer over its share with a clear error, so nothing unbudgeted piles up however many ids or
streams a peer uses. Memory held only inside one synchronous stretch of code (parsing, one request at a time) and
the compute thread's working memory for the one request it runs are outside the charges, bounded per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import closing, suppress
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.errors import BadRequest, LimitReached, SwarmError
from swarm.stream_end import END_WAIT_S

logger = logging.getLogger(__name__)

# Copies of a unary request alive while its handler runs: the daemon connection's message, its payload bytes, the
# parsed envelope (a sealed one; an open swarm's request itself), the parsed request and its decoded tensors.
UNARY_COPIES = 5
# Copies of a stream message alive until its handler is done with it: its bytes as read, the parsed message, the
# parsed request inside a sealed envelope and its decoded tensors.
STREAM_COPIES = 4


class Gate(Protocol):
    """A budget that charges can be admitted to (server.compute_queue.FairCompute implements it)."""

    def admit(self, ticket: Ticket) -> None:
        """Hold `ticket.nbytes` for `ticket.peer` until release(ticket), or raise a SwarmError saying why not. The
        budget may end the ticket later to make room for a peer that holds less: it calls `ticket.end(reason)`."""

    def release(self, ticket: Ticket) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One charge: `nbytes` held for `peer`. Whoever holds the charged memory learns of an eviction through
    `on_end` (a queued request is dropped, a stream fails at its next read)."""

    peer: str
    nbytes: int
    ended: str | None = None  # why the budget ended this charge
    on_end: list[Callable[[str], None]] = field(default_factory=list)

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            for callback in self.on_end:
                callback(reason)

    def check(self) -> None:
        if self.ended is not None:
            raise LimitReached(self.ended)


class AdmittedContext(P2PContext):
    """A handler's context with the charge of its unary request (None for a stream's handler)."""

    ticket: Ticket | None = None


@dataclass
class Ingress:
    """A server's admission of what its peers send: the budget charged, the longest stream message, and the stream
    handlers (by the end of their name) that keep every message of a request until it ends."""

    gate: Gate
    max_message_bytes: int
    keeps_messages: Collection[str] = ()

    def charge(self, peer: str, nbytes: int) -> Ticket:
        ticket = Ticket(peer, nbytes)
        self.gate.admit(ticket)
        return ticket

    def unary(self, handler, size: Callable[[object], int]):
        """`handler` (request, context) whose request is charged UNARY_COPIES times `size(request)` first."""

        async def admitted(request, context: P2PContext):
            ticket = self.charge(str(context.remote_id), UNARY_COPIES * size(request))
            try:
                return await handler(request, _with_ticket(context, ticket))
            except asyncio.CancelledError:
                # The caller gave up (hivemind cancels the handler). A unary handler's task that ends cancelled stays
                # in hivemind's table of handler tasks for good, with the frames its error holds (the request and its
                # tensors): ending with an error instead, hivemind answers (nobody listens) and forgets it.
                raise ConnectionAbortedError("the caller cancelled the request") from None
            finally:
                self.gate.release(ticket)

        return admitted

    async def add_stream_handler(self, p2p: P2P, name: str, handler, input_type, balanced: bool = False) -> None:
        """Serve a stream-in, stream-out protobuf handler as hivemind does, reading through this ingress; like
        swarm.stream_end, the stream closes only after its caller's end of stream (or END_WAIT_S), so that a caller
        still writing reads the last reply or the error instead of a broken pipe."""

        async def serve(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
            requests = AdmittedStream(self, str(stream_info.peer_id), reader, input_type,
                                      keep=any(name.endswith(suffix) for suffix in self.keeps_messages))
            error = None
            with closing(writer), closing(requests):
                try:
                    async for reply in handler(requests.messages(), context):
                        try:
                            await P2P.send_protobuf(reply, writer)
                        except Exception:  # noqa: BLE001 - the caller is gone; it learns nothing more
                            logger.debug("could not send a reply of %s", name, exc_info=True)
                            return
                except Exception as exc:  # noqa: BLE001 - the handler's error is the caller's answer
                    if not isinstance(exc, SwarmError):
                        logger.warning("stream handler %s failed", name, exc_info=True)
                    error = exc
                if error is not None:  # first: the caller, once it has read it, ends its stream
                    with suppress(Exception):
                        await P2P.send_protobuf(RPCError(message=str(error)), writer)
                await requests.finish(END_WAIT_S)

        await p2p.add_binary_stream_handler(name, serve, balanced)


def _with_ticket(context: P2PContext, ticket: Ticket) -> AdmittedContext:
    admitted = AdmittedContext(handle_name=context.handle_name, local_id=context.local_id, remote_id=context.remote_id)
    admitted.ticket = ticket
    return admitted


class AdmittedStream:
    """A stream's requests, read one at a time when the handler asks, each charged before its body is read and
    released when the handler asks for the next (`keep`: when the stream ends). A charge the budget ends fails the
    handler's read at once. One read task at a time: a handler's reader task cancelled mid-message leaves it to
    finish, so the stream never loses its place."""

    def __init__(self, ingress: Ingress, peer: str, reader: asyncio.StreamReader, input_type, keep: bool):
        self.ingress, self.peer, self.reader, self.input_type, self.keep = ingress, peer, reader, input_type, keep
        self.held: list[Ticket] = []
        self._reading: asyncio.Task | None = None
        self._at_end = False
        self._ended: asyncio.Future = asyncio.get_running_loop().create_future()

    async def messages(self) -> AsyncIterator:
        while True:
            if not self.keep:
                self._release()
            if self._reading is None:
                self._reading = asyncio.create_task(self._read(keep=True))
            await asyncio.wait([self._reading, self._ended], return_when=asyncio.FIRST_COMPLETED)
            if self._ended.done():
                raise LimitReached(self._ended.result())
            reading, self._reading = self._reading, None
            message = reading.result()
            if message is None:
                return
            yield message

    async def finish(self, timeout: float) -> None:
        """Drop what the caller still sends, unread and uncharged, until its end of stream (at most `timeout` s)."""
        self._release()

        async def drain() -> None:
            if self._reading is not None:
                with suppress(Exception):
                    await self._reading
                self._release()
            while not self._at_end:
                await self._read(keep=False)

        with suppress(Exception):
            await asyncio.wait_for(drain(), timeout)

    async def _read(self, keep: bool):
        """The next request, None at the caller's end of stream (or a closed connection); `keep` False skips it."""
        try:
            marker = await self.reader.readexactly(1)
            length = int.from_bytes(await self.reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
            if marker != P2P.MESSAGE_MARKER:  # the end of stream: an empty error message
                await self._skip(length)
                self._at_end = True
                return None
            if not keep:
                await self._skip(length)
                return None
            limit = self.ingress.max_message_bytes
            if length > limit:
                self._at_end = True  # its body is not read: nothing after it can be
                raise BadRequest(f"a stream message of {length} bytes exceeds this server's limit of {limit} bytes "
                                 "per message; split the request")
            ticket = self.ingress.charge(self.peer, STREAM_COPIES * length)
            ticket.on_end.append(self._end)
            self.held.append(ticket)
            data = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            self._at_end = True
            return None
        try:
            return self.input_type.FromString(data)
        except DecodeError as exc:
            raise BadRequest(f"a stream message is not a valid {self.input_type.DESCRIPTOR.name} ({exc})") from None

    async def _skip(self, length: int) -> None:
        while length > 0:
            length -= len(await self.reader.readexactly(min(length, 1 << 16)))

    def _end(self, reason: str) -> None:
        if not self._ended.done():
            self._ended.set_result(reason)

    def _release(self) -> None:
        for ticket in self.held:
            self.ingress.gate.release(ticket)
        self.held.clear()

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self._release()
