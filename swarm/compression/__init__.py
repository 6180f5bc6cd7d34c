"""Codecs for activations and gradients in transit; `wire` puts their payloads into request and reply slots.

`registry.get(id).encode(tensor)` gives a `Payload`; `registry.get(payload.codec).decode(payload)` restores the
tensor, raising `CodecError` on any malformed payload.
"""

from swarm.compression.base import Codec, CodecError, Payload, PayloadSize
from swarm.compression.codecs import CastCodec, NoneCodec
from swarm.compression.hadamard import Hadamard
from swarm.compression.int8 import Int8Outlier, Int8StaticOutlier
from swarm.compression.lowbit import LowBitOutlier
from swarm.compression.registry import available, get, register
from swarm.compression.wire import payload_size

__all__ = [
    "CastCodec",
    "Codec",
    "CodecError",
    "Hadamard",
    "Int8Outlier",
    "Int8StaticOutlier",
    "LowBitOutlier",
    "NoneCodec",
    "Payload",
    "PayloadSize",
    "available",
    "get",
    "payload_size",
    "register",
]
