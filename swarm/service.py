"""The RPC interface of a server, declared once for both sides."""

from __future__ import annotations

# hivemind recognises streaming RPCs by typing.AsyncIterator hints (not collections.abc's), keep this import.
from typing import AsyncIterator  # noqa: UP035

from hivemind.p2p import ServicerBase
from hivemind.proto import runtime_pb2


class BlockService(ServicerBase):
    """The RPC interface of a server. Clients call it through `BlockService.get_stub(p2p, peer, namespace=...)`;
    servers register their implementation with `BlockService().add_p2p_handlers(p2p, wrapper=impl, ...)`,
    so both sides derive the same handler names from this one class."""

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    # A step for an open inference session, pushed by the previous server of its route (swarm.forwarding.PushStep),
    # alone or as one message of a stream that carries a session's pushes (each answered when accepted).
    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_push_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError

    # A forward (a SpanRequest message, answered with the output) and its backward (a TrainGrad message, answered
    # like rpc_backward) in one request: the server keeps the activations in between instead of recomputing them.
    async def rpc_train(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # noqa: E501
        raise NotImplementedError
