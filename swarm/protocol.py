"""Wire protocol: typed request metadata, safe tensor (de)serialization, limits and error codes.

Nothing a peer sends is unpickled or executed: metadata is JSON checked by pydantic models,
tensors are raw little-endian buffers checked against an allow-list of dtypes and their shapes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# hivemind recognises streaming RPCs by typing.AsyncIterator hints (not collections.abc's), keep this import.
from typing import Annotated, AsyncIterator  # noqa: UP035

import torch
from hivemind.p2p import ServicerBase
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.compression import wire
from swarm.compression.base import FLOAT_DTYPES, CodecError, Payload
from swarm.config import PROTOCOL_VERSION, STREAM_CHUNK_BYTES

# ---------------------------------------------------------------------------------------------- errors


class SwarmError(Exception):
    """An error with a stable code that travels to the remote side as '[code] message'."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(f"[{self.code}] {message}")
        self.message = message


class BadRequest(SwarmError):
    code = "bad_request"


class BlocksNotServed(SwarmError):
    code = "blocks_not_served"


class MaxLengthExceeded(SwarmError):
    code = "max_length_exceeded"


class CacheFull(SwarmError):
    code = "cache_full"


class LoraNotCached(SwarmError):
    """The request named LoRA tensors by a digest the server no longer holds: send the tensors again."""

    code = "lora_not_cached"


class DeltaStateMissing(SwarmError):
    """Delta-coded rows name references the server does not hold (evicted, restarted, another route): send in full."""

    code = "delta_state_missing"


class ServerLeaving(SwarmError):
    """The server is shutting down: the client should continue its session on another server."""

    code = "server_leaving"


class ServerBusy(SwarmError):
    code = "server_busy"


_REMOTE_ERROR = re.compile(r"\[([a-z_]+)\] (.*)", re.S)


class RemoteError(RuntimeError):
    """An error a server reported, as seen by the client."""

    # The server is gone or going: the call may be retried elsewhere. Other codes are the server's answers.
    # blocks_not_served: it moved to other blocks since the caller's view of the swarm was taken (rebalancing).
    SERVER_GONE = frozenset({"transport", "server_leaving", "blocks_not_served"})
    # Of those, the ones a live server said itself: its DHT record says so too, so it need not be banned.
    SERVER_MOVED = frozenset({"server_leaving", "blocks_not_served"})

    def __init__(self, code: str, message: str, peer: str | None = None):
        where = f" (server {peer})" if peer else ""
        super().__init__(f"{message}{where}")
        self.code, self.message, self.peer = code, message, peer

    @property
    def server_gone(self) -> bool:
        return self.code in self.SERVER_GONE

    @property
    def server_moved(self) -> bool:
        """The server is alive and said it is leaving or no longer serves these blocks."""
        return self.code in self.SERVER_MOVED

    @classmethod
    def from_exception(cls, exc: BaseException, peer: str | None = None) -> RemoteError:
        match = _REMOTE_ERROR.search(str(exc))
        if match:
            message = match.group(2).strip()
            if message[-2:] in ("')", '")'):  # unary errors arrive as repr(exception)
                message = message[:-2]
            return cls(match.group(1), message, peer)
        return cls("transport", f"{type(exc).__name__}: {exc}", peer)


# ---------------------------------------------------------------------------------------------- metadata


class _Meta(BaseModel):
    # Unknown fields from newer peers are ignored; missing ones take their defaults.
    model_config = ConfigDict(extra="ignore", frozen=True)
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes):
        if len(raw) > 64 * 1024:
            raise BadRequest(f"metadata of {len(raw)} bytes is larger than the 64 KiB limit")
        try:
            return cls.model_validate(json.loads(raw or b"{}"))
        except (ValueError, ValidationError) as exc:
            raise BadRequest(f"malformed {cls.__name__}: {_short(exc)}") from None


_KEY = r"^[0-9a-f]{32}$"
_REF = r"^([0-9a-f]{16})?$"
MAX_DELTA_ROWS = 1024


