"""The swarm key: a 32-byte secret that every member of a private swarm holds, and the tokens made from it.

A key file holds the key as 64 hex digits (`swarm keygen FILE`). Sub-keys for RPCs and for DHT records are derived
from it with HMAC-SHA256 (an HKDF expand step with a label per use), so a key that leaks from one use says nothing
about the other. Every request carries a token: a MAC over the method, the caller's and the callee's peer ids,
a timestamp, a random nonce and the message; the receiver checks it in constant time, allows a small clock skew and
remembers the nonces it accepted, so a captured request cannot be replayed, redirected or altered. Replies carry a
MAC that echoes the request's nonce, so a reply cannot be forged or taken from another request. The MAC is keyed
BLAKE2b (a MAC by design, RFC 7693) over the length-framed parts: one pass over the message, where a digest and then
an HMAC of it took two and cost three times as much per inference step.

Pure Python (hashlib, hmac, secrets): nothing here knows hivemind; `swarm.keyed_p2p` puts the tokens on the wire.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import secrets
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

KEY_BYTES = 32
NONCE_BYTES = 16
ENV_VAR = "SWARM_KEY_FILE"
CLOCK_SKEW = 30.0  # seconds a token's timestamp may differ from the receiver's clock
NONCE_MEMORY = 4 * CLOCK_SKEW  # how long an accepted nonce is remembered (a few windows: past any accepted skew)
MAX_NONCES = 200_000  # per receiver; when full, tokens older than the oldest remembered nonce are refused
_KEYGEN_HINT = "create one with `swarm keygen FILE` and pass it to every peer of the swarm"


class SwarmKeyError(ValueError):
    """A swarm key (file) is missing, unreadable, readable by everyone or malformed."""


class Refused(PermissionError):
    """A message without a valid token for this swarm's key: the receiver answers nothing but this refusal."""


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different lists of parts give the same bytes."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


@dataclass(frozen=True)
class SwarmKey:
    """One swarm key and the sub-keys derived from it."""

    secret: bytes = field(repr=False)
    rpc: bytes = field(repr=False)
    records: bytes = field(repr=False)
    key_id: str  # a short public name of the key (safe to log): which key a peer holds, never the key itself

    @classmethod
    def from_bytes(cls, secret: bytes) -> SwarmKey:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key is {KEY_BYTES} bytes, got {len(secret) if hasattr(secret, '__len__') else type(secret).__name__}")
        secret = bytes(secret)

        def derive(label: bytes) -> bytes:
            return hmac.new(secret, b"swarm/v1/" + label + b"\x01", hashlib.sha256).digest()

        return cls(secret, derive(b"rpc"), derive(b"records"), derive(b"key-id")[:6].hex())


