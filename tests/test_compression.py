"""Activation codecs: pinned round-trip error and compression ratio on hidden states with outlier channels,
every dtype and shape, and malformed payloads rejected with CodecError (fuzzed with hypothesis)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from swarm.compression import (
    CodecError,
    Hadamard,
    Int8Outlier,
    Int8StaticOutlier,
    LowBitOutlier,
    Payload,
    available,
    get,
    payload_size,
    register,
    registry,
    wire,
)

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "swarm-hypothesis")  # not .hypothesis/ in the checkout

HIDDEN = 576
OUTLIER_SCALES = {11: 50.0, 77: 120.0, 200: 300.0, 345: 500.0, 460: 80.0, 507: 200.0}
STATIC = Int8StaticOutlier(sorted(OUTLIER_SCALES))
FUZZ = settings(  # SWARM_FUZZ_EXAMPLES=5000 for a longer hunt
    max_examples=int(os.environ.get("SWARM_FUZZ_EXAMPLES", "250")),
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
)
U16, U8 = 2.0**-11, 2.0**-8  # unit roundoff of float16 and bfloat16


def hidden_states(seed: int = 0) -> torch.Tensor:
    """[2, 64, 576] ~N(0, 1) with a few channels scaled x50..x500 and token 0 at 25,000 in channel 507 (as in SmolLM2)."""
    x = torch.randn(2, 64, HIDDEN, generator=torch.Generator().manual_seed(seed))
    for channel, scale in OUTLIER_SCALES.items():
        x[..., channel] *= scale
    x[:, 0, 507] = 25000.0
    return x


def token_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x - y|| / ||x|| per token (row of the last dim)."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return (x - y).norm(dim=1) / x.norm(dim=1)


def codec(codec_id: str):
    return STATIC if codec_id == STATIC.id else get(codec_id)


# measured on hidden_states(): max token error / wire ratio vs float32
#   none 0 / 1.00, float16 3.7e-4 / 2.00, bfloat16 3.6e-3 / 2.00, int8_outlier 5.8e-4 / 3.70,
#   int8_static_outlier 8.6e-4 / 3.93, int4_outlier 9.3e-3 / 6.36, int4_outlier_k4 4.2e-2 / 7.13,
#   int5_outlier 4.3e-3 / 5.31, int6_outlier 2.1e-3 / 4.55,
#   hadamard_int8 3.2e-3 / 3.92
BOUNDS = {  # codec id: (max token error, min compression ratio)
    "none": (0.0, 0.999),
    "float16": (U16, 1.99),  # rounding alone: at most the unit roundoff
    "bfloat16": (U8, 1.99),
    "int8_outlier": (2e-3, 3.6),
    "int8_static_outlier": (2e-3, 3.9),
    "int4_outlier": (2e-2, 6.2),
    "int4_outlier_k4": (6e-2, 7.0),  # 4 exact channels, fewer than these tensors' 6 outlier channels
    "int5_outlier": (1e-2, 5.2),
    "int6_outlier": (5e-3, 4.5),
    "hadamard_int8": (1e-2, 3.9),
}


def test_pinned_codecs_are_the_registered_ones():
    assert set(BOUNDS) == set(available()) | {STATIC.id}


@pytest.mark.parametrize("codec_id", sorted(BOUNDS))
def test_round_trip_error_and_ratio_on_hidden_states(codec_id):
    x = hidden_states()
    payload = codec(codec_id).encode(x)
    y = codec(codec_id).decode(payload, shape=x.shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    max_error, min_ratio = BOUNDS[codec_id]
    assert token_error(x, y).max() <= max_error
    size = payload_size(payload, codec(codec_id))
    assert x.numel() * 4 / size.wire_bytes >= min_ratio


@pytest.mark.parametrize("codec_id", ["int8_outlier", "int4_outlier", "int8_static_outlier"])
def test_outlier_channels_are_kept_to_float16_precision(codec_id):
    x = hidden_states(1)
    y = codec(codec_id).decode(codec(codec_id).encode(x))
    if codec_id == STATIC.id:
        channels = torch.tensor(STATIC.channels).expand(*x.shape[:-1], -1)
    else:  # the top 16 channels of each token
        channels = x.abs().topk(16, dim=-1).indices
    exact, got = x.gather(-1, channels), y.gather(-1, channels)
    assert ((got - exact).abs() <= exact.abs() * U16).all()
    assert abs(y[0, 0, 507].item() - 25000.0) <= 25000.0 * U16


def test_int8_outlier_wire_layout_and_size():
    x = hidden_states()
    payload = get("int8_outlier").encode(x)
    q, scale, codes, vals, low, high = payload.tensors
    assert [t.dtype for t in payload.tensors] == [torch.int8, torch.float16, torch.uint8, torch.float16, torch.uint8, torch.uint8]
    # 560 int8 values, 9 groups of up to 64 channels, 16 outliers with 10-bit indices (8 low bits + 2 high bits)
    assert [tuple(t.shape) for t in payload.tensors] == [(128, HIDDEN - 16), (128,), (128, 9), (128, 16), (128, 16), (128, 4)]
    size = payload_size(payload)
    assert size.raw_bytes == 128 * (HIDDEN - 16 + 2 + 9 + 16 * 2 + 20)
    # the slot header: length, version, dtype, count, 3 bytes of 4-bit tensor dtypes, the fields as "[16,64]"
    assert size.meta_bytes == 2 + 3 + 3 + len("[16,64]") and size.wire_bytes == size.raw_bytes + size.meta_bytes
    assert payload.meta == {"shape": [2, 64, HIDDEN], "dtype": "float32", "k": 16, "group": 64}
    # each group's scale is the token's times 2^(-code / 16): the smallest such step its largest value fits in,
    # so every group uses its int8 range to within a factor 2^(1/16)
    group_max = torch.nn.functional.pad(q.float().abs(), (0, 9 * 64 - (HIDDEN - 16))).view(128, 9, 64).amax(dim=2)
    assert group_max.min() >= 127 / 2 ** (1 / 16) - 1 and group_max.max() <= 127 and int(codes.max()) > 0


def test_decode_steps_stay_compressed_with_the_slot_header():
    """A single token (one decode step) with the slot header still travels 3.6x smaller than float32."""
    x = hidden_states()[:1, :1]
    dtype, buffer = wire.encode_slot(x, "int8_outlier")
    assert x.numel() * 4 / len(buffer) >= 3.6
    assert token_error(x, wire.decode_slot(dtype, buffer, list(x.shape))).max() <= BOUNDS["int8_outlier"][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(HIDDEN,), (5, 96), (2, 3, 40), (2, 0, HIDDEN), (0, 8), (4, 7), (3, 1), (2, 0)])
def test_every_codec_handles_dtypes_and_shapes(dtype, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    for codec_id in available():
        payload = get(codec_id).encode(x)
        y = get(codec_id).decode(payload, shape=shape)
        assert y.shape == x.shape and y.dtype == dtype, codec_id
        assert get(codec_id).decode(payload, dtype=torch.float32).dtype == torch.float32
        if codec_id == "none":
            assert torch.equal(y, x)
        elif x.numel():
            assert token_error(x, y).max() <= 0.25, codec_id


def test_none_is_exact_and_keeps_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = hidden_states().to(dtype)
        payload = get("none").encode(x)
        assert payload.tensors[0].dtype == dtype and torch.equal(get("none").decode(payload), x)


def test_float16_saturates_instead_of_overflowing():
    x = torch.tensor([[1e6, -1e9, 70000.0, 1.0, 1e-8]])
    payload = get("float16").encode(x)
    assert torch.isfinite(payload.tensors[0]).all()
    assert get("float16").decode(payload).tolist() == [[65504.0, -65504.0, 65504.0, 1.0, 0.0]]
    huge = torch.full((2, 4), 3.4e38)
    assert torch.isfinite(get("bfloat16").decode(get("bfloat16").encode(huge))).all()
    # decoding to a narrower dtype saturates too
    assert get("none").decode(get("none").encode(x), dtype=torch.float16)[0, 0].item() == 65504.0


@pytest.mark.parametrize("scale", [1e-8, 1e-20, 1e30])
@pytest.mark.parametrize("codec_id", ["int8_outlier", "int4_outlier", "int8_static_outlier", "hadamard_int8"])
def test_quantizers_keep_precision_at_gradient_and_huge_scales(codec_id, scale):
    x = hidden_states(2) * scale
    payload = codec(codec_id).encode(x)
    y = codec(codec_id).decode(payload)
    assert token_error(x, y).max() <= BOUNDS[codec_id][0]
    if codec_id == "int4_outlier":  # outliers travel as float16 multiples of their token's scale, at any magnitude
        assert payload.tensors[3].dtype == torch.float16
    elif codec_id != "hadamard_int8":  # int8's outliers beyond float16's range or precision travel as float32
        assert payload.tensors[2 if codec_id == "int8_static_outlier" else 3].dtype == torch.float32
    if codec_id in ("int8_outlier", "int8_static_outlier", "hadamard_int8") and scale != 1e30:
        assert payload.tensors[1].dtype == torch.float32  # token scales below float16's normal range


@pytest.mark.parametrize("codec_id", ["int4_outlier", "int6_outlier"])
def test_outliers_float16_cannot_hold_travel_as_float32(codec_id):
    x = hidden_states(3)[0]  # [tokens, channels]
    x[0] *= 1e-3
    x[0, 507] = 1e6  # 1e9 times the token's other values: no float16 multiple holds it
    x[1] = 0.0
    x[1, 507] = 5.0  # nothing but outliers: no scale to be a multiple of
    payload = codec(codec_id).encode(x)
    assert payload.tensors[-3].dtype == torch.float32  # values, then the two index tensors
    y = codec(codec_id).decode(payload)
    assert y[0, 507] == 1e6 and y[1, 507] == 5.0 and not y[1].ne(0).sum() > 1
    assert token_error(x, y).max() <= BOUNDS[codec_id][0]


def test_encode_rejects_what_it_cannot_send():
    for bad in (torch.tensor([1.0, math.nan]), torch.tensor([[math.inf]]), torch.ones(3, dtype=torch.int64),
                torch.ones(3, dtype=torch.float64), torch.tensor(1.0), [1.0, 2.0]):
        for codec_id in available():
            with pytest.raises(CodecError):
                get(codec_id).encode(bad)
    with pytest.raises(CodecError, match="too large to rotate"):
        get("hadamard_int8").encode(torch.full((1, 64), 3e38))


def test_static_outlier_codec_checks_its_channel_set():
    with pytest.raises(CodecError, match="does not exist"):
        STATIC.encode(torch.randn(2, 100))
    with pytest.raises(CodecError, match="distinct"):
        Int8StaticOutlier([3, 3])
    other = Int8StaticOutlier([1, 2, 3])
    with pytest.raises(CodecError, match="outlier channels"):
        other.decode(STATIC.encode(hidden_states()))
    assert STATIC.encode(hidden_states()).tensors[2].shape == (128, len(OUTLIER_SCALES))


def test_decode_checks_codec_id_and_expected_shape():
    payload = get("int8_outlier").encode(hidden_states())
    with pytest.raises(CodecError, match="payload is for codec 'int8_outlier'"):
        get("int4_outlier").decode(payload)
    with pytest.raises(CodecError, match=r"expected \[2, 64, 575\]"):
        get("int8_outlier").decode(payload, shape=(2, 64, 575))
    with pytest.raises(CodecError, match="cannot decode to dtype"):
        get("int8_outlier").decode(payload, dtype=torch.int32)


def test_registry(monkeypatch):
    monkeypatch.setattr(registry, "_CODECS", dict(registry._CODECS))  # codecs registered here stay here
    assert {"none", "float16", "bfloat16", "int8_outlier", "int4_outlier", "hadamard_int8"} <= set(available())
    with pytest.raises(CodecError, match="unknown codec 'zstd'; known codecs: .*int8_outlier"):
        get("zstd")
    with pytest.raises(CodecError, match="unknown codec"):
        get(None)
    with pytest.raises(CodecError, match="already registered"):
        register(Int8Outlier(k=4))
    with pytest.raises(CodecError, match="must be 1-64"):
        register(Int8Outlier(id="Bad Id"))
    custom = register(LowBitOutlier(4, k=4, group=64, id="test_int4_k4"))
    assert get("test_int4_k4") is custom and register(custom) is custom
    assert "test_int4_k4" in available()


# ------------------------------------------------------------------------------------------------ fuzzing

FUZZ_CODECS = [*(get(i) for i in available()), Int8StaticOutlier([0, 5]), Hadamard(LowBitOutlier(4, k=2), seed=7)]
FUZZ_SHAPES = [(2, 3, 40), (5, 64), (0, 8), (7,), (1, 1)]


def _fuzz_input(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    if x.numel():
        x.view(-1, shape[-1])[:, 0] *= 300
    return x


VALID = [(c, s, c.encode(_fuzz_input(s))) for c in FUZZ_CODECS for s in FUZZ_SHAPES
         if not (isinstance(c, Int8StaticOutlier) and s[-1] <= 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "float32", "bfloat16", "int8", "x" * 300, "1:00000000"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["k", "group", "q"]), children, max_size=3),
    max_leaves=8,
)


@st.composite
def _tensor_mutation(draw, tensor: torch.Tensor):
    kind = draw(st.sampled_from(["truncate", "dtype", "reinterpret", "reshape", "garbage", "not_a_tensor", "grow"]))
    if kind == "truncate":
        flat = tensor.reshape(-1)
        return flat[: draw(st.integers(0, max(flat.numel() - 1, 0)))]
    if kind == "dtype":
        return tensor.to(draw(st.sampled_from(DTYPES)))
    if kind == "reshape":
        return draw(st.sampled_from([tensor.reshape(-1), tensor.unsqueeze(0), tensor.t() if tensor.dim() == 2 else tensor.reshape(1, -1)]))
    if kind == "garbage":  # random bytes in the same dtype and shape: NaN, huge scales, bad or repeated indices
        raw = draw(st.binary(min_size=tensor.numel() * tensor.element_size(), max_size=tensor.numel() * tensor.element_size()))
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape) if raw else tensor
    if kind == "reinterpret" and tensor.numel() * tensor.element_size() % 4 == 0 and tensor.numel():
        return tensor.reshape(-1).view(draw(st.sampled_from([torch.float32, torch.int32])))
    if kind == "grow":
        return torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:1]]) if tensor.numel() else torch.zeros(1)
    return draw(st.sampled_from([None, 1.5, [1, 2], "tensor"]))


@st.composite
def _mutated(draw):
    codec, shape, payload = draw(st.sampled_from(VALID))
    codec_id, tensors, meta = payload.codec, list(payload.tensors), dict(payload.meta)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["tensor", "tensor", "drop", "extra", "swap", "meta_value", "meta_drop",
                                     "meta_extra", "inner", "codec_id", "containers"]))
        if kind == "tensor" and tensors:
            i = draw(st.integers(0, len(tensors) - 1))
            tensors[i] = draw(_tensor_mutation(tensors[i])) if isinstance(tensors[i], torch.Tensor) else None
        elif kind == "drop" and tensors:
            tensors.pop(draw(st.integers(0, len(tensors) - 1)))
        elif kind == "extra":
            tensors.append(draw(st.sampled_from([torch.zeros(3), torch.zeros(0, dtype=torch.int8), tensors[0] if tensors else None])))
        elif kind == "swap" and len(tensors) > 1:
            i, j = draw(st.lists(st.integers(0, len(tensors) - 1), min_size=2, max_size=2, unique=True))
            tensors[i], tensors[j] = tensors[j], tensors[i]
        elif kind == "meta_value" and meta:
            key = draw(st.sampled_from(sorted(meta)))
            meta[key] = draw(JSON_VALUES | st.lists(st.integers(-5, 2**31), max_size=9) | st.integers(-5, 600))
        elif kind == "meta_drop" and meta:
            meta.pop(draw(st.sampled_from(sorted(meta))))
        elif kind == "meta_extra":
            meta[draw(st.sampled_from(["extra", "k", "scale", "channels"]))] = draw(JSON_VALUES)
        elif kind == "inner" and isinstance(meta.get("inner"), dict):
            inner = dict(meta["inner"])
            inner[draw(st.sampled_from(["k", "group", "x"]))] = draw(JSON_VALUES | st.integers(-5, 600))
            meta["inner"] = inner
        elif kind == "codec_id":
            codec_id = draw(st.sampled_from([*available(), "", "INT8", None, 7]))
        elif kind == "containers":
            choice = draw(st.integers(0, 2))
            if choice == 0:
                return codec, shape, Payload(codec_id, draw(st.sampled_from([None, torch.zeros(2), {"q": 1}])), meta)
            if choice == 1:
                return codec, shape, Payload(codec_id, tensors, draw(st.sampled_from([None, [], "meta", meta.items()])))
            return codec, shape, "not a payload"
    return codec, shape, Payload(codec_id, tensors, meta)


@FUZZ
@given(_mutated(), st.booleans())
def test_mutated_payloads_decode_cleanly_or_raise_codec_error(case, pass_shape):
    codec, shape, payload = case
    try:
        out = codec.decode(payload, shape=shape if pass_shape else None)
    except CodecError as exc:
        assert str(exc)
        return
    expected = shape if pass_shape else tuple(payload.meta["shape"])
    assert tuple(out.shape) == tuple(expected)
    assert out.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert torch.isfinite(out).all()


@st.composite
def _garbage_contents(draw):
    """A valid payload with random bytes in some of its tensors (same dtype and shape)."""
    codec, shape, payload = draw(st.sampled_from([v for v in VALID if v[2].meta["shape"][0]]))
    tensors = list(payload.tensors)
    for i in draw(st.lists(st.integers(0, len(tensors) - 1), min_size=1, max_size=len(tensors), unique=True)):
        t = tensors[i]
        raw = draw(st.binary(min_size=t.numel() * t.element_size(), max_size=t.numel() * t.element_size()))
        if raw:
            tensors[i] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(t.dtype).reshape(t.shape)
    return codec, shape, Payload(payload.codec, tensors, payload.meta)


@FUZZ
@given(_garbage_contents())
def test_garbage_tensor_contents_decode_to_finite_values_or_raise_codec_error(case):
    codec, shape, payload = case
    try:
        out = codec.decode(payload, shape=shape)
    except CodecError as exc:
        assert any(word in str(exc) for word in ("NaN", "outside", "repeat")), str(exc)
        return
    assert out.shape == shape and torch.isfinite(out).all()


def test_deep_payload_checks():
    x = hidden_states()
    payload = get("int8_outlier").encode(x)
    names = ("q", "scale", "codes", "vals", "low", "high")

    def decode(**changes):
        tensors = {**dict(zip(names, payload.tensors, strict=True)), **changes}
        return get("int8_outlier").decode(Payload("int8_outlier", list(tensors.values()), payload.meta))

    q, scale, codes, vals, low, high = payload.tensors
    with pytest.raises(CodecError, match="'scale' has NaN"):
        decode(scale=torch.full_like(scale, math.nan))
    with pytest.raises(CodecError, match=r"'scale' has values outside \[0, "):
        decode(scale=-scale)
    with pytest.raises(CodecError, match="indices name channels outside"):
        decode(high=torch.full_like(high, 255))  # high bits 3: channels 768 and up of 576
    with pytest.raises(CodecError, match="repeat a channel"):
        decode(low=torch.zeros_like(low), high=torch.zeros_like(high))
    with pytest.raises(CodecError, match="'outlier_vals' has NaN or infinite"):
        decode(vals=torch.full_like(vals, math.inf))
    with pytest.raises(CodecError, match="'group_codes' has shape"):
        decode(codes=codes[:, :-1])
    # the most extreme accepted payload still decodes to finite values
    extreme = decode(q=torch.full_like(q, -128), scale=torch.full((len(scale),), torch.finfo(torch.float32).max / 128),
                     codes=torch.zeros_like(codes))
    assert torch.isfinite(extreme).all()
    # low-bit codecs' outliers are multiples of the token's scale: a product beyond float32 is refused
    low = get("int4_outlier").encode(x)
    tensors = list(low.tensors)
    tensors[1] = torch.full_like(tensors[1], torch.finfo(torch.float32).max / 8)
    with pytest.raises(CodecError, match="outlier values fall outside float32"):
        get("int4_outlier").decode(Payload("int4_outlier", tensors, low.meta))


def _element_bound(codec_id: str, x: torch.Tensor) -> torch.Tensor:
    """The largest |x - decoded| each element may have, from the codec's design (x float32 [rows, cols])."""
    amax = x.abs().amax(dim=1, keepdim=True) if x.shape[1] else x.new_zeros(x.shape[0], 1)
    ax = x.abs()
    if codec_id == "none":
        return torch.zeros_like(x)
    if codec_id == "float16":
        return ax * U16 + 2.0**-25
    if codec_id == "bfloat16":
        return ax * U8 + 1e-38
    slack = 1 + 2e-3  # float32 scale arithmetic, float16 token scales rounded up, group codes round steps up
    if codec_id in ("int8_outlier", "int8_static_outlier"):  # half a step of the token's int8 scale; outliers fp16
        return amax / 254 * slack + ax * U16 + 1e-37
    if codec_id in ("int4_outlier", "int4_outlier_k4", "int5_outlier", "int6_outlier"):  # half a step of 2^(bits-1) - 1
        bits = 4 if codec_id == "int4_outlier_k4" else int(codec_id[3])
        return amax / (2 * ((1 << (bits - 1)) - 1)) * slack + ax * U16 + 1e-37
    raise AssertionError(codec_id)


