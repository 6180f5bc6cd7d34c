"""Which blocks a server should host: a pure function of the swarm's current coverage."""

from __future__ import annotations

from collections.abc import Sequence


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
    best = min(
        range(num_blocks - span_length + 1),
        key=lambda s: (min(counts[s : s + span_length]), sum(counts[s : s + span_length]), s),
    )
    return best, best + span_length
