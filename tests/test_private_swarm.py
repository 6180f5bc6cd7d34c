"""A private swarm against outsiders and against members who attack it, on the suite's shared (keyed) swarm.

Outsiders (no key, or another key) cannot join the DHT, store a record or get an answer from a server; captured,
redirected, tampered and forged messages are refused; one member cannot overwrite, delete or extend another's
records. All of it while an honest client generates, token for token as the local model does.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import subprocess
import sys
import time
from functools import partial

import pytest
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from client import aio
from client.routing import plan_route
from swarm.auth import Keyring, SwarmKey, generate_key_file, read_key_file
from swarm.dht_records import block_key, fetch_servers
from swarm.join import SwarmRefused, SwarmUnreachable, join_swarm
from swarm.keyed_p2p import KeyedDHT, KeyedP2P, Sealed, keyed
from swarm.record_auth import MAX_SUBKEYS, MAX_VALUE_BYTES, SwarmRecordValidator, peer_id_of
from swarm.service import BlockService
from tests.conftest import SWARM_KEY_FILE

PREFIX, BLOCKS = "tiny-llama", 6


@pytest.fixture(scope="module")
def other_key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("other-key") / "other.key"
    generate_key_file(path)
    return str(path)


def server_peers(dist_model) -> list:
    return [s.peer_id for s in fetch_servers(dist_model.remote_layers.connection.dht, PREFIX, BLOCKS)]


def all_addresses(tiny_swarm) -> list[str]:
    return [*tiny_swarm.initial_peers, *(m for server in tiny_swarm.servers for m in server.maddrs)]


def test_the_suite_runs_keyed(dist_model):
    assert dist_model.remote_layers.connection.dht.keyring.key_id == read_key_file(SWARM_KEY_FILE).key_id
    assert isinstance(dist_model.remote_layers.connection.p2p, KeyedP2P)


def test_outsiders_cannot_join(tiny_swarm, other_key_file, monkeypatch):
    with pytest.raises(SwarmRefused, match="refused the key"):
        join_swarm(tiny_swarm.initial_peers, client_mode=True, swarm_key=other_key_file, timeout=20)
    monkeypatch.delenv("SWARM_KEY_FILE")
    with pytest.raises(SwarmUnreachable, match="no initial peer answered.*--swarm-key-file"):
        join_swarm(tiny_swarm.initial_peers, client_mode=True, timeout=20)


@pytest.mark.parametrize("outsider", ["no key", "another key"])
def test_outsiders_store_nothing_and_get_no_answer(tiny_swarm, dist_model, honest_generation, other_key_file, outsider):
    peers = server_peers(dist_model)
    assert len(peers) == 3
    keyring = None if outsider == "no key" else Keyring.load(other_key_file)
    dht = KeyedDHT(initial_peers=all_addresses(tiny_swarm), start=True, keyring=keyring,
                   ensure_bootstrap_success=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        key, outsider_id = block_key(PREFIX, 0), dht.peer_id.to_base58()
        # hivemind calls a store "done" when no peer answers (and caches the value locally): the swarm is the judge
        dht.store(key, {"start": 0, "end": 6}, get_dht_time() + 30, subkey=outsider_id)
        honest = dist_model.remote_layers.connection.dht.get(key, latest=True).value
        assert outsider_id not in honest and len(honest) == 1
        assert {str(p) for p in server_peers(dist_model)} == {str(p) for p in peers}

        p2p = keyed(aio.run(dht.replicate_p2p()), keyring)
        for peer in peers:
            stub = BlockService.get_stub(p2p, peer, namespace=PREFIX)
            for method, request in [("rpc_info", runtime_pb2.ExpertUID()), ("rpc_forward", runtime_pb2.ExpertRequest()),
                                    ("rpc_backward", runtime_pb2.ExpertRequest())]:
                with pytest.raises(Exception, match="refused"):
                    aio.run(getattr(stub, method)(request, timeout=10))
            with pytest.raises(Exception, match="refused"):
                aio.run(_all_replies(stub.rpc_inference(_once(runtime_pb2.ExpertRequest()))))
    finally:
        dht.shutdown()


async def _once(message):
    yield message


async def _all_replies(call) -> list:
    return [reply async for reply in await call]


def test_status_with_another_key_says_the_swarm_refused_it(tiny_swarm, other_key_file):
    begin = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--initial-peers", *tiny_swarm.initial_peers,
                             "--swarm-key-file", other_key_file], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and time.monotonic() - begin < 30
    assert "refused the key" in result.stderr and "Traceback" not in result.stderr
    assert PREFIX not in result.stdout  # no server listed


# ------------------------------------------------------------------------------------------------ captured messages

def test_captured_requests_cannot_be_replayed_redirected_or_altered(dist_model, honest_generation):
    connection = dist_model.remote_layers.connection
    p2p, (first, second, _) = connection.p2p, server_peers(dist_model)
    name = BlockService._get_handle_name(PREFIX, "rpc_info")

    def send(peer, sealed):
        return aio.run(p2p._inner.call_protobuf_handler(peer, name, sealed, Sealed))

    call = p2p.call(name, first)
    captured = call.seal(runtime_pb2.ExpertUID())
    assert call.open(send(first, captured), runtime_pb2.ExpertInfo).serialized_info  # the genuine request
    with pytest.raises(Exception, match="already received"):
        send(first, captured)  # replayed within the window
    with pytest.raises(Exception, match="does not match"):
        send(second, p2p.call(name, first).seal(runtime_pb2.ExpertUID()))  # made for one server, sent to another
    tampered = p2p.call(name, first).seal(runtime_pb2.ExpertUID())
    tampered.payload = runtime_pb2.ExpertUID(uid="x").SerializeToString()
    with pytest.raises(Exception, match="does not match"):
        send(first, tampered)

    late = KeyedP2P(p2p._inner, Keyring(p2p.keyring.keys, clock=lambda: time.time() - 120))
    with pytest.raises(Exception, match="off this peer's clock"):  # a capture replayed after the window
        send(first, late.call(name, first).seal(runtime_pb2.ExpertUID()))


def test_a_token_sent_from_another_peer_is_refused(tiny_swarm, dist_model, honest_generation):
    """A member's valid token, replayed by another peer that holds the key too (the peer id in it is not theirs)."""
    connection = dist_model.remote_layers.connection
    first = server_peers(dist_model)[0]
    name = BlockService._get_handle_name(PREFIX, "rpc_info")
    captured = connection.p2p.call(name, first).seal(runtime_pb2.ExpertUID())
    thief = join_swarm(all_addresses(tiny_swarm), client_mode=True)
    try:
        raw = aio.run(thief.replicate_p2p())
        with pytest.raises(Exception, match="does not match"):
            aio.run(raw.call_protobuf_handler(first, name, captured, Sealed))
    finally:
        thief.shutdown()


