"""Codec interface for tensors compressed in transit: the payload record, strict validation, byte accounting.

A codec turns a floating-point tensor into a `Payload` (a few plain tensors plus JSON-able metadata) and back.
Decoding treats the payload as untrusted input: anything inconsistent raises `CodecError` naming the problem,
never another exception and never a silently wrong tensor.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swarm.dtypes import FLOAT_DTYPES, dtype_name

MAX_RANK = 8
MAX_ELEMENTS = 1 << 30  # the same limit as swarm.tensors.MAX_TENSOR_ELEMENTS
FLOAT32_MAX = torch.finfo(torch.float32).max


class CodecError(ValueError):
    """A tensor cannot be encoded, or a payload is malformed; the message says what was wrong."""


@dataclass(frozen=True)
class Payload:
    """What a codec puts on the wire: its id, a few plain tensors and a small JSON-able metadata dict."""

    codec: str
    tensors: Sequence[torch.Tensor]
    meta: dict[str, Any]


@dataclass(frozen=True)
class PayloadSize:
    """Bytes of a payload in a wire slot (see swarm.compression.wire): its tensors' bytes and its header's."""

    raw_bytes: int
    meta_bytes: int

    @property
    def wire_bytes(self) -> int:
        return self.raw_bytes + self.meta_bytes


def meta_json(meta: Any) -> str:
    """Metadata (a dict or a list of values) as compact JSON (sorted keys, no NaN); CodecError if it is not JSON-able."""
    try:
        return json.dumps(meta, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"metadata is not JSON-able: {exc}") from None


@dataclass(frozen=True)
class Layout:
    """Shape and dtype of the original tensor, seen as rows (tokens) x cols (channels, the last dim)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])


# ------------------------------------------------------------------------------------------- validation helpers


def check_keys(meta: Any, keys: Sequence[str], what: str = "metadata") -> dict[str, Any]:
    """The metadata must be a dict with exactly these keys."""
    if not isinstance(meta, dict):
        raise CodecError(f"{what} must be a dict, got {type(meta).__name__}")
    missing = [k for k in keys if k not in meta]
    extra = sorted(str(k) for k in meta if k not in keys)
    if missing or extra:
        raise CodecError(f"{what} keys: missing {missing}, unexpected {extra} (expected {sorted(keys)})")
    return meta


