"""Route planning as pure functions of a swarm snapshot: the servers' records, the round trips this client measured,
its bans and its allowed/blocked lists. Inference minimizes expected latency; training spreads over replicas."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from client.config import CLIENT
from swarm.dht_records import ServerInfo, ServerState

UNREACHABLE = math.inf  # the round trip recorded for a server whose last ping failed
# Says why a client cannot work with a server at all, or None (client.compatibility.Compatibility).
CompatibilityRule = Callable[[ServerInfo], "tuple[str, str] | None"]


@dataclass(frozen=True)
class RouteStep:
    peer_id: object  # hivemind PeerID (kept opaque so policies stay testable with plain values)
    start: int
    end: int
    # The tokens (batch x length) the server takes per request, as its record announced when the route was planned.
    max_chunk_tokens: int | None = field(default=None, compare=False)


class NoRouteError(RuntimeError):
    """No chain of usable servers covers the blocks. `reasons`: why the servers of the first uncovered block were
    left out (codes: blocked, not_allowed, offline, joining, protocol, model, banned, full, adapter, cache, batch);
    empty when none hosts it."""

    def __init__(self, message: str, block: int = 0, reasons: frozenset[str] = frozenset()):
        super().__init__(message)
        self.block, self.reasons = block, reasons


@dataclass(frozen=True)
class ServerChoice:
    """Which servers a client may use at all, by peer id string: only `allowed` ones (None: any), never `blocked`."""

    allowed: frozenset[str] | None = None
    blocked: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allowed: Iterable | None = None, blocked: Iterable = (), check=None) -> ServerChoice:
        """From lists of peer ids (strings or PeerIDs). `check(text)` raises ValueError for a malformed id (e.g.
        PeerID.from_base58); an empty `allowed` list would exclude every server, so it is refused too."""
        if isinstance(allowed, str) or isinstance(blocked, str):
            raise ValueError("allowed_servers and blocked_servers are lists of peer ids, not a single string")
        choice = cls(None if allowed is None else frozenset(map(str, allowed)), frozenset(map(str, blocked)))
        if choice.allowed is not None and not choice.allowed:
            raise ValueError("allowed_servers is empty: give at least one peer id, or None to allow every server")
        for name, peers in (("allowed_servers", choice.allowed or ()), ("blocked_servers", choice.blocked)):
            for peer in sorted(peers) if check is not None else ():
                try:
                    check(peer)
                except ValueError:
                    raise ValueError(f"{name}: {peer!r} is not a peer id (as `swarm status` shows them)") from None
        return choice

    def refusal(self, peer: str) -> tuple[str, str] | None:
        if peer in self.blocked:
            return "blocked", "in blocked_servers"
        if self.allowed is not None and peer not in self.allowed:
            return "not_allowed", "not in allowed_servers"
        return None


def ban_seconds(strikes: int, base: float = CLIENT.ban_base_s, cap: float = CLIENT.ban_max_s) -> float:
    """How long a server stays out of routes after its `strikes`-th failure in a row: doubling from `base`, at
    most `cap`."""
    if strikes < 1:
        return 0.0
    return min(cap, base * 2.0 ** (strikes - 1))


def smooth_rtt(previous: float | None, sample: float | None, alpha: float = CLIENT.ping_smoothing) -> float:
    """A server's round trip after a new ping (`sample` in ms, None when it failed): an exponential moving average,
    so one slow answer on a busy machine does not flip routes; a failure makes it UNREACHABLE until it answers."""
    if sample is None:
        return UNREACHABLE
    if previous is None or math.isinf(previous):
        return sample
    return alpha * sample + (1.0 - alpha) * previous


def exclusion(server: ServerInfo, banned: Collection[str] = (), choice: ServerChoice = ServerChoice(),
              adapter: str | None = None, session_tokens: int = 0, batch_size: int = 0,
              compatibility: CompatibilityRule | None = None, full: Collection[str] = ()) -> tuple[str, str] | None:
    """(code, text) saying why a server may not be on a route, or None when it may. `compatibility` says whether
    the client can work with it at all (protocol versions, the model it loaded); `full`: servers that answered
    they had no room for this client."""
    peer = str(server.peer_id)
    refused = choice.refusal(peer)
    if refused is not None:
        return refused
    record = server.record
    if record.state != ServerState.ONLINE:
        return record.state.value, record.state.value
    if compatibility is not None and (refused := compatibility(server)) is not None:
        return refused
    if peer in banned:
        return "banned", "banned after a failure"
    if peer in full:
        return "full", "answered it has no room for this client"
    if adapter is not None and adapter not in record.adapters:
        return "adapter", f"does not host adapter {adapter!r}"
    if session_tokens > record.cache_tokens_left:
        return "cache", f"{record.cache_tokens_left} cache tokens free, {session_tokens} needed"
    if batch_size > record.max_batch_size:
        return "batch", f"takes batches of at most {record.max_batch_size}, {batch_size} needed"
    return None


def _short(peer: object) -> str:
    text = str(peer)
    return text if len(text) <= 10 else "..." + text[-8:]


# What a user can do about servers left out for these reasons, in the order the error names them.
_ADVICE = (({"blocked", "not_allowed"}, "allow one of them (allowed_servers / blocked_servers)"),
           ({"banned"}, "retry once its ban ends"),
           ({"full"}, "retry later, when they have room, or run a server for these blocks to add capacity"),
           ({"cache"}, "use a smaller max_length or batch, or wait for sessions to end"),
           ({"protocol"}, "upgrade the older side, this client or those servers (`swarm status` shows their versions)"),
           ({"model"}, "serve the checkpoint this client loaded, or load the one those servers serve"),
           ({"batch"}, "use a smaller batch"))


def _no_route(servers: Sequence[ServerInfo], block: int, start: int, end: int, usable: int, adapter: str | None,
              why: Mapping[str, tuple[str, str]]) -> NoRouteError:
    hosts = [s for s in servers if s.record.start <= block < s.record.end]
    reasons = frozenset(why[str(s.peer_id)][0] for s in hosts if str(s.peer_id) in why)
    details = ", ".join(f"{_short(s.peer_id)} ({why[str(s.peer_id)][1]})" for s in hosts if str(s.peer_id) in why)
    needed = f"blocks {start}:{end} needed; {usable} usable server(s) of {len(servers)} known"
    if reasons <= {"offline", "joining", "adapter"}:  # the swarm lacks it, rather than this client's choices
        with_adapter = f" with adapter {adapter!r}" if adapter is not None else ""
        left_out = f"; its servers: {details}" if details else ""
        message = (f"no online server{with_adapter} hosts block {block} ({needed}{left_out}). "
                   "Start a server for it or wait for one to join")
    else:
        advice_text = "; or ".join(advice for codes, advice in _ADVICE if reasons & codes)
        message = (f"block {block} is served only by servers left out of routes here ({needed}): {details}. "
                   f"{advice_text[:1].upper()}{advice_text[1:]}, or wait for another server to join")
    return NoRouteError(message, block, reasons)


def _usable(servers: Sequence[ServerInfo], **rules) -> tuple[list[ServerInfo], dict[str, tuple[str, str]]]:
    usable, why = [], {}
    for server in servers:
        reason = exclusion(server, **rules)
        if reason is None:
            usable.append(server)
        else:
            why[str(server.peer_id)] = reason
    return usable, why


def plan_route(
    servers: Sequence[ServerInfo],
    start: int,
    end: int,
    banned: Collection[str] = (),  # str(peer_id) of servers to leave out
    hop_ms: float = CLIENT.hop_overhead_ms,
    default_ms_per_block: float = CLIENT.default_ms_per_block,
    adapter: str | None = None,
    *,
    rtt_ms: Mapping[str, float] | None = None,
    choice: ServerChoice = ServerChoice(),
    session_tokens: int = 0,
    batch_size: int = 0,
    compatibility: CompatibilityRule | None = None,
    full: Collection[str] = (),
) -> list[RouteStep]:
    """The chain covering blocks [start, end) with the least expected latency per token. Each hop costs the client's
    round trip to that server (`rtt_ms` by peer id; `hop_ms` when not measured; when unreachable, a penalty that makes
    it used only where nothing else serves its blocks) plus its blocks times the server's ms_per_block. A server may be
    entered in the middle of its span and left before its end; ties prefer fewer hops. Servers that `exclusion` leaves
    out are not used (`session_tokens`: batch x max_length of an inference session)."""
    rtt_ms = rtt_ms or {}
    usable, why = _usable(servers, banned=banned, choice=choice, adapter=adapter, session_tokens=session_tokens,
                          batch_size=batch_size, compatibility=compatibility, full=full)
    best: dict[int, tuple[float, int, int | None, ServerInfo | None]] = {start: (0.0, 0, None, None)}
    for i in range(start, end):
        if i not in best:
            continue
        cost_i, hops_i, _, _ = best[i]
        for server in usable:
            if not server.record.start <= i < server.record.end:
                continue
            ms_per_block = server.record.ms_per_block or default_ms_per_block
            network = rtt_ms.get(str(server.peer_id), hop_ms)
            network = CLIENT.unreachable_rtt_ms if math.isinf(network) else network
            for j in range(i + 1, min(server.record.end, end) + 1):
                candidate = (cost_i + network + (j - i) * ms_per_block, hops_i + 1, i, server)
                if j not in best or candidate[:2] < best[j][:2]:
                    best[j] = candidate
    if end not in best:
        raise _no_route(servers, max(best), start, end, len(usable), adapter, why)
    steps, j = [], end
    while j != start:
        _, _, i, server = best[j]
        steps.append(RouteStep(server.peer_id, i, j, server.record.max_chunk_tokens))
        j = i
    return steps[::-1]


def block_throughput(server: ServerInfo) -> float | None:
    """Tokens per second through one of a server's blocks (its forward_tokens_per_s is for the whole span)."""
    record = server.record
    return record.forward_tokens_per_s * (record.end - record.start) if record.forward_tokens_per_s else None


