"""A server's own counters at http://HOST:PORT/metrics in Prometheus' text format (`swarm server --metrics-port N`).

The figures of its record (swarm.metrics: the same names `swarm monitor` uses, so the two agree), as of the moment
of the scrape rather than of the last announcement, plus what only the server knows: open sessions, requests by kind,
bytes in and out, compute time. prometheus_client's own HTTP server answers from a thread of its own: a scrape never
waits on the event loop, and only reads counters the loop updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from swarm.dht_records import ServerRecord
from swarm.metrics import record_families

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSample:
    """What one scrape shows: the record the server would announce now and its handler's counters."""

    model: str
    peer_id: str
    record: ServerRecord
    sessions_open: int
    bytes_in: int  # on the wire, received and sent
    bytes_out: int
    raw_in: int  # the same tensors uncompressed
    raw_out: int
    by_kind: dict[str, int] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)


def sample_families(sample: ServerSample) -> list[Metric]:
    labels = ("model", "peer_id")
    values = (sample.model, sample.peer_id)
    families = record_families([(values, sample.record)], labels)
    sessions = GaugeMetricFamily("swarm_server_sessions_open", "inference sessions open now", labels=list(labels))
    sessions.add_metric(list(values), sample.sessions_open)
    by_kind = CounterMetricFamily("swarm_server_requests_by_kind", "requests served, by kind",
                                  labels=[*labels, "kind"])
    for kind, count in sorted(sample.by_kind.items()):
        by_kind.add_metric([*values, kind], count)
    compute = CounterMetricFamily("swarm_server_compute_seconds", "seconds on the compute thread, by request kind",
                                  labels=[*labels, "kind"])
    for kind, seconds in sorted(sample.compute_s.items()):
        compute.add_metric([*values, kind], seconds)
    directed = []
    for name, help_text, incoming, outgoing in (
            ("swarm_server_wire_bytes_by_direction", "tensor bytes on the wire, received (in) and sent (out)",
             sample.bytes_in, sample.bytes_out),
            ("swarm_server_raw_bytes_by_direction", "the same tensors uncompressed", sample.raw_in, sample.raw_out)):
        family = CounterMetricFamily(name, help_text, labels=[*labels, "direction"])
        family.add_metric([*values, "in"], incoming)
        family.add_metric([*values, "out"], outgoing)
        directed.append(family)
    return [*families, sessions, by_kind, compute, *directed]


class SampleCollector:
    """A prometheus_client collector over `read()`: None while the server has nothing to show (still loading)."""

    def __init__(self, read: Callable[[], ServerSample | None]):
        self.read = read

    def collect(self):
        sample = self.read()
        return iter(sample_families(sample) if sample is not None else [])


class MetricsEndpoint:
    """The HTTP server of --metrics-port, started and stopped with the server."""

    def __init__(self, host: str, port: int, read: Callable[[], ServerSample | None]):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SampleCollector(read))
        try:
            self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise RuntimeError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               f"choose a free port or leave --metrics-port out") from None
        self.port = self.httpd.server_address[1]
        logger.info("metrics at http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