@pytest.mark.parametrize("forgery", ["without the key", "an earlier reply"])
def test_a_forged_reply_is_refused(forgery):
    """A peer that answers without the key, or with a genuine reply to an earlier request, is not believed."""
    keyring = Keyring([SwarmKey.from_bytes(b"k" * 32)])

    async def scenario():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = KeyedP2P(await P2P.create(initial_peers=await server.get_visible_maddrs()), keyring)
        served, earlier = KeyedP2P(server, keyring), []

        async def forger(sealed, context):
            if forgery == "without the key":
                return Sealed(seq=0, mac=b"\0" * 32, payload=runtime_pb2.ExpertInfo(serialized_info=b"lies").SerializeToString())
            _, nonce = served._open("forged", context, sealed, runtime_pb2.ExpertUID)
            if not earlier:  # the first reply is genuine; every later request gets that same reply
                earlier.append(served._seal_reply("forged", context, nonce, 0, runtime_pb2.ExpertInfo(serialized_info=b"1")))
            return earlier[0]

        await server.add_protobuf_handler("forged", forger, Sealed)
        try:
            call = client.call_protobuf_handler(server.peer_id, "forged", runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo)
            if forgery == "an earlier reply":
                assert (await call).serialized_info == b"1"
                call = client.call_protobuf_handler(server.peer_id, "forged", runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo)
            await call
        finally:
            await client.shutdown()
            await server.shutdown()

    with pytest.raises(Exception, match="seal"):
        aio.run(scenario())


