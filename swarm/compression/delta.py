"""Delta coding of training activations against the previous epoch's (AC-SGD style).

A training sample's activations at a span boundary change little from one epoch to the next (only the adapter
moves), so both ends of a hop keep the value they last exchanged for that sample (the *reference*) and the next
epoch sends only the change, with a low-bit codec. Each row of a batch (one sample) travels in one of three modes:

- "f" (full): no shared reference yet; the row is sent with the full codec (e.g. int8_outlier).
- "d" (delta): the row minus the reference, with the delta codec (e.g. int4_outlier).
- "s" (same): the row is bit for bit the one that produced the reference (a frozen embedding's output for a
  sample seen before): nothing is sent, and the receiver uses its reference again.

Both ends then store the same reconstruction (the decoded full row, or reference + decoded delta) as the next
reference, so errors do not accumulate: each epoch's error is that of quantizing one epoch's change. References
are named by a digest of their bytes; a receiver whose reference is missing or differs refuses the rows, and the
sender falls back to a full send (counted). Keys name a sample by the content of its input row (`row_keys`), so
a shuffled dataset finds its references without sample ids.

Pure functions and a bounded store; the client and server wire them into requests (client.remote_sequential,
server.handler).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from swarm.bounded import BoundedStore
from swarm.compression.base import Codec, CodecError, Payload

MODES = frozenset("fds")
KEY_CHARS = 32  # hex digits of a sample key (16 bytes of blake2b)
DIGEST_CHARS = 16


def row_keys(*tensors: torch.Tensor | None) -> list[str]:
    """A key per row (dim 0) from the rows' contents: the same sample in a later epoch gets the same key."""
    present = [t.detach().cpu().contiguous() for t in tensors if t is not None]
    keys = []
    for row in range(present[0].shape[0]):
        h = hashlib.blake2b(digest_size=KEY_CHARS // 2)
        for t in present:
            h.update(str((t.dtype, tuple(t.shape[1:]))).encode())
            h.update(t[row].reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def digest(tensor: torch.Tensor) -> str:
    """A short digest of a reference's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=DIGEST_CHARS // 2)
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Reference:
    tensor: torch.Tensor  # the reconstruction both ends hold
    digest: str  # of `tensor`
    source: str = ""  # the sender's digest of the row that produced it ("" on the receiving end)


class DeltaStore(BoundedStore):
    """References by key, bounded in bytes (least recently used first out) and expiring after `ttl` s unused."""

    def put(self, key: tuple, tensor: torch.Tensor, source: str = "") -> Reference:  # type: ignore[override]
        ref = Reference(tensor, digest(tensor), source)
        super().put(key, ref, tensor.numel() * tensor.element_size())
        return ref


@dataclass
class DeltaEncoded:
    """One batch, delta-coded: a mode per row, the payloads of the full and delta rows, each row's reconstruction
    (the next reference on both ends) and the digest of each row as given (its reference's `source`)."""

    modes: str
    full: Payload | None
    delta: Payload | None
    states: list[torch.Tensor]
    sources: list[str]


def delta_encode(x: torch.Tensor, refs: list[Reference | None], full_codec: Codec, delta_codec: Codec) -> DeltaEncoded:
    """Rows of x [rows, ...] with a reference of the same shape go as deltas, or not at all when the row is the
    one that produced the reference; the others go in full."""
    if len(refs) != x.shape[0]:
        raise CodecError(f"{len(refs)} references for {x.shape[0]} rows")
    x = x.detach().float()
    modes, sources = [], [digest(row) for row in x]
    for row, ref, source in zip(x, refs, sources, strict=True):
        if ref is None or ref.tensor.shape != row.shape:
            modes.append("f")
        else:
            modes.append("s" if ref.source == source else "d")
    full_rows = [i for i, m in enumerate(modes) if m == "f"]
    delta_rows = [i for i, m in enumerate(modes) if m == "d"]
    states: list[torch.Tensor] = [refs[i].tensor if m == "s" else None for i, m in enumerate(modes)]  # type: ignore[misc,union-attr]
    full = delta = None
    if full_rows:
        full = full_codec.encode(x[full_rows])
        for i, value in zip(full_rows, full_codec.decode(full).float(), strict=True):
            states[i] = value
    if delta_rows:
        base = torch.stack([refs[i].tensor for i in delta_rows])  # type: ignore[union-attr]
        delta = delta_codec.encode(x[delta_rows] - base)
        for i, ref, change in zip(delta_rows, base, delta_codec.decode(delta).float(), strict=True):
            states[i] = ref + change
    return DeltaEncoded("".join(modes), full, delta, states, sources)


def delta_decode(modes: str, full: torch.Tensor | None, delta: torch.Tensor | None,
                 refs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Each row's reconstruction from the decoded full rows, decoded deltas and this end's references.

    CodecError if the modes are malformed, a payload's row count or row shape disagrees with them, or a "d"/"s"
    row has no reference (the caller checks reference digests before).
    """
    if not isinstance(modes, str) or not set(modes) <= MODES or len(modes) != len(refs):
        raise CodecError(f"delta modes {modes!r:.80} must be one of 'f', 'd', 's' per row ({len(refs)} rows)")
    counts = {m: modes.count(m) for m in MODES}
    for name, tensor, mode in (("full", full, "f"), ("delta", delta, "d")):
        rows = 0 if tensor is None else tensor.shape[0]
        if rows != counts[mode]:
            raise CodecError(f"{name} rows: {rows} sent, the modes name {counts[mode]}")
    shapes = {tuple(t.shape[1:]) for t in (full, delta) if t is not None and t.shape[0]}
    shapes |= {tuple(r.shape) for r, m in zip(refs, modes, strict=True) if m != "f" and r is not None}
    if len(shapes) > 1:
        raise CodecError(f"delta rows disagree in shape: {sorted(shapes)}")
    out: list[torch.Tensor] = []
    full_iter = iter(full.float()) if full is not None else iter(())
    delta_iter = iter(delta.float()) if delta is not None else iter(())
    for i, mode in enumerate(modes):
        if mode == "f":
            out.append(next(full_iter))
            continue
        ref = refs[i]
        if ref is None:
            raise CodecError(f"row {i} is sent as {'a delta' if mode == 'd' else 'unchanged'} but has no reference here")
        out.append(ref if mode == "s" else ref + next(delta_iter))
    return out
