"""Tensors on the wire: raw little-endian buffers checked against an allow-list of dtypes and their shapes, or
codec payloads (swarm.compression); and the byte counts of what was sent."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
from hivemind.proto import runtime_pb2

from swarm.compression import wire
from swarm.compression.base import CodecError, Payload
from swarm.devices import to_host
from swarm.dtypes import FLOAT_DTYPES, WIRE_DTYPES, dtype_name
from swarm.errors import BadRequest

MAX_TENSOR_ELEMENTS = 1 << 30


def pack_tensor(tensor: torch.Tensor, codec: str | None = None) -> runtime_pb2.Tensor:
    """A tensor as raw bytes, or encoded with `codec` (see swarm.compression; None or "none" sends it as is). A tensor
    on a GPU is copied to the host here, where every tensor crosses to the wire."""
    tensor = to_host(tensor.detach()).contiguous()
    if codec and codec != "none":
        try:
            dtype, buffer = wire.encode_slot(tensor, codec)
        except CodecError as exc:
            raise ValueError(f"cannot encode with codec {codec!r}: {exc}") from None
        return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype=dtype, requires_grad=False)
    name = dtype_name(tensor.dtype)
    if name is None:
        raise TypeError(f"cannot send a tensor of dtype {tensor.dtype}")
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return runtime_pb2.Tensor(buffer=raw, size=list(tensor.shape), dtype=name, requires_grad=False)


def pack_payload(payload: Payload | None, like: torch.Tensor) -> runtime_pb2.Tensor:
    """A slot for an already encoded payload; with none, an empty float32 tensor of `like`'s row shape."""
    if payload is None:
        return pack_tensor(torch.zeros((0, *like.shape[1:]), dtype=torch.float32))
    return runtime_pb2.Tensor(buffer=wire.pack_payload(payload), size=payload.meta["shape"],
                              dtype=wire.PREFIX + payload.codec, requires_grad=False)


def unpack_tensor(proto: runtime_pb2.Tensor, what: str = "tensor") -> torch.Tensor:
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequest(f"{what}: unsupported compression {proto.compression}")
    if wire.is_payload_dtype(proto.dtype):  # compressed: the codec checks the payload before decoding it
        try:
            return wire.decode_slot(proto.dtype, proto.buffer, list(proto.size))
        except CodecError as exc:
            raise BadRequest(f"{what}: {exc}") from None
    dtype = WIRE_DTYPES.get(proto.dtype)
    if dtype is None:
        raise BadRequest(f"{what}: dtype {proto.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    shape = list(proto.size)
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise BadRequest(f"{what}: invalid shape {shape}")
    numel = math.prod(shape)
    extent = math.prod(max(d, 1) for d in shape)  # bounds empty shapes too: torch cannot stride [0, 2**21, 2**21, 2**21]
    if extent > MAX_TENSOR_ELEMENTS:
        zeros = " (counting its zero dimensions as 1)" if numel == 0 else ""
        raise BadRequest(f"{what}: {extent} elements{zeros} exceed the limit of {MAX_TENSOR_ELEMENTS}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = proto.buffer  # each read of the field is a copy of its bytes: read it once
    if len(buffer) != numel * itemsize:
        raise BadRequest(f"{what}: buffer has {len(buffer)} bytes, shape {shape} of {proto.dtype} needs {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(dtype).reshape(shape)


def decoded(tensor: runtime_pb2.Tensor | torch.Tensor, what: str = "server output") -> torch.Tensor:
    """A tensor as it is, or a packed one unpacked (`what` names it in errors)."""
    return unpack_tensor(tensor, what) if isinstance(tensor, runtime_pb2.Tensor) else tensor


def payload_bytes(tensors: Iterable[runtime_pb2.Tensor]) -> int:
    return sum(len(t.buffer) for t in tensors)


def raw_bytes(tensors: Iterable[runtime_pb2.Tensor]) -> int:
    """What packed tensors would take uncompressed (payload_bytes is what they take on the wire)."""
    return sum(wire.original_nbytes(t.buffer, list(t.size)) if wire.is_payload_dtype(t.dtype) else len(t.buffer)
               for t in tensors)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """What decoded tensors take in memory."""
    return sum(t.numel() * t.element_size() for t in tensors)


def hidden_slots(tensors: Iterable[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """The slots holding hidden states or their gradients: float or codec payloads of rank 3 [batch, length, hidden]
    (positions and masks are integers, LoRA tensors rank 2, deep prompts rank 4)."""
    return [t for t in tensors if len(t.size) == 3 and (wire.is_payload_dtype(t.dtype) or t.dtype in FLOAT_DTYPES)]


@dataclasses.dataclass
class Traffic:
    """Bytes of tensors sent and received: raw (uncompressed) and on the wire."""

    sent_raw: int = 0
    sent_wire: int = 0
    received_raw: int = 0
    received_wire: int = 0

    @classmethod
    def of(cls, sent: Iterable[runtime_pb2.Tensor] = (), received: Iterable[runtime_pb2.Tensor] = ()) -> Traffic:
        sent, received = list(sent), list(received)
        return cls(raw_bytes(sent), payload_bytes(sent), raw_bytes(received), payload_bytes(received))

    def __iadd__(self, other: Traffic) -> Traffic:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def ratio(self) -> float:
        """Raw bytes over wire bytes, both directions (1.0 before any traffic)."""
        wire_total = self.sent_wire + self.received_wire
        return (self.sent_raw + self.received_raw) / wire_total if wire_total else 1.0