# ------------------------------------------------------------------------------------------------------ records

def test_a_member_cannot_overwrite_delete_or_extend_another_servers_record(tiny_swarm, dist_model, honest_generation):
    before = {(str(s.peer_id), s.record.start, s.record.end) for s in
              fetch_servers(dist_model.remote_layers.connection.dht, PREFIX, BLOCKS)}
    victim = next(peer for peer, start, _ in before if start == 0)  # an entry under block 0
    mallory = join_swarm(all_addresses(tiny_swarm), host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # holds the key
    try:
        key, later = block_key(PREFIX, 0), get_dht_time() + 60
        assert not mallory.store(key, {"start": 0, "end": 6, "state": "online"}, later, subkey=victim)  # overwrite
        assert not mallory.store(key, b"gone", later)  # a plain value would replace every server's entry
        huge = mallory.run_coroutine(partial(_store_signed, key=key, size=100_000))  # (too big for hivemind's pipe)
        assert huge and not any(any(stored or []) for stored in huge), huge
        assert any(any(stored or []) for stored in mallory.run_coroutine(partial(_store_signed, key=key, size=100)))
        assert not mallory.store(key, {"x": 1}, get_dht_time() + 7200, subkey=mallory.peer_id.to_base58())
        assert mallory.store(block_key("mallory-model", 0), {"x": 1}, later, subkey=mallory.peer_id.to_base58())

        results = mallory.run_coroutine(partial(_replay_with_a_later_expiry, key=key, victim=victim))
        assert results and all(not any(stored or []) for stored in results), results
    finally:
        mallory.shutdown()
    after = {(str(s.peer_id), s.record.start, s.record.end) for s in
             fetch_servers(dist_model.remote_layers.connection.dht, PREFIX, BLOCKS)}
    assert after == before


async def _replay_with_a_later_expiry(dht, node, key: str, victim: str) -> list:
    """Take the victim's genuine signed entry as stored, and store it again with a later expiry."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    results = []
    for peer in [p for p in await node.protocol.p2p.list_peers()][:4]:
        found = await node.protocol.call_find(peer.peer_id, [key_id])
        entry = (found or {}).get(key_id, (None, None))[0]
        if entry is None or not hasattr(entry.value, "get"):
            continue
        item = entry.value.get(victim)
        if item is None:
            continue
        stored = await node.protocol.call_store(peer.peer_id, [key_id], [item.value],
                                                [item.expiration_time + 600], subkeys=[victim])
        results.append(list(stored or []))  # (a protobuf repeated field does not pickle back to the caller)
    return results


async def _store_signed(dht, node, key: str, size: int) -> list:
    """Store an entry of `size` bytes under `key`, owned and signed by this peer, at the peers it knows."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    key_id, expiration = DHTID.generate(source=key), get_dht_time() + 60
    owner = node.peer_id.to_base58()
    record = DHTRecord(key_id.to_bytes(), MSGPackSerializer.dumps(owner), MSGPackSerializer.dumps(b"x" * size), expiration)
    signed = node.protocol.record_validator.sign_value(record)
    return [list(await node.protocol.call_store(peer.peer_id, [key_id], [signed], [expiration], subkeys=[owner]) or [])
            for peer in (await node.protocol.p2p.list_peers())[:4]]


# ------------------------------------------------------------------------------------------------------ floods

def test_a_member_flooding_keys_with_entries_or_huge_values_is_capped(tiny_swarm, dist_model, honest_generation):
    """A key holder makes up peer identities (they cost nothing) and stores more entries than a key may hold under
    the key that block 0's server announces on and under a fresh key, then values far over the size cap: every DHT
    peer keeps at most MAX_SUBKEYS entries per key and none of the huge values, the servers' records stay readable
    and routes still go through them, while an honest client generates."""
    connection = dist_model.remote_layers.connection
    before = {(str(s.peer_id), s.record.start, s.record.end) for s in fetch_servers(connection.dht, PREFIX, BLOCKS)}
    owners = sorted({peer for peer, _, _ in before})
    mallory = join_swarm(all_addresses(tiny_swarm), host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # holds the key
    try:
        mallory.run_coroutine(_patient)
        tag = secrets.token_hex(4)
        # The made-up entries expire soon after this test: while block 0's key is full, no new server could announce
        # on it (the servers announced there already renew their own entries).
        expiration = get_dht_time() + 45
        for key in (block_key(PREFIX, 0), f"flood-{tag}"):
            peers = mallory.run_coroutine(partial(_nearest, key=key))
            held_before = mallory.run_coroutine(partial(_entries_held, key=key, peers=peers, owners=owners))
            stored = mallory.run_coroutine(partial(_flood, key=key, peers=peers, count=MAX_SUBKEYS + 16,
                                                   expiration=expiration))
            answered = sorted(peer for peer, accepted in stored.items() if accepted is not None)
            assert len(answered) >= 3, (key, stored)
            held = mallory.run_coroutine(partial(_entries_held, key=key, peers=answered, owners=owners))
            for peer in answered:
                count, kept = held[peer]
                assert count == MAX_SUBKEYS, (key, peer, held[peer])  # full, and not one entry more
                assert sum(stored[peer]) <= MAX_SUBKEYS - held_before[peer][0], (key, peer, held_before[peer])
                assert set(held_before[peer][1]) <= set(kept), (key, peer)  # the servers' own entries stay

        huge = f"flood-{tag}-huge"
        peers = mallory.run_coroutine(partial(_nearest, key=huge))
        for size in (2 * MAX_VALUE_BYTES, 1 << 20):
            results = mallory.run_coroutine(partial(_store_own, key=huge, peers=peers, size=size, expiration=expiration))
            assert not any(any(accepted or []) for accepted in results.values()), (size, results)
        assert all(count == 0 for count, _ in mallory.run_coroutine(
            partial(_entries_held, key=huge, peers=peers, owners=owners)).values())
        # The same store of a small value is kept (and read back): the read-back above counts what peers hold.
        results = mallory.run_coroutine(partial(_store_own, key=huge, peers=peers, size=100, expiration=expiration))
        assert any(all(accepted or [False]) for accepted in results.values()), results
        assert any(count == 1 for count, _ in mallory.run_coroutine(
            partial(_entries_held, key=huge, peers=peers, owners=owners)).values())
    finally:
        mallory.shutdown()
    found = fetch_servers(connection.dht, PREFIX, BLOCKS)  # what the honest client reads now
    assert {(str(s.peer_id), s.record.start, s.record.end) for s in found} == before
    route = plan_route(found, 0, BLOCKS)
    assert [route[0].start, *(step.end for step in route)] == [0, *(step.start for step in route[1:]), BLOCKS]
    assert {str(step.peer_id) for step in route} <= set(owners)
    honest_generation.wait_for_more(2)  # generations that ran through the flood's aftermath, checked at the end


class _MadeUpIdentity:
    """A peer identity as a flood makes them: an RSA key whose peer id no peer runs (swarm.record_auth.IdentityKey's
    interface). Identities cost nothing: one modulus with another public exponent is another valid key, so a
    thousand take milliseconds, as they would an attacker."""

    def __init__(self, private):
        from cryptography.hazmat.primitives import serialization

        self.private = private
        self.public_der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.peer_id = PeerID(peer_id_of(self.public_der)).to_base58()

    def sign(self, data: bytes) -> tuple[bytes, bytes]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        return self.public_der, self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _made_up_identities(count: int) -> list[_MadeUpIdentity]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(65537, 1024).private_numbers()
    p, q, n = numbers.p, numbers.q, numbers.public_numbers.n
    totient, iqmp = math.lcm(p - 1, q - 1), rsa.rsa_crt_iqmp(p, q)
    identities, exponent = [], 65537
    while len(identities) < count:
        exponent += 2
        if math.gcd(exponent, totient) != 1:
            continue
        d = pow(exponent, -1, totient)
        private = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), iqmp, rsa.RSAPublicNumbers(exponent, n))
        identities.append(_MadeUpIdentity(private.private_key(unsafe_skip_rsa_key_validation=True)))
    return identities


