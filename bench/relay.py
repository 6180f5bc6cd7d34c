"""A WAN in front of local peers: TCP relays that hold every byte for a one-way delay (and optionally pace it to a
bandwidth cap), both ways, in a process of their own so that their work competes with no peer's event loop.

A server listens on a private port and announces its relay's port (`--announce-maddrs`), so every connection to it,
from the client or from another server, crosses its relay once: each link gets the delay once per direction, one
round trip costs 2 x delay. The delay and the cap can be changed while connections stay open (they apply to bytes
read from then on), so one swarm serves every setting of a benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import time
from dataclasses import dataclass


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Route:
    listen: int  # the relay's port, the one the server announces
    target: int  # the server's own listening port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay, rate, counter, slot: int) -> None:
    """Copy reader to writer, each chunk delivered `delay` seconds after it was read (after its transmission time at
    `rate` bytes/s, in order, when a cap is set)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        free_at = 0.0  # when the capped link finishes sending what it already holds
        try:
            while chunk := await reader.read(1 << 16):
                now = time.monotonic()
                sent = now if rate.value <= 0 else max(now, free_at) + len(chunk) / rate.value
                free_at = sent
                queue.put_nowait((sent + delay.value, chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((time.monotonic() + delay.value, b""))

    task = asyncio.create_task(pump())
    try:
        while True:
            due, chunk = await queue.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                break
            writer.write(chunk)
            with counter.get_lock():
                counter[slot] += len(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        writer.close()


async def _serve(routes: list[Route], delay, rate, counter, ready) -> None:
    servers = []
    for index, route in enumerate(routes):
        async def accept(reader, writer, route=route, index=index) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", route.target)
            except OSError:
                writer.close()
                return
            for sock in (writer.get_extra_info("socket"), up_writer.get_extra_info("socket")):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(_pipe(reader, up_writer, delay, rate, counter, 2 * index),  # towards the server
                                 _pipe(up_reader, writer, delay, rate, counter, 2 * index + 1))  # from it

        servers.append(await asyncio.start_server(accept, "127.0.0.1", route.listen))
    ready.set()
    await asyncio.gather(*(server.serve_forever() for server in servers))


def _main(routes, delay, rate, counter, ready) -> None:
    try:
        import uvloop

        uvloop.run(_serve(routes, delay, rate, counter, ready))
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        asyncio.run(_serve(routes, delay, rate, counter, ready))


class Relays:
    """The relay process for `routes`; `delay_ms` and `rate_mbit` (0: no cap) can be set at any time, and
    `bytes_relayed()` gives [to server, from server] per route."""

    def __init__(self, routes: list[Route]):
        context = multiprocessing.get_context("spawn")
        self.routes = routes
        self._delay, self._rate = context.Value("d", 0.0), context.Value("d", 0.0)
        self._counter = context.Array("q", 2 * len(routes))
        ready = context.Event()
        self.process = context.Process(target=_main, args=(routes, self._delay, self._rate, self._counter, ready),
                                       daemon=True, name="wan-relays")
        self.process.start()
        if not ready.wait(30):
            raise RuntimeError("the relay process did not start listening within 30 s")

    def set(self, delay_ms: float, rate_mbit: float = 0.0) -> None:
        self._delay.value = delay_ms / 1000
        self._rate.value = rate_mbit * 1e6 / 8

    def bytes_relayed(self) -> list[tuple[int, int]]:
        values = list(self._counter)
        return [(values[2 * i], values[2 * i + 1]) for i in range(len(self.routes))]

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)
