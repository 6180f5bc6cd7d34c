"""How a client's requests fit what servers take per request (the limits their records announce): pure functions,
and the forward that runs through inference sessions when one sequence is longer than a request may hold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from client.routing import RouteStep, ServerChoice, exclusion
from swarm.dht_records import ServerInfo


@dataclass(frozen=True)
class RequestLimits:
    max_chunk_tokens: int  # batch x length of one request
    max_batch_size: int | None = None  # None: no server announced one


def announced_limits(servers: Sequence[ServerInfo], start: int, end: int, max_chunk_tokens: int, *,
                     choice: ServerChoice = ServerChoice(), adapter: str | None = None) -> RequestLimits:
    """The smallest limits among the servers that may run any of blocks [start, end) for this client (online, allowed,
    hosting `adapter` if one is named), and the client's own `max_chunk_tokens`: a request within them fits any
    route, a replacement replica's included."""
    candidates = [s.record for s in servers if s.record.start < end and start < s.record.end
                  and exclusion(s, choice=choice, adapter=adapter) is None]
    batch = min((r.max_batch_size for r in candidates), default=None)
    return RequestLimits(min([max_chunk_tokens, *(r.max_chunk_tokens for r in candidates)]), batch)


def route_limit(steps: Sequence[RouteStep]) -> int | None:
    """The tokens per request every server of a route takes, as planned (None: none of them announced a limit)."""
    return min((s.max_chunk_tokens for s in steps if s.max_chunk_tokens is not None), default=None)


def split_batch(batch: int, length: int, max_chunk_tokens: int, max_batch_size: int | None = None) -> list[slice]:
    """Chunks of whole sequences, each within the per-request token limit (and batch size), of nearly equal size, to
    travel the route concurrently. Splitting further to pipeline a batch that fits in one request was measured slower
    when the servers share the client's cores (SmolLM2 step 1.77x local against 1.62x)."""
    per_chunk_limit = max(1, min(max_chunk_tokens // max(length, 1), max_batch_size or batch))
    chunks = min(batch, math.ceil(batch / per_chunk_limit))
    size = math.ceil(batch / max(chunks, 1))
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)] or [slice(0, 0)]


def length_chunks(batch: int, length: int, max_chunk_tokens: int | None) -> list[slice]:
    """Consecutive pieces of an inference step's new tokens, each of at most `max_chunk_tokens` (batch x length), to
    send one after another: the servers' KV caches make their outputs, joined, those of the whole step."""
    if max_chunk_tokens is None or batch * length <= max_chunk_tokens:
        return [slice(0, length)]
    per_piece = max_chunk_tokens // batch
    if per_piece < 1:
        raise ValueError(f"a batch of {batch} sequences exceeds the {max_chunk_tokens} tokens per request that a server "
                         "of this session's route takes: use a smaller batch")
    return [slice(i, min(i + per_piece, length)) for i in range(0, length, per_piece)]


def forward_needs_session(length: int, limits: RequestLimits, needs_grad: bool) -> bool:
    """Whether a forward of sequences of `length` tokens must run through an inference session in length chunks
    (exact, thanks to the KV caches, but without gradients): when one sequence exceeds the tokens per request.
    A forward that needs gradients cannot be split so and is refused here, naming the limit."""
    if length <= limits.max_chunk_tokens:
        return False
    if needs_grad:
        raise ValueError(
            f"a sequence of {length} tokens exceeds the {limits.max_chunk_tokens} tokens per request allowed here (the "
            "smallest max_chunk_tokens among these blocks' servers, as their records announce, and this client's), and a "
            f"forward with gradients cannot be split by length: train on sequences of at most {limits.max_chunk_tokens} "
            "tokens, or use servers started with a larger --max-chunk-tokens (allowed_servers / blocked_servers)")
    return True


def forward_in_sessions(layers, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        limits: RequestLimits) -> torch.Tensor:
    """A no-grad forward of `layers` (a RemoteSequential) through a temporary inference session per chunk of the batch,
    each step sent in length chunks: equal to one forward (its hidden states go in the inference codec)."""
    batch, length, _ = hidden.shape
    outputs = []
    for where in split_batch(batch, 1, limits.max_chunk_tokens, limits.max_batch_size):
        with layers.inference_session(max_length=length, batch_size=where.stop - where.start) as session:
            mask = attention_mask[where] if attention_mask is not None else None
            outputs.append(session.step(hidden[where], position_ids[where], mask))
    return torch.cat(outputs, dim=0).to(hidden.device, hidden.dtype)