async def _patient(dht, node, seconds: float = 30.0) -> None:
    """This peer waits up to `seconds` for each answer instead of hivemind's 3 s: on a loaded machine, a peer that
    validates a flood's 528 signed entries in one request can take longer, and no answer would pass for no peer."""
    node.protocol.wait_timeout = seconds


async def _flood(dht, node, key: str, peers: list[str], count: int, expiration: float) -> dict:
    """Store `count` entries under `key` at each of `peers` (in one request each), every entry owned and signed by a
    made-up peer (made here: hivemind's pipe to its DHT process does not carry that many): peer -> whether it
    accepted each (None: no answer)."""
    entries = _made_up_entries(Keyring.load(SWARM_KEY_FILE), key, count, expiration)
    return await _store_entries(dht, node, key, peers, entries, expiration)


def _made_up_entries(keyring: Keyring, key: str, count: int, expiration: float) -> list[tuple[str, bytes]]:
    """`count` entries under `key`, each owned and signed by a made-up peer as swarm.record_auth asks: valid records
    that only the cap on entries per key keeps out."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    key_bytes, entries = DHTID.generate(source=key).to_bytes(), []
    for number, identity in enumerate(_made_up_identities(count)):
        record = DHTRecord(key_bytes, MSGPackSerializer.dumps(identity.peer_id), MSGPackSerializer.dumps({"flood": number}),
                           expiration)
        entries.append((identity.peer_id, SwarmRecordValidator(keyring, identity).sign_value(record)))
    return entries


async def _nearest(dht, node, key: str) -> list[str]:
    """The peers a store of `key` goes to, by peer id: the nearest that answer, as hivemind's own store keeps them.
    Routing tables still list the servers of test modules that have ended (the shared DHT outlives them): those
    are left out, as a store leaves them out."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    nearest = await node.find_nearest_nodes([key_id], k_nearest=node.num_replicas + 16, exclude_self=True)
    candidates = list(nearest[key_id].values())
    answers = await asyncio.gather(*(node.protocol.call_ping(peer) for peer in candidates))
    return [peer.to_base58() for peer, answer in zip(candidates, answers, strict=True) if answer is not None][
        : node.num_replicas]


