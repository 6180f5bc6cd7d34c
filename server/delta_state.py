"""The server's end of delta-coded training streams (see swarm.compression.delta): references per peer, hop and
sample, bounded in memory; decoding a request's rows and encoding the output's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hivemind.proto import runtime_pb2

from server.lora_cache import PEER_OF_KEY
from swarm import compression
from swarm.compression.base import CodecError
from swarm.compression.delta import DeltaStore, delta_decode, delta_encode
from swarm.errors import BadRequest, DeltaStateMissing
from swarm.protocol import DeltaInfo
from swarm.tensors import pack_payload, unpack_tensor


class ServerDelta:
    """References of the inputs ("in") and outputs ("out") this server exchanged with each peer, by sample key."""

    def __init__(self, max_bytes: int, ttl: float):
        self.store = DeltaStore(max_bytes, ttl, **PEER_OF_KEY)  # fair among peers, as the LoRA cache
        self.rows = dict.fromkeys(("full", "delta", "same"), 0)  # rows received or sent in each mode
        self.refused = 0  # requests refused for a missing or different reference (the client then sends in full)

    def decode_input(self, info: DeltaInfo, full: runtime_pb2.Tensor, delta: runtime_pb2.Tensor, peer: str,
                     start: int, end: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """The hidden states [rows, length, hidden] of a delta-coded request, and a function that stores them as
        the new references (to call once the request is validated)."""
        keys = [(peer, start, end, "in", key) for key in info.keys]
        refs = []
        missing = 0
        for key, mode, want in zip(keys, info.modes, info.refs, strict=True):
            ref = self.store.get(key) if mode != "f" else None
            if mode != "f" and (ref is None or ref.digest != want):
                missing += 1
            refs.append(ref.tensor if ref is not None else None)
        if missing:
            self.refused += 1
            raise DeltaStateMissing(f"{missing} of {len(keys)} rows refer to activations this server does not hold "
                                    "(evicted, restarted or a new route); send them in full")
        try:
            rows = delta_decode(info.modes, _rows(full, "full rows"), _rows(delta, "delta rows"), refs)
        except CodecError as exc:
            raise BadRequest(f"delta-coded hidden states: {exc}") from None

        def commit() -> None:
            for key, mode, row in zip(keys, info.modes, rows, strict=True):
                if mode != "s":
                    self.store.put(key, row)
            self._count(info.modes)

        return torch.stack(rows), commit

    def encode_output(self, info: DeltaInfo, output: torch.Tensor, full_codec: str, peer: str, start: int,
                      end: int) -> tuple[str, list[runtime_pb2.Tensor]]:
        """(modes, [full rows, deltas]) of the output; a row goes as a delta only where the client's reference
        (its digest in `out_refs`) is the one stored here."""
        keys = [(peer, start, end, "out", key) for key in info.keys]
        refs = []
        for key, want in zip(keys, info.out_refs, strict=True):
            ref = self.store.get(key) if want else None
            refs.append(ref if ref is not None and ref.digest == want else None)
        encoded = delta_encode(output, refs, compression.get(full_codec or "none"), compression.get(info.codec or "none"))
        for key, mode, state, source in zip(keys, encoded.modes, encoded.states, encoded.sources, strict=True):
            if mode != "s":
                self.store.put(key, state, source)
        self._count(encoded.modes)
        return encoded.modes, [pack_payload(encoded.full, output), pack_payload(encoded.delta, output)]

    def _count(self, modes: str) -> None:
        for mode in self.rows:
            self.rows[mode] += modes.count(mode[0])

    def info(self) -> dict:
        return {"delta_refs": len(self.store), "delta_ref_bytes": self.store.bytes,
                **{f"delta_rows_{mode}": count for mode, count in self.rows.items()}, "delta_refused": self.refused}


def _rows(proto: runtime_pb2.Tensor, what: str) -> torch.Tensor | None:
    tensor = unpack_tensor(proto, what)
    if tensor.dim() != 3 or not tensor.is_floating_point():
        raise BadRequest(f"{what} must be a float tensor [rows, length, hidden], got {tensor.dtype} {list(tensor.shape)}")
    return tensor if tensor.shape[0] else None
