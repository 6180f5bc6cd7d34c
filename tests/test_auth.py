"""The swarm key and its tokens, without a swarm: key files, request tokens, reply seals, record signatures."""

from __future__ import annotations

import os
import secrets
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.validation import DHTRecord
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from swarm import auth
from swarm.auth import Keyring, Refused, SwarmKey, SwarmKeyError, generate_key_file, read_key_file
from swarm.record_auth import MAX_TTL, MAX_VALUE_BYTES, CappedStorage, IdentityKey, SwarmRecordValidator, peer_id_of

CALLER, CALLEE, OTHER = b"caller-peer-id", b"callee-peer-id", b"another-peer"
METHOD = "tiny::BlockService.rpc_forward"


def key() -> SwarmKey:
    return SwarmKey.from_bytes(secrets.token_bytes(32))


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_keygen_writes_a_private_file_and_never_overwrites(tmp_path):
    path = tmp_path / "swarm.key"
    written = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == written and len(path.read_text().strip()) == 64
    with pytest.raises(SwarmKeyError, match="never overwritten"):
        generate_key_file(path)
    assert read_key_file(path) == written


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist: create one with `swarm keygen FILE`"),
    ("world-readable", "readable or writable by every user.*chmod 600"),
    ("malformed", "does not hold a swarm key"),
    ("short", "does not hold a swarm key"),
    ("directory", "not a regular file"),
])
def test_bad_key_files_fail_closed_with_a_clear_message(tmp_path, case, message):
    path = tmp_path / "swarm.key"
    if case == "directory":
        path.mkdir()
        path.chmod(0o700)
    elif case != "missing":
        path.write_text({"world-readable": secrets.token_hex(32), "malformed": "z" * 64, "short": "ab" * 16}[case])
        path.chmod(0o644 if case == "world-readable" else 0o600)
    with pytest.raises(SwarmKeyError, match=message):
        read_key_file(path)


def test_keys_come_from_the_argument_or_the_environment(tmp_path):
    path = tmp_path / "k"
    written = generate_key_file(path)
    assert Keyring.load(None, env={}) is None  # an open swarm
    assert Keyring.load(None, env={auth.ENV_VAR: str(path)}).keys == (written,)
    assert Keyring.load(written.secret, env={auth.ENV_VAR: "/nonexistent"}).keys == (written,)
    with pytest.raises(SwarmKeyError, match="32 bytes"):
        Keyring.load(b"too short")
    with pytest.raises(SwarmKeyError, match="does not exist"):
        Keyring.load(None, env={auth.ENV_VAR: str(tmp_path / "gone")})


def test_sub_keys_differ_and_the_key_id_reveals_nothing():
    one = key()
    assert len({one.secret, one.rpc, one.records}) == 3
    assert one.key_id not in one.secret.hex() and one.key_id != key().key_id
    assert one.secret.hex() not in repr(one)


def test_a_token_is_accepted_once():
    sender, receiver = Keyring([k := key()], clock=Clock()), Keyring([k], clock=Clock())
    body = b"the request"
    token = sender.mint(METHOD, CALLER, CALLEE, body)
    receiver.check(METHOD, CALLER, CALLEE, body, *token)
    with pytest.raises(Refused, match="already received"):
        receiver.check(METHOD, CALLER, CALLEE, body, *token)