async def _store_entries(dht, node, key: str, peers: list[str], entries: list[tuple[str, bytes]],
                         expiration: float) -> dict:
    """Store signed `entries` (subkey, value) under `key` at each of `peers`, in one request each: peer -> whether it
    accepted each entry (None: no answer)."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)

    async def store(peer: str) -> list[bool] | None:
        stored = await node.protocol.call_store(PeerID.from_base58(peer), [key_id] * len(entries),
                                                [value for _, value in entries], expiration,
                                                subkeys=[subkey for subkey, _ in entries])
        return None if stored is None else list(stored)  # (a protobuf repeated field does not pickle back)

    return dict(zip(peers, await asyncio.gather(*map(store, peers)), strict=True))


async def _store_own(dht, node, key: str, peers: list[str], size: int, expiration: float) -> dict:
    """Store an entry of `size` bytes under `key`, owned and signed by this peer (made here: hivemind's pipe to its
    DHT process does not carry such values)."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    owner = node.peer_id.to_base58()
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(owner),
                       MSGPackSerializer.dumps(b"x" * size), expiration)
    signed = node.protocol.record_validator.sign_value(record)
    return await _store_entries(dht, node, key, peers, [(owner, signed)], expiration)


async def _entries_held(dht, node, key: str, peers: list[str], owners: list[str]) -> dict:
    """What each of `peers` holds under `key`: peer -> (its number of entries, which of `owners` have one)."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)

    async def held(peer: str) -> tuple[int, list[str]]:
        found = await node.protocol.call_find(PeerID.from_base58(peer), [key_id])
        entry = (found or {}).get(key_id, (None, None))[0]
        value = entry.value if entry is not None and hasattr(entry.value, "items") else {}
        return len(value), [owner for owner in owners if owner in value]

    return dict(zip(peers, await asyncio.gather(*map(held, peers)), strict=True))
