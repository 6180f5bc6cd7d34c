"""The client's end of delta-coded training streams (see swarm.compression.delta): references by hop and sample,
the request fields and slots for a hop's input, and the reconstruction of its output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hivemind.proto import runtime_pb2

from swarm import compression
from swarm.compression.base import CodecError
from swarm.compression.delta import DeltaStore, delta_decode, delta_encode
from swarm.errors import RemoteError
from swarm.protocol import DeltaInfo, SpanReply
from swarm.tensors import pack_payload, unpack_tensor


@dataclass
class DeltaCounts:
    """Rows this client sent and received in full, as deltas, or not at all (unchanged), and fallbacks: rows
    sent or received in full although the client held a reference (the server lacked or had another one)."""

    rows_full: int = 0
    rows_delta: int = 0
    rows_same: int = 0
    fallbacks: int = 0


class ClientDelta:
    """References of each hop's input ("in") and output ("out") by (blocks, sample key), bounded in bytes."""

    def __init__(self, codec: str, full_codec: str, max_bytes: int):
        compression.get(codec)  # unknown codec: CodecError naming the known ones
        self.codec, self.full_codec = codec, full_codec
        self.store = DeltaStore(max_bytes)
        self.counts = DeltaCounts()

    def _refs(self, keys: list[str], start: int, end: int, direction: str):
        return [self.store.get((start, end, direction, key)) for key in keys]

    def encode_input(self, keys: list[str], start: int, end: int, hidden: torch.Tensor):
        """(DeltaInfo, [full rows slot, deltas slot], commit) for a hop's input; call commit() once it was accepted."""
        refs = self._refs(keys, start, end, "in")
        encoded = delta_encode(hidden, refs, compression.get(self.full_codec or "none"), compression.get(self.codec))
        out_refs = self._refs(keys, start, end, "out")
        info = DeltaInfo(keys=keys, modes=encoded.modes, refs=[r.digest if m != "f" else "" for r, m in zip(refs, encoded.modes, strict=True)],
                         out_refs=[r.digest if r is not None else "" for r in out_refs], codec=self.codec)
        slots = [pack_payload(encoded.full, hidden), pack_payload(encoded.delta, hidden)]

        def commit() -> None:
            for key, mode, state, source in zip(keys, encoded.modes, encoded.states, encoded.sources, strict=True):
                if mode != "s":
                    self.store.put((start, end, "in", key), state, source)
            self._count(encoded.modes)

        return info, slots, commit

    def decode_output(self, info: DeltaInfo, start: int, end: int, reply: runtime_pb2.ExpertResponse) -> torch.Tensor:
        """The output [rows, length, hidden] of a delta-coded reply; stores its rows as the new references."""
        modes = SpanReply.decode(reply.metadata).delta_modes
        if len(reply.tensors) != 2:
            raise RemoteError("bad_reply", f"a delta-coded reply carries 2 tensors, got {len(reply.tensors)}")
        refs = self._refs(info.keys, start, end, "out")
        usable = [r.tensor if r is not None and r.digest == want else None
                  for r, want in zip(refs, info.out_refs, strict=True)]
        full, delta = (unpack_tensor(t, "server output") for t in reply.tensors)
        try:
            rows = delta_decode(modes, full if full.shape[0] else None, delta if delta.shape[0] else None, usable)
        except CodecError as exc:
            raise RemoteError("bad_reply", f"delta-coded output: {exc}") from None
        for key, mode, row in zip(info.keys, modes, rows, strict=True):
            if mode != "s":
                self.store.put((start, end, "out", key), row)
        output = torch.stack(rows)
        self._count(modes)
        self.counts.fallbacks += sum(m == "f" and want != "" for m, want in zip(modes, info.out_refs, strict=True))
        return output

    def forget_inputs(self, keys: list[str], start: int, end: int) -> None:
        """After the server refused our references: drop them (the retry sends those rows in full)."""
        held = [key for key in keys if self.store.get((start, end, "in", key)) is not None]
        for key in held:
            self.store.drop((start, end, "in", key))
        self.counts.fallbacks += len(held)

    def _count(self, modes: str) -> None:
        self.counts.rows_full += modes.count("f")
        self.counts.rows_delta += modes.count("d")
        self.counts.rows_same += modes.count("s")