@pytest.mark.parametrize("change, message", [
    ("method", "does not match"), ("caller", "does not match"), ("callee", "does not match"),
    ("body", "does not match"), ("stamp", "does not match"), ("nonce", "does not match"), ("mac", "does not match"),
    ("other key", "does not match"), ("late", "off this peer's clock"), ("early", "off this peer's clock"),
    ("no token", "no valid swarm key token"),
])
def test_a_changed_or_stale_token_is_refused(change, message):
    k = key()
    sender, receiver = Keyring([key() if change == "other key" else k], clock=Clock()), Keyring([k], clock=Clock())
    method, caller, callee, body = METHOD, CALLER, CALLEE, b"the request"
    stamp, nonce, mac = sender.mint(method, caller, callee, body)
    if change == "method":
        method = "tiny::BlockService.rpc_backward"
    elif change == "caller":
        caller = OTHER  # the token of another peer's request, sent by this one
    elif change == "callee":
        callee = OTHER  # a request to one server, replayed to another
    elif change == "body":
        body = b"the request, tampered"
    elif change == "stamp":
        stamp += 1.0
    elif change == "nonce":
        nonce = secrets.token_bytes(len(nonce))
    elif change == "mac":
        mac = bytes([mac[0] ^ 1]) + mac[1:]
    elif change in ("late", "early"):
        receiver.clock.now += (1 if change == "late" else -1) * (auth.CLOCK_SKEW + 1)
    elif change == "no token":
        stamp, nonce, mac = 0.0, b"", b""
    with pytest.raises(Refused, match=message):
        receiver.check(method, caller, callee, body, stamp, nonce, mac)


def test_a_replay_after_the_window_is_refused_even_once_the_nonce_is_forgotten():
    k, clock = key(), Clock()
    sender, receiver = Keyring([k], clock=clock), Keyring([k], clock=clock)
    token = sender.mint(METHOD, CALLER, CALLEE, b"d")
    receiver.check(METHOD, CALLER, CALLEE, b"d", *token)
    clock.now += auth.NONCE_MEMORY + 1  # the nonce is forgotten by now, and the stamp is long out of the window
    receiver.check(METHOD, CALLER, CALLEE, b"d", *sender.mint(METHOD, CALLER, CALLEE, b"d"))  # (forgets old nonces)
    with pytest.raises(Refused, match="off this peer's clock"):
        receiver.check(METHOD, CALLER, CALLEE, b"d", *token)


def test_a_full_nonce_memory_refuses_what_it_can_no_longer_prove_fresh(monkeypatch):
    monkeypatch.setattr(auth, "MAX_NONCES", 3)
    k, clock = key(), Clock()
    sender, receiver = Keyring([k], clock=clock), Keyring([k], clock=clock)
    early = sender.mint(METHOD, CALLER, CALLEE, b"d")
    for _ in range(4):
        clock.now += 1
        receiver.check(METHOD, CALLER, CALLEE, b"d", *sender.mint(METHOD, CALLER, CALLEE, b"d"))
    assert len(receiver._nonces) <= 3
    with pytest.raises(Refused, match="already received"):  # within the clock window, but older than what is kept
        receiver.check(METHOD, CALLER, CALLEE, b"d", *early)


def test_rotation_accepts_the_old_key_while_signing_with_the_new():
    old, new = key(), key()
    rotating, still_old = Keyring([new, old], clock=Clock()), Keyring([old], clock=Clock())
    rotating.check(METHOD, CALLER, CALLEE, b"d", *still_old.mint(METHOD, CALLER, CALLEE, b"d"))
    with pytest.raises(Refused):  # it signs with the new key, which a peer holding only the old one refuses
        still_old.check(METHOD, CALLER, CALLEE, b"d", *rotating.mint(METHOD, CALLER, CALLEE, b"d"))
    assert rotating.key_id == new.key_id


def test_reply_seals_are_bound_to_the_request_and_their_place():
    k = key()
    server, client = Keyring([k]), Keyring([k])
    nonce, body = secrets.token_bytes(16), b"reply"
    mac = server.seal(b"reply", METHOD, CALLEE, CALLER, nonce, 0, body)
    client.check_seal(b"reply", METHOD, CALLEE, CALLER, nonce, 0, body, mac)
    for args in [(b"reply", METHOD, CALLEE, CALLER, secrets.token_bytes(16), 0, body),  # another request's reply
                 (b"reply", METHOD, CALLEE, CALLER, nonce, 1, body),  # out of order
                 (b"stream", METHOD, CALLEE, CALLER, nonce, 0, body),  # a request passed off as a reply
                 (b"reply", METHOD, OTHER, CALLER, nonce, 0, body),  # from another peer
                 (b"reply", METHOD, CALLEE, CALLER, nonce, 0, b"forged")]:
        with pytest.raises(Refused, match="seal"):
            client.check_seal(*args, mac)
    with pytest.raises(Refused):
        Keyring([key()]).check_seal(b"reply", METHOD, CALLEE, CALLER, nonce, 0, body, mac)


