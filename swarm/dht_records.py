"""DHT keys, the server record schema, and read/write helpers over hivemind.DHT.

A server stores one record per hosted block under `{prefix}.{block}` with its peer ID as the
subkey, and one entry in the model index. Records expire by themselves, so a crashed server
disappears from the swarm without anyone noticing it explicitly.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm import __version__
from swarm.config import ServerConfig

MODEL_INDEX_KEY = "_swarm.models"


class ServerState(str, enum.Enum):
    OFFLINE = "offline"
    JOINING = "joining"
    ONLINE = "online"


@dataclass(frozen=True)
class ServerRecord:
    """What a server tells the swarm about itself. Parses older and newer versions without failing."""

    state: ServerState
    start: int
    end: int
    public_name: str = ""
    version: str = __version__
    torch_dtype: str = "float32"
    device: str = ""  # what computes its blocks: "cpu", "cuda: NVIDIA H200", "2 x cuda: ..." ("": not announced)
    quant: str = "none"  # how its blocks' linear layers are quantized (swarm.quantize): none, int8, nf4
    ms_per_block: float | None = None  # measured time of one block for a decode step (batch 1)
    forward_tokens_per_s: float | None = None  # measured throughput of the whole span for a forward pass
    cache_tokens_left: int = 0  # tokens (batch_size * max_length) of a session over its whole span that fit now
    cache_bytes_left: int = 0  # free bytes of its KV-cache budget, and the budget (0: not announced)
    cache_bytes: int = 0
    codecs: tuple[str, ...] = ("none",)
    adapters: tuple[str, ...] = ()
    bytes_raw: int = 0  # tensors this server received and sent since it started, uncompressed
    bytes_wire: int = 0  # the same on the wire
    requests: int = 0  # requests it served since it started, and those it refused or failed (for monitors)
    errors: int = 0
    rebalances: bool = False  # it moves to other blocks when the swarm needs them (see server.block_selection)
    # Protocol versions it speaks (swarm.versions); a record older than ranges speaks version 1 only.
    protocol_min: int = 1
    protocol_max: int = 1
    # What it loaded (swarm.identity): digests of the model's config and of its span's weights ("": not announced).
    config_digest: str = ""
    weights_digest: str = ""
    # The largest request it takes: batch x length tokens, and batch (a record without them: the servers' defaults).
    max_chunk_tokens: int = ServerConfig.max_chunk_tokens
    max_batch_size: int = ServerConfig.max_batch_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["codecs"], data["adapters"] = list(self.codecs), list(self.adapters)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ServerRecord | None:
        """None when the value is not a usable record (garbage in the DHT must not break a client)."""
        if not isinstance(data, dict):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["state"] = ServerState(values.get("state"))
            start, end = int(values.pop("start")), int(values.pop("end"))
            for name in ("codecs", "adapters"):
                if name in values:
                    values[name] = tuple(str(x) for x in values[name])
            values["rebalances"] = values.get("rebalances") is True
            for name in ("protocol_min", "protocol_max"):
                if name in values:
                    values[name] = int(values[name])
            for name in ("config_digest", "weights_digest", "device", "quant"):
                if not isinstance(values.get(name, ""), str):
                    values.pop(name)
            for name in ("cache_bytes_left", "cache_bytes", "requests", "errors"):
                if not (type(values.get(name)) is int and values[name] >= 0):
                    values.pop(name, None)
            for name in ("max_chunk_tokens", "max_batch_size"):  # a bad limit is ignored, not the whole record
                if not (type(values.get(name)) is int and values[name] >= 1):
                    values.pop(name, None)
            record = cls(start=start, end=end, **values)
        except (KeyError, ValueError, TypeError):
            return None
        return record if 0 <= record.start < record.end else None


@dataclass(frozen=True)
class ServerInfo:
    peer_id: PeerID
    record: ServerRecord


def block_key(prefix: str, index: int) -> str:
    return f"{prefix}.{index}"


# ---------------------------------------------------------------------------------------------- writes


async def _store_span(dht: DHT, node: DHTNode, prefix: str, num_blocks: int, record: dict, expiration_time: float) -> None:
    keys = [block_key(prefix, i) for i in range(record["start"], record["end"])]
    subkey = node.peer_id.to_base58()
    # The index entry is the server's own too (subkey: its peer id), so that in a private swarm every entry has one
    # owner who signs it (swarm.record_auth); older servers used the model's name as the subkey.
    await node.store_many(keys=keys + [MODEL_INDEX_KEY],
                          values=[record] * len(keys) + [{"model": prefix, "num_blocks": num_blocks}],
                          expiration_time=expiration_time, subkeys=[subkey] * (len(keys) + 1), num_workers=8)


def announce_span(dht: DHT, prefix: str, num_blocks: int, record: ServerRecord, expiration: float,
                  timeout: float = 10.0) -> bool:
    """Store the record under every block of the span; it expires `expiration` seconds from now.

    Returns False if the DHT did not confirm within `timeout` (for example, when no other peer is reachable).
    """
    future = dht.run_coroutine(partial(_store_span, prefix=prefix, num_blocks=num_blocks, record=record.to_dict(),
                                       expiration_time=get_dht_time() + expiration), return_future=True)
    try:
        future.result(timeout)
        return True
    except TimeoutError:
        future.cancel()
        return False


# ---------------------------------------------------------------------------------------------- reads


async def _get_many(dht: DHT, node: DHTNode, keys: list[str]) -> dict[str, Any]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=8)
    result = {}
    for key, entry in found.items():
        value = entry.value if entry is not None else None
        if isinstance(value, dict):
            result[key] = {subkey: item.value for subkey, item in value.items()}
    return result


def fetch_servers(dht: DHT, prefix: str, num_blocks: int) -> list[ServerInfo]:
    """Every live server of a model with its record (state offline included; callers filter)."""
    keys = [block_key(prefix, i) for i in range(num_blocks)]
    raw = dht.run_coroutine(partial(_get_many, keys=keys))
    servers: dict[str, ServerRecord] = {}
    for key in keys:
        for subkey, value in raw.get(key, {}).items():
            record = ServerRecord.from_dict(value)
            if record is None or record.end > num_blocks or not isinstance(subkey, str):
                continue
            known = servers.get(subkey)
            # A server that moved to other blocks leaves offline records under the ones it left until they expire:
            # its record under the blocks it hosts now is the one that counts.
            if known is None or (known.state == ServerState.OFFLINE and record.state != ServerState.OFFLINE):
                servers[subkey] = record
    result = []
    for subkey, record in servers.items():
        try:
            result.append(ServerInfo(PeerID.from_base58(subkey), record))
        except ValueError:
            continue
    return sorted(result, key=lambda s: (s.record.start, s.record.end, s.peer_id.to_base58()))


def fetch_models(dht: DHT) -> dict[str, int]:
    """Models the swarm serves: DHT prefix -> number of blocks."""
    raw = dht.run_coroutine(partial(_get_many, keys=[MODEL_INDEX_KEY])).get(MODEL_INDEX_KEY, {})
    models = {}
    for subkey, value in raw.items():
        if not isinstance(value, dict) or not isinstance(value.get("num_blocks"), int):
            continue
        prefix = value.get("model", subkey)  # entries of older servers are keyed by the model's name
        if isinstance(prefix, str):
            models[prefix] = value["num_blocks"]
    return models
