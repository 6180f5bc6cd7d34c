"""Rebalancing: a server started with --num-blocks checks the swarm now and then and moves to other blocks when
server.block_selection.decide_move says so, without ever leaving the swarm short of a block."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.block_selection import HostedSpan, Move, decide_move
from swarm.dht_records import ServerInfo, ServerState, fetch_servers

logger = logging.getLogger(__name__)


class ActiveHandler:
    """What the RPC layer calls: each new request goes to the handler of the span served now, so a server changes
    blocks without registering its handlers again. Requests already running stay with the handler they started on."""

    def __init__(self, handler: Any):
        self.current = handler

    def __getattr__(self, name: str):
        if not name.startswith("rpc_"):
            raise AttributeError(name)

        def call(request, context):
            return getattr(self.current, name)(request, context)

        call.__name__ = name
        return call


def swarm_view(servers: Sequence[ServerInfo], me: str, start: int, end: int) -> list[HostedSpan]:
    """The policy's input: every online server, and this one (`me`) where it really is (its DHT record may lag)."""
    view = [HostedSpan(s.peer_id.to_base58(), s.record.start, s.record.end, s.record.rebalances) for s in servers
            if s.record.state != ServerState.OFFLINE and s.peer_id.to_base58() != me]
    return [*view, HostedSpan(me, start, end, movable=True)]


@dataclass
class Rebalancer:
    """The I/O around decide_move for one server: when to look, what to fetch, how to move.

    `server` is a server.server.Server: its DHT, its current span (`hosted`), and `load`, `switch` and `retire`
    to build a new span, serve it instead of the old one and let the old one's sessions go.
    """

    server: Any
    period: float
    jitter: float
    balance_margin: float

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait = self.period * random.uniform(1 - self.jitter, 1 + self.jitter)  # so servers rarely check together
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
                return
            except asyncio.TimeoutError:
                pass
            try:
                move = await self.decide()
                if move is not None:
                    await self.move(move, stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed check or load must not stop the server from serving
                logger.warning("rebalancing check failed (will try again): %s: %s", type(exc).__name__, exc)

    async def decide(self) -> Move | None:
        server = self.server
        async with server.dht_lock:
            servers = await asyncio.to_thread(fetch_servers, server.dht, server.prefix, server.num_model_blocks)
        hosted = server.hosted
        view = swarm_view(servers, server.dht.peer_id.to_base58(), hosted.start, hosted.end)
        return decide_move(server.num_model_blocks, view[-1].peer_id, view, self.balance_margin)

    async def move(self, move: Move, stop: asyncio.Event) -> None:
        server, old = self.server, self.server.hosted
        logger.info("moving from blocks %d:%d to %d:%d because %s", old.start, old.end, move.start, move.end, move.reason)
        new = await asyncio.to_thread(server.load, move.start, move.end)  # the old span serves on meanwhile
        # Loading took a while: if another server filled the gap meanwhile, or this one's blocks lost their other
        # server, the move is no longer right (two servers moving at once must not leave a block uncovered).
        again = await self.decide()
        if stop.is_set() or again is None or (again.start, again.end) != (move.start, move.end):
            logger.info("not moving to blocks %d:%d after all: the swarm changed while they loaded", move.start, move.end)
            new.handler.shutdown()
            return
        if not await server.switch(new):
            new.handler.shutdown()
            return
        logger.info("moved: serving blocks %d:%d; blocks %d:%d announced offline, their open sessions move on their "
                    "next step", new.start, new.end, old.start, old.end)
        await server.retire(old)


async def drain(handler: Any, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a handler that takes no new work to finish what it has: open inference
    sessions, training streams holding activations, and requests queued on its compute thread. True if it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (handler.stats.sessions_open or handler.activations.used) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    while handler.compute.busy and loop.time() < deadline:  # requests queued or running on the compute thread
        await asyncio.sleep(0.05)
    return not (handler.stats.sessions_open or handler.activations.used or handler.compute.busy)
