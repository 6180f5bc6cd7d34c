"""A codec payload in one wire tensor slot, so any tensor of a request or reply may travel compressed.

The slot's dtype is "payload:<codec id>", its size the original shape, and its buffer holds a little-endian
uint32 header length, the header (compact JSON: the codec's metadata and each payload tensor's dtype and
shape), then the payload tensors' bytes one after another. Everything is checked before the codec decodes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from swarm.compression import registry
from swarm.compression.base import CodecError, Payload, meta_json

PREFIX = "payload:"
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_TENSORS = 16
PAYLOAD_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
}
_NAMES = {v: k for k, v in PAYLOAD_DTYPES.items()}


def is_payload_dtype(dtype: str) -> bool:
    return dtype.startswith(PREFIX)


def encode_slot(tensor: torch.Tensor, codec_id: str) -> tuple[str, bytes]:
    """(the slot's dtype string, its buffer) for `tensor` encoded with codec `codec_id`."""
    payload = registry.get(codec_id).encode(tensor)
    parts, specs = [], []
    for t in payload.tensors:
        t = t.detach().cpu().contiguous()
        specs.append([_NAMES[t.dtype], list(t.shape)])
        parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    header = meta_json({"meta": payload.meta, "tensors": specs}).encode()
    return PREFIX + codec_id, len(header).to_bytes(4, "little") + header + b"".join(parts)


def decode_slot(dtype: str, buffer: bytes, shape: list[int]) -> torch.Tensor:
    """The tensor a slot carries; CodecError naming the problem if anything about it is inconsistent."""
    codec = registry.get(dtype[len(PREFIX):])
    if len(buffer) < 4:
        raise CodecError(f"payload of {len(buffer)} bytes is too short for its header")
    header_len = int.from_bytes(buffer[:4], "little")
    if header_len > min(MAX_HEADER_BYTES, len(buffer) - 4):
        raise CodecError(f"payload header of {header_len} bytes does not fit (limit {MAX_HEADER_BYTES}, buffer {len(buffer)})")
    header = _parse_header(buffer[4 : 4 + header_len])
    tensors, offset = [], 4 + header_len
    for index, (name, tshape) in enumerate(header["tensors"]):
        dtype_ = PAYLOAD_DTYPES[name]
        nbytes = math.prod(tshape) * torch.empty((), dtype=dtype_).element_size()
        if offset + nbytes > len(buffer):
            raise CodecError(f"payload tensor {index} needs {nbytes} bytes, {len(buffer) - offset} remain")
        raw = bytearray(buffer[offset : offset + nbytes])
        tensors.append(torch.frombuffer(raw, dtype=torch.uint8).view(dtype_).reshape(tshape) if nbytes else
                       torch.empty(tshape, dtype=dtype_))
        offset += nbytes
    if offset != len(buffer):
        raise CodecError(f"payload has {len(buffer) - offset} bytes beyond its tensors")
    return codec.decode(Payload(codec.id, tensors, header["meta"]), shape=shape)


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"payload header is not JSON: {str(exc)[:100]}") from None
    if not isinstance(header, dict) or set(header) != {"meta", "tensors"} or not isinstance(header["meta"], dict):
        raise CodecError("payload header must be an object with 'meta' (an object) and 'tensors'")
    specs = header["tensors"]
    if not isinstance(specs, list) or len(specs) > MAX_PAYLOAD_TENSORS:
        raise CodecError(f"payload header 'tensors' must be a list of at most {MAX_PAYLOAD_TENSORS}")
    for spec in specs:
        ok = (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and spec[0] in PAYLOAD_DTYPES and isinstance(spec[1], list)
              and len(spec[1]) <= 8 and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in spec[1])
              and math.prod(spec[1]) <= 1 << 30)
        if not ok:
            raise CodecError(f"payload tensor spec {str(spec)[:80]} is not [dtype in {sorted(PAYLOAD_DTYPES)}, shape]")
    return header


def original_nbytes(buffer: bytes, shape: list[int]) -> int:
    """Bytes the tensor in a (valid) payload slot takes uncompressed; float32 if its header cannot be read."""
    itemsize = 4
    try:
        header = json.loads(buffer[4 : 4 + int.from_bytes(buffer[:4], "little")])
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(header["meta"]["dtype"], 4)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    return math.prod(shape) * itemsize
