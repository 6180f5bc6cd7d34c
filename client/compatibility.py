"""Which servers a client can work with at all: those that speak a protocol version it speaks (swarm.versions) and
that loaded the model it loaded (swarm.identity). A pure rule, and the cached digests and log lines around it that
the routing rules call (client.routing.exclusion's `compatibility`)."""

from __future__ import annotations

import logging
import threading

from swarm import versions
from swarm.dht_records import ServerInfo, ServerRecord
from swarm.identity import ModelIdentity

logger = logging.getLogger(__name__)


def incompatibility(record: ServerRecord, client_versions: versions.Range, config_digest: str,
                    weights_digest: str | None) -> tuple[str, str] | None:
    """(code, text) when a client cannot use this server, else None. `config_digest` and `weights_digest` are what
    the client's own checkpoint gives for the server's span (None: the client cannot tell, e.g. a hub checkpoint
    whose shards of those blocks it never downloaded). A server that announces no digest (older than digests)
    cannot be checked and is used."""
    server_versions = versions.normalized(record.protocol_min, record.protocol_max)
    if versions.common_version(server_versions, client_versions) is None:
        return "protocol", (f"speaks protocol version {versions.describe(server_versions)} (software {record.version}), "
                            f"this client {versions.describe(client_versions)}")
    if record.config_digest and record.config_digest != config_digest:
        return "model", (f"loaded another config of this model (digest {record.config_digest[:8]}, this client's "
                         f"checkpoint gives {config_digest[:8]})")
    if record.weights_digest and weights_digest is not None and record.weights_digest != weights_digest:
        return "model", (f"loaded other weights for blocks {record.start}:{record.end} (digest "
                         f"{record.weights_digest[:8]}, this client's checkpoint gives {weights_digest[:8]})")
    return None


class Compatibility:
    """incompatibility() for each server of a client's view, against the client's own checkpoint (`identity`, None:
    versions only): span digests are computed when a span is first seen, and each server left out is logged once."""

    def __init__(self, identity: ModelIdentity | None = None, client_versions: versions.Range | None = None):
        self.identity = identity
        self.client_versions = client_versions or versions.ours()
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, server: ServerInfo) -> tuple[str, str] | None:
        record = server.record
        config, weights = "", None
        if self.identity is not None:
            config = self.identity.config
            if record.weights_digest:
                weights = self.identity.span(record.start, record.end)
        reason = incompatibility(record, self.client_versions, config or record.config_digest, weights)
        if reason is not None:
            with self._lock:
                first = (str(server.peer_id), reason[1]) not in self._logged
                self._logged.add((str(server.peer_id), reason[1]))
            if first:
                log = logger.warning if reason[0] == "model" else logger.info
                log("leaving server %s out of routes: it %s", server.peer_id, reason[1])
        return reason
