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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

END_WAIT_S = 10.0  # the longest a finished stream waits for its caller's end of stream (a stranger's may never come)
PREFETCH = 5  # requests read ahead of the handler, as hivemind's stream handler does

_END = object()


class _Requests:
    """The caller's side of a served stream, read by one task: requests for the handler (at most PREFETCH ahead),
    then the end of stream; `ended` once the caller has ended its stream or gone, `gone` once the connection closed."""

    def __init__(self, reader: asyncio.StreamReader, input_type):
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=PREFETCH)
        self._keep = True
        self.ended, self.gone = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._receive(reader, input_type))

    async def _receive(self, reader: asyncio.StreamReader, input_type) -> None:
        try:
            while True:
                request, _ = await P2P.receive_protobuf(input_type, reader)
                if request is None:  # the end-of-stream marker; anything after it is not kept
                    await self._end()
                elif self._keep:
                    await self._queue.put(request)
        except Exception as exc:  # noqa: BLE001 - the connection closed or broke, or carried a malformed frame
            logger.debug("a served stream's caller ended the connection: %r", exc)
        self.gone.set()
        await self._end()

    async def _end(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            if self._keep:
                await self._queue.put(_END)

    async def messages(self) -> AsyncIterator:
        while (item := await self._queue.get()) is not _END:
            yield item

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
        try:
            await P2P.send_protobuf(RPCError(message=str(exc)), writer)
        except (ConnectionError, OSError):
            pass
    finally:
        await replies.aclose()


async def add_stream_handler(p2p: P2P, name: str, handler: Callable, input_type, *, balanced: bool = False,
                             end_wait: float = END_WAIT_S) -> None:
    """Serve `handler` (requests, context -> replies, both async iterators) as the stream RPC `name` of `p2p`."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        requests = _Requests(reader, input_type)
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

    await p2p.add_binary_stream_handler(name, handle, balanced=balanced)