def plan_training_route(
    servers: Sequence[ServerInfo],
    start: int,
    end: int,
    draw: random.Random,
    in_flight: Mapping[str, int] | None = None,
    banned: Collection[str] = (),
    adapter: str | None = None,
    *,
    rtt_ms: Mapping[str, float] | None = None,
    choice: ServerChoice = ServerChoice(),
    batch_size: int = 0,
    compatibility: CompatibilityRule | None = None,
    full: Collection[str] = (),
) -> list[RouteStep]:
    """A chain covering [start, end) for one training request, spread over replicas by throughput: from the first
    uncovered block, the next server is drawn among the usable ones hosting it with probability proportional to its
    throughput per block (the average of the others' if it reports none) over 1 + the requests `in_flight` says this
    client has there; it runs to the end of its span or `end`. Servers whose last ping failed are drawn only if no
    other hosts the block. Deterministic given `draw`'s state."""
    rtt_ms, in_flight = rtt_ms or {}, in_flight or {}
    usable, why = _usable(servers, banned=banned, choice=choice, adapter=adapter, batch_size=batch_size,
                          compatibility=compatibility, full=full)
    steps, i = [], start
    while i < end:
        hosts = [s for s in usable if s.record.start <= i < s.record.end]
        if not hosts:
            raise _no_route(servers, i, start, end, len(usable), adapter, why)
        reachable = [s for s in hosts if not math.isinf(rtt_ms.get(str(s.peer_id), 0.0))]
        hosts = reachable or hosts
        known = [tps for tps in map(block_throughput, hosts) if tps]
        default = sum(known) / len(known) if known else 1.0
        weights = [(block_throughput(s) or default) / (1 + max(in_flight.get(str(s.peer_id), 0), 0)) for s in hosts]
        chosen = hosts[_pick(weights, draw.random())]
        j = min(chosen.record.end, end)
        steps.append(RouteStep(chosen.peer_id, i, j, chosen.record.max_chunk_tokens))
        i = j
    return steps


def _pick(weights: Sequence[float], u: float) -> int:
    """The index that a uniform draw `u` in [0, 1) selects with probability proportional to its weight (never an
    error, unlike random.choices, whatever throughput a record announces)."""
    target, total = u * sum(weights), 0.0
    for index, weight in enumerate(weights):
        total += weight
        if target < total:
            return index
    return len(weights) - 1
