"""Request parsing fuzzed with hypothesis, without a network: the wire records' decode, tensors and streamed chunks,
the sealed envelopes and the DHT record validator. Whatever the bytes, only the project's typed errors come out
(BadRequest and the other SwarmErrors, Refused, False from the validator), never an IndexError, a struct.error, a
UnicodeDecodeError or a protobuf DecodeError; and what is accepted is what it claims to be."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from swarm.auth import CLOCK_SKEW, Keyring, Refused, SwarmKey
from swarm.compression import available, wire
from swarm.dtypes import WIRE_DTYPES
from swarm.errors import BadRequest, SwarmError
from swarm.forwarding import ForwardHop, ForwardStep, PushStep
from swarm.keyed_p2p import KeyedP2P, Sealed, SealedCall
from swarm.protocol import (
    DeltaInfo,
    InferenceOpen,
    InferenceReply,
    InferenceStep,
    SpanReply,
    SpanRequest,
    TrainGrad,
)
from swarm.record_auth import _TRAILER, MAX_TTL, SwarmRecordValidator, peer_id_of
from swarm.streaming import join_message, split_message
from swarm.tensors import pack_tensor, unpack_tensor
from tests.test_auth import identity_file, signed

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "swarm-hypothesis")  # not .hypothesis/ in the checkout

# Repeatable in CI (derandomize: the same examples every run), a few seconds in all. SWARM_FUZZ_EXAMPLES=5000 hunts
# longer, with new examples each run.
_HUNT = os.environ.get("SWARM_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 150), derandomize=_HUNT is None, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

RECORDS = [SpanRequest, InferenceOpen, InferenceStep, ForwardStep, PushStep, TrainGrad, SpanReply, InferenceReply]
FIELDS = sorted({name for model in [*RECORDS, DeltaInfo, ForwardHop] for name in model.model_fields} | {"x"})

# ------------------------------------------------------------------------------------------------ wire records

_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40)
            | st.sampled_from(["0" * 32, "ab" * 8, "fds", "none", "int8_outlier", "Qm" + "a" * 44]))
# JSON whose objects mostly use the records' own field names, so that values reach every field's validator.
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6), max_leaves=12)


@st.composite
def _metadata(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "object", "bytes", "damaged"]))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "object":
        return json.dumps(draw(st.dictionaries(st.sampled_from(FIELDS), _json, max_size=10))).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    raw = bytearray(SpanRequest(start=0, end=2, lora=["0.self_attn.q_proj.A"], delta=None).encode())
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@FUZZ
@given(st.sampled_from(RECORDS), _metadata())
def test_records_decode_or_raise_a_swarm_error(record, raw):
    try:
        decoded = record.decode(raw)
    except SwarmError as exc:
        assert exc.message
        return
    assert isinstance(decoded, record)
    assert record.decode(decoded.encode()) == decoded  # what was accepted travels on unchanged


# ------------------------------------------------------------------------------------------------------ tensors

SAMPLES = [torch.randn(2, 3, 8), torch.arange(6).reshape(1, 6), torch.ones(2, 2, dtype=torch.bool),
           torch.zeros(0, 4, dtype=torch.float16)]
VALID = [pack_tensor(t) for t in SAMPLES] + [pack_tensor(SAMPLES[0], codec) for codec in available() if codec != "none"]
_dtypes = st.sampled_from([*WIRE_DTYPES, *(wire.PREFIX + codec for codec in available()), "object", "payload:", ""])
_sizes = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 9), max_size=10)
_compressions = st.sampled_from(list(runtime_pb2.CompressionType.values()))


@st.composite
def _tensor_protos(draw) -> runtime_pb2.Tensor:
    if draw(st.booleans()):  # anything at all in each field
        return runtime_pb2.Tensor(buffer=draw(st.binary(max_size=200)), size=draw(_sizes), dtype=draw(_dtypes),
                                  compression=draw(_compressions))
    valid = draw(st.sampled_from(VALID))  # a valid tensor with one or two fields damaged
    fields = dict(buffer=valid.buffer, size=list(valid.size), dtype=valid.dtype, compression=valid.compression)
    for name in draw(st.lists(st.sampled_from(["buffer", "size", "dtype", "compression"]), min_size=1, max_size=2)):
        if name == "buffer":
            data = bytearray(fields["buffer"])
            at = draw(st.integers(0, len(data)))
            fields["buffer"] = bytes(data[:at]) + draw(st.binary(max_size=8)) + bytes(data[at + draw(st.integers(0, 8)):])
        else:
            fields[name] = draw({"size": _sizes, "dtype": _dtypes, "compression": _compressions}[name])
    return runtime_pb2.Tensor(**fields)


@FUZZ
@given(_tensor_protos())
def test_tensors_unpack_as_declared_or_raise_bad_request(proto):
    try:
        tensor = unpack_tensor(proto, "fuzzed tensor")
    except BadRequest as exc:
        assert exc.message.startswith("fuzzed tensor: ")  # says which tensor
        return
    assert list(tensor.shape) == list(proto.size)
    assert tensor.dtype == WIRE_DTYPES.get(proto.dtype, tensor.dtype)
    if wire.is_payload_dtype(proto.dtype):  # codecs decode only finite floats
        assert tensor.is_floating_point() and bool(torch.isfinite(tensor).all())


@FUZZ
@given(st.lists(st.lists(st.tuples(st.binary(max_size=16), st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 3),
                                                                    max_size=3)), max_size=3), max_size=4))
def test_streamed_chunks_join_or_raise_bad_request(chunks):
    first = split_message(SpanRequest(start=0, end=2), [pack_tensor(t) for t in SAMPLES[:2]])[0]
    rest = [runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b, size=s) for b, s in message])
            for message in chunks]
    try:
        joined = join_message(first, rest, max_bytes=64)
    except BadRequest:
        return
    assert [list(t.size) for t in joined] == [list(t.size) for t in first.tensors]


# ------------------------------------------------------------------------------------------- sealed envelopes

KEY = SwarmKey.from_bytes(b"f" * 32)
CALLER, CALLEE = PeerID(b"\x12\x20" + b"c" * 32), PeerID(b"\x12\x20" + b"s" * 32)
METHOD = "tiny-llama::BlockService.rpc_forward"
_stamps = st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats() | st.floats(-2 * CLOCK_SKEW, 2 * CLOCK_SKEW)
_payloads = st.binary(max_size=120) | st.sampled_from([runtime_pb2.ExpertRequest(
    metadata=b"{}", tensors=[pack_tensor(SAMPLES[0])]).SerializeToString()])


def _server(keyring: Keyring) -> tuple[KeyedP2P, SimpleNamespace]:
    """The receiving side of a KeyedP2P (its envelope checks need no network) and a call's context there."""
    return KeyedP2P(None, keyring), SimpleNamespace(remote_id=CALLER, local_id=CALLEE)


