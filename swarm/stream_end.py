"""A served stream ends only after its caller's end of stream, so that the caller reads the server's last message.

When a server closes a stream while its caller is still writing (its next request, or just the end-of-stream
marker), the caller's write fails, and asyncio then fails the caller's reads too, before the bytes already
received: the caller sees a broken pipe instead of the error (or the last reply) that the server sent just before.
So a served stream's requests are read by one pump task, and when the handler ends (with a reply or an error) the
stream waits, for a bounded time and discarding what still arrives, for the caller's end of stream before hivemind
closes it. Honest callers end their stream as soon as they read the last message: one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

END_WAIT_S = 2.0  # the longest a finished stream waits for its caller's end of stream (a stranger's that never comes)

_END = object()


class _Pump:
    """Moves a stream's requests into a queue of one, so the handler's reads and the final wait never share a
    generator (hivemind's request stream may be awaited by a reader task of the handler when the handler fails)."""

    def __init__(self, requests: AsyncIterator):
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._ended = asyncio.Event()
        self._discard = False
        self._task = asyncio.create_task(self._run(requests))

    async def _run(self, requests: AsyncIterator) -> None:
        item: Any = _END
        try:
            async for message in requests:
                if not self._discard:
                    await self._queue.put(message)
        except Exception as exc:  # noqa: BLE001 - handed to the handler as its stream's error
            item = exc
        finally:
            self._ended.set()
        if not self._discard:
            await self._queue.put(item)

    async def messages(self) -> AsyncIterator:
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def wait_for_end(self, timeout: float) -> None:
        """Discard what the caller still sends until its end of stream, for at most `timeout` seconds."""
        self._discard = True
        while not self._queue.empty():  # a pending put completes, and later messages are not kept
            self._queue.get_nowait()
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def close(self) -> None:
        self._task.cancel()


def ends_cleanly(handler, timeout: float = END_WAIT_S):
    """`handler` (a stream-in, stream-out hivemind handler) whose stream closes only after its caller's end of stream
    (or `timeout`), whether it ended with its last reply or with an error."""

    async def served(requests: AsyncIterator, context) -> AsyncIterator:
        pump = _Pump(requests)
        try:
            async for reply in handler(pump.messages(), context):
                yield reply
            await pump.wait_for_end(timeout)
        except Exception:
            await pump.wait_for_end(timeout)
            raise
        finally:
            pump.close()

    return served
