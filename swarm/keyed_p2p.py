"""A private swarm's RPCs: every message between peers travels sealed with the swarm key.

`KeyedP2P` wraps a hivemind P2P so that every protobuf RPC made or served through it (the block service, the DHT's
own ping/store/find, and anything added later) carries a `Sealed` envelope: the message's bytes, and a token
(swarm.auth) bound to the handler's name, both peers' ids as libp2p authenticated them, a timestamp, a nonce and
those bytes (the MAC covers them in one pass, no separate digest). A receiver opens an envelope only if its token is
valid, so a peer without the key gets nothing but a refusal and its bytes are never even parsed. Replies are sealed with the request's nonce and their
place in the stream. The DHT runs in its own process: `KeyedDHT` makes its P2P keyed there.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import hivemind
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hivemind.utils.asyncio import as_aiter

from swarm.auth import Keyring, Refused
from swarm.errors import BadRequest
from swarm.ingress import Ingress
from swarm.stream_end import add_stream_handler

logger = logging.getLogger(__name__)


def _sealed_type():
    """message Sealed {double time; bytes nonce; uint64 seq; bytes mac; bytes payload}, built without protoc."""
    proto = descriptor_pb2.FileDescriptorProto(name="swarm_sealed.proto", package="swarm", syntax="proto3")
    message = proto.message_type.add(name="Sealed")
    kinds = descriptor_pb2.FieldDescriptorProto
    for number, (name, kind) in enumerate([("time", kinds.TYPE_DOUBLE), ("nonce", kinds.TYPE_BYTES),
                                           ("seq", kinds.TYPE_UINT64), ("mac", kinds.TYPE_BYTES),
                                           ("payload", kinds.TYPE_BYTES)], start=1):
        message.field.add(name=name, number=number, type=kind, label=kinds.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("swarm.Sealed"))


Sealed = _sealed_type()


class ServingP2P:
    """A hivemind P2P whose stream handlers are served by swarm.stream_end (their last message reaches a caller that
    is still writing), as an open swarm's peers use it; with an `ingress` (a server's), every request it serves is
    charged on arrival (swarm.ingress). Everything else is the wrapped P2P's."""

    def __init__(self, inner: hivemind.P2P, ingress: Ingress | None = None):
        self._inner, self.ingress = inner, ingress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def add_protobuf_handler(self, name: str, handler, input_protobuf_type, *, stream_input: bool = False,
                                   stream_output: bool = False, balanced: bool = False) -> None:
        if stream_input and stream_output:
            await add_stream_handler(self._inner, name, handler, input_protobuf_type, balanced=balanced,
                                     ingress=self.ingress)
            return
        if not stream_input and not stream_output and self.ingress is not None:
            handler = self.ingress.unary(handler, size=lambda request: request.ByteSize())
        await self._inner.add_protobuf_handler(name, handler, input_protobuf_type, stream_input=stream_input,
                                               stream_output=stream_output, balanced=balanced)


class KeyedP2P(ServingP2P):
    """A hivemind P2P whose protobuf RPCs are sealed with the swarm key; everything else is the wrapped P2P's."""

    def __init__(self, inner: hivemind.P2P, keyring: Keyring, ingress: Ingress | None = None):
        super().__init__(inner, ingress)
        self.keyring = keyring

    # -- calling ---------------------------------------------------------------------------------------------------

    def call(self, name: str, peer_id) -> SealedCall:
        """The sealing of one call to `name` at `peer_id`: its requests in order, then its replies in order."""
        return SealedCall(self, name, peer_id)

    async def call_protobuf_handler(self, peer_id, name: str, input, output_protobuf_type):
        if isinstance(input, AsyncIterable):
            responses = await self.iterate_protobuf_handler(peer_id, name, input, output_protobuf_type)
            replies = [reply async for reply in responses]
            if len(replies) != 1:
                raise ValueError(f"{name} answered {len(replies)} messages where one was expected")
            return replies[0]
        call = self.call(name, peer_id)
        raw = await self._inner.call_protobuf_handler(peer_id, name, call.seal(input), Sealed)
        return call.open(raw, output_protobuf_type)

    async def iterate_protobuf_handler(self, peer_id, name: str, input, output_protobuf_type) -> AsyncIterator:
        call = self.call(name, peer_id)
        messages = input if isinstance(input, AsyncIterable) else as_aiter(input)

        async def requests():
            async for message in messages:
                yield call.seal(message)

        raw = await self._inner.iterate_protobuf_handler(peer_id, name, requests(), Sealed)

        async def replies():
            async for sealed in raw:
                yield call.open(sealed, output_protobuf_type)

        return replies()

    # -- serving ---------------------------------------------------------------------------------------------------

    def _open(self, name: str, context, sealed, input_type) -> tuple[Any, bytes]:
        try:
            self.keyring.check(name, context.remote_id.to_bytes(), context.local_id.to_bytes(), sealed.payload,
                               sealed.time, sealed.nonce, sealed.mac)
        except Refused:
            logger.debug("refused %s from %s", name, context.remote_id)
            raise
        return _parse(input_type, sealed.payload, name), sealed.nonce

    def _open_later(self, name: str, context, nonce: bytes, seq: int, sealed, input_type):
        self.keyring.check_seal(b"stream", name, context.remote_id.to_bytes(), context.local_id.to_bytes(), nonce,
                                seq, sealed.payload, sealed.mac)
        if sealed.seq != seq:
            raise Refused("refused: a stream message out of order")
        return _parse(input_type, sealed.payload, name)

    def _seal_reply(self, name: str, context, nonce: bytes, seq: int, message):
        payload = message.SerializeToString()
        mac = self.keyring.seal(b"reply", name, context.local_id.to_bytes(), context.remote_id.to_bytes(), nonce, seq,
                                payload)
        return Sealed(seq=seq, mac=mac, payload=payload)

    async def add_protobuf_handler(self, name: str, handler, input_protobuf_type, *, stream_input: bool = False,
                                   stream_output: bool = False, balanced: bool = False) -> None:
        if not stream_input and not stream_output:
            async def unary(sealed, context):
                request, nonce = self._open(name, context, sealed, input_protobuf_type)
                return self._seal_reply(name, context, nonce, 0, await handler(request, context))

            if self.ingress is not None:  # charged before the payload is even checked, let alone parsed
                unary = self.ingress.unary(unary, size=lambda sealed: sealed.ByteSize())
            await self._inner.add_protobuf_handler(name, unary, Sealed, balanced=balanced)
            return

        async def serve(iterator, context):
            try:
                first, nonce = self._open(name, context, await iterator.__anext__(), input_protobuf_type)
            except StopAsyncIteration:
                return

            async def requests():
                yield first
                seq = 1
                async for sealed in iterator:
                    yield self._open_later(name, context, nonce, seq, sealed, input_protobuf_type)
                    seq += 1

            output = handler(requests() if stream_input else first, context)
            if not stream_output:
                yield self._seal_reply(name, context, nonce, 0, await output)
                return
            seq = 0
            async for reply in output:
                yield self._seal_reply(name, context, nonce, seq, reply)
                seq += 1

        await add_stream_handler(self._inner, name, serve, Sealed, balanced=balanced, ingress=self.ingress)