# ------------------------------------------------------------------------------------------------------ records

def identity_file(tmp_path, name: str) -> tuple[IdentityKey, str]:
    """A libp2p identity file as hivemind writes it, and the peer id (base58) it gives."""
    from hivemind.p2p import PeerID

    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    path = tmp_path / name
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString())
    public = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return IdentityKey(path), PeerID(peer_id_of(public)).to_base58()


def signed(validator, subkey, value=b"record", expiration=None) -> DHTRecord:
    record = DHTRecord(b"key-id", MSGPackSerializer.dumps(subkey) if subkey is not None else b"", value,
                       expiration if expiration is not None else get_dht_time() + 60)
    return DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)


def test_records_are_owned_by_the_peer_that_signs_them(tmp_path):
    from hivemind.p2p import PeerID

    k = Keyring([key()])
    owner, owner_id = identity_file(tmp_path, "a")
    mallory, mallory_id = identity_file(tmp_path, "b")
    # hivemind's own derivation of a peer id from an identity file agrees with ours
    assert PeerID.from_identity(owner.path.read_bytes()).to_base58() == owner_id
    honest, attacker = SwarmRecordValidator(k, owner), SwarmRecordValidator(k, mallory)
    reader = SwarmRecordValidator(k)

    good = signed(honest, owner_id)
    assert reader.problem(good) is None and reader.strip_value(good) == b"record"
    assert reader.problem(signed(attacker, mallory_id)) is None
    assert "signed by another peer" in reader.problem(signed(attacker, owner_id))  # overwrite someone's entry
    assert "owned by a peer" in reader.problem(signed(attacker, None))  # a plain value would replace the whole key
    extended = DHTRecord(good.key, good.subkey, good.value, good.expiration_time + 30)  # replayed, later expiry
    assert reader.problem(extended) is not None
    changed = DHTRecord(good.key, good.subkey, b"X" + good.value[1:], good.expiration_time)
    assert reader.problem(changed) is not None
    assert "not stored by a holder" in SwarmRecordValidator(Keyring([key()])).problem(good)
    assert "not stored by a holder" in reader.problem(DHTRecord(good.key, good.subkey, b"plain", good.expiration_time))
    assert "ahead" in reader.problem(signed(honest, owner_id, expiration=get_dht_time() + MAX_TTL + 60))
    assert "bytes" in reader.problem(signed(honest, owner_id, value=b"x" * (MAX_VALUE_BYTES + 2048)))
    assert "not a peer id" in reader.problem(signed(attacker, "not-a-peer-id"))


def test_storage_caps_entries_per_key(monkeypatch):
    from hivemind.dht.routing import DHTID

    from swarm import record_auth

    monkeypatch.setattr(record_auth, "MAX_SUBKEYS", 4)
    storage, key_id, later = CappedStorage(), DHTID.generate(), get_dht_time() + 60
    assert all(storage.store(key_id, b"v", later, subkey=f"peer-{i}".encode()) for i in range(4))
    assert not storage.store(key_id, b"v", later, subkey=b"peer-4")  # a fifth entry is refused...
    assert storage.store(key_id, b"v2", later + 1, subkey=b"peer-0")  # ...but an owner still refreshes its own
    assert len(storage.get(key_id).value) == 4


def test_key_file_permissions_are_checked_before_its_content(tmp_path):
    path = tmp_path / "k"
    path.write_text("not a key")  # malformed too: the mode must be refused first, before the content is read
    os.chmod(path, 0o604)
    with pytest.raises(SwarmKeyError, match="chmod 600"):
        read_key_file(path)
