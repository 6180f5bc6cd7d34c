"""Joining a swarm through its initial peers: check their addresses before anything slow, start the DHT peer, and turn
any failure to reach the swarm into one error that says what was wrong and what to pass instead.

The address check is pure Python (no hivemind, no torch), so a command can refuse a malformed `--initial-peers` at once.
"""

from __future__ import annotations

import _thread
import contextlib
import ipaddress
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from swarm.config import JOIN_TIMEOUT

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)

ADDRESS_FORM = "/ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID"
_WHERE = "the address printed by `swarm dht` or `swarm server` (\"Join with: ...\")"
_HINT = f"pass {_WHERE}, of the form {ADDRESS_FORM}"

# Multiaddress protocols a libp2p peer may be reached over: those that take a value, and those that take none.
_WITH_VALUE = {"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr", "tcp", "udp", "p2p", "ipfs", "ip6zone", "sni"}
_WITHOUT_VALUE = {"quic", "quic-v1", "ws", "wss", "tls", "noise", "p2p-circuit", "webtransport", "http", "https"}
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class BadPeerAddress(ValueError):
    """An initial peer's address is not a multiaddress a peer can be joined through."""


class SwarmUnreachable(RuntimeError):
    """No initial peer could be reached, so this peer could not join the swarm."""


class SwarmRefused(SwarmUnreachable):
    """The initial peers were reached but refused this peer's swarm key (or its lack of one)."""


def check_initial_peers(addresses: Sequence[str]) -> list[str]:
    """The addresses as given, if each is a multiaddress that names a peer (.../p2p/PEER_ID); else BadPeerAddress."""
    if isinstance(addresses, str):
        addresses = [addresses]
    for address in addresses:
        problem = address_problem(address)
        if problem is not None:
            raise BadPeerAddress(f"--initial-peers {address!r} {problem}: {_HINT}")
    return list(addresses)


def address_problem(address: str) -> str | None:
    """What is wrong with `address` as an initial peer (None: nothing), e.g. "has no /p2p/PEER_ID part"."""
    if not isinstance(address, str) or not address.startswith("/"):
        return "is not a multiaddress (those start with /)"
    parts = address.rstrip("/").split("/")[1:]
    peer_id, words = None, iter(parts)
    for name in words:
        if name in _WITHOUT_VALUE:
            continue
        if name not in _WITH_VALUE:
            return f"names an unknown protocol {name!r}"
        value = next(words, "")
        if not value:
            return f"gives no value after /{name}"
        if name in ("ip4", "ip6"):
            try:
                (ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address)(value)
            except ValueError:
                return f"has {value!r} where an IPv{name[-1]} address belongs"
        elif name in ("tcp", "udp") and not (value.isdigit() and 0 < int(value) < 65536):
            return f"has {value!r} where a {name} port (1-65535) belongs"
        elif name in ("p2p", "ipfs"):
            if not _is_peer_id(value):
                return f"has {value!r} where a peer id belongs (a base58 multihash such as 12D3KooW...)"
            peer_id = value
    if not any(name in parts for name in ("tcp", "udp")):
        return "names no transport (/tcp/PORT or /udp/PORT)"
    if peer_id is None:
        return "names no peer (it must end with /p2p/PEER_ID)"
    return None