def generate_key_file(path: str | os.PathLike) -> SwarmKey:
    """Write a new random key to `path` (mode 0600), refusing to overwrite an existing file."""
    path = Path(path)
    secret = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SwarmKeyError(f"{path} already exists: a swarm key is never overwritten (remove it first, or choose "
                            "another file)") from None
    except OSError as exc:
        raise SwarmKeyError(f"cannot create the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        file.write(secret.hex() + "\n")
    return SwarmKey.from_bytes(secret)


def read_key_file(path: str | os.PathLike) -> SwarmKey:
    """The key in `path`; SwarmKeyError (fail closed) if it is missing, unreadable, world-readable or malformed."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise SwarmKeyError(f"swarm key file {path} is not a regular file")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise SwarmKeyError(f"swarm key file {path} is readable or writable by every user of this machine (mode "
                                f"{stat.S_IMODE(mode):04o}): run `chmod 600 {path}`")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {path} does not exist: {_KEYGEN_HINT}") from None
    except OSError as exc:
        raise SwarmKeyError(f"cannot read the swarm key file {path}: {exc.strerror}") from None
    text = raw.strip()
    if len(text) != 2 * KEY_BYTES or any(c not in b"0123456789abcdefABCDEF" for c in text):
        raise SwarmKeyError(f"swarm key file {path} does not hold a swarm key ({2 * KEY_BYTES} hex digits, as "
                            "`swarm keygen` writes)")
    return SwarmKey.from_bytes(bytes.fromhex(text.decode()))


KeySource = str | os.PathLike | bytes | SwarmKey


def load_key(source: KeySource) -> SwarmKey:
    """A key from a key file's path, the key's 32 bytes, or a SwarmKey."""
    if isinstance(source, SwarmKey):
        return source
    if isinstance(source, (bytes, bytearray)):
        return SwarmKey.from_bytes(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        return read_key_file(source)
    raise SwarmKeyError(f"swarm_key must be a key file's path or the key's {KEY_BYTES} bytes, got "
                        f"{type(source).__name__}")


def warn_if_open(keyring: Keyring | None) -> None:
    """Say once, when a new swarm starts without a key, that anyone who can reach it can join it."""
    if keyring is None:
        import logging

        logging.getLogger("swarm").warning(
            "this new swarm is OPEN: anyone who can reach its peers can join it, read its records, announce servers "
            "and call them. For a private swarm, run `swarm keygen FILE` and give every peer --swarm-key-file FILE.")


class Keyring:
    """The keys of one peer (the first signs; any verifies, so a key can be rotated) and the nonces it accepted.

    `mint`/`check` make and verify request tokens; `seal`/`check_seal` make and verify the MACs on stream messages
    after the first and on replies, bound to the first message's nonce and a sequence number."""

    def __init__(self, keys: Sequence[SwarmKey], clock=time.time):
        if not keys:
            raise SwarmKeyError("a keyring needs at least one swarm key")
        self.keys = tuple(keys)
        self.clock = clock
        self._nonces: dict[bytes, float] = {}
        self._order: collections.deque[tuple[float, bytes]] = collections.deque()
        self._floor = 0.0  # tokens older than this cannot be proven fresh any more (their nonces were forgotten)
        self._heads: dict[tuple, object] = {}  # (key id, a call's fixed MAC parts) -> hash state (see _stream_mac)

    @classmethod
    def load(cls, given: KeySource | Sequence[KeySource] | None, env: dict | None = None) -> Keyring | None:
        """The keyring of the given keys (one source or several; none: SWARM_KEY_FILE's), or None for an open swarm."""
        if given is None or (isinstance(given, (list, tuple)) and not given):
            path = (os.environ if env is None else env).get(ENV_VAR)
            given = [path] if path else []
        sources = list(given) if isinstance(given, (list, tuple)) else [given]
        return cls([load_key(source) for source in sources]) if sources else None

    @property
    def key_id(self) -> str:
        return self.keys[0].key_id

    def _mac(self, key: SwarmKey, *parts: bytes) -> bytes:
        """Keyed BLAKE2b of the parts framed as _frame frames them; the last (the message) is hashed where it lies,
        not copied into the frame (training requests are megabytes), and the few calls keep a step's MAC cheap."""
        *head, body = parts
        mac = hashlib.blake2b(_frame(*head), key=key.rpc, digest_size=32)
        mac.update(len(body).to_bytes(4, "big"))
        mac.update(body)
        return mac.digest()

    def mint(self, method: str, caller: bytes, callee: bytes, body: bytes) -> tuple[float, bytes, bytes]:
        """(timestamp, nonce, mac) for a request `caller` sends to `callee`; `body` is the message's bytes (or a
        digest of them)."""
        stamp, nonce = round(self.clock(), 6), secrets.token_bytes(NONCE_BYTES)
        return stamp, nonce, self._mac(self.keys[0], b"request", method.encode(), caller, callee,
                                       repr(stamp).encode(), nonce, body)

    def check(self, method: str, caller: bytes, callee: bytes, body: bytes, stamp: float, nonce: bytes,
              mac: bytes) -> None:
        """Accept a request token once, or raise Refused saying why (never which part of the MAC differed)."""
        now = self.clock()
        # A NaN stamp would pass every comparison below (and stay in the nonce memory for ever): refused with the rest.
        if (not isinstance(stamp, float) or not math.isfinite(stamp) or not isinstance(nonce, bytes)
                or len(nonce) != NONCE_BYTES):
            raise Refused("refused: the request carries no valid swarm key token")
        if abs(now - stamp) > CLOCK_SKEW:
            raise Refused(f"refused: the request's token is {now - stamp:+.0f} s off this peer's clock (more than "
                          f"{CLOCK_SKEW:.0f} s: a replay, or a clock to set right)")
        parts = (b"request", method.encode(), caller, callee, repr(stamp).encode(), nonce, body)
        if not any(hmac.compare_digest(self._mac(key, *parts), mac) for key in self.keys):
            raise Refused("refused: the request's token does not match this swarm's key (another key, or a message "
                          "altered or sent to or from another peer)")
        self._remember(nonce, stamp, now)

    def _remember(self, nonce: bytes, stamp: float, now: float) -> None:
        while self._order and (self._order[0][0] < now or len(self._order) >= MAX_NONCES):
            expiry, old = self._order.popleft()
            self._nonces.pop(old, None)
            self._floor = max(self._floor, expiry - NONCE_MEMORY)
        if nonce in self._nonces or stamp < self._floor:
            raise Refused("refused: this request was already received (a replayed token)")
        expiry = max(stamp, now) + NONCE_MEMORY
        self._nonces[nonce] = expiry
        self._order.append((expiry, nonce))

    def _stream_mac(self, key: SwarmKey, head: tuple, seq: int, body: bytes) -> bytes:
        """_mac(key, *head, seq, body), from a hash state that has taken the call's fixed parts already: a stream's
        messages (an inference step each) then cost two small updates and the message's own bytes."""
        state = self._heads.get((key.key_id, head))
        if state is None:
            state = hashlib.blake2b(_frame(*head), key=key.rpc, digest_size=32)
            if len(self._heads) >= 4096:  # calls are short-lived: forget the oldest
                del self._heads[next(iter(self._heads))]
            self._heads[(key.key_id, head)] = state
        mac = state.copy()
        mac.update(b"\x00\x00\x00\x08" + seq.to_bytes(8, "big") + len(body).to_bytes(4, "big"))
        mac.update(body)
        return mac.digest()

    def seal(self, kind: bytes, method: str, sender: bytes, receiver: bytes, nonce: bytes, seq: int,
             body: bytes) -> bytes:
        """The MAC of a reply (kind b"reply") or of a later stream message (b"stream"): bound to the first request's
        nonce and the message's place in its stream, so none can be forged, reordered or moved to another call."""
        return self._stream_mac(self.keys[0], (kind, method.encode(), sender, receiver, nonce), seq, body)

    def check_seal(self, kind: bytes, method: str, sender: bytes, receiver: bytes, nonce: bytes, seq: int,
                   body: bytes, mac: bytes) -> None:
        head = (kind, method.encode(), sender, receiver, nonce)
        if not any(hmac.compare_digest(self._stream_mac(key, head, seq, body), mac) for key in self.keys):
            what = "reply" if kind == b"reply" else "stream message"
            raise Refused(f"refused: a {what} without a valid swarm key seal (forged, altered or out of order)")
