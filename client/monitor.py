"""`swarm monitor`: a web page, a JSON API and Prometheus metrics of a swarm, from the records in its DHT.

A poller thread reads the records as `swarm status` does (every --poll-period seconds, never on the web server's event
loop) into an immutable Snapshot; the routes only turn the latest one into JSON (`swarm_view`), the page (one HTML
file with its CSS and script inline: client/data/monitor.html) or Prometheus' text format (`snapshot_families`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.config import MonitorConfig
from swarm.dht_records import ServerInfo, ServerState

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "data" / "monitor.html"


@dataclass(frozen=True)
class Snapshot:
    """What one poll of the DHT found: model prefix -> (number of blocks, its servers), when each server's record was
    last seen (unix time), whether the swarm is private, and the error of the last poll if it failed."""

    models: dict[str, tuple[int, list[ServerInfo]]] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    private: bool = False
    polled_at: float | None = None  # None: no poll has finished yet
    error: str | None = None
    polls: int = 0
    failed_polls: int = 0


# ---------------------------------------------------------------------------------------------- the views (pure)


def gaps(counts: list[int]) -> list[list[int]]:
    """Runs [start, end) of blocks that no online server hosts."""
    runs: list[list[int]] = []
    for index, count in enumerate(counts):
        if count:
            continue
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return runs


def server_view(info: ServerInfo, last_seen: float | None) -> dict[str, Any]:
    r = info.record
    return {"peer_id": info.peer_id.to_base58(), "public_name": r.public_name, "start": r.start, "end": r.end,
            "state": r.state.value, "device": r.device, "dtype": r.torch_dtype, "quant": r.quant,
            "ms_per_block": r.ms_per_block, "forward_tokens_per_s": r.forward_tokens_per_s,
            "cache_bytes_left": r.cache_bytes_left, "cache_bytes": r.cache_bytes,
            "cache_tokens_left": r.cache_tokens_left, "adapters": list(r.adapters), "codecs": list(r.codecs),
            "version": r.version, "protocol": [r.protocol_min, r.protocol_max], "rebalances": r.rebalances,
            "bytes_wire": r.bytes_wire, "bytes_raw": r.bytes_raw, "requests": r.requests, "errors": r.errors,
            "last_seen": last_seen}


def swarm_view(snapshot: Snapshot) -> dict[str, Any]:
    """The JSON of /api/swarm: per model its coverage (servers per block, gaps) and servers; traffic totals."""
    from client.cli_status import block_counts

    models, totals = [], {"bytes_wire": 0, "bytes_raw": 0, "requests": 0, "errors": 0}
    for prefix, (num_blocks, servers) in sorted(snapshot.models.items()):
        counts = block_counts(num_blocks, servers)
        rows = [server_view(s, snapshot.last_seen.get(s.peer_id.to_base58())) for s in servers]
        traffic = {name: sum(row[name] for row in rows) for name in totals}
        for name, value in traffic.items():
            totals[name] += value
        models.append({"name": prefix, "num_blocks": num_blocks, "block_servers": counts, "gaps": gaps(counts),
                       "blocks_covered": sum(1 for c in counts if c),
                       "servers_online": sum(1 for s in servers if s.record.state == ServerState.ONLINE),
                       "traffic": traffic, "servers": rows})
    return {"private": snapshot.private, "polled_at": snapshot.polled_at, "error": snapshot.error,
            "traffic": totals, "models": models}


def snapshot_families(snapshot: Snapshot) -> list:
    """The Prometheus families of /metrics: per model its coverage, per server its record's figures, the totals."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from swarm.metrics import record_families

    view = swarm_view(snapshot)
    per_model = {name: GaugeMetricFamily(name, text, labels=["model"]) for name, text in (
        ("swarm_model_blocks", "blocks of the model"),
        ("swarm_model_blocks_covered", "blocks of the model that at least one online server hosts"),
        ("swarm_model_servers_online", "servers of the model whose record says online"),
        ("swarm_model_servers", "servers of the model with a live record, whatever its state"))}
    block_servers = GaugeMetricFamily("swarm_block_servers", "online servers hosting the block", labels=["model", "block"])
    for model in view["models"]:
        name = model["name"]
        for metric, value in (("swarm_model_blocks", model["num_blocks"]),
                              ("swarm_model_blocks_covered", model["blocks_covered"]),
                              ("swarm_model_servers_online", model["servers_online"]),
                              ("swarm_model_servers", len(model["servers"]))):
            per_model[metric].add_metric([name], value)
        for index, count in enumerate(model["block_servers"]):
            block_servers.add_metric([name, str(index)], count)
    servers = [((prefix, s.peer_id.to_base58()), s.record) for prefix, (_, infos) in sorted(snapshot.models.items())
               for s in infos]
    swarm = []
    for name, text, value in (
            ("swarm_traffic_wire_bytes", "tensor bytes on the wire, summed over the servers listed now", "bytes_wire"),
            ("swarm_traffic_raw_bytes", "the same tensors uncompressed", "bytes_raw"),
            ("swarm_traffic_requests", "requests served, summed over the servers listed now", "requests"),
            ("swarm_traffic_errors", "requests refused or failed, summed over the servers listed now", "errors")):
        swarm.append(GaugeMetricFamily(name, text, value=view["traffic"][value]))
    swarm.append(GaugeMetricFamily("swarm_private", "1 if the swarm has a key (only key holders can join)",
                                   value=float(snapshot.private)))
    if snapshot.polled_at is not None:
        swarm.append(GaugeMetricFamily("swarm_monitor_last_poll_timestamp_seconds", "when the DHT was last read",
                                       value=snapshot.polled_at))
    swarm.append(CounterMetricFamily("swarm_monitor_failed_polls", "reads of the DHT that failed",
                                     value=snapshot.failed_polls))
    return [*per_model.values(), block_servers, *record_families(servers, ("model", "peer_id")), *swarm]


