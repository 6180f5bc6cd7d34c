"""Malformed requests to a live server, one kind per row of a table, sealed with the swarm's key so that they reach
its handlers: every metadata field wrong in turn, damaged and oversized tensors, huge declared sizes, unknown codecs,
NaN, negative lengths, unknown sessions, steps out of order, metadata that is not UTF-8 or too large. Each gets an
error that names what was wrong; afterwards the server still answers, and a client that generated all along got
exactly the local model's tokens."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from client import aio
from client.streams import open_stream
from swarm import compression
from swarm.compression import Payload, wire
from swarm.config import ServerConfig
from swarm.errors import RemoteError
from swarm.protocol import SpanRequest
from swarm.streaming import split_message
from swarm.tensors import pack_tensor

HIDDEN = 64  # the tiny Llama's (tests/conftest.py)
_rng = torch.Generator().manual_seed(1313)


def _hidden(batch: int = 1, length: int = 3) -> torch.Tensor:
    return torch.randn(batch, length, HIDDEN, generator=_rng)


def _positions(length: int = 3, first: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.arange(first, first + length).repeat(batch, 1)


GOOD = [pack_tensor(_hidden()), pack_tensor(_positions())]  # a valid forward's tensors: hidden states, positions
EMPTY = runtime_pb2.Tensor(size=[0], dtype="float32")  # two bytes on the wire, a tensor object once decoded
MAX_TENSORS = ServerConfig.max_request_tensors  # the shared swarm's servers keep the default
GRAD = pack_tensor(_hidden())


def _with(index: int, proto: runtime_pb2.Tensor, tensors=None) -> list[runtime_pb2.Tensor]:
    """`tensors` (GOOD by default) with tensor `index` replaced."""
    tensors = list(GOOD if tensors is None else tensors)
    tensors[index] = proto
    return tensors


def _raw(tensor: torch.Tensor, **changes) -> runtime_pb2.Tensor:
    """A packed tensor with some of its wire fields replaced (buffer, size, dtype, compression)."""
    proto = pack_tensor(tensor)
    fields = dict(buffer=proto.buffer, size=list(proto.size), dtype=proto.dtype, compression=proto.compression)
    return runtime_pb2.Tensor(**{**fields, **changes})


def _meta(base: dict, **changes) -> bytes:
    """Metadata as raw JSON, so that any field can hold a wrong type, NaN or a value the records would refuse."""
    return json.dumps({**base, **changes}).encode()


def _message(metadata: bytes, tensors=()) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=metadata, tensors=list(tensors))


SPAN = {"start": 0, "end": 2}  # the first server's blocks
OPEN = {**SPAN, "max_length": 8, "batch_size": 1}
STEP = {"step": 0}


def _session_id() -> str:
    return secrets.token_hex(16)


def _push(session_id: str, step: int = 0, tensors=None, **changes) -> runtime_pb2.ExpertRequest:
    return _message(_meta({"step": step, "session_id": session_id}, **changes), GOOD if tensors is None else tensors)


def _nan_float16_payload() -> runtime_pb2.Tensor:
    """A float16 codec slot whose last value is +inf (0x7c00), which no honest encoder writes."""
    proto = pack_tensor(_hidden(), "float16")
    return runtime_pb2.Tensor(buffer=proto.buffer[:-2] + b"\x00\x7c", size=proto.size, dtype=proto.dtype)


INT8 = pack_tensor(_hidden(), "int8_outlier")


def _int8_payload(**fields) -> runtime_pb2.Tensor:
    """An int8_outlier slot whose header carries other metadata values (the wire writes whatever it is given)."""
    x = _hidden()
    payload = compression.get("int8_outlier").encode(x)
    damaged = Payload(payload.codec, payload.tensors, {**payload.meta, **fields})
    return runtime_pb2.Tensor(buffer=wire.pack_payload(damaged), size=list(x.shape), dtype=wire.PREFIX + payload.codec)
STREAM_LIMIT_CHUNKS = 12  # MiB: more than the tiny swarm's servers take in one streamed request (~10.8 MB)


def _oversized_stream() -> list[runtime_pb2.ExpertRequest]:
    first = _message(SpanRequest(start=0, end=2).encode(), [runtime_pb2.Tensor(size=[1, 16384, 64], dtype="float32")])
    chunk = runtime_pb2.Tensor(buffer=bytes(1 << 20), size=[0])
    return [first, *(_message(b"", [chunk]) for _ in range(STREAM_LIMIT_CHUNKS))]


def _bad_chunk_stream() -> list[runtime_pb2.ExpertRequest]:
    messages = split_message(SpanRequest(start=0, end=2), GOOD)
    return [*messages, _message(b"", [runtime_pb2.Tensor(buffer=b"x", size=[7])])]


DELTA = {"keys": ["0" * 32], "modes": "f", "refs": [""], "out_refs": [""], "codec": "none"}


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # rpc_forward, rpc_backward, rpc_push (one message); rpc_forward_stream, rpc_inference, rpc_train
    messages: list
    expected: str  # in the error's message: names what was wrong
    code: str = "bad_request"
    session: bytes | None = None  # rpc_push: open an inference session with this metadata first


def _forward(name, metadata, expected, tensors=None, code="bad_request") -> Case:
    return Case(name, "rpc_forward", [_message(metadata, GOOD if tensors is None else tensors)], expected, code)


def _tensors(name, tensors, expected) -> Case:
    return _forward(name, _meta(SPAN), expected, tensors)


def _inference(name, messages, expected, code="bad_request") -> Case:
    return Case(name, "rpc_inference", messages, expected, code)


def _opening(**changes) -> runtime_pb2.ExpertRequest:
    return _message(_meta(OPEN, **changes))


def _step(tensors=None, **changes) -> runtime_pb2.ExpertRequest:
    return _message(_meta(STEP, **changes), GOOD if tensors is None else tensors)


def _pushed(name, opening: dict, push: runtime_pb2.ExpertRequest, expected) -> Case:
    return Case(name, "rpc_push", [push], expected, session=_meta(OPEN, **opening))


def _train(name, first, expected, grad=None) -> Case:
    messages = [first] + ([grad] if grad is not None else [])
    return Case(name, "rpc_train", messages, expected)


SID = _session_id()
CASES = [
    # ---- each field of a forward/backward's metadata wrong in turn (swarm.protocol.SpanRequest)
    _forward("start negative", _meta(SPAN, start=-1), "start: Input should be greater than or equal to 0"),
    _forward("start not an integer", _meta(SPAN, start="zero"), "start: Input should be a valid integer"),
    _forward("end zero", _meta(SPAN, end=0), "end: Input should be greater than or equal to 1"),
    _forward("span reversed", _meta(SPAN, start=2, end=1), "the request asked for 2:1", code="blocks_not_served"),
    _forward("span beyond the server", _meta(SPAN, end=5), "hosts blocks 0:2; the request asked for 0:5",
             code="blocks_not_served"),
    _forward("lora not a list", _meta(SPAN, lora="q_proj"), "lora: Input should be a valid list"),
    _forward("lora name of 5000 digits", _meta(SPAN, lora=["1" * 5000 + ".self_attn.q_proj.A"]),
             "lora.0: String should have at most"),
    _forward("lora scaling NaN", _meta(SPAN, lora_scaling=float("nan")), "lora_scaling: Input should be a finite number"),
    _forward("adapter name too long", _meta(SPAN, adapter="a" * 300), "adapter: String should have at most 256"),
    _forward("adapter not hosted", _meta(SPAN, adapter="x"), "does not host adapter 'x'"),
    _forward("deep_prompts not a bool", _meta(SPAN, deep_prompts="sometimes"), "deep_prompts: Input should be a valid boolean"),
    _forward("deep_prompts without the tensor", _meta(SPAN, deep_prompts=True), "deep prompts and LoRA tensors as named; got 2"),
    _forward("reply codec unknown", _meta(SPAN, reply_codec="zip"), "unknown codec 'zip'"),
    _forward("lora_digest not hex", _meta(SPAN, lora_digest="XYZ"), "lora_digest: String should match pattern"),
    _forward("lora_by_digest without a digest", _meta(SPAN, lora_by_digest=True, lora=["0.self_attn.q_proj.A"]),
             "lora_by_digest needs lora_digest"),
    _forward("lora_dropout of 1", _meta(SPAN, lora_dropout=1.0), "lora_dropout: Input should be less than 1"),
    _forward("dropout_seed negative", _meta(SPAN, dropout_seed=-1), "dropout_seed: Input should be greater than or equal"),
    _forward("grad reply codec unknown", _meta(SPAN, grad_reply_codec="zip"), "unknown codec 'zip'"),
    Case("input_grad not a bool", "rpc_backward", [_message(_meta(SPAN, input_grad="perhaps"), [*GOOD, GRAD])],
         "input_grad: Input should be a valid boolean"),
    _forward("protocol version from the future", _meta(SPAN, version=99, min_version=99), "speaks protocol version 99",
             code="protocol_version"),
    # ---- the metadata as a whole
    _forward("metadata not JSON", b"{not json", "malformed SpanRequest: metadata is not JSON"),
    _forward("metadata not UTF-8", b'{"start": 0, "end": 2, "adapter": "\xff\xfe"}', "metadata is not UTF-8"),
    _forward("metadata oversized", _meta(SPAN, adapter=" " * 70000), "larger than the 64 KiB limit"),
    _forward("metadata nested too deep", b"[" * 30000 + b"]" * 30000, "metadata is nested too deeply"),
    _forward("metadata not an object", b"[0, 2]", "Input should be a valid dictionary"),
    # ---- LoRA tensors against their names
    _forward("more LoRA names than tensors", _meta(SPAN, lora=["a", "b", "c"]), "names 3 LoRA tensors but the request carries 2"),
    _forward("LoRA name malformed", _meta(SPAN, lora=["nonsense"]), "'nonsense' is not of the form BLOCK.MODULE.A",
             tensors=[*GOOD, pack_tensor(torch.zeros(4, HIDDEN))]),
    # ---- tensors
    _tensors("buffer truncated", _with(0, _raw(_hidden(), buffer=GOOD[0].buffer[:-4])), "tensor 0: buffer has 764 bytes"),
    _tensors("buffer too long", _with(0, _raw(_hidden(), buffer=GOOD[0].buffer + b"\0" * 4)), "tensor 0: buffer has 772 bytes"),
    _tensors("huge declared size", _with(0, _raw(_hidden(), size=[1 << 20, 1 << 20, HIDDEN])), "elements exceed the limit"),
    _tensors("negative length", _with(0, _raw(_hidden(), size=[1, 2**32 - 3, HIDDEN])), "elements exceed the limit"),  # uint32
    _tensors("empty but huge", _with(0, runtime_pb2.Tensor(size=[0, 1 << 21, 1 << 21, 1 << 21], dtype="float32")),
             "elements (counting its zero dimensions as 1) exceed the limit"),
    _tensors("rank 9", _with(1, _raw(_positions(), size=[1] * 9)), "tensor 1: invalid shape"),
    _tensors("dtype not allowed", _with(0, _raw(_hidden(), dtype="object")), "tensor 0: dtype 'object' is not one of"),
    _tensors("hivemind compression", _with(0, _raw(_hidden(), compression=runtime_pb2.CompressionType.FLOAT16)),
             "tensor 0: unsupported compression"),
    _tensors("codec unknown", _with(0, _raw(_hidden(), dtype="payload:zip")), "tensor 0: unknown codec 'zip'"),
    _tensors("codec payload truncated", _with(0, runtime_pb2.Tensor(buffer=INT8.buffer[:-5], size=INT8.size, dtype=INT8.dtype)),
             "tensor 0: payload tensor"),
    _tensors("codec payload of a huge declared size",
             _with(0, runtime_pb2.Tensor(buffer=INT8.buffer, size=[1 << 16, 1 << 16, HIDDEN], dtype=INT8.dtype)),
             "has more than 1073741824 elements"),
    _tensors("codec payload with a negative field", _with(0, _int8_payload(k=-1)), "metadata 'k' = -1 is outside"),
    _tensors("codec payload with inf", _with(0, _nan_float16_payload()), "tensor 0: payload tensor 'data' has NaN or infinite"),
    _tensors("hidden states NaN", _with(0, pack_tensor(torch.full((1, 3, HIDDEN), float("nan")))), "hidden states must not contain NaN"),
    _tensors("hidden states of the wrong width", _with(0, pack_tensor(torch.zeros(1, 3, 32))), "shape [batch, length, 64]"),
    _tensors("empty batch", [pack_tensor(torch.zeros(0, 3, HIDDEN)), pack_tensor(torch.zeros(0, 3, dtype=torch.int64))],
             "batch size 0 is outside"),
    _tensors("positions not integers", _with(1, pack_tensor(_positions().float())), "position ids must be integers"),
    _tensors("positions negative", _with(1, pack_tensor(_positions(first=-2))), "position ids must lie in [0, 512)"),
    _tensors("mask not 0/1", [*GOOD, pack_tensor(torch.full((1, 3), 2))], "attention mask may only hold 0 and 1"),
    _tensors("hidden states only", GOOD[:1], "expected hidden states, position ids"),
    # ---- backward
    Case("gradient of another shape", "rpc_backward", [_message(_meta(SPAN), [*GOOD, pack_tensor(_hidden(1, 4))])],
         "output gradient has shape [1, 4, 64], hidden states [1, 3, 64]"),
    Case("gradient NaN", "rpc_backward", [_message(_meta(SPAN), [*GOOD, pack_tensor(torch.full((1, 3, HIDDEN), float("nan")))])],
         "output gradient must not contain NaN"),
    Case("backward without a gradient", "rpc_backward", [_message(_meta(SPAN), GOOD)], "the output gradient and LoRA tensors"),
    # ---- more tensors than a request may carry (ServerConfig.max_request_tensors), counted before any is decoded
    _tensors("too many tensors", [*GOOD, *[EMPTY] * (MAX_TENSORS - 1)],
             f"carries {MAX_TENSORS + 1} tensors; this server takes at most {MAX_TENSORS} per request"),
    _inference("opening with too many tensors", [_message(_meta(OPEN), [EMPTY] * (MAX_TENSORS + 1))],
               f"carries {MAX_TENSORS + 1} tensors; this server takes at most {MAX_TENSORS}"),
    Case("stream of too many tensors", "rpc_forward_stream",
         [_message(SpanRequest(start=0, end=2).encode(), [EMPTY] * (MAX_TENSORS + 1))],
         f"carries {MAX_TENSORS + 1} tensors; this server takes at most {MAX_TENSORS}"),
    # ---- streamed requests
    Case("stream chunk of no tensor", "rpc_forward_stream", _bad_chunk_stream(), "stream chunk refers to an unknown tensor"),
    Case("stream oversized", "rpc_forward_stream", _oversized_stream(), "streamed request exceeds this server's limit"),
    # ---- an inference session's opening (InferenceOpen), field by field
    _inference("max_length zero", [_opening(max_length=0)], "max_length: Input should be greater than or equal to 1"),
    _inference("max_length beyond the model", [_opening(max_length=10**9)], "max_length 1000000000 exceeds the model's 512"),
    _inference("batch_size zero", [_opening(batch_size=0)], "batch_size: Input should be greater than or equal to 1"),
    _inference("batch_size beyond the limit", [_opening(batch_size=1000)], "batch size 1000 exceeds this server's limit"),
    _inference("session larger than the whole cache", [_opening(batch_size=9, max_length=500)],
               "exceeds this server's whole KV-cache budget", code="cache_full"),
    _inference("session_id not hex", [_opening(session_id="not-a-session")], "session_id: String should match pattern"),
    _inference("input codec unknown", [_opening(input_codec="zip")], "unknown codec 'zip'"),
    _inference("deep prompts missing", [_opening(deep_prompts=True)], "deep_prompts is set but the opening message carries no"),
    _inference("opening tensor not allowed", [_message(_meta(OPEN), [_raw(_hidden(), dtype="object")])],
               "opening tensor 0: dtype 'object'"),
    _inference("opening span reversed", [_opening(start=2, end=1)], "asked for 2:1", code="blocks_not_served"),
    # ---- its steps (swarm.forwarding.ForwardStep)
    _inference("step negative", [_opening(), _step(step=-1)], "step: Input should be greater than or equal to 0"),
    _inference("step before its turn", [_opening(), _step(step=3)], "step 3 arrived before step 0"),
    _inference("step skipped", [_opening(), _step(), _step(tensors=[pack_tensor(_hidden()), pack_tensor(_positions(first=3))],
                                                        step=2)], "step 2 arrived before step 1"),
    _inference("hypo_ids out of range", [_opening(), _step(hypo_ids=[5])], "hypo_ids must name one row in [0, 1)"),
    _inference("hypo_ids negative", [_opening(), _step(hypo_ids=[-1])], "hypo_ids.0: Input should be greater than or equal"),
    _inference("step of another batch size", [_opening(), _step(tensors=[pack_tensor(_hidden(2)), pack_tensor(_positions(batch=2))])],
               "session was opened for batch size 1, step has 2"),
    _inference("step beyond max_length", [_opening(max_length=4), _step(),
                                          _step(tensors=[pack_tensor(_hidden()), pack_tensor(_positions(first=3))], step=1)],
               "session holds 3 tokens and max_length=4", code="max_length_exceeded"),
    _inference("forward hop peer id invalid", [_opening(), _step(forward=[{"peer_id": "0OIl", "session_id": SID, "step": 0}])],
               "forward.0.peer_id: String should match pattern"),
    _inference("forward hop codec unknown", [_opening(), _step(forward=[{"peer_id": "Qm" + "a" * 44, "session_id": SID,
                                                                          "step": 0, "codec": "zip"}])], "unknown codec 'zip'"),
    _inference("step metadata not UTF-8", [_opening(), _message(b'{"step": 0, "x": "\xc3"}', GOOD)], "malformed ForwardStep: metadata is not UTF-8"),
    _inference("step hidden states NaN", [_opening(), _step(tensors=_with(0, pack_tensor(torch.full((1, 3, HIDDEN), float("nan")))))],
               "hidden states must not contain NaN"),
    # ---- pushes into a session (swarm.forwarding.PushStep)
    Case("push to an unknown session", "rpc_push", [_push(_session_id())], "no inference session"),
    Case("push session_id not hex", "rpc_push", [_push("zz")], "session_id: String should match pattern"),
    _pushed("push out of order", {"session_id": SID}, _push(SID, step=3), "pushed step 3 does not follow this session's 0 steps"),
    _pushed("push in another codec", {"session_id": SID}, _push(SID, tensors=_with(0, pack_tensor(_hidden(), "float16"))),
            "pushed hidden states are in codec 'float16'; this session takes 'none'"),
    _pushed("push without tensors", {"session_id": SID}, _push(SID, tensors=[]), "got no tensors"),
    _pushed("push of another batch size", {"session_id": SID},
            _push(SID, tensors=[pack_tensor(_hidden(2)), pack_tensor(_positions(batch=2))]), "opened for batch size 1, push has 2"),
    # ---- training streams (rpc_train: a SpanRequest, then a TrainGrad)
    _train("train gradient as two tensors", _message(_meta(SPAN), GOOD), "a gradient message carries one tensor, got 2",
           grad=_message(b"{}", [GRAD, GRAD])),
    _train("train gradient NaN", _message(_meta(SPAN), GOOD), "output gradient must not contain NaN",
           grad=_message(b"{}", [pack_tensor(torch.full((1, 3, HIDDEN), float("nan")))])),
    _train("train gradient metadata not JSON", _message(_meta(SPAN), GOOD), "malformed TrainGrad", grad=_message(b"{{", [GRAD])),
    _train("train delta rows inconsistent", _message(_meta(SPAN, delta={**DELTA, "out_refs": []}), GOOD),
           "delta needs one key, mode, ref and out_ref per row"),
    _train("train delta codec unknown", _message(_meta(SPAN, delta={**DELTA, "codec": "zip"}), GOOD), "unknown codec 'zip'"),
    _train("train delta without its two tensors", _message(_meta(SPAN, delta=DELTA), GOOD[:1]), "starts with two tensors"),
]


@pytest.fixture(scope="module")
def first_server(dist_model):
    """The client's connection and the server of blocks 0:2, which every malformed request goes to."""
    connection = dist_model.remote_layers.connection
    step = connection.plan()[0]
    assert (step.start, step.end) == (0, 2)
    return connection, step.peer_id


