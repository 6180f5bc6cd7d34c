"""The one map of dtype names: what the wire, the codecs and checkpoints call each dtype."""

from __future__ import annotations

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Dtypes a plain (uncompressed) tensor may have on the wire: hidden states, positions, masks.
WIRE_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The wire name of a dtype ("float32", ...), or None for one that does not travel."""
    return _NAMES.get(dtype)
