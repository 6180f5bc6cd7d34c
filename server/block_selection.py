"""Which blocks a server should host, and when it should move: pure functions of the swarm's current coverage.

Coverage counts servers per block (every server weighs the same: measured speeds on shared machines are too noisy
to steer moves by). Balance is judged leximin: the least-served block first, then the next, so a move that fills a
hole always beats one that only evens things out, and every move makes the sorted coverage strictly better, which
rules out servers moving back and forth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarm.config import ServerConfig


def coverage(num_blocks: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many servers host each block."""
    counts = [0] * num_blocks
    for start, end in spans:
        for index in range(max(start, 0), min(end, num_blocks)):
            counts[index] += 1
    return counts


def choose_span(num_blocks: int, span_length: int, spans: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The window of `span_length` blocks that covers the least-served blocks.

    Windows are ranked by the coverage of their least-covered block, then by their total coverage,
    then by position (earliest first), so an empty swarm fills from block 0 onwards.
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"cannot host {span_length} blocks of a model with {num_blocks}")
    counts = coverage(num_blocks, spans)
    best = min(range(num_blocks - span_length + 1),
               key=lambda s: (min(counts[s : s + span_length]), sum(counts[s : s + span_length]), s))
    return best, best + span_length


@dataclass(frozen=True)
class HostedSpan:
    """One online server as the rebalancing policy sees it."""

    peer_id: str
    start: int
    end: int
    movable: bool = True  # it rebalances (started with --num-blocks); a --blocks server stays where it is


@dataclass(frozen=True)
class Move:
    peer_id: str
    start: int  # the span to move to
    end: int
    reason: str = ""


def best_move(num_blocks: int, servers: Sequence[HostedSpan]) -> Move | None:
    """The single move that improves the swarm's coverage most, or None.

    Only a movable server whose every block is also hosted by another server may move (the swarm never loses a
    block while it does), and only to the window choose_span gives it among the others. Equal outcomes go to the
    smallest peer id, so servers that see the same swarm agree on who moves and the others wait.
    """
    counts = coverage(num_blocks, [(s.start, s.end) for s in servers])
    best_after, best = sorted(counts), None
    for server in sorted(servers, key=lambda s: s.peer_id):  # on equal outcomes the first (smallest id) stays best
        if not server.movable or min(counts[server.start : server.end]) < 2:
            continue
        others = [s for s in servers if s is not server]
        start, end = choose_span(num_blocks, server.end - server.start, [(s.start, s.end) for s in others])
        if (start, end) == (server.start, server.end):
            continue
        after = sorted(coverage(num_blocks, [*((s.start, s.end) for s in others), (start, end)]))
        if after > best_after:
            best_after, best = after, Move(server.peer_id, start, end)
    return best


def plan_rebalance(num_blocks: int, servers: Sequence[HostedSpan]) -> list[Move]:
    """The moves, one at a time, that best_move would make if every server followed it on an unchanging swarm.

    Each move strictly improves the sorted coverage, so the plan is finite; four moves per server only bound the work.
    """
    state = list(servers)
    moves: list[Move] = []
    for _ in range(4 * len(state)):
        move = best_move(num_blocks, state)
        if move is None:
            break
        moves.append(move)
        state = apply_moves(state, [move])
    return moves


def apply_moves(servers: Sequence[HostedSpan], moves: Sequence[Move]) -> list[HostedSpan]:
    """The servers after `moves`, in order."""
    state = list(servers)
    for move in moves:
        state = [HostedSpan(s.peer_id, move.start, move.end, s.movable) if s.peer_id == move.peer_id else s
                 for s in state]
    return state


def decide_move(num_blocks: int, me: str, servers: Sequence[HostedSpan],
                balance_margin: float = ServerConfig.balance_margin) -> Move | None:
    """Whether the server `me` (one of `servers`) should move now, and where.

    It moves when it makes the first move of plan_rebalance and that plan either gives a server to blocks that have
    none, or raises the coverage of the least-served block by more than a factor of 1 + `balance_margin` (moving
    costs a reload, so small gains are not worth it). Everyone else waits for that move and checks again.
    """
    plan = plan_rebalance(num_blocks, servers)
    if not plan or plan[0].peer_id != me:
        return None
    before = coverage(num_blocks, [(s.start, s.end) for s in servers])
    final = coverage(num_blocks, [(s.start, s.end) for s in apply_moves(servers, plan)])
    holes = [i for i, count in enumerate(before) if count == 0]
    if holes:
        if final.count(0) >= len(holes):
            return None
        reason = f"blocks {_ranges(holes)} have no server"
    elif min(final) > min(before) * (1 + balance_margin):
        reason = (f"coverage is uneven: the least-served blocks have {min(before)} server(s), and "
                  f"{len(plan)} move(s) would give them {min(final)}")
    else:
        return None
    return Move(me, plan[0].start, plan[0].end, reason)


def _ranges(indices: Sequence[int]) -> str:
    """[3, 4, 5, 8] -> '3:6, 8:9'"""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ", ".join(f"{a}:{b}" for a, b in ranges)