class SealedCall:
    """One call's envelopes on the caller's side: the first request carries a token, later ones a seal bound to it
    and to their place in the stream; replies must carry seals bound to the same nonce, in order."""

    def __init__(self, p2p: KeyedP2P, name: str, peer_id):
        self.keyring, self.name = p2p.keyring, name
        self.caller, self.callee = p2p.peer_id.to_bytes(), peer_id.to_bytes()
        self.nonce: bytes | None = None
        self.sent = self.received = 0

    def seal(self, message):
        payload = message.SerializeToString()
        if self.nonce is None:
            stamp, self.nonce, mac = self.keyring.mint(self.name, self.caller, self.callee, payload)
            sealed = Sealed(time=stamp, nonce=self.nonce, mac=mac, payload=payload)
        else:
            mac = self.keyring.seal(b"stream", self.name, self.caller, self.callee, self.nonce, self.sent, payload)
            sealed = Sealed(seq=self.sent, mac=mac, payload=payload)
        self.sent += 1
        return sealed

    def open(self, sealed, output_type):
        if self.nonce is None:
            raise Refused(f"refused: a reply to {self.name} before it was asked")
        self.keyring.check_seal(b"reply", self.name, self.callee, self.caller, self.nonce, self.received,
                                sealed.payload, sealed.mac)
        if sealed.seq != self.received:
            raise Refused("refused: a reply out of order")
        self.received += 1
        return _parse(output_type, sealed.payload, self.name)


def _parse(message_type, payload: bytes, name: str):
    """A sealed message's payload as `message_type`. Its seal proves only who sent it: bytes that a key holder sealed
    but that do not parse are a bad request (or reply), not a crash of the handler."""
    try:
        return message_type.FromString(payload)
    except DecodeError as exc:
        raise BadRequest(f"{name}: the message is not a valid {message_type.DESCRIPTOR.name} ({exc})") from None


def keyed(p2p, keyring: Keyring | None, ingress: Ingress | None = None) -> ServingP2P:
    """`p2p` with its RPCs sealed by `keyring`; for an open swarm (no keyring) with only its streams' ends mended.
    `ingress`: a server's admission of what it is sent (swarm.ingress)."""
    if isinstance(p2p, KeyedP2P) or (keyring is None and isinstance(p2p, ServingP2P)):
        return p2p
    return ServingP2P(p2p, ingress) if keyring is None else KeyedP2P(p2p, keyring, ingress)


class KeyedDHT(hivemind.DHT):
    """A hivemind DHT whose peer (in the DHT's own process) speaks only sealed RPCs and, with a key, stores and
    accepts only records signed by their owners (swarm.record_auth). Without a key: an open swarm, as hivemind's."""

    def __init__(self, *args, keyring: Keyring | None = None, **kwargs):
        self.keyring = keyring
        if keyring is not None:
            from swarm.record_auth import IdentityKey, SwarmRecordValidator

            if not kwargs.get("identity_path") and not kwargs.get("client_mode"):
                # Records are signed with the peer's libp2p identity key: give hivemind a file to generate it in (a
                # missing file is generated without the slow check that an existing identity is not taken). A
                # client stores nothing, so it needs none.
                kwargs["identity_path"] = os.path.join(tempfile.mkdtemp(prefix="swarm-identity-"), "identity.key")
            owner = IdentityKey(kwargs["identity_path"]) if kwargs.get("identity_path") else None
            kwargs["record_validators"] = [*kwargs.get("record_validators", ()), SwarmRecordValidator(keyring, owner)]
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        # This runs in the DHT's own (forked) process, which hosts one DHT node: make the P2P that hivemind creates
        # for it keyed before it does so.
        import hivemind.dht.node as node
        import hivemind.dht.protocol as protocol

        from swarm.record_auth import CappedStorage

        protocol.DHTLocalStorage = CappedStorage
        if self.keyring is not None:
            node.P2P = _keyed_factory(node.P2P, self.keyring)
        super().run()


def _keyed_factory(p2p_class, keyring: Keyring):
    class _KeyedCreate:
        @staticmethod
        async def create(*args, **kwargs):
            return KeyedP2P(await p2p_class.create(*args, **kwargs), keyring)

    return _KeyedCreate
