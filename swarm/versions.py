"""Protocol versions: every peer speaks a range of them (swarm.config), announced in its DHT record and carried by each
message; two peers work together when their ranges overlap, in the highest version both speak."""

from __future__ import annotations

from swarm import config
from swarm.errors import VersionMismatch

Range = tuple[int, int]  # (lowest, highest) protocol version a peer speaks


def ours() -> Range:
    """The range this build speaks (read at call time, so a process that sets swarm.config's constants first,
    as a test of a newer peer does, announces and checks its own)."""
    return config.MIN_PROTOCOL_VERSION, config.PROTOCOL_VERSION


def normalized(low: int, high: int) -> Range:
    """A peer's range from what it sent: a message or record older than ranges carries only its version (`high`),
    and the receiver's default fills the other end, which must not lift it above that version."""
    return min(low, high), high


def common_version(a: Range, b: Range) -> int | None:
    """The version two peers talk in: the highest both speak; None when their ranges do not overlap."""
    version = min(a[1], b[1])
    return version if version >= max(a[0], b[0]) else None


def describe(versions: Range) -> str:
    low, high = versions
    return f"{low}" if low == high else f"{low}..{high}"


def check_message(theirs: Range, kind: str, mine: Range | None = None) -> None:
    """Raise VersionMismatch, naming both ranges, when a received message's sender speaks no version of ours."""
    mine = ours() if mine is None else mine
    if common_version(theirs, mine) is None:
        older = "receiving" if mine[1] < theirs[0] else "sending"
        raise VersionMismatch(f"{kind} comes from a peer that speaks protocol version {describe(theirs)}; the peer "
                              f"receiving it speaks {describe(mine)}. Upgrade the {older} peer (`swarm status` shows "
                              "each server's versions)")