def read_int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """An integer metadata field in [lo, hi] (bools are not integers here)."""
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(f"metadata {key!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CodecError(f"metadata {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def read_str(meta: dict[str, Any], key: str) -> str:
    value = meta[key]
    if not isinstance(value, str):
        raise CodecError(f"metadata {key!r} must be a string, got {type(value).__name__}")
    return value


def read_layout(meta: dict[str, Any]) -> Layout:
    """The 'shape' (1..8 non-negative ints, at most MAX_ELEMENTS in all) and 'dtype' (a float dtype name)."""
    shape = meta["shape"]
    if not isinstance(shape, list | tuple) or not 1 <= len(shape) <= MAX_RANK:
        raise CodecError(f"metadata 'shape' must be a list of 1..{MAX_RANK} integers, got {shape!r:.100}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_ELEMENTS:
            raise CodecError(f"metadata 'shape' {shape!r:.100} has an invalid dimension {d!r:.40}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # zeros aside too: torch cannot stride [0, 2**30, 2**30]
        raise CodecError(f"metadata 'shape' {shape} has more than {MAX_ELEMENTS} elements (counting zeros as 1)")
    name = meta["dtype"]
    if not isinstance(name, str) or name not in FLOAT_DTYPES:
        raise CodecError(f"metadata 'dtype' {name!r:.40} is not one of {sorted(FLOAT_DTYPES)}")
    return Layout(tuple(shape), FLOAT_DTYPES[name])


def check_tensors(tensors: Any, count: int | None = None) -> list[torch.Tensor]:
    """A list or tuple of dense tensors on one device, `count` of them if given."""
    if not isinstance(tensors, list | tuple):
        raise CodecError(f"payload tensors must be a list, got {type(tensors).__name__}")
    if count is not None and len(tensors) != count:
        raise CodecError(f"payload has {len(tensors)} tensors, expected {count}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"payload tensor {i} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
            raise CodecError(f"payload tensor {i} is not a plain dense tensor")
    if len({t.device for t in tensors}) > 1:
        raise CodecError("payload tensors are on different devices")
    return list(tensors)


def expect(tensor: torch.Tensor, name: str, dtypes: torch.dtype | tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    """The payload tensor `name` must have one of these dtypes and exactly this shape."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if tensor.dtype not in dtypes:
        raise CodecError(f"payload tensor {name!r} has dtype {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tuple(tensor.shape) != tuple(shape):
        raise CodecError(f"payload tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf (one min/max pass: both propagate NaN)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite(tensor: torch.Tensor, name: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    """Every value is finite and within [lo, hi]."""
    if tensor.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CodecError(f"payload tensor {name!r} has NaN or infinite values")
    if low < lo or high > hi:
        raise CodecError(f"payload tensor {name!r} has values outside [{lo:g}, {hi:g}]")


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to `dtype`, clamping to its largest finite value instead of overflowing to inf."""
    if x.dtype == dtype:
        return x
    if torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        limit = torch.finfo(dtype).max  # exact in float32, not in bfloat16 (65504 would round to 65536)
        x = x.float().clamp(-limit, limit)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------- codec


class Codec(ABC):
    """Encodes float tensors (float32/float16/bfloat16, rank 1..8) into a Payload and decodes them back.

    The last dim is the channel dim; every other dim is flattened into rows (tokens). Subclasses implement
    `_encode` and `_decode` on 2-d rows and list their metadata fields in `meta_keys`; this class handles the
    common 'shape' and 'dtype' fields and all checks on inputs and outputs.
    """

    id: str
    meta_keys: tuple[str, ...] = ()

    def encode(self, tensor: torch.Tensor) -> Payload:
        """Encode a finite float tensor; CodecError on non-finite values or unsupported dtype/shape."""
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"can only encode a tensor, got {type(tensor).__name__}")
        name = dtype_name(tensor.dtype) if tensor.dtype in FLOAT_DTYPES.values() else None
        if name is None:
            raise CodecError(f"cannot encode dtype {tensor.dtype}; supported: {sorted(FLOAT_DTYPES)}")
        if not 1 <= tensor.dim() <= MAX_RANK or tensor.numel() > MAX_ELEMENTS:
            raise CodecError(f"cannot encode shape {list(tensor.shape)}: rank 1..{MAX_RANK}, at most {MAX_ELEMENTS} elements")
        tensor = tensor.detach()
        if not all_finite(tensor):
            raise CodecError("cannot encode a tensor with NaN or infinite values")
        layout = Layout(tuple(tensor.shape), tensor.dtype)
        rows = tensor.reshape(layout.rows, layout.cols)
        tensors, meta = self._encode(rows, layout)
        return Payload(self.id, tensors, {"shape": list(layout.shape), "dtype": name, **meta})

    def decode(self, payload: Payload, *, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode a payload to its original shape, in `dtype` (default: the original dtype).

        `shape`, if given, is what the caller expects; a payload of any other shape is rejected.
        """
        if not isinstance(payload, Payload):
            raise CodecError(f"can only decode a Payload, got {type(payload).__name__}")
        if payload.codec != self.id:
            raise CodecError(f"payload is for codec {payload.codec!r:.60}, this codec is {self.id!r}")
        meta = check_keys(payload.meta, ("shape", "dtype", *self.meta_keys))
        layout = read_layout(meta)
        if shape is not None and tuple(shape) != layout.shape:
            raise CodecError(f"payload has shape {list(layout.shape)}, expected {list(shape)}")
        if dtype is not None and dtype not in FLOAT_DTYPES.values():
            raise CodecError(f"cannot decode to dtype {dtype}; supported: {sorted(FLOAT_DTYPES)}")
        shapes = self._shapes(meta, layout)
        rows = self._decode(check_tensors(payload.tensors, len(shapes)), meta, layout, shapes)
        if tuple(rows.shape) != (layout.rows, layout.cols):  # a bug in a codec, not in the payload
            raise AssertionError(f"{self.id} decoded {list(rows.shape)}, expected {[layout.rows, layout.cols]}")
        if not all_finite(rows):  # checked before the cast, which would clamp inf to a finite value
            raise CodecError("payload decodes to NaN or infinite values")
        return saturating_cast(rows, dtype or layout.dtype).reshape(layout.shape)

    def payload_shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        """The shape of each payload tensor for this metadata (the codec's fields) and layout; CodecError if a
        field is invalid. The wire format sends only the metadata and derives the shapes from it."""
        return [tuple(s) for s in self._shapes(check_keys(meta, ("shape", "dtype", *self.meta_keys)), layout)]

    @abstractmethod
    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        """Validate the codec's metadata fields and return the payload tensors' shapes."""

    @abstractmethod
    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Encode [rows, cols] (in the input's dtype) into payload tensors and codec-specific metadata."""

    @abstractmethod
    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        """Validate the payload tensors (as many as `shapes`, which _shapes gave for the already checked metadata),
        and return [rows, cols] in any float dtype."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"
