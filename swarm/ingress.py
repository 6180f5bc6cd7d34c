"""What a server's peers make it hold before any handler runs: every request is charged to a budget on arrival.

Unguarded, a stream message is read whole however long it says it is (a 1 GiB message would be in memory before
anyone looked at it), five of them ahead of the handler per stream, for any number of streams; and a unary request
is held in several copies (the daemon's message, its bytes, the parsed envelope, the parsed request, its tensors) for
as long as its handler runs. So a server's P2P serves through an `Ingress`: a unary request is charged
`UNARY_COPIES` times its size before its payload is parsed, for as long as its handler runs; a stream message
(swarm.stream_end reads them) longer than `max_message_bytes` is refused before its body is read, and a shorter one
is charged `STREAM_COPIES` times its size before it is read, until its handler asks for the next message (or, for
handlers that keep every message of a request, until the stream ends). The charge goes to a `Gate` (the server's
in-flight budget, shared fairly among peers), which refuses a peer over its share with a clear error, so nothing
unbudgeted piles up however many ids or streams a peer uses. Memory held only inside one synchronous stretch of
code (parsing, one request at a time) and the compute thread's working memory for the one request it runs are
outside the charges, bounded per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from hivemind.p2p import P2PContext

from swarm.errors import LimitReached

logger = logging.getLogger(__name__)

# Copies of a unary request alive while its handler runs: the daemon connection's message, its payload bytes, the
# parsed envelope (a sealed one; an open swarm's request itself), the parsed request and its decoded tensors.
UNARY_COPIES = 5
# Copies of a stream message alive until its handler is done with it: its bytes as read, the parsed message, the
# parsed request inside a sealed envelope and its decoded tensors.
STREAM_COPIES = 4


class Gate(Protocol):
    """A budget that charges can be admitted to (server.compute_queue.FairCompute implements it)."""

    def admit(self, ticket: Ticket) -> None:
        """Hold `ticket.nbytes` for `ticket.peer` until release(ticket), or raise a SwarmError saying why not. The
        budget may end the ticket later to make room for a peer that holds less: it calls `ticket.end(reason)`."""

    def release(self, ticket: Ticket) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One charge: `nbytes` held for `peer`. Whoever holds the charged memory learns of an eviction through
    `on_end` (a queued request is dropped, a stream fails at its next read)."""

    peer: str
    nbytes: int
    ended: str | None = None  # why the budget ended this charge
    on_end: list[Callable[[str], None]] = field(default_factory=list)

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            for callback in self.on_end:
                callback(reason)

    def check(self) -> None:
        if self.ended is not None:
            raise LimitReached(self.ended)


@dataclass(frozen=True)
class AdmittedContext(P2PContext):
    """A handler's context with the charge of its unary request (None for a stream's handler)."""

    ticket: Ticket | None = None


@dataclass
class Ingress:
    """A server's admission of what its peers send: the budget charged, the longest stream message, and the stream
    handlers (by the end of their name) that keep every message of a request until it ends."""

    gate: Gate
    max_message_bytes: int
    keeps_messages: Collection[str] = ()

    def charge(self, peer: str, nbytes: int) -> Ticket:
        ticket = Ticket(peer, nbytes)
        self.gate.admit(ticket)
        return ticket

    def unary(self, handler, size: Callable[[object], int]):
        """`handler` (request, context) whose request is charged UNARY_COPIES times `size(request)` first."""

        async def admitted(request, context: P2PContext):
            ticket = self.charge(str(context.remote_id), UNARY_COPIES * size(request))
            try:
                context = AdmittedContext(context.handle_name, context.local_id, context.remote_id, ticket)
                return await handler(request, context)
            except asyncio.CancelledError:
                # The caller gave up (hivemind cancels the handler). A unary handler's task that ends cancelled stays
                # in hivemind's table of handler tasks for good, with the frames its error holds (the request and its
                # tensors): ending with an error instead, hivemind answers (nobody listens) and forgets it.
                raise ConnectionAbortedError("the caller cancelled the request") from None
            finally:
                self.gate.release(ticket)

        return admitted
