"""Requests are charged to a server's in-flight budget as they arrive (swarm.ingress), before their payload is parsed:
unary requests for as long as their handler runs, stream messages until their handler asks for the next one (or the
request ends), a stream message longer than the limit refused before its body is read."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from server.compute_queue import FairCompute
from swarm.errors import LimitReached
from swarm.ingress import STREAM_COPIES, UNARY_COPIES, Ingress, Ticket
from swarm.keyed_p2p import keyed

MiB = 2**20


def _context(peer: str):
    return SimpleNamespace(remote_id=peer, local_id="server", handle_name="rpc_forward")


def test_a_unary_request_holds_its_charge_while_its_handler_runs_and_gives_it_back():
    compute = FairCompute(MiB)
    ingress = Ingress(compute, max_message_bytes=MiB)
    request = runtime_pb2.ExpertRequest(metadata=b"x" * 10_000)
    seen = []

    async def handler(message, context):
        seen.append((compute.inflight.held("a"), context.ticket.nbytes))
        return runtime_pb2.ExpertResponse()

    asyncio.run(ingress.unary(handler, size=lambda m: m.ByteSize())(request, _context("a")))
    assert seen == [(UNARY_COPIES * request.ByteSize(),) * 2]
    assert compute.inflight.used == 0


def test_a_peer_over_its_share_is_refused_before_its_request_is_looked_at_and_a_smaller_holder_takes_its_place():
    compute = FairCompute(MiB)
    ingress = Ingress(compute, max_message_bytes=MiB)
    queued = Ticket("a", 900 * 1024)  # a's request waiting for compute
    compute.admit(queued)
    compute.admit(Ticket("b", 10 * 1024))
    request = runtime_pb2.ExpertRequest(metadata=b"x" * 40_000)  # 5 x 40 kB: more than is free
    called = []

    async def handler(message, context):
        called.append(str(context.remote_id))
        return runtime_pb2.ExpertResponse()

    admitted = ingress.unary(handler, size=lambda m: m.ByteSize())
    with pytest.raises(LimitReached, match="over its fair share"):
        asyncio.run(admitted(request, _context("a")))
    assert called == [] and queued.ended is None
    asyncio.run(admitted(request, _context("b")))  # b holds less: a's queued request gives way
    assert called == ["b"] and "ended to make room for another peer" in queued.ended
    with pytest.raises(LimitReached, match="ended to make room"):
        queued.check()  # what the compute queue does with it: the request is dropped with that reason


async def _stream_pair(keep: bool, limit: int):
    """A server P2P serving an echo of its in-flight use per message through an ingress, and a client P2P."""
    compute = FairCompute(64 * MiB)
    ingress = Ingress(compute, max_message_bytes=limit, keeps_messages=("rpc_echo",) if keep else ())
    server = keyed(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), None, ingress)
    handled = []

    async def echo(requests, context):
        async for message in requests:
            handled.append(len(message.metadata))
            yield runtime_pb2.ExpertResponse(metadata=str(compute.inflight.used).encode())

    await server.add_protobuf_handler("rpc_echo", echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())
    return server, client, compute, handled


@pytest.mark.parametrize("keep", [False, True], ids=["released at the next read", "kept until the request ends"])
def test_stream_messages_are_charged_as_they_arrive(keep):
    async def run():
        server, client, compute, _ = await _stream_pair(keep, MiB)
        try:
            messages = [runtime_pb2.ExpertRequest(metadata=b"x" * n) for n in (1000, 3000)]
            answered = asyncio.Queue()
            replies = await client.iterate_protobuf_handler(server.peer_id, "rpc_echo", _each_after_a_reply(messages, answered),
                                                            runtime_pb2.ExpertResponse)
            used = []
            async for reply in replies:
                used.append(int(reply.metadata))
                answered.put_nowait(None)
            await asyncio.sleep(0.1)
            return used, [STREAM_COPIES * m.ByteSize() for m in messages], compute.inflight.used
        finally:
            await client.shutdown()
            await server.shutdown()

    used, charges, after = asyncio.run(run())
    assert used == ([charges[0], charges[0] + charges[1]] if keep else charges)
    assert after == 0


def test_a_stream_message_longer_than_the_limit_is_refused_before_its_body_is_read():
    async def run():
        server, client, compute, handled = await _stream_pair(False, 64 * 1024)
        try:
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, "rpc_echo")
            writer.write(P2P.MESSAGE_MARKER + (2**40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))  # 1 TiB, never sent
            await writer.drain()
            reply, error = await asyncio.wait_for(P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader), 30)
            writer.close()
            return reply, error, handled, compute.inflight.used
        finally:
            await client.shutdown()
            await server.shutdown()

    reply, error, handled, used = asyncio.run(run())
    assert reply is None and handled == [] and used == 0
    assert error.message.startswith(f"[bad_request] a stream message of {2**40} bytes exceeds this server's limit of "
                                    f"{64 * 1024} bytes")


async def _each_after_a_reply(messages, answered: asyncio.Queue):
    """The messages, each after the reply to the one before (so none is read ahead of the handler)."""
    for i, message in enumerate(messages):
        if i:
            await answered.get()
        yield message
