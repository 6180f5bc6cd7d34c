"""Wire protocol: tensors round-trip exactly, and anything malformed is rejected with a clear error."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.errors import BadRequest, RemoteError
from swarm.protocol import InferenceOpen, SpanRequest
from swarm.service import BlockService
from swarm.streaming import join_message, split_message
from swarm.tensors import pack_tensor, unpack_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_tensor_round_trip_is_exact(dtype):
    tensor = (torch.randn(3, 5, 7) * 100).to(dtype)
    restored = unpack_tensor(pack_tensor(tensor))
    assert restored.dtype == dtype and restored.shape == tensor.shape
    assert torch.equal(restored, tensor)


def test_empty_and_noncontiguous_tensors():
    assert unpack_tensor(pack_tensor(torch.empty(0, 4))).shape == (0, 4)
    tensor = torch.randn(4, 6).t()
    assert torch.equal(unpack_tensor(pack_tensor(tensor)), tensor)


@pytest.mark.parametrize(
    "proto, message",
    [
        (runtime_pb2.Tensor(buffer=b"\0" * 12, size=[4], dtype="float32"), "buffer has 12 bytes"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="object"), "dtype 'object' is not one of"),
        (runtime_pb2.Tensor(buffer=b"", size=[1] * 9, dtype="float32"), "invalid shape"),
        (runtime_pb2.Tensor(buffer=b"", size=[1 << 20, 1 << 20], dtype="float32"), "exceed the limit"),
        (runtime_pb2.Tensor(buffer=b"\0" * 4, size=[1], dtype="float32", compression=runtime_pb2.CompressionType.FLOAT16),
         "unsupported compression"),
    ],
)
def test_malformed_tensors_are_rejected(proto, message):
    with pytest.raises(BadRequest, match=message):
        unpack_tensor(proto)


def test_metadata_is_validated_and_tolerant():
    assert SpanRequest.decode(b'{"start": 1, "end": 3, "from_the_future": [1, 2]}') == SpanRequest(start=1, end=3)
    with pytest.raises(BadRequest, match="malformed SpanRequest"):
        SpanRequest.decode(b'{"start": -1, "end": 3}')
    with pytest.raises(BadRequest, match="malformed InferenceOpen"):
        InferenceOpen.decode(b'{"start": 0, "end": 3, "max_length": "lots", "batch_size": 1}')
    with pytest.raises(BadRequest, match="64 KiB"):
        SpanRequest.decode(b" " * 70000)


def test_split_and_join_streamed_messages():
    tensors = [torch.randn(700, 1000), torch.arange(5)]
    messages = split_message(SpanRequest(start=0, end=1), [pack_tensor(t) for t in tensors])
    assert len(messages) > 3  # 2.8 MB cut into 1 MiB chunks
    restored = [unpack_tensor(p) for p in join_message(messages[0], messages[1:])]
    assert all(torch.equal(a, b) for a, b in zip(restored, tensors, strict=True))
    with pytest.raises(BadRequest, match="exceeds the limit"):
        join_message(messages[0], messages[1:], max_bytes=1000)
    bad = runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"x", size=[7])])
    with pytest.raises(BadRequest, match="unknown tensor"):
        join_message(messages[0], [bad])


def test_remote_errors_parse_from_both_transports():
    stream_error = RuntimeError("Failed to call handler `x` at Qm: [cache_full] KV cache is full: 3 of 9 tokens free")
    unary_error = RuntimeError("BlocksNotServed('[blocks_not_served] this server hosts blocks 0:2')")
    assert RemoteError.from_exception(stream_error).code == "cache_full"
    parsed = RemoteError.from_exception(unary_error, "peer")
    assert (parsed.code, parsed.message) == ("blocks_not_served", "this server hosts blocks 0:2")
    assert "server peer" in str(parsed)
    assert RemoteError.from_exception(TimeoutError()).code == "transport"


def test_streaming_rpcs_are_declared_as_streams():
    """hivemind only streams methods hinted with typing.AsyncIterator; a lint 'fix' once broke this silently."""
    BlockService._collect_rpc_handlers()
    kinds = {h.method_name: (h.stream_input, h.stream_output) for h in BlockService._rpc_handlers}
    assert kinds["rpc_inference"] == kinds["rpc_forward_stream"] == kinds["rpc_backward_stream"] == (True, True)
    assert kinds["rpc_push_stream"] == (True, True)
    assert kinds["rpc_forward"] == kinds["rpc_backward"] == kinds["rpc_push"] == (False, False)
