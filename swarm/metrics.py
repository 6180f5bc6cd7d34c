"""Prometheus metric families of a server's record, shared by a server's own /metrics (server.metrics) and by
`swarm monitor` (client.monitor), so that both name the same figure the same way.

Pure functions from records to prometheus_client families: whoever serves them decides the labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from swarm.dht_records import ServerRecord, ServerState

# (metric name, help, counter or gauge, the record's value); a counter's name gets "_total" in the text format.
RECORD_METRICS = (
    ("swarm_server_online", "1 if the server's record says it is online (0: joining or offline)", "gauge",
     lambda r: float(r.state == ServerState.ONLINE)),
    ("swarm_server_span_start", "first block the server hosts", "gauge", lambda r: r.start),
    ("swarm_server_span_end", "block after the last one the server hosts", "gauge", lambda r: r.end),
    ("swarm_server_ms_per_block", "measured milliseconds of one block for a decode step (batch 1)", "gauge",
     lambda r: r.ms_per_block),
    ("swarm_server_forward_tokens_per_second", "measured forward throughput of the server's whole span", "gauge",
     lambda r: r.forward_tokens_per_s),
    ("swarm_server_kv_cache_free_bytes", "free bytes of the server's KV-cache budget", "gauge",
     lambda r: r.cache_bytes_left),
    ("swarm_server_kv_cache_bytes", "the server's KV-cache budget in bytes (0: not announced)", "gauge",
     lambda r: r.cache_bytes),
    ("swarm_server_kv_cache_tokens_left", "tokens (batch * max_length) of a session over the whole span that fit now",
     "gauge", lambda r: r.cache_tokens_left),
    ("swarm_server_requests", "requests the server served since it started", "counter", lambda r: r.requests),
    ("swarm_server_errors", "requests the server refused or failed since it started", "counter", lambda r: r.errors),
    ("swarm_server_wire_bytes", "tensor bytes the server received and sent on the wire since it started", "counter",
     lambda r: r.bytes_wire),
    ("swarm_server_raw_bytes", "the same tensors' bytes uncompressed", "counter", lambda r: r.bytes_raw),
)


def record_families(servers: Iterable[tuple[Sequence[str], ServerRecord]], label_names: Sequence[str]) -> list[Metric]:
    """One family per RECORD_METRICS entry (plus swarm_server_info), a sample per (label values, record) given; a
    figure the record does not have (None) is left out rather than shown as 0."""
    families: list[Metric] = []
    servers = list(servers)
    for name, help_text, kind, value in RECORD_METRICS:
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(name, help_text, labels=list(label_names))
        for labels, record in servers:
            figure = value(record)
            if figure is not None:
                family.add_metric(list(labels), float(figure))
        families.append(family)
    info = InfoMetricFamily("swarm_server", "what a server announces about itself",
                            labels=list(label_names))
    for labels, record in servers:
        info.add_metric(list(labels), {"public_name": record.public_name, "version": record.version,
                                       "state": record.state.value, "device": record.device,
                                       "dtype": record.torch_dtype, "quant": record.quant,
                                       "blocks": f"{record.start}:{record.end}"})
    families.append(info)
    return families
