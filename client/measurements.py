"""What a client measures about the servers it uses, as inputs to routing: round trips (measured in the background
on the client's event loop, so routing reads them without waiting on the network) and its own requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

from client import aio
from client.config import CLIENT
from client.routing import smooth_rtt

logger = logging.getLogger(__name__)


class Pinger:
    """Pings every watched server once per `period` and at once when a new one is watched, with `ping(peer_id)` (one
    small call that raises on failure); a failure or a timeout marks that server unreachable until it answers again."""

    def __init__(self, ping: Callable[[object], Awaitable[object]], period: float = CLIENT.ping_period_s,
                 timeout: float = CLIENT.ping_timeout_s, smoothing: float = CLIENT.ping_smoothing):
        self._ping, self.period, self.timeout, self.smoothing = ping, period, timeout, smoothing
        self._lock = threading.Lock()
        self._targets: dict[str, object] = {}  # str(peer id) -> peer id
        self._rtt: dict[str, float] = {}  # str(peer id) -> smoothed round trip in ms
        self._wake: asyncio.Event | None = None
        self._task = None

    @property
    def rtt_ms(self) -> dict[str, float]:
        """Smoothed round trips in ms by peer id string (inf: the last ping failed); absent: not measured yet."""
        with self._lock:
            return dict(self._rtt)

    def watch(self, peer_ids: Iterable) -> None:
        """Ping these servers from now on (and no others); any not measured yet are pinged without waiting."""
        targets = {str(p): p for p in peer_ids}
        with self._lock:
            self._targets = targets
            self._rtt = {peer: rtt for peer, rtt in self._rtt.items() if peer in targets}
            new = any(peer not in self._rtt for peer in targets)
        if new and self._wake is not None:
            aio.get_loop().call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.run_coroutine_threadsafe(self._run(), aio.get_loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def measure(self, peer_id, known: bool = True) -> float | None:
        """One round trip in ms, or None if the server did not answer in time. The first call to a server that is not
        `known` also dials it (measured: 8 ms, then 2): it is timed again."""
        for _ in range(1 if known else 2):
            began = time.perf_counter()
            try:
                await asyncio.wait_for(self._ping(peer_id), self.timeout)
            except Exception as exc:  # noqa: BLE001 - any failure only means "unreachable for now"
                logger.debug("ping to %s failed: %s", peer_id, exc or type(exc).__name__)
                return None
        return (time.perf_counter() - began) * 1000.0

    async def ping_round(self) -> None:
        with self._lock:
            targets = list(self._targets.items())
            known = [peer in self._rtt for peer, _ in targets]
        samples = await asyncio.gather(*(self.measure(peer_id, k) for (_, peer_id), k in zip(targets, known, strict=True)))
        with self._lock:
            for (peer, _), sample in zip(targets, samples, strict=True):
                if peer in self._targets:  # not dropped while we waited
                    self._rtt[peer] = smooth_rtt(self._rtt.get(peer), sample, self.smoothing)

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            await self.ping_round()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period)


class InFlight:
    """Requests of this client awaiting a server's reply, by peer id string (training routes count them as load)."""

    def __init__(self):
        self._lock = threading.Lock()  # requests run on the client loop; routes are planned on the caller's thread
        self._counts: Counter[str] = Counter()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @contextlib.contextmanager
    def request(self, peer_id):
        key = str(peer_id)
        with self._lock:
            self._counts[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]
