"""The compute thread's queue, shared fairly: requests wait per peer and the peer that used the least compute lately
runs next (server.fair_share.next_peer), so one peer's flood delays another's step by at most the request running.
The bytes of requests waiting or running are a fair budget (--inflight-mb): when it is short, a peer over its share
is refused and a queued request of the largest holder gives way to a peer that holds less."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.cache_budget import InflightBudget
from server.fair_share import decayed, next_peer
from swarm.errors import LimitReached
from swarm.ingress import Ticket


class _Job:
    def __init__(self, peer: str, fn: Callable, args: tuple, future: asyncio.Future, queued_at: float):
        self.peer, self.fn, self.args, self.future, self.queued_at = peer, fn, args, future, queued_at
        self.seconds = 0.0
        self.holding: object = self  # its key in the in-flight budget: itself, or the ticket its request came with

    def __call__(self) -> Any:
        started = time.perf_counter()
        try:
            return self.fn(*self.args)
        finally:
            self.seconds = time.perf_counter() - started


class FairCompute:
    """One compute thread (requests run one at a time, off the event loop) fed from per-peer queues."""

    def __init__(self, inflight_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.inflight = InflightBudget(inflight_bytes, clock)
        self.clock = clock
        self._waiting: dict[str, deque[_Job]] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # peer -> (compute seconds, as of when)
        self._running: _Job | None = None

    async def run(self, peer: str, nbytes: int, fn: Callable, *args, ticket: Ticket | None = None) -> Any:
        """`fn(*args)` on the compute thread, in `peer`'s turn. Its request holds the in-flight budget: `ticket`, the
        charge it was admitted with on arrival (swarm.ingress), or else `nbytes` from now on."""
        job = _Job(peer, fn, args, asyncio.get_running_loop().create_future(), self.clock())
        if ticket is None:
            self.inflight.acquire(peer, job, nbytes, lambda reason: self._drop(job, reason))
        else:
            ticket.check()  # ended while its request was parsed: it gave way already
            ticket.on_end.append(lambda reason: self._drop(job, reason))
            job.holding = ticket
        try:
            self._waiting.setdefault(peer, deque()).append(job)
            self._dispatch()
            return await job.future
        finally:
            if ticket is None:
                self.inflight.release(job)
            self._unqueue(job)

    # -- swarm.ingress.Gate: requests are charged to the in-flight budget on arrival --------------------------------

    def admit(self, ticket: Ticket) -> None:
        self.inflight.acquire(ticket.peer, ticket, ticket.nbytes, ticket.end)

    def release(self, ticket: Ticket) -> None:
        self.inflight.release(ticket)

    def usage(self) -> dict[str, float]:
        now = self.clock()
        return {peer: decayed(seconds, now - when) for peer, (seconds, when) in self._usage.items()}

    def _dispatch(self) -> None:
        if self._running is not None:
            return
        waiting = {peer: queue[0].queued_at for peer, queue in self._waiting.items() if queue}
        if not waiting:
            return
        job = self._waiting[next_peer(waiting, self.usage())].popleft()
        self.inflight.pin(job.holding)
        self._running = job
        try:
            done = asyncio.wrap_future(self.executor.submit(job))
        except RuntimeError as exc:  # shut down
            self._running = None
            job.future.set_exception(exc)
            return
        done.add_done_callback(lambda result: self._finished(job, result))

    def _finished(self, job: _Job, result: asyncio.Future) -> None:
        self._running = None
        now = self.clock()
        seconds, when = self._usage.get(job.peer, (0.0, now))
        self._usage[job.peer] = (decayed(seconds, now - when) + job.seconds, now)
        if len(self._usage) > 4096:  # forget peers whose use has faded
            self._usage = {p: u for p, u in self._usage.items() if decayed(u[0], now - u[1]) > 1e-3}
        if not job.future.done():
            if result.cancelled():
                job.future.cancel()
            elif result.exception() is not None:
                job.future.set_exception(result.exception())
            else:
                job.future.set_result(result.result())
        self._dispatch()

    def _drop(self, job: _Job, reason: str) -> None:
        """End a queued request to make room for a peer that holds less (the policy never picks a running one)."""
        self._unqueue(job)
        if not job.future.done():
            job.future.set_exception(LimitReached(reason))

    def _unqueue(self, job: _Job) -> None:
        queue = self._waiting.get(job.peer)
        if queue is not None:
            if job in queue:
                queue.remove(job)
            if not queue:
                del self._waiting[job.peer]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class CurrentCompute:
    """The swarm.ingress.Gate of a server: the in-flight budget of the span it serves now (`current()`); a charge
    goes back to the budget that took it, also after a move replaced the span's handler."""

    def __init__(self, current: Callable[[], FairCompute]):
        self.current = current
        self._taken: dict[Ticket, FairCompute] = {}

    def admit(self, ticket: Ticket) -> None:
        compute = self.current()
        compute.admit(ticket)
        self._taken[ticket] = compute

    def release(self, ticket: Ticket) -> None:
        compute = self._taken.pop(ticket, None)
        if compute is not None:
            compute.release(ticket)
