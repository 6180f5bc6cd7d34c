"""Route planning: a chain of servers that covers every block, as a pure function of a swarm snapshot."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from swarm.config import CLIENT
from swarm.dht_records import ServerInfo, ServerState


@dataclass(frozen=True)
class RouteStep:
    peer_id: object  # hivemind PeerID (kept opaque so policies stay testable with plain values)
    start: int
    end: int


class NoRouteError(RuntimeError):
    pass


def ban_seconds(strikes: int, base: float = CLIENT.ban_base_s, cap: float = CLIENT.ban_max_s) -> float:
    """How long a server stays out of routes after its `strikes`-th failure in a row: doubling from `base`, at
    most `cap`."""
    if strikes < 1:
        return 0.0
    return min(cap, base * 2.0 ** (strikes - 1))


def plan_route(
    servers: Sequence[ServerInfo],
    start: int,
    end: int,
    banned: Collection[str] = (),  # str(peer_id) of servers to leave out
    hop_ms: float = CLIENT.hop_overhead_ms,
    default_ms_per_block: float = CLIENT.default_ms_per_block,
    adapter: str | None = None,
) -> list[RouteStep]:
    """The cheapest chain covering blocks [start, end): each hop costs `hop_ms` plus its blocks' compute time.

    A server may be entered in the middle of its span and left before its end. Ties prefer fewer hops.
    With `adapter`, only servers that host that named adapter are used.
    """
    usable = [s for s in servers if s.record.state == ServerState.ONLINE and str(s.peer_id) not in banned
              and (adapter is None or adapter in s.record.adapters)]
    best: dict[int, tuple[float, int, int | None, ServerInfo | None]] = {start: (0.0, 0, None, None)}
    for i in range(start, end):
        if i not in best:
            continue
        cost_i, hops_i, _, _ = best[i]
        for server in usable:
            if not server.record.start <= i < server.record.end:
                continue
            ms_per_block = server.record.ms_per_block or default_ms_per_block
            for j in range(i + 1, min(server.record.end, end) + 1):
                candidate = (cost_i + hop_ms + (j - i) * ms_per_block, hops_i + 1, i, server)
                if j not in best or candidate[:2] < best[j][:2]:
                    best[j] = candidate
    if end not in best:
        covered = max(best)
        with_adapter = f" with adapter {adapter!r}" if adapter is not None else ""
        raise NoRouteError(
            f"no online server{with_adapter} hosts block {covered} (blocks {start}:{end} needed; "
            f"{len(usable)} usable server(s) of {len(servers)} known). Start a server for it or wait for one to join"
        )
    steps, j = [], end
    while j != start:
        _, _, i, server = best[j]
        steps.append(RouteStep(server.peer_id, i, j))
        j = i
    return steps[::-1]
