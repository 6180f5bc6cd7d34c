"""A codec payload in one wire tensor slot, so any tensor of a request or reply may travel compressed.

The slot's dtype is "payload:<codec id>" and its size the original shape. Its buffer is a small binary header,
then the payload tensors' bytes one after another:

    uint16 header length (little-endian), then the header:
    uint8 format version, uint8 original dtype code, uint8 tensor count, a 4-bit dtype code per tensor (two per byte),
    the codec's metadata fields as a compact JSON list (in the order of `codec.meta_keys`).

The tensors' shapes are not sent: the codec derives them from its metadata and the slot's shape
(`Codec.payload_shapes`), so a decode step's header is about a dozen bytes. Everything is checked before the
codec decodes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from swarm.compression import registry
from swarm.compression.base import (
    Codec,
    CodecError,
    Payload,
    PayloadSize,
    check_tensors,
    meta_json,
    read_layout,
)
from swarm.dtypes import FLOAT_DTYPES, dtype_name

PREFIX = "payload:"
VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_PAYLOAD_TENSORS = 16
DTYPE_CODES: list[torch.dtype] = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
                                  torch.int32]
_CODE = {dtype: code for code, dtype in enumerate(DTYPE_CODES)}


def is_payload_dtype(dtype: str) -> bool:
    return dtype.startswith(PREFIX)


def slot_codec(dtype: str) -> str:
    """The codec a slot's dtype field names: its payload's codec id, or "none" for a plain tensor."""
    return dtype[len(PREFIX):] if is_payload_dtype(dtype) else "none"


def _header(payload: Payload, codec: Codec | None) -> bytes:
    """The length-prefixed header of a payload's slot (see the module docstring)."""
    codec = codec or registry.get(payload.codec)
    tensors = check_tensors(payload.tensors)
    fields = meta_json([payload.meta[key] for key in codec.meta_keys]).encode()
    codes = _nibbles([_CODE[t.dtype] for t in tensors])
    header = bytes([VERSION, _CODE[FLOAT_DTYPES[payload.meta["dtype"]]], len(tensors), *codes]) + fields
    return len(header).to_bytes(2, "little") + header


def pack_payload(payload: Payload, codec: Codec | None = None) -> bytes:
    """The slot buffer of a payload (see the module docstring); `codec` defaults to the registered one."""
    header = _header(payload, codec)  # checks the tensors first
    parts = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in payload.tensors]
    return header + b"".join(parts)


def encode_slot(tensor: torch.Tensor, codec_id: str) -> tuple[str, bytes]:
    """(the slot's dtype string, its buffer) for `tensor` encoded with codec `codec_id`."""
    return PREFIX + codec_id, pack_payload(registry.get(codec_id).encode(tensor))


def payload_size(payload: Payload, codec: Codec | None = None) -> PayloadSize:
    """Bytes of a payload in a slot: the tensors' bytes and the header's."""
    raw = sum(t.numel() * t.element_size() for t in check_tensors(payload.tensors))
    return PayloadSize(raw_bytes=raw, meta_bytes=len(_header(payload, codec)))


def unpack_payload(codec_id: str, buffer: bytes, shape: list[int]) -> Payload:
    """The payload a slot buffer holds, its tensors sliced per the shapes the codec derives; CodecError naming
    the problem if the header or the sizes are inconsistent."""
    codec = registry.get(codec_id)
    if len(buffer) < 2:
        raise CodecError(f"payload of {len(buffer)} bytes is too short for its header")
    header_len = int.from_bytes(buffer[:2], "little")
    if not 3 <= header_len <= min(MAX_HEADER_BYTES, len(buffer) - 2):
        raise CodecError(f"payload header of {header_len} bytes does not fit (3..{MAX_HEADER_BYTES}, buffer {len(buffer)})")
    header = buffer[2 : 2 + header_len]
    version, dtype_code, count = header[0], header[1], header[2]
    if version != VERSION:
        raise CodecError(f"payload format version {version} is not supported (this peer reads version {VERSION})")
    if dtype_code >= len(DTYPE_CODES) or DTYPE_CODES[dtype_code] not in FLOAT_DTYPES.values():
        raise CodecError(f"payload original dtype code {dtype_code} is not a float dtype")
    code_bytes = (count + 1) // 2
    if count > MAX_PAYLOAD_TENSORS or 3 + code_bytes > header_len:
        raise CodecError(f"payload header names {count} tensors (at most {MAX_PAYLOAD_TENSORS}) in {header_len} bytes")
    codes = [b >> shift & 15 for b in header[3 : 3 + code_bytes] for shift in (0, 4)]
    if any(code >= len(DTYPE_CODES) for code in codes[:count]) or any(codes[count:]):
        raise CodecError(f"payload tensor dtype codes {codes} are not all in [0, {len(DTYPE_CODES)}) with zero padding")
    codes = codes[:count]
    values = _parse_fields(header[3 + code_bytes :], len(codec.meta_keys))
    meta = {"shape": list(shape), "dtype": dtype_name(DTYPE_CODES[dtype_code]), **dict(zip(codec.meta_keys, values, strict=True))}
    shapes = codec.payload_shapes(meta, read_layout(meta))
    if len(shapes) != count:
        raise CodecError(f"payload has {count} tensors, codec {codec.id} expects {len(shapes)}")
    tensors, offset = [], 2 + header_len
    for index, (code, tshape) in enumerate(zip(codes, shapes, strict=True)):
        dtype = DTYPE_CODES[code]
        nbytes = math.prod(tshape) * dtype.itemsize
        if offset + nbytes > len(buffer):
            raise CodecError(f"payload tensor {index} needs {nbytes} bytes, {len(buffer) - offset} remain")
        raw = bytearray(buffer[offset : offset + nbytes])
        tensors.append(torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(tshape) if nbytes else
                       torch.empty(tshape, dtype=dtype))
        offset += nbytes
    if offset != len(buffer):
        raise CodecError(f"payload has {len(buffer) - offset} bytes beyond its tensors")
    return Payload(codec.id, tensors, meta)


def decode_slot(dtype: str, buffer: bytes, shape: list[int]) -> torch.Tensor:
    """The tensor a slot carries; CodecError naming the problem if anything about it is inconsistent."""
    payload = unpack_payload(dtype[len(PREFIX):], buffer, shape)
    return registry.get(payload.codec).decode(payload, shape=shape)


def _nibbles(codes: list[int]) -> list[int]:
    """4-bit codes two per byte, low nibble first."""
    codes = codes + [0] * (len(codes) % 2)
    return [codes[i] | codes[i + 1] << 4 for i in range(0, len(codes), 2)]


def _parse_fields(raw: bytes, count: int) -> list[Any]:
    try:
        values = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"payload metadata is not JSON: {str(exc)[:100]}") from None
    if not isinstance(values, list) or len(values) != count:
        raise CodecError(f"payload metadata must be a list of {count} values, got {str(values)[:80]}")
    return values


def original_nbytes(buffer: bytes, shape: list[int]) -> int:
    """Bytes the tensor in a (valid) payload slot takes uncompressed; float32 if its header cannot be read."""
    code = buffer[3] if len(buffer) > 3 else 0
    dtype = DTYPE_CODES[code] if code < len(DTYPE_CODES) and DTYPE_CODES[code] in FLOAT_DTYPES.values() else torch.float32
    return math.prod(shape) * dtype.itemsize
