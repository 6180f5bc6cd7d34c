"""A background event loop (uvloop) that the synchronous client API submits its network work to."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = uvloop.new_event_loop()
            threading.Thread(target=loop.run_forever, name="swarm-client-loop", daemon=True).start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    loop = get_loop()
    if threading.current_thread().name == "swarm-client-loop":
        raise RuntimeError("client.aio.run() called from inside the client loop; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