@pytest.fixture(scope="module")
def errors_before(first_server) -> int:
    return _info(*first_server)["errors"]


def _info(connection, peer_id) -> dict:
    return json.loads(aio.run(connection.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


async def _send(connection, peer_id, case: Case) -> list:
    if case.method in ("rpc_forward", "rpc_backward", "rpc_push") and case.session is None:
        return [await getattr(connection.stub(peer_id), case.method)(case.messages[0], timeout=30)]
    if case.session is not None:
        return await _push_into_session(connection, peer_id, case)
    replies = await open_stream(connection.p2p, connection.prefix, peer_id, case.method, as_aiter(*case.messages))
    return [reply async for reply in replies]


async def _push_into_session(connection, peer_id, case: Case) -> list:
    """Open an inference session, push the case's message into it while it is open, then end the session."""
    release = asyncio.Event()

    async def requests():
        yield _message(case.session)
        await release.wait()

    replies = await open_stream(connection.p2p, connection.prefix, peer_id, "rpc_inference", requests())
    try:
        await anext(replies)  # the session is open
        return [await connection.stub(peer_id).rpc_push(case.messages[0], timeout=30)]
    finally:
        release.set()
        async for _ in replies:
            pass


def test_the_table_has_thirty_kinds_or_more():
    assert len({case.name for case in CASES}) == len(CASES) >= 30
    assert {case.method for case in CASES} >= {"rpc_forward", "rpc_backward", "rpc_forward_stream", "rpc_inference",
                                                "rpc_push", "rpc_train"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_malformed_request_gets_an_error_naming_what_was_wrong(first_server, errors_before, honest_generation, case):
    connection, peer_id = first_server
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the transport's own error type, parsed below
        aio.run(asyncio.wait_for(_send(connection, peer_id, case), 60))
    error = RemoteError.from_exception(raised.value)
    assert error.code == case.code and case.expected in error.message, error
    assert "internal server error" not in error.message and "Traceback" not in error.message


def test_the_server_stays_up_and_the_concurrent_generation_is_exact(tiny_swarm, first_server, errors_before,
                                                                    honest_generation):
    info = _info(*first_server)
    assert info["errors"] - errors_before == len(CASES)  # every case reached the handler and was refused there
    assert all(server.process.poll() is None for server in tiny_swarm.servers)
    during = len(honest_generation.outputs)
    honest_generation.wait_for_more()  # and one begun after the whole table
    # Every generation, during the table and after it, token for token as the local model's.
    assert during >= 1 and honest_generation.finish() >= during + 2