@FUZZ
@given(sealed_by_key=st.booleans(), offset=_stamps, nonce=st.binary(max_size=20), mac=st.binary(max_size=40),
       payload=_payloads, seq=st.integers(0, 2**64 - 1))
def test_sealed_requests_open_or_are_refused(sealed_by_key, offset, nonce, mac, payload, seq):
    """A random envelope is refused; a key holder's (at any clock offset, NaN included) opens only when fresh, and
    only into a valid message: bytes that do not parse are a BadRequest."""
    now = time.time()
    if sealed_by_key:
        sender = Keyring([KEY], clock=lambda: now + offset)
        stamp, nonce, mac = sender.mint(METHOD, CALLER.to_bytes(), CALLEE.to_bytes(), payload)
    else:
        stamp = now + offset
    server, context = _server(Keyring([KEY]))
    try:
        message, _ = server._open(METHOD, context, Sealed(time=stamp, nonce=nonce, seq=seq, mac=mac, payload=payload),
                                  runtime_pb2.ExpertRequest)
    except Refused:
        assert not sealed_by_key or not abs(offset) <= CLOCK_SKEW - 1  # NaN and stale stamps included
        return
    except BadRequest as exc:
        assert sealed_by_key and "not a valid ExpertRequest" in exc.message
        return
    assert sealed_by_key and math.isfinite(stamp) and abs(stamp - now) <= CLOCK_SKEW + 1
    assert message.SerializeToString() == runtime_pb2.ExpertRequest.FromString(payload).SerializeToString()


def _opened_or_bad_request(open_envelope) -> None:
    """Open an envelope a key holder sealed: a valid message comes out, or bytes that do not parse are a BadRequest."""
    try:
        open_envelope()
    except BadRequest as exc:
        assert "is not a valid" in exc.message


