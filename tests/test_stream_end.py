"""A served stream's last message reaches a caller that is still writing (swarm.stream_end), open and keyed.

A stream closed under a caller that still writes made the caller's write fail, and asyncio then failed its reads
before the bytes already received: the caller saw a broken pipe instead of the server's error (1-2 of ~640 tests per
full run, always a malformed-request case). Here the caller writes its end of stream late on purpose, and only then
reads, through real p2p daemons on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarm.auth import Keyring, SwarmKey
from swarm.errors import BadRequest
from swarm.keyed_p2p import KeyedP2P, Sealed, keyed

NAME = "late_caller"


async def _session_like(requests, context):
    """Like rpc_inference: a reader task moves the caller's messages into an inbox while the handler works, so the
    request stream is being awaited by that task when the handler fails."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def read():
        async for request in requests:
            inbox.put_nowait(request)
        inbox.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        first = await inbox.get()
        yield runtime_pb2.ExpertResponse(metadata=b"opened " + first.metadata)
        second = await inbox.get()
        if second is not None and second.metadata == b"bad":
            raise BadRequest("step: the second message is bad")
    finally:
        reader.cancel()


async def _one_reply(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=b"done " + request.metadata)
        return


async def _scenario(keyring, handler, messages):
    """What a caller that sends `messages`, then waits 0.3 s, then ends its stream, then reads, gets back."""
    server = keyed(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), keyring)
    client = keyed(await P2P.create(initial_peers=await server.get_visible_maddrs()), keyring)
    await server.add_protobuf_handler(NAME, handler, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    call = client.call(NAME, server.peer_id) if isinstance(client, KeyedP2P) else None
    got = []
    try:
        _, reader, writer = await client.call_binary_stream_handler(server.peer_id, NAME)

        async def send(message):
            await P2P.send_protobuf(call.seal(message) if call else message, writer)

        async def receive():
            reply, error = await P2P.receive_protobuf(Sealed if call else runtime_pb2.ExpertResponse, reader)
            if error is not None:
                return "error: " + error.message
            return (call.open(reply, runtime_pb2.ExpertResponse) if call else reply).metadata.decode()

        await send(runtime_pb2.ExpertRequest(metadata=messages[0]))
        got.append(await receive())
        for message in messages[1:]:
            await send(runtime_pb2.ExpertRequest(metadata=message))
        await asyncio.sleep(0.3)  # the server has answered, or failed, by now
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        try:
            while True:
                got.append(await receive())
        except asyncio.IncompleteReadError:
            got.append("end")
        writer.close()
    finally:
        await client.shutdown()
        await server.shutdown()
    return got


KEYS = {"open": None, "keyed": Keyring([SwarmKey.from_bytes(b"e" * 32)])}


@pytest.mark.parametrize("swarm", list(KEYS))
def test_a_caller_still_writing_reads_the_error_that_ended_its_stream(swarm):
    got = asyncio.run(_scenario(KEYS[swarm], _session_like, [b"a", b"bad"]))
    assert got[0] == "opened a"
    assert len(got) == 3 and "step: the second message is bad" in got[1] and got[2] == "end", got


@pytest.mark.parametrize("swarm", list(KEYS))
def test_a_caller_still_writing_reads_the_last_reply_then_the_end(swarm):
    assert asyncio.run(_scenario(KEYS[swarm], _one_reply, [b"x"])) == ["done x", "end"]


@pytest.mark.parametrize("swarm", list(KEYS))
def test_a_caller_that_disconnects_ends_the_handler(swarm):
    """A caller gone mid-request frees what its handler holds at once (an inference session's cache, say)."""
    released = asyncio.Event()

    async def holding(requests, context):
        try:
            async for request in requests:
                yield runtime_pb2.ExpertResponse(metadata=b"holding " + request.metadata)
                await asyncio.Event().wait()  # works on until cancelled
        finally:
            released.set()

    async def scenario():
        server = keyed(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), KEYS[swarm])
        client = keyed(await P2P.create(initial_peers=await server.get_visible_maddrs()), KEYS[swarm])
        await server.add_protobuf_handler(NAME, holding, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
        try:
            replies = await client.iterate_protobuf_handler(server.peer_id, NAME, runtime_pb2.ExpertRequest(metadata=b"a"),
                                                            runtime_pb2.ExpertResponse)
            assert (await anext(replies)).metadata == b"holding a"
            await replies.aclose()  # the caller's stream closes without its end-of-stream marker
            await asyncio.wait_for(released.wait(), 10)
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())
