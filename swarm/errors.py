"""Errors with stable codes: raised by servers, carried to the client as '[code] message', and seen there as
RemoteError."""

from __future__ import annotations

import re


class SwarmError(Exception):
    """An error with a stable code that travels to the remote side as '[code] message'."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(f"[{self.code}] {message}")
        self.message = message


class BadRequest(SwarmError):
    code = "bad_request"


class VersionMismatch(SwarmError):
    """The message's sender and this peer speak no protocol version in common (swarm.versions)."""

    code = "protocol_version"


class BlocksNotServed(SwarmError):
    code = "blocks_not_served"


class MaxLengthExceeded(SwarmError):
    code = "max_length_exceeded"


class CacheFull(SwarmError):
    code = "cache_full"


class LimitReached(SwarmError):
    """The peer holds more than its fair share of a budget that is short (server.fair_share): free some of it (close
    sessions, wait for requests in flight) or retry later; another peer's request may still be admitted."""

    code = "limit_reached"


class LoraNotCached(SwarmError):
    """The request named LoRA tensors by a digest the server no longer holds: send the tensors again."""

    code = "lora_not_cached"


class DeltaStateMissing(SwarmError):
    """Delta-coded rows name references the server does not hold (evicted, restarted, another route): send in full."""

    code = "delta_state_missing"


class ServerLeaving(SwarmError):
    """The server is shutting down: the client should continue its session on another server."""

    code = "server_leaving"


_REMOTE_ERROR = re.compile(r"\[([a-z_]+)\] (.*)", re.S)


class RemoteError(RuntimeError):
    """An error a server reported, as seen by the client."""

    # The server is gone or going: the call may be retried elsewhere. Other codes are the server's answers.
    # blocks_not_served: it moved to other blocks since the caller's view of the swarm was taken (rebalancing).
    SERVER_GONE = frozenset({"transport", "server_leaving", "blocks_not_served"})
    # Of those, the ones a live server said itself: its DHT record says so too, so it need not be banned.
    SERVER_MOVED = frozenset({"server_leaving", "blocks_not_served"})
    # The server is up but has no room for this peer now (its sessions, cache or its fair share of them taken, or a
    # session ended to make room for another peer): another replica may take the call, this one later.
    SERVER_FULL = frozenset({"limit_reached", "cache_full"})

    def __init__(self, code: str, message: str, peer: str | None = None):
        where = f" (server {peer})" if peer else ""
        super().__init__(f"{message}{where}")
        self.code, self.message, self.peer = code, message, peer
        self.opening = False  # it happened while an inference session opened (see client.failover)

    @property
    def server_gone(self) -> bool:
        return self.code in self.SERVER_GONE

    @property
    def server_full(self) -> bool:
        return self.code in self.SERVER_FULL

    @classmethod
    def from_exception(cls, exc: BaseException, peer: str | None = None) -> RemoteError:
        match = _REMOTE_ERROR.search(str(exc))
        if match:
            message = match.group(2).strip()
            if message[-2:] in ("')", '")'):  # unary errors arrive as repr(exception)
                message = message[:-2]
            return cls(match.group(1), message, peer)
        return cls("transport", f"{type(exc).__name__}: {exc}", peer)
