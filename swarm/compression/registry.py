"""Codecs by id: the built-in ones are registered on import; `register` adds more (e.g. a static-outlier
codec built for one model's channels)."""

from __future__ import annotations

import re

import torch

from swarm.compression.base import Codec, CodecError

_ID = re.compile(r"[a-z0-9][a-z0-9_+.\-]{0,63}")
_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make `codec` available under its id; CodecError on a bad id or one already taken."""
    if not isinstance(codec, Codec):
        raise CodecError(f"can only register a Codec, got {type(codec).__name__}")
    if not isinstance(codec.id, str) or not _ID.fullmatch(codec.id):
        raise CodecError(f"codec id {codec.id!r:.80} must be 1-64 of [a-z0-9_+.-], starting with a letter or digit")
    if codec.id in _CODECS and _CODECS[codec.id] is not codec:
        raise CodecError(f"codec id {codec.id!r} is already registered")
    _CODECS[codec.id] = codec
    return codec


def get(codec_id: str) -> Codec:
    """The codec registered under `codec_id`; CodecError naming the known ids if there is none."""
    codec = _CODECS.get(codec_id) if isinstance(codec_id, str) else None
    if codec is None:
        raise CodecError(f"unknown codec {codec_id!r:.80}; known codecs: {', '.join(available())}")
    return codec


def available() -> list[str]:
    """Ids of the registered codecs: "none" (the uncompressed baseline) first, then the others sorted."""
    return sorted(_CODECS, key=lambda codec_id: (codec_id != "none", codec_id))


def _register_builtins() -> None:
    from swarm.compression.codecs import CastCodec, NoneCodec
    from swarm.compression.hadamard import Hadamard
    from swarm.compression.int8 import Int8Outlier
    from swarm.compression.lowbit import LowBitOutlier

    for codec in (NoneCodec(), CastCodec(torch.float16, "float16"), CastCodec(torch.bfloat16, "bfloat16"),
                  Int8Outlier(), LowBitOutlier(4), LowBitOutlier(5), LowBitOutlier(6),
                  LowBitOutlier(4, k=4, id="int4_outlier_k4"),  # for gradients: fewer exact channels, 10% fewer bytes
                  Hadamard(Int8Outlier(k=0, id="int8"), id="hadamard_int8")):
        register(codec)


_register_builtins()
