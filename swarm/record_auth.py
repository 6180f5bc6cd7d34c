"""DHT records of a private swarm: stored only by key holders, each owned and signed by the peer it describes.

In a keyed swarm every record is an entry of a dictionary whose subkey is a peer id (the swarm's records are the
servers' announcements and the model index, both kept per server). `SwarmRecordValidator` appends to every value:
the owner's public key and its signature over (key, subkey, value, expiration), then an HMAC over all of it with the
swarm key's record sub-key. A record is accepted only if the HMAC checks, the public key hashes to the subkey's
peer id (as libp2p derives peer ids), the signature verifies, the value is small and the expiry near. So a peer
without the key stores nothing, and a key holder cannot overwrite, delete or extend another peer's announcement:
any change to a record (a later expiry included) breaks its owner's signature.

The owner key is the peer's libp2p identity (an RSA key in the file hivemind reads with `identity_path`): the same
key that authenticates its connections, so the peer id in a record is the peer that signed it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from swarm.auth import Keyring, _frame

logger = logging.getLogger(__name__)

MAX_VALUE_BYTES = 64 * 1024  # a server's record is ~1 KB; the model index entry less
MAX_TTL = 3600.0  # seconds ahead an expiry may be (servers re-announce every --update-period, 30 s by default)
MAX_SUBKEYS = 512  # entries per key (servers per block): see CappedStorage
_MAC_BYTES = 32
_TRAILER = struct.Struct(">HH")  # lengths of the public key and of the signature


def peer_id_of(public_der: bytes) -> bytes:
    """The libp2p peer id (multihash bytes) of an RSA public key in DER: sha2-256 of its PublicKey protobuf."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return b"\x12\x20" + hashlib.sha256(encoded).digest()


class IdentityKey:
    """A peer's libp2p identity key, read from hivemind's identity file when first needed (hivemind writes the file
    in the DHT's process as the peer starts)."""

    def __init__(self, identity_path: str | Path):
        self.path = Path(identity_path)
        self._private = None
        self.public_der = b""

    def sign(self, data: bytes) -> tuple[bytes, bytes]:
        if self._private is None:
            raw = crypto_pb2.PrivateKey.FromString(self.path.read_bytes())
            self._private = serialization.load_der_private_key(raw.data, password=None)
            self.public_der = self._private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return self.public_der, self._private.sign(data, padding.PKCS1v15(), hashes.SHA256())


class SwarmRecordValidator(RecordValidatorBase):
    """Signs (with `owner`, where this peer stores records) and validates every record of a keyed swarm."""

    def __init__(self, keyring: Keyring, owner: IdentityKey | None = None):
        self.keyring, self.owner = keyring, owner

    @property
    def priority(self) -> int:
        return 100  # outermost: checked before any other validator (a schema) reads the value

    def _mac(self, key: bytes, record: DHTRecord, signed: bytes) -> bytes:
        return hmac.new(key, _frame(b"record", record.key, record.subkey, signed,
                                    repr(float(record.expiration_time)).encode()), hashlib.sha256).digest()

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.owner is None:
            raise PermissionError("this peer has no identity key to sign DHT records with")
        public, signature = self.owner.sign(_owned(record, record.value))
        signed = record.value + public + signature + _TRAILER.pack(len(public), len(signature))
        return signed + self._mac(self.keyring.keys[0].records, record, signed)

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = _split(record.value)
        return parts[0] if parts else record.value

    def validate(self, record: DHTRecord) -> bool:
        problem = self.problem(record)
        if problem is not None:
            logger.debug("refused a DHT record: %s", problem)
        return problem is None

    def problem(self, record: DHTRecord, now: float | None = None) -> str | None:
        """Why `record` may not be stored or used in this swarm (None: it may)."""
        if len(record.value) > MAX_VALUE_BYTES + 1024:
            return f"a value of {len(record.value)} bytes (at most {MAX_VALUE_BYTES})"
        if not math.isfinite(record.expiration_time):  # NaN would pass the cap below (and never expire)
            return f"an expiry of {record.expiration_time} (not a time)"
        if record.expiration_time - (get_dht_time() if now is None else now) > MAX_TTL:
            return f"an expiry more than {MAX_TTL:.0f} s ahead"
        signed, mac = record.value[:-_MAC_BYTES], record.value[-_MAC_BYTES:]
        if len(record.value) <= _MAC_BYTES or not any(
                hmac.compare_digest(self._mac(key.records, record, signed), mac) for key in self.keyring.keys):
            return "not stored by a holder of this swarm's key"
        parts = _split(record.value)
        if parts is None:
            return "not signed by an owner"
        value, public, signature = parts
        try:
            owner = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:  # noqa: BLE001 - any malformed subkey is refused
            owner = None
        if not isinstance(owner, str):
            return "not an entry owned by a peer (its subkey must be the owner's peer id)"
        try:
            owner_id = PeerID.from_base58(owner).to_bytes()
        except Exception:  # noqa: BLE001
            return f"subkey {owner[:60]!r} is not a peer id"
        if peer_id_of(public) != owner_id:
            return f"signed by another peer than its owner {owner}"
        try:
            key = serialization.load_der_public_key(public)
            key.verify(signature, _owned(record, value), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError, AttributeError):
            return f"its owner {owner}'s signature does not match it (changed, or given another expiry)"
        return None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def _owned(record: DHTRecord, value: bytes) -> bytes:
    """What a record's owner signs: everything about the entry, so no part of it can be changed or reused."""
    return _frame(b"owned-record", record.key, record.subkey, value, repr(float(record.expiration_time)).encode())


def _split(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(value, public key, signature) of a signed value, or None if it is not one."""
    body = raw[:-_MAC_BYTES]
    if len(body) < _TRAILER.size:
        return None
    public_len, signature_len = _TRAILER.unpack(body[-_TRAILER.size:])
    end = len(body) - _TRAILER.size
    start = end - public_len - signature_len
    if start < 0:
        return None
    return body[:start], body[start:start + public_len], body[start + public_len:end]


class CappedStorage(DHTLocalStorage):
    """A DHT peer's storage that keeps at most MAX_SUBKEYS entries per key, so that no member can flood a block's
    key with made-up servers (each needs only a fresh identity key) and crowd out the real ones."""

    def store_subkey(self, key, subkey, value, expiration_time) -> bool:
        current = self.get(key)
        if (current is not None and isinstance(current.value, DictionaryDHTValue) and subkey not in current.value
                and len(current.value) >= MAX_SUBKEYS):
            logger.debug("refused a DHT entry: its key already has %d entries", MAX_SUBKEYS)
            return False
        return super().store_subkey(key, subkey, value, expiration_time)