def _is_peer_id(text: str) -> bool:
    """A base58 multihash: a hash code, the digest's length, the digest (e.g. "Qm..." or "12D3KooW...")."""
    if not text or any(char not in _BASE58 for char in text):
        return False
    number = 0
    for char in text:
        number = number * 58 + _BASE58.index(char)
    raw = bytes(len(text) - len(text.lstrip("1"))) + number.to_bytes((number.bit_length() + 7) // 8, "big")
    return len(raw) >= 3 and raw[1] == len(raw) - 2


def start_joining(initial_peers: Sequence[str], swarm_key=None, **dht_kwargs) -> hivemind.DHT:
    """Start a DHT peer that joins through `initial_peers` (none: it starts a new swarm) and return it at once, so
    that other work can overlap the join; `wait_joined` then waits for it. `swarm_key`: a private swarm's key (a key
    file's path, the key's bytes, several of them, or a swarm.auth.Keyring; None: the SWARM_KEY_FILE environment
    variable's, else an open swarm). `dht_kwargs` go to hivemind.DHT."""
    if not initial_peers and dht_kwargs.get("client_mode"):
        raise BadPeerAddress(f"initial_peers is empty: a client joins an existing swarm; {_HINT}")
    peers = check_initial_peers(initial_peers) if initial_peers else []
    from swarm.auth import Keyring
    from swarm.keyed_p2p import KeyedDHT

    keyring = swarm_key if isinstance(swarm_key, Keyring) else Keyring.load(swarm_key)
    if keyring is not None:  # (a client's output stays its answer alone)
        logger.log(logging.DEBUG if dht_kwargs.get("client_mode") else logging.INFO,
                   "joining a private swarm with key id %s", keyring.key_id)
    return KeyedDHT(initial_peers=peers, start=True, await_ready=False, keyring=keyring, **dht_kwargs)


def wait_joined(dht: hivemind.DHT, timeout: float = JOIN_TIMEOUT) -> hivemind.DHT:
    """`dht` once it has joined; if it could not within `timeout` seconds, it is shut down and one clear error
    (SwarmUnreachable or BadPeerAddress) says why."""
    try:
        dht.wait_until_ready(timeout)
        return dht
    except BaseException as exc:
        logger.debug("joining the swarm failed", exc_info=True)
        dht.shutdown()
        if not isinstance(exc, Exception):  # Ctrl-C and the like go on as they are
            raise
        keyring = getattr(dht, "keyring", None)
        error = join_error(exc, list(dht.initial_peers or []), timeout, keyring.key_id if keyring else None)
    raise error from None  # the message says all: the daemon's traceback would only hide it


def join_swarm(initial_peers: Sequence[str], timeout: float = JOIN_TIMEOUT, **dht_kwargs) -> hivemind.DHT:
    """A DHT peer that has joined the swarm through `initial_peers` (none: a new swarm), or one clear error."""
    return wait_joined(start_joining(initial_peers, **dht_kwargs), timeout)


def join_as_configured(o) -> hivemind.DHT:
    """join_swarm for a peer's --new-swarm or --initial-peers, --host-maddrs, --announce-maddrs, --identity-path and
    --swarm-key-file (the attributes of a swarm.config.ServerConfig or of parsed `swarm dht` arguments)."""
    if o.new_swarm:
        from swarm.auth import warn_if_open

        warn_if_open(o.swarm_key)
    return join_swarm([] if o.new_swarm else list(o.initial_peers), host_maddrs=list(o.host_maddrs),
                      announce_maddrs=list(o.announce_maddrs) if o.announce_maddrs else None, identity_path=o.identity_path,
                      swarm_key=o.swarm_key)


@contextlib.contextmanager
def interrupted_if_join_fails(dht: hivemind.DHT) -> Iterator[None]:
    """Run the block while `dht` joins; if the join fails first, the block is interrupted by the join's error (as
    wait_joined raises it), so that an unreachable swarm is reported at once, not after seconds of imports and loading.

    A watcher thread interrupts the main thread with a signal whose handler raises the error; outside the main
    thread (signals go only there) the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def on_signal(signum, frame) -> None:
        if armed[0]:
            armed[0] = False
            wait_joined(dht, timeout=0)  # the join has failed: this raises its error

    stop = threading.Event()
    previous = signal.signal(_INTERRUPT, on_signal)
    watcher = threading.Thread(target=_watch_join, args=(dht, stop), name="join-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        armed[0] = False
        stop.set()
        watcher.join()  # no interrupt comes after this; one already sent finds the handler disarmed
        signal.signal(_INTERRUPT, previous)


_INTERRUPT = signal.SIGUSR1


def _watch_join(dht: hivemind.DHT, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            dht.wait_until_ready(0.1)
            return
        except TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - any failure of the join: the main thread raises it
            if not stop.is_set():
                _thread.interrupt_main(_INTERRUPT)
            return


def join_error(exc: Exception, initial_peers: Sequence[str], timeout: float, key_id: str | None = None) -> Exception:
    """The error to show for `exc`, raised while joining through `initial_peers` with the swarm key `key_id` (None:
    none) (hivemind's words kept where they say something the user can act on)."""
    peers = " ".join(initial_peers) or "(none)"
    text = str(exc)
    if "multiaddr" in text.lower() or "peer id" in text.lower():  # p2pd or hivemind could not parse an address
        return BadPeerAddress(f"--initial-peers {peers}: {_last_line(text)}; {_HINT}")
    if "identity" in text.lower() and "taken" in text.lower():
        return RuntimeError(f"{_last_line(text)}: another running peer uses this --identity-path; stop it or give "
                            "this peer another identity file")
    if isinstance(exc, TimeoutError) or "failed to start in" in text:
        what = f"got no answer from the initial peers in {timeout:.0f} s"
    elif "failed to connect to bootstrap peers" in text:
        what = "could not connect to any initial peer"
    elif "bootstrap failed" in text and key_id is not None:
        return SwarmRefused(f"the swarm refused the key (key id {key_id}): the initial peers ({peers}) answered this "
                            "peer's requests with refusals, so they hold another swarm key (or run an open swarm); pass "
                            "that swarm's key file with --swarm-key-file (or SWARM_KEY_FILE)")
    elif "bootstrap failed" in text:
        what = ("connected, but no initial peer answered as a DHT peer (if that swarm is private, pass its key file "
                "with --swarm-key-file or SWARM_KEY_FILE)")
    else:
        what = f"could not join the swarm ({_last_line(text) or type(exc).__name__})"
    return SwarmUnreachable(f"{what} ({peers}): check that the peer you join through is running and reachable from "
                            f"here, and {_HINT}")


def _last_line(text: str) -> str:
    """The useful end of a daemon's message: "Daemon failed to start: 2026/12/01 12:00:00 invalid p2p multiaddr" ->
    "invalid p2p multiaddr"."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    head, _, rest = line.partition("Daemon failed to start: ")
    line = rest or head
    words = line.split(" ", 2)
    if len(words) == 3 and words[0].count("/") == 2 and words[1].count(":") == 2:  # a Go log timestamp
        line = words[2]
    return line.strip()