@FUZZ
@given(sealed_by_key=st.booleans(), seq=st.integers(0, 3), mac=st.binary(max_size=40), payload=_payloads)
def test_later_stream_messages_and_replies_open_or_are_refused(sealed_by_key, seq, mac, payload):
    """The envelopes after a call's first request, and its replies: random ones are refused; sealed ones open."""
    client = SealedCall(SimpleNamespace(keyring=Keyring([KEY]), peer_id=CALLER), METHOD, CALLEE)
    first = client.seal(runtime_pb2.ExpertRequest())
    server, context = _server(Keyring([KEY]))
    server._open(METHOD, context, first, runtime_pb2.ExpertRequest)
    later = Sealed(seq=seq, mac=mac, payload=payload)
    reply = Sealed(seq=0, mac=mac, payload=payload)
    if not sealed_by_key:
        for open_envelope in (lambda: server._open_later(METHOD, context, first.nonce, seq, later, runtime_pb2.ExpertRequest),
                              lambda: client.open(reply, runtime_pb2.ExpertResponse)):
            try:
                open_envelope()
            except Refused:
                continue
            raise AssertionError("a random envelope was opened")
        return
    later.mac = client.keyring.seal(b"stream", METHOD, CALLER.to_bytes(), CALLEE.to_bytes(), first.nonce, seq,
                                    payload)
    reply.mac = server.keyring.seal(b"reply", METHOD, CALLEE.to_bytes(), CALLER.to_bytes(), first.nonce, 0,
                                    payload)
    _opened_or_bad_request(lambda: server._open_later(METHOD, context, first.nonce, seq, later, runtime_pb2.ExpertRequest))
    _opened_or_bad_request(lambda: client.open(reply, runtime_pb2.ExpertResponse))


# ------------------------------------------------------------------------------------------------- DHT records

_IDENTITY_DIR = Path(tempfile.mkdtemp(prefix="swarm-fuzz-identity-"))
OWNER, OWNER_ID = identity_file(_IDENTITY_DIR, "owner")
SIGNER, READER = SwarmRecordValidator(Keyring([KEY]), OWNER), SwarmRecordValidator(Keyring([KEY]))
GENUINE = signed(SIGNER, OWNER_ID, value=MSGPackSerializer.dumps({"start": 0, "end": 2}),
                 expiration=get_dht_time() + MAX_TTL / 2)  # valid for as long as a long hunt runs


@st.composite
def _records(draw) -> tuple[DHTRecord, bool]:
    """(a record, whether the swarm must accept it): random records; records whose swarm-key MAC is right (a key
    holder's) around random or inconsistent owner parts; the genuine record with one part changed; records its owner
    signed with any expiry (NaN and far ahead are refused: the cap on expiries must hold)."""
    kind = draw(st.sampled_from(["random", "keyed", "owned", "changed", "expiry"]))
    expiration = draw(st.sampled_from([GENUINE.expiration_time, math.nan, math.inf, -math.inf]) | st.floats()
                      | st.floats(-10.0, MAX_TTL + 10.0).map(lambda ahead: get_dht_time() + ahead))
    if kind == "random":
        return DHTRecord(draw(st.binary(max_size=40)), draw(st.binary(max_size=40)), draw(st.binary(max_size=300)),
                         expiration), False
    if kind == "expiry":
        record = signed(SIGNER, OWNER_ID, value=draw(st.binary(max_size=40)), expiration=expiration)
        return record, math.isfinite(expiration) and expiration - get_dht_time() <= MAX_TTL - 1
    if kind == "changed":
        part = draw(st.sampled_from(["key", "subkey", "value", "expiration_time"]))
        if part == "expiration_time":
            return dataclasses.replace(GENUINE, expiration_time=expiration), expiration == GENUINE.expiration_time
        data = bytearray(getattr(GENUINE, part))
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return dataclasses.replace(GENUINE, **{part: bytes(data)}), False
    public, signature = draw(st.binary(max_size=300)), draw(st.binary(max_size=300))
    lengths = draw(st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)) | st.just((len(public), len(signature))))
    owner = PeerID(peer_id_of(public)).to_base58() if kind == "owned" else draw(st.text(max_size=60))
    subkey = MSGPackSerializer.dumps(owner) if draw(st.booleans()) else draw(st.binary(max_size=20))
    body = draw(st.binary(max_size=60)) + public + signature + _TRAILER.pack(*lengths)
    record = DHTRecord(b"key-id", subkey, body, expiration)
    # sealed with the swarm key's record MAC, as a key holder would, around owner parts that sign nothing
    return dataclasses.replace(record, value=body + READER._mac(KEY.records, record, body)), False


@FUZZ
@given(_records())
def test_the_record_validator_only_says_yes_or_no(case):
    record, expected = case
    assert READER.validate(record) is expected
    assert isinstance(READER.strip_value(record), bytes)


def test_the_genuine_record_is_accepted():
    """The fuzz above can fail: its one genuine record passes the same validator."""
    assert READER.validate(GENUINE) and GENUINE.expiration_time > get_dht_time()
