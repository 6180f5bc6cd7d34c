"""Inference sessions: one KV-cached stream per route step, and the history needed to rebuild them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import torch
from hivemind.proto import runtime_pb2

from client import aio
from client.config import CLIENT, ClientConfig
from client.connection import SwarmConnection
from client.failover import Attempt, full_servers, with_failover
from client.limits import length_chunks, route_limit
from client.requests import Additions, Codecs
from client.streams import SpanStream, relayed
from swarm.config import MAX_UNARY_PAYLOAD_BYTES
from swarm.errors import RemoteError
from swarm.forwarding import HopTarget, forward_chain, forwarding_pays, forwarding_setting
from swarm.tensors import Traffic, unpack_tensor

logger = logging.getLogger(__name__)


class InferenceSession:
    """Sends new tokens' hidden states through a chain of servers that keep the past in their KV caches. The streams
    open on the first step (when the batch size is known)."""

    def __init__(self, connection: SwarmConnection, max_length: int, start: int = 0, end: int | None = None,
                 batch_size: int | None = None, additions: Additions | None = None, forwarding: bool | str | None = None,
                 config: ClientConfig | None = None):
        self.connection, self.max_length = connection, max_length
        self.config = config if config is not None else getattr(connection, "config", CLIENT)
        # What the client adds (LoRA, a hosted adapter, deep prompts, codecs); LoRA values are copied when the
        # streams open, so a session keeps the adapter it started with.
        self.additions = additions if additions is not None else Additions(Codecs.uncompressed(), first_block=start)
        # Each server pushes its output straight to the next one (swarm.forwarding) instead of returning it here to be
        # sent on; any failure falls back to the client sending that hop's step itself. True, False or "auto" (decided
        # at every step from the measured round trips to the route's servers; `forwards` says what the last step did).
        self.forwarding = forwarding_setting(self.config.forwarding if forwarding is None else forwarding)
        self.forwards: bool | None = None
        self.virtual_tokens = 0  # shallow prompt tokens this session holds before the caller's tokens
        self.start, self.end = start, connection.num_blocks if end is None else end
        self.batch_size = batch_size
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed so far
        self.token_ids: torch.Tensor | None = None  # the last generate() output, kept by the model class
        self.closed = False
        self.recoveries: list[float] = []  # seconds each move of a failed span took (re-route, replay, retry)
        # Beam search: the reorder of the cached rows that each step done carried ([] for none), replayed with the
        # history on a replacement server so its cache ends the same; and the one the next step carries.
        self.reorders: list[list[int]] = []
        self._next_reorder: list[int] = []

    async def _open_route(self, start: int, end: int, batch_size: int, tried: Sequence[Attempt] = ()) -> list[SpanStream]:
        """Open streams along a planned route for blocks [start, end), leaving out the servers that said during
        these tries that they are full; a failure to open one is marked `opening` (client.failover: a crashed
        server's record outlives it, and is passed over once without using a retry)."""
        route = await self.connection.aplan(start, end, self.additions.adapter or None,
                                            session_tokens=batch_size * self.max_length,
                                            batch_size=batch_size, full=full_servers(tried))
        streams = [SpanStream(self.connection, step, batch_size, self.max_length, self.additions) for step in route]
        try:
            for stream in streams:
                await stream.open()
            return streams
        except BaseException as exc:
            await _close(streams)
            if isinstance(exc, RemoteError):
                exc.opening = True
            raise

    async def _open(self, batch_size: int) -> None:
        tried: list[Attempt] = []
        self.streams = await with_failover(self.connection, f"opening blocks {self.start}:{self.end} failed",
                                           lambda _: self._open_route(self.start, self.end, batch_size, tried),
                                           self.config.max_retries, tried)
        logger.debug("opened inference session through %s", [(str(s.step.peer_id)[-6:], s.step.start, s.step.end) for s in self.streams])

    async def _step(self, tensors: list[torch.Tensor], hypo_ids: list[int]) -> torch.Tensor:
        step_bytes = sum(t.numel() * t.element_size() for t in tensors)
        inputs: list = list(tensors)  # of the stream at `index`; its hidden states may be a server's packed output
        index, pushed, chain_end = 0, False, 0  # streams index+1..chain_end were named in a forwarded step
        forwards = self._forwards_now()
        while index < len(self.streams):
            stream = self.streams[index]
            try:
                result = await self._pushed_result(index, inputs) if pushed else None
                if result is None:  # the client sends this hop itself, naming the later hops that take pushes
                    forward = forward_chain(self._targets(), index, step_bytes, MAX_UNARY_PAYLOAD_BYTES) if forwards else []
                    stream.submit(inputs, forward, hypo_ids)
                    chain_end = index + len(forward)
                    result = await stream.result(inputs)
                output, reply = result
            except RemoteError as exc:
                # A server that is gone, or that ended the session to make room for another peer (or has no room
                # for this step), is replaced; any other refusal (bad input) is the server's answer.
                if not (exc.server_gone or exc.server_full):
                    raise
                output, count = await self._recover(index, inputs, hypo_ids, exc)
                index, pushed = index + count, False
            else:
                if await self._outvoted(index, output, hypo_ids):
                    # Every later stream took its wrong outputs as inputs, so their KV caches are wrong too: all of
                    # them move to new servers, the first one's history replayed (this step's inputs sent after it).
                    self.streams[index].history.pop()
                    output, count = await self._recover(index, inputs, hypo_ids, None, through=len(self.streams))
                    index, pushed = index + count, False
                else:
                    pushed = self._pushes_on(index, chain_end, reply)
                    index += 1
            inputs = [_input_for(output, self.streams[index] if index < len(self.streams) else None), *tensors[1:]]
        return inputs[0]  # decoded: no stream follows

    def _forwards_now(self) -> bool:
        """Whether this step is forwarded: the setting, or with "auto" the measured round trips' verdict (logged when
        it changes)."""
        if self.forwarding != "auto":
            return bool(self.forwarding)
        pings = self.connection.pings
        forwards = len(self.streams) > 1 and forwarding_pays([pings.get(str(s.step.peer_id)) for s in self.streams],
                                                             self.config.forwarding_min_rtt_ms)
        if forwards != self.forwards:
            logger.info("forwarding %s for this session's steps (round trips to its servers: %s ms; auto turns it on "
                        "from %.1f ms)", "on" if forwards else "off",
                        ", ".join(f"{pings.get(str(s.step.peer_id), float('nan')):.1f}" for s in self.streams),
                        self.config.forwarding_min_rtt_ms)
        self.forwards = forwards
        return forwards

    def _pushes_on(self, index: int, chain_end: int, reply) -> bool:
        """Whether stream `index`'s server pushed this step on to the next stream (which then gets no message from
        here); a push that failed makes the client send the next hop itself, from now on."""
        if index < chain_end and not reply.forwarded:
            following = self.streams[index + 1]
            following.accepts_pushes = False  # the client sends it its steps from now on
            logger.info("server %s could not push to %s (%s); sending that hop from the client instead",
                        str(self.streams[index].step.peer_id)[-6:], str(following.step.peer_id)[-6:],
                        reply.forward_error[:200])
        return index < chain_end and reply.forwarded

    async def _pushed_result(self, index: int, inputs: list) -> tuple[runtime_pb2.Tensor, object] | None:
        """The result of stream `index` for the step its previous server pushes to it, or None if that server reports
        that the push failed (its reply went before the push): the client then sends the step itself. Should the push
        have arrived after all, the server takes the step once and ignores the copy."""
        pusher, stream = self.streams[index - 1], self.streams[index]
        result = asyncio.ensure_future(stream.result(inputs))
        failure = asyncio.ensure_future(pusher.push_failed(pusher.step_id - 1))
        try:
            await asyncio.wait({result, failure}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failure.cancel()
            result.cancel()  # a no-op when the result came
        with contextlib.suppress(asyncio.CancelledError):
            return await result
        stream.accepts_pushes = False  # the client sends it its steps from now on
        logger.info("server %s could not push step %d to %s (%s); sending that hop from the client instead",
                    str(pusher.step.peer_id)[-6:], pusher.step_id - 1, str(stream.step.peer_id)[-6:], failure.result()[:200])
        return None

    def _targets(self) -> list[HopTarget]:
        return [HopTarget(str(s.step.peer_id), s.session_id, s.step_id, s.codec, s.accepts_pushes) for s in self.streams]

    async def _outvoted(self, index: int, output: runtime_pb2.Tensor, hypo_ids: list[int]) -> bool:
        """Whether a spot check of this step (if sampled: config.verify_fraction) outvoted the server of stream
        `index`, which is then banned (client.verification replays the stream's history on replicas)."""
        stream = self.streams[index]
        if not self.config.verify_fraction or not self.connection.spot_checks.sample(self.config.verify_fraction):
            return False  # (off by default: nothing of the checks is touched)
        steps = list(zip(stream.history, [*self.reorders, hypo_ids], strict=True))  # its history ends with this step
        checked = await self.connection.spot_checks.session_step(stream.step, output, steps, stream.batch_size,
                                                                 stream.max_length, self.additions)
        return str(stream.step.peer_id) in checked.outvoted

    async def _recover(self, index: int, inputs: list, hypo_ids: list[int], error: RemoteError | None,
                       through: int | None = None) -> tuple[runtime_pb2.Tensor, int]:
        """Replace the failed stream `index` (and those up to `through`) by a route of other servers for their blocks:
        open sessions there, replay every input the first one took (one message each, as first sent, with the same
        reorders of the cached rows, so the new KV caches hold exactly the same values), then send `inputs`. Returns
        the packed output and how many streams took their place. `error`: the failure that brought us here (None:
        a spot check, whose server is banned already)."""
        replaced = self.streams[index : index + 1 if through is None else through]
        failed = replaced[0]
        start, end, history = failed.step.start, replaced[-1].step.end, failed.history
        began = time.perf_counter()
        await _close(replaced)
        tried: list[Attempt] = []

        async def attempt(number: int) -> tuple[runtime_pb2.Tensor, list[SpanStream]]:
            if number == 0 and error is not None:  # the failure that brought us here
                raise error
            streams = await self._open_route(start, end, failed.batch_size, tried)
            try:
                for past, rows in zip([*history, inputs], [*self.reorders, hypo_ids], strict=True):
                    hidden = past[0]
                    for i, stream in enumerate(streams):
                        step = [_input_for(hidden, stream) if i else hidden, *past[1:]]
                        stream.submit(step, (), rows)
                        hidden, _ = await stream.result(step)
            except BaseException:
                await _close(streams)
                raise
            return hidden, streams

        hidden, streams = await with_failover(self.connection, f"blocks {start}:{end} failed and could not be moved",
                                              attempt, self.config.max_retries, tried)
        self.streams[index : index + len(replaced)] = streams
        self.recoveries.append(time.perf_counter() - began)
        logger.info("blocks %d:%d moved to %s after %s; replayed %d steps in %.2f s", start, end,
                    [str(s.step.peer_id)[-6:] for s in streams], "a failure" if error is not None else "a spot check",
                    len(history), self.recoveries[-1])
        return hidden, len(streams)

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens [batch, length, hidden] through every block; returns the last block's output, on `hidden`'s
        device and in its dtype (the hidden states travel from host memory)."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, length, _ = hidden.shape
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"session is for batch size {self.batch_size}, got {batch}")
        if self.position + length > self.max_length:
            raise ValueError(
                f"the session holds {self.position} tokens and max_length={self.max_length}: {length} more do not fit. "
                "Open the session with a larger max_length"
            )
        if position_ids is None:
            position_ids = torch.arange(self.position, self.position + length).expand(batch, length)
        tensors = [hidden.detach().to("cpu"), position_ids.expand(batch, length).to("cpu", torch.int64).contiguous()]
        if attention_mask is not None:
            tensors.append(attention_mask.to("cpu", torch.int64).contiguous())
        if not self.streams:
            aio.run(self._open(batch))
        # A long prompt goes in pieces that every server of the route takes (their KV caches make it one step).
        outputs = []
        for piece in length_chunks(batch, length, route_limit([stream.step for stream in self.streams])):
            rows, self._next_reorder = self._next_reorder, []  # a reorder goes with the first piece
            outputs.append(aio.run(self._step([t[:, piece] for t in tensors], rows)))
            self.reorders.append(rows)
        output = torch.cat(outputs, dim=1)
        self.batch_size = batch
        self.position += length
        return output.to(hidden.device, hidden.dtype)

    def reorder(self, hypo_ids: Sequence[int] | torch.Tensor) -> None:
        """Beam search: from the next step on, every server's cached row i is the current row hypo_ids[i] (a row may
        be kept twice, another dropped). The reorder travels with the next step, as Petals' hypo ids do."""
        rows = [int(i) for i in (hypo_ids.flatten().tolist() if isinstance(hypo_ids, torch.Tensor) else hypo_ids)]
        if self.position == 0:
            return  # nothing is cached yet: there is nothing to reorder (as transformers' caches do)
        if len(rows) != self.batch_size or not all(0 <= i < self.batch_size for i in rows):
            raise ValueError(f"a reorder names one of the session's {self.batch_size} rows for each row; got {rows[:16]}")
        if self._next_reorder:  # two reorders before a step: the second picks among the rows of the first
            rows = [self._next_reorder[i] for i in rows]
        self._next_reorder = [] if rows == list(range(len(rows))) else rows

    @property
    def traffic(self) -> Traffic:
        """Bytes of hidden states this session sent and received over all its hops, raw and on the wire."""
        total = Traffic()
        for stream in self.streams:
            total += stream.traffic
        return total

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        aio.run(_close(self.streams))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _input_for(output: runtime_pb2.Tensor, stream: SpanStream | None) -> runtime_pb2.Tensor | torch.Tensor:
    """A server's packed output as the input of `stream` (see `relayed`), or decoded when no stream follows."""
    return relayed(output, stream.codec) if stream is not None else unpack_tensor(output, "server output")


async def _close(streams: Sequence[SpanStream]) -> None:
    for stream in streams:
        await stream.close()
