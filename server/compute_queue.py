"""The compute thread's queue, shared fairly, decode steps first and batched.

Requests wait per peer, in two classes: decode steps (short inference steps, which a user waits on token by token)
and bulk work (training, long prefills). Decode steps always go first; among the peers waiting in a class, the one
that used the least compute lately runs next (server.fair_share.next_peer), so one peer's flood delays another's step
by at most the request running. A decode step takes along every other one waiting for the same blocks (server.batching),
filled one per peer in turn, least used first, up to `max_batch_rows` rows; it never waits for company. Bulk work that
comes in chunks (a generator: one block per chunk) gives way between chunks whenever a decode step is waiting, so such
a step waits at most one chunk. The bytes of requests waiting or running are a fair budget (--inflight-mb): when it
is short, a peer over its share is refused and a queued request of the largest holder gives way to a peer that holds
less."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.cache_budget import InflightBudget
from server.fair_share import decayed, next_peer
from swarm.config import ServerConfig
from swarm.errors import LimitReached
from swarm.ingress import Ticket

DECODE, BULK = 0, 1  # the two classes, in the order they are served


@dataclass(frozen=True)
class Batchable:
    """A decode step: `runner([item, ...])` runs it with others of the same `key` (None: alone), each item's result
    or exception in order; it holds `rows` rows of a batch."""

    key: Hashable | None
    item: Any
    runner: Callable[[list], list]
    rows: int = 1


class _Paused:
    """What the compute thread returns for chunked work that gave way to a waiting decode step."""


PAUSED = _Paused()


class _Job:
    def __init__(self, peer: str, fn: Callable, args: tuple, future: asyncio.Future, queued_at: float,
                 step: Batchable | None = None):
        self.peer, self.fn, self.args, self.future, self.queued_at, self.step = peer, fn, args, future, queued_at, step
        self.kind = DECODE if step is not None else BULK
        self.seconds = 0.0
        self.chunks = None  # the generator of chunked work, once started
        self.holding: object = self  # its key in the in-flight budget: itself, or the ticket its request came with


class FairCompute:
    """One compute thread (requests run one batch or chunk at a time, off the event loop) fed from per-peer queues."""

    def __init__(self, inflight_bytes: int, clock: Callable[[], float] = time.monotonic,
                 max_batch_rows: int = ServerConfig.max_batch_size, account: Callable[[str, float], None] | None = None):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # Bulk work runs on a thread of its own at a lower OS priority (never at the same time as the first: the queue
        # runs one thing at a time), so that peers sharing the machine's cores (other servers, clients) get their
        # decode steps through first, too; its intra-op threads, started by it, inherit that priority.
        self.bulk_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute-bulk",
                                                initializer=_lower_priority)
        self.inflight = InflightBudget(inflight_bytes, clock)
        self.clock, self.max_batch_rows, self.account = clock, max_batch_rows, account  # account(kind, seconds)
        self._waiting: tuple[dict[str, deque[_Job]], ...] = ({}, {})  # by class, then by peer
        self._usage: dict[str, tuple[float, float]] = {}  # peer -> (compute seconds, as of when)
        self._running: list[_Job] | None = None
        self.batches = self.batched_steps = 0  # decode batches run and the steps in them

    async def run(self, peer: str, nbytes: int, fn: Callable | None, *args, ticket: Ticket | None = None,
                  step: Batchable | None = None) -> Any:
        """`fn(*args)` on the compute thread, in `peer`'s turn (a generator function: one chunk per next(), its
        return value the result); or, with `step`, that decode step in a batch. Its request holds the in-flight
        budget: `ticket`, the charge it was admitted with on arrival (swarm.ingress), or else `nbytes` from now on."""
        job = _Job(peer, fn, args, asyncio.get_running_loop().create_future(), self.clock(), step)
        if ticket is None:
            self.inflight.acquire(peer, job, nbytes, lambda reason: self._drop(job, reason))
        else:
            ticket.check()  # ended while its request was parsed: it gave way already
            ticket.on_end.append(lambda reason: self._drop(job, reason))
            job.holding = ticket
        try:
            self._waiting[job.kind].setdefault(peer, deque()).append(job)
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

    def _decode_waiting(self) -> bool:
        """Read by the compute thread between chunks of bulk work (a dict's truth is safe to read from there)."""
        return bool(self._waiting[DECODE])

    def _dispatch(self) -> None:
        if self._running is not None:
            return
        for kind in (DECODE, BULK):
            waiting = {peer: queue[0].queued_at for peer, queue in self._waiting[kind].items() if queue}
            if waiting:
                break
        else:
            return
        usage = self.usage()
        job = self._waiting[kind][next_peer(waiting, usage)].popleft()
        jobs = [job, *self._company(job, usage)] if job.step is not None and job.step.key is not None else [job]
        for each in jobs:
            self._unqueue(each)
            self.inflight.pin(each.holding)
        self._running = jobs
        try:
            executor = self.executor if job.kind == DECODE else self.bulk_executor
            done = asyncio.wrap_future(executor.submit(self._work, jobs))
        except RuntimeError as exc:  # shut down
            self._running = None
            for each in jobs:
                each.future.set_exception(exc)
            return
        done.add_done_callback(lambda result: self._finished(jobs, result))

    def _company(self, first: _Job, usage: dict[str, float]) -> list[_Job]:
        """The decode steps waiting with `first`'s key that join its batch: one per peer in turn, the least used peer
        first, up to max_batch_rows rows in all."""
        matching = ((peer, [job for job in queue if job.step.key == first.step.key])
                    for peer, queue in self._waiting[DECODE].items())
        queues = sorted(((peer, jobs) for peer, jobs in matching if jobs),
                        key=lambda entry: (usage.get(entry[0], 0.0), entry[1][0].queued_at))
        company, rows = [], first.step.rows
        while any(jobs for _, jobs in queues):
            for _, jobs in queues:
                if jobs and rows + jobs[0].step.rows <= self.max_batch_rows:
                    rows += jobs[0].step.rows
                    company.append(jobs.pop(0))
                elif jobs:
                    jobs.clear()  # it does not fit: this peer's steps wait for the next batch
        return company

    def _work(self, jobs: list[_Job]) -> Any:
        """On the compute thread: a batch of decode steps (a list of results), or a bulk job until it ends or gives
        way to a decode step (PAUSED)."""
        started = time.perf_counter()
        try:
            if jobs[0].step is not None:
                return jobs[0].step.runner([job.step.item for job in jobs])
            job = jobs[0]
            if job.chunks is None:
                result = job.fn(*job.args)
                if not inspect.isgenerator(result):
                    return result
                job.chunks = result
            try:
                while True:
                    next(job.chunks)
                    if self._decode_waiting():
                        return PAUSED
            except StopIteration as stop:
                return stop.value
        finally:
            seconds = time.perf_counter() - started
            rows = sum(job.step.rows if job.step is not None else 1 for job in jobs)
            for job in jobs:
                job.seconds += seconds * (job.step.rows if job.step is not None else 1) / rows
            if self.account is not None:
                self.account("step" if jobs[0].step is not None else jobs[0].fn.__name__, seconds)

    def _finished(self, jobs: list[_Job], result: asyncio.Future) -> None:
        self._running = None
        now = self.clock()
        for job in jobs:
            seconds, when = self._usage.get(job.peer, (0.0, now))
            self._usage[job.peer] = (decayed(seconds, now - when) + job.seconds, now)
            job.seconds = 0.0
        if len(self._usage) > 4096:  # forget peers whose use has faded
            self._usage = {p: u for p, u in self._usage.items() if decayed(u[0], now - u[1]) > 1e-3}
        if result.cancelled() or result.exception() is not None or jobs[0].step is None:
            outcomes = [result] * len(jobs)
        else:
            outcomes = result.result()
            self.batches += 1
            self.batched_steps += len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.future.done():
                if job.chunks is not None:
                    job.chunks.close()
                continue
            if isinstance(outcome, asyncio.Future):
                if outcome.cancelled():
                    job.future.cancel()
                elif outcome.exception() is not None:
                    job.future.set_exception(outcome.exception())
                elif outcome.result() is PAUSED:
                    self._waiting[BULK].setdefault(job.peer, deque()).appendleft(job)  # next in its peer's turn
                else:
                    job.future.set_result(outcome.result())
            elif isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        self._dispatch()

    def _drop(self, job: _Job, reason: str) -> None:
        """End a queued request to make room for a peer that holds less (the policy never picks a running one)."""
        self._unqueue(job)
        if not job.future.done():
            job.future.set_exception(LimitReached(reason))

    def _unqueue(self, job: _Job) -> None:
        queues = self._waiting[job.kind]
        queue = queues.get(job.peer)
        if queue is not None:
            if job in queue:
                queue.remove(job)
            if not queue:
                del queues[job.peer]

    @property
    def busy(self) -> bool:
        """Whether anything runs or waits."""
        return self._running is not None or any(self._waiting)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.bulk_executor.shutdown(wait=False, cancel_futures=True)


BULK_NICENESS = 10  # CPU weight about a tenth of a normal thread's, when both want a core (Linux's CFS)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICENESS)  # this thread only, on Linux
    except (OSError, AttributeError):  # elsewhere, or not permitted: bulk work just runs at normal priority
        pass


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
