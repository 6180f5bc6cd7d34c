"""Lossless and cast codecs: `none` (identity), `float16` and `bfloat16` (one cast each way)."""

from __future__ import annotations

from typing import Any

import torch

from swarm.compression.base import Codec, Layout, check_finite, expect, saturating_cast


class CastCodec(Codec):
    """Sends the tensor cast to a narrower float dtype; decodes to the original dtype unless told otherwise.

    The cast saturates: values beyond the wire dtype's largest finite value become that value (±65504 for
    float16), never inf. float16 also loses relative precision below 6.1e-5 (subnormals) and flushes values
    below about 6e-8 to zero; bfloat16 keeps float32's range with 8 bits of mantissa (relative error <= 2^-9).
    """

    def __init__(self, wire_dtype: torch.dtype | None, id: str):
        self.wire_dtype, self.id = wire_dtype, id  # None: the tensor's own dtype

    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        return [layout.shape]

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [saturating_cast(rows, self.wire_dtype or rows.dtype).reshape(layout.shape)], {}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        (data,) = tensors
        expect(data, "data", self.wire_dtype or layout.dtype, layout.shape)
        check_finite(data, "data")
        return data.reshape(layout.rows, layout.cols)


class NoneCodec(CastCodec):
    """Identity: the tensor travels as it is, in its own dtype (float32, float16 or bfloat16); decoding returns
    the payload tensor itself (reshaped, not copied) unless another dtype is asked for."""

    def __init__(self):
        super().__init__(None, "none")