class DeltaInfo(BaseModel):
    """Delta coding of a training stream's hidden states (see swarm.compression.delta), one entry per batch row.

    With it, the request's first two tensors are the rows sent in full (the activations codec) and the deltas of
    the others (`codec`), in row order; rows in mode "s" are not sent. `refs` names the reference each "d"/"s" row
    is relative to, `out_refs` the reference the client holds for each row of the output ("" for none): the
    server answers a row as a delta only where its own reference has that digest.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[Annotated[str, Field(pattern=_KEY)]] = Field(max_length=MAX_DELTA_ROWS)
    modes: str = Field(pattern=r"^[fds]*$", max_length=MAX_DELTA_ROWS)
    refs: list[Annotated[str, Field(pattern=_REF)]] = Field(max_length=MAX_DELTA_ROWS)
    out_refs: list[Annotated[str, Field(pattern=_REF)]] = Field(max_length=MAX_DELTA_ROWS)
    codec: str = Field(max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> DeltaInfo:
        rows = len(self.keys)
        if not rows or not len(self.modes) == len(self.refs) == len(self.out_refs) == rows:
            raise ValueError(f"delta needs one key, mode, ref and out_ref per row (got {rows} keys, {len(self.modes)} "
                             f"modes, {len(self.refs)} refs, {len(self.out_refs)} out_refs)")
        if any((mode == "f") != (ref == "") for mode, ref in zip(self.modes, self.refs, strict=True)):
            raise ValueError("delta refs must be empty exactly for the rows sent in full ('f')")
        return self


class SpanRequest(_Meta):
    """Forward or backward through blocks [start, end) of the model."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    # LoRA tensors ride after the inputs, in this order (names as in swarm.lora); scaling = alpha / rank.
    lora: list[str] = Field(default_factory=list, max_length=4096)
    lora_scaling: float = 1.0
    adapter: str = Field(default="", max_length=256)  # a named adapter the server hosts (instead of `lora`)
    # swarm.lora.digest of the LoRA tensors. With the tensors: the server may keep them under it for a while.
    # With lora_by_digest and no tensors: use the ones this peer uploaded under it (or fail with lora_not_cached).
    lora_digest: str = Field(default="", max_length=64, pattern=r"^[0-9a-f]*$")
    lora_by_digest: bool = False
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # masks drawn from dropout_seed (see swarm.lora.dropout_mask)
    dropout_seed: int = Field(default=0, ge=0, lt=1 << 63)
    # Deep prompt tuning: a tensor [blocks, batch or 1, P, hidden] follows the inputs (before a backward's gradient).
    deep_prompts: bool = False
    # Codec for the hidden-state tensor of the reply (the output, or the gradient w.r.t. the input); "" = none.
    reply_codec: str = Field(default="", max_length=64)
    grad_reply_codec: str = Field(default="", max_length=64)  # rpc_train only: codec of the backward's input gradient
    # Backward: whether the reply starts with the gradient w.r.t. the input hidden states. A client whose input
    # needs none (the first span, after a frozen embedding) saves that tensor on the wire.
    input_grad: bool = True
    delta: DeltaInfo | None = None  # rpc_train only: delta-coded hidden states (the output answered likewise)


class InferenceOpen(_Meta):
    """First message of an inference stream: reserve a KV cache for the session."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    max_length: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    # A client's own LoRA tensors for the session ride in the opening message (names as in swarm.lora).
    lora: list[str] = Field(default_factory=list, max_length=4096)
    lora_scaling: float = 1.0
    adapter: str = Field(default="", max_length=256)
    deep_prompts: bool = False  # the opening message then carries them first, before the LoRA tensors
    reply_codec: str = Field(default="", max_length=64)  # codec for each step's output hidden states; "" = none
    # Forwarding (swarm.forwarding): the id the previous server of the route pushes steps into this session under
    # ("" = none are accepted), and the codec those pushed hidden states must come in.
    session_id: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    input_codec: str = Field(default="", max_length=64)


class InferenceStep(_Meta):
    """One step of an inference stream: the new tokens' hidden states (and their positions and mask)."""

    step: int = Field(ge=0)


class TrainGrad(_Meta):
    """Second message of a training stream (rpc_train): the gradient w.r.t. the output of its forward."""


class SpanReply(_Meta):
    # With a request's `delta`: the output's mode per row; its tensors are then the full rows and the deltas.
    delta_modes: str = Field(default="", pattern=r"^[fds]*$", max_length=MAX_DELTA_ROWS)


class InferenceReply(_Meta):
    position: int = 0  # tokens in the session's cache after this step
    cache_tokens_left: int = 0
    forwarded: bool = False  # the step named later servers and its output was pushed to the next one
    forward_error: str = Field(default="", max_length=1024)  # why it could not be pushed


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", "; ")
    return text if len(text) < 300 else text[:300] + "..."


# ---------------------------------------------------------------------------------------------- tensors

ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}
MAX_TENSOR_ELEMENTS = 1 << 30