# ---------------------------------------------------------------------------------------------- the poller (I/O)


def read_swarm(dht) -> dict[str, tuple[int, list[ServerInfo]]]:
    """Every model of the swarm with its servers' records, as `swarm status` reads them."""
    from swarm.dht_records import fetch_models, fetch_servers

    return {prefix: (n, fetch_servers(dht, prefix, n)) for prefix, n in fetch_models(dht).items()}


class Poller:
    """Reads the swarm every `period` seconds in a thread of its own; `snapshot` is always the latest result."""

    def __init__(self, dht, period: float, private: bool):
        if period <= 0:
            raise ValueError(f"--poll-period must be positive, got {period}")
        self.dht, self.period = dht, period
        self.snapshot = Snapshot(private=private)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarm-monitor-poller", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def poll(self) -> Snapshot:
        old = self.snapshot
        try:
            models = read_swarm(self.dht)
        except Exception as exc:  # noqa: BLE001 - the page shows it; the next poll tries again
            logger.warning("reading the swarm failed: %s", exc)
            self.snapshot = Snapshot(old.models, old.last_seen, old.private, old.polled_at, f"{type(exc).__name__}: {exc}",
                                     old.polls + 1, old.failed_polls + 1)
            return self.snapshot
        now = time.time()
        listed = {s.peer_id.to_base58() for _, servers in models.values() for s in servers}
        self.snapshot = Snapshot(models, {peer: now for peer in listed}, old.private, now, None, old.polls + 1,
                                 old.failed_polls)
        return self.snapshot

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period + 30)


# ---------------------------------------------------------------------------------------------- the web app


def create_app(poller: Poller):
    """The monitor's ASGI app over `poller` (in-process for tests: starlette.testclient.TestClient(create_app(...)))."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    class Collector:
        def collect(self):
            return iter(snapshot_families(poller.snapshot))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    page = PAGE.read_text(encoding="utf-8")

    async def index(request):
        return HTMLResponse(page)

    async def api_swarm(request):
        return JSONResponse(swarm_view(poller.snapshot))

    async def metrics(request):
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/", index), Route("/api/swarm", api_swarm), Route("/metrics", metrics)])


def start_monitor(config: MonitorConfig) -> Poller:
    """Join the swarm (a clear error if that fails) and start polling it."""
    from swarm.auth import Keyring
    from swarm.join import join_swarm

    keyring = config.swarm_key if isinstance(config.swarm_key, Keyring) else Keyring.load(config.swarm_key)
    dht = join_swarm(list(config.initial_peers), swarm_key=keyring, client_mode=True)
    return Poller(dht, config.poll_period, private=keyring is not None).start()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments
    from swarm.options import add_arguments as add_options

    add_swarm_arguments(parser)
    add_options(parser, MonitorConfig)


def listen(host: str, port: int):
    """The web server's socket, bound here so that a port in use is one clear error (port 0: any free one)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be a TCP port (0-65535; 0: any free one), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") from None
    return sock


@contextlib.contextmanager
def serving(app, host: str, port: int):
    """Serve the ASGI `app` on `host`:`port` (0: any free one) in a thread while the block runs; yields its URL (the
    demo's gateway and monitor, and tests, serve their apps so)."""
    import uvicorn

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"the web server on {host}:{sock.getsockname()[1]} did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from swarm.options import from_args

    config = from_args(MonitorConfig, args)
    sock = listen(config.host, config.port)
    poller = start_monitor(config)
    try:
        port = sock.getsockname()[1]
        print(f"Monitor at http://{config.host}:{port}/ (JSON: /api/swarm, Prometheus: /metrics)", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(poller), log_level="warning"))
        server.run(sockets=[sock])
    finally:
        poller.stop()
        poller.dht.shutdown()
        sock.close()
    return 0
