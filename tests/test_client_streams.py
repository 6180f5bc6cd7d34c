"""A client's reply stream ends as soon as the server's connection is gone, so a server killed mid-session is noticed
at once rather than at the request timeout (found by tests/test_churn.py)."""

from __future__ import annotations

import asyncio
import signal
import time

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from client import aio
from client.streams import open_stream
from swarm.launch import LOCALHOST
from swarm.service import BlockService


async def _echo(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)


def test_a_reply_stream_ends_when_the_server_dies_while_the_client_waits():
    async def scenario() -> float:
        server = await P2P.create(host_maddrs=[LOCALHOST])
        client = await P2P.create(initial_peers=await server.get_visible_maddrs())
        await server.add_protobuf_handler(BlockService._get_handle_name("m", "rpc_inference"), _echo,
                                          runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():  # as SpanStream's: the next request comes only after the previous reply
            while (message := await queue.get()) is not None:
                yield message

        try:
            replies = await open_stream(client, "m", server.peer_id, "rpc_inference", requests())
            queue.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step 1"))
            assert (await asyncio.wait_for(anext(replies), 10)).metadata == b"step 1"
            queue.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step 2"))
            assert (await asyncio.wait_for(anext(replies), 10)).metadata == b"step 2"
            server._child.send_signal(signal.SIGKILL)  # its libp2p daemon dies, as with the machine
            began = time.monotonic()
            # hivemind's own stream call waits here until the request stream ends, which it never does
            assert await asyncio.wait_for(anext(replies, None), 20) is None
            return time.monotonic() - began
        finally:
            queue.put_nowait(None)
            await client.shutdown()
            await server.shutdown()

    assert aio.run(scenario()) < 5