@FUZZ
@given(
    rows=st.integers(0, 6), cols=st.integers(1, 80), lead=st.sampled_from([(), (2,)]),
    exponent=st.integers(-30, 30), seed=st.integers(0, 2**16), zero_rows=st.booleans(),
    spike=st.sampled_from([0.0, 50.0, 1e4]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_valid_inputs_round_trip_within_bounds(rows, cols, lead, exponent, seed, zero_rows, spike, dtype):
    x = torch.randn(*lead, rows, cols, generator=torch.Generator().manual_seed(seed)) * 10.0**exponent
    if spike and x.numel():
        x[..., seed % cols] *= spike
    if zero_rows and rows:
        x[..., 0, :] = 0
    if dtype is torch.float16:
        x = x.clamp(-65504, 65504)
    x = x.to(dtype)
    ref = x.float().reshape(-1, cols)
    rounding = (U16 if dtype is torch.float16 else U8 if dtype is torch.bfloat16 else 0.0) * 1.01  # decoding to dtype
    for codec_id in sorted(BOUNDS):
        c = Int8StaticOutlier([0, 2], id=STATIC.id) if codec_id == STATIC.id else get(codec_id)
        if codec_id == STATIC.id and cols <= 2:
            with pytest.raises(CodecError):
                c.encode(x)
            continue
        y = c.decode(c.encode(x))
        assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all(), codec_id
        target = ref.clamp(-65504, 65504) if codec_id == "float16" else ref  # float16 saturates
        err = y.float().reshape(-1, cols) - target
        if codec_id == "hadamard_int8":  # orthonormal rotation: bound the token's error norm instead
            bound = ref.norm(dim=1) * (math.sqrt(cols) / 254 * 1.01 + rounding) + 1e-30
            assert (err.norm(dim=1) <= bound).all(), codec_id
        else:
            bound = _element_bound(codec_id, target) + target.abs() * rounding + (2.0**-24 if rounding else 0.0)
            assert (err.abs() <= bound).all(), codec_id


# ------------------------------------------------------------------------------------- the wire slot, fuzzed

SLOTS = [(codec_id, list(s), *wire.encode_slot(_fuzz_input(s), codec_id))
         for codec_id in available() for s in FUZZ_SHAPES]


@st.composite
def _mutated_slot(draw):
    """A valid slot (codec id, declared shape, buffer) with its bytes or declared shape damaged."""
    codec_id, shape, dtype, buffer = draw(st.sampled_from(SLOTS))
    data = bytearray(buffer)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip_header", "truncate", "extend", "header_len", "shape", "codec"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "flip_header" and len(data) > 2:
            data[draw(st.integers(0, min(len(data), 24) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif kind == "header_len" and len(data) >= 2:
            data[:2] = draw(st.integers(0, 2**16 - 1)).to_bytes(2, "little")
        elif kind == "shape":
            shape = draw(st.lists(st.integers(0, 700), min_size=0, max_size=4))
        elif kind == "codec":
            dtype = wire.PREFIX + draw(st.sampled_from(available()))
    return dtype, bytes(data), shape


@FUZZ
@given(_mutated_slot())
def test_damaged_slots_decode_cleanly_or_raise_codec_error(case):
    dtype, buffer, shape = case
    try:
        out = wire.decode_slot(dtype, buffer, shape)
    except CodecError as exc:
        assert str(exc)
        return
    assert list(out.shape) == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("codec_id", available())
def test_slots_round_trip_exactly_what_the_codec_decodes(codec_id):
    x = hidden_states()
    dtype, buffer = wire.encode_slot(x, codec_id)
    payload = get(codec_id).encode(x)
    assert torch.equal(wire.decode_slot(dtype, buffer, list(x.shape)), get(codec_id).decode(payload))
    assert len(buffer) == payload_size(payload).wire_bytes
    assert wire.original_nbytes(buffer, list(x.shape)) == x.numel() * 4
