"""Requests larger than one libp2p message travel as a stream of chunks: the first message carries the metadata
and a header per tensor, the rest the tensors' bytes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hivemind.proto import runtime_pb2

from swarm.config import STREAM_CHUNK_BYTES
from swarm.errors import BadRequest
from swarm.protocol import _Meta


def split_message(meta: _Meta, packed: Sequence[runtime_pb2.Tensor], message_type=runtime_pb2.ExpertRequest) -> list:
    """Cut packed tensors (see pack_tensor) into stream messages of at most STREAM_CHUNK_BYTES of payload each: the
    first carries the metadata and a header per tensor (shape and dtype, no buffer), the rest only chunks."""
    headers = [runtime_pb2.Tensor(size=p.size, dtype=p.dtype) for p in packed]
    chunks: list[runtime_pb2.Tensor] = []
    for index, p in enumerate(packed):
        for offset in range(0, max(len(p.buffer), 1), STREAM_CHUNK_BYTES):
            # The chunk's index into the inputs rides in `size` so the receiver can reassemble.
            chunks.append(runtime_pb2.Tensor(buffer=p.buffer[offset : offset + STREAM_CHUNK_BYTES], size=[index]))
    return [message_type(metadata=meta.encode(), tensors=headers), *(message_type(tensors=[c]) for c in chunks)]


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