def pack_tensor(tensor: torch.Tensor, codec: str | None = None) -> runtime_pb2.Tensor:
    """A tensor as raw bytes, or encoded with `codec` (see swarm.compression; None or "none" sends it as is)."""
    tensor = tensor.detach().cpu().contiguous()
    if codec and codec != "none":
        try:
            dtype, buffer = wire.encode_slot(tensor, codec)
        except CodecError as exc:
            raise ValueError(f"cannot encode with codec {codec!r}: {exc}") from None
        return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype=dtype, requires_grad=False)
    name = _DTYPE_NAMES.get(tensor.dtype)
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
    if wire.is_payload_dtype(proto.dtype):  # compressed: the codec checks the payload before decoding it
        if proto.compression != runtime_pb2.CompressionType.NONE:
            raise BadRequest(f"{what}: unsupported compression {proto.compression}")
        try:
            return wire.decode_slot(proto.dtype, proto.buffer, list(proto.size))
        except CodecError as exc:
            raise BadRequest(f"{what}: {exc}") from None
    dtype = ALLOWED_DTYPES.get(proto.dtype)
    if dtype is None:
        raise BadRequest(f"{what}: dtype {proto.dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequest(f"{what}: unsupported compression {proto.compression}")
    shape = list(proto.size)
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise BadRequest(f"{what}: invalid shape {shape}")
    numel = math.prod(shape)
    if numel > MAX_TENSOR_ELEMENTS:
        raise BadRequest(f"{what}: {numel} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(proto.buffer) != numel * itemsize:
        raise BadRequest(f"{what}: buffer has {len(proto.buffer)} bytes, shape {shape} of {proto.dtype} needs {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=torch.uint8).view(dtype).reshape(shape)


def payload_bytes(tensors: Iterable[runtime_pb2.Tensor]) -> int:
    return sum(len(t.buffer) for t in tensors)


def raw_bytes(tensors: Iterable[runtime_pb2.Tensor]) -> int:
    """What packed tensors would take uncompressed (payload_bytes is what they take on the wire)."""
    return sum(wire.original_nbytes(t.buffer, list(t.size)) if wire.is_payload_dtype(t.dtype) else len(t.buffer)
               for t in tensors)


def hidden_slots(tensors: Iterable[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """The slots holding hidden states or their gradients: float or codec payloads of rank 3 [batch, length, hidden]
    (positions and masks are integers, LoRA tensors rank 2, deep prompts rank 4)."""
    return [t for t in tensors if len(t.size) == 3 and (wire.is_payload_dtype(t.dtype) or t.dtype in FLOAT_DTYPES)]


@dataclass
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

    def add(self, sent: Iterable[runtime_pb2.Tensor] = (), received: Iterable[runtime_pb2.Tensor] = ()) -> None:
        self += Traffic.of(sent, received)

    def __iadd__(self, other: Traffic) -> Traffic:
        self.sent_raw += other.sent_raw
        self.sent_wire += other.sent_wire
        self.received_raw += other.received_raw
        self.received_wire += other.received_wire
        return self

    @property
    def ratio(self) -> float:
        """Raw bytes over wire bytes, both directions (1.0 before any traffic)."""
        wire_total = self.sent_wire + self.received_wire
        return (self.sent_raw + self.received_raw) / wire_total if wire_total else 1.0


# ---------------------------------------------------------------------------------------------- streaming


def split_message(meta: _Meta, packed: Sequence[runtime_pb2.Tensor], message_type=runtime_pb2.ExpertRequest) -> list:
    """Cut packed tensors (see pack_tensor) into stream messages of at most STREAM_CHUNK_BYTES of payload each.

    The first message carries the metadata and a header tensor per input (shape and dtype with an empty
    buffer), the rest only carry chunks.
    """
    headers = [runtime_pb2.Tensor(size=p.size, dtype=p.dtype) for p in packed]
    chunks: list[runtime_pb2.Tensor] = []
    for index, p in enumerate(packed):
        for offset in range(0, max(len(p.buffer), 1), STREAM_CHUNK_BYTES):
            # The chunk's index into the inputs rides in `size` so the receiver can reassemble.
            chunks.append(runtime_pb2.Tensor(buffer=p.buffer[offset : offset + STREAM_CHUNK_BYTES], size=[index]))
    messages = [message_type(metadata=meta.encode(), tensors=headers)]
    messages += [message_type(tensors=[c]) for c in chunks]
    return messages


def join_message(first, rest: Iterable, max_bytes: int = 1 << 31) -> list[runtime_pb2.Tensor]:
    """Inverse of split_message, given the first message and the remaining ones."""
    buffers = [bytearray() for _ in first.tensors]
    total = 0
    for message in rest:
        for chunk in message.tensors:
            if len(chunk.size) != 1 or not 0 <= chunk.size[0] < len(buffers):
                raise BadRequest("stream chunk refers to an unknown tensor")
            total += len(chunk.buffer)
            if total > max_bytes:
                raise BadRequest(f"streamed request exceeds the limit of {max_bytes} bytes")
            buffers[chunk.size[0]] += chunk.buffer
    return [runtime_pb2.Tensor(buffer=bytes(b), size=h.size, dtype=h.dtype) for b, h in zip(buffers, first.tensors, strict=True)]


# ---------------------------------------------------------------------------------------------- service


class BlockService(ServicerBase):
    """The RPC interface of a server. Clients call it through `BlockService.get_stub(p2p, peer, namespace=...)`;
    servers register their implementation with `BlockService().add_p2p_handlers(p2p, wrapper=impl, ...)`,
    so both sides derive the same handler names from this one class."""

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    # A step for an open inference session, pushed by the previous server of its route (swarm.forwarding.PushStep),
    # alone or as one message of a stream that carries a session's pushes (each answered when accepted).
    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_push_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    # A forward (a SpanRequest message, answered with the output) and its backward (a TrainGrad message, answered
    # like rpc_backward) in one request: the server keeps the activations in between instead of recomputing them.
    async def rpc_train(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError
