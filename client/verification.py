"""Spot checks in action (the policy is client.spot_checks): send a sampled span request to other replicas, compare,
ban the server the majority outvotes for the client's lifetime and name it in a warning.

A forward is checked by sending the same request to the replica. A generation step needs the replica to hold the
same KV history: the check opens a fresh session there and replays every input the checked stream took (kept for
recovery already, with the same reorders of the cached rows), so a check at step t costs t steps of upload and compute
on the replica, one message each, and a short-lived session of that length; with a share f of the steps checked,
about f * n^2 / 2 extra steps over an n-step session (bench/spot_checks.py measures the bytes). Backwards are not
checked: their inputs (a training stream's kept activations, delta-coded rows) are not what a replica could be sent
as they are, and a wrong gradient misleads a training run without spoiling what the client is served.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from hivemind.proto import runtime_pb2

from client.requests import SpanCall
from client.routing import RouteStep
from client.spot_checks import agreement, judge, relative_error, replicas, sampled, tolerance
from client.streams import SpanStream
from swarm.errors import RemoteError
from swarm.tensors import Traffic, decoded

if TYPE_CHECKING:
    from client.connection import SwarmConnection
    from client.requests import Additions

logger = logging.getLogger(__name__)
Output = torch.Tensor | runtime_pb2.Tensor  # packed: as a server's reply carried it


@dataclass(frozen=True)
class Conviction:
    """A server banned by a spot check: its peer id, how far its output was from the majority's, the kind of request
    and how many span requests this client had considered for a check when it was caught."""

    peer: str
    error: float
    kind: str
    request: int


@dataclass(frozen=True)
class Checked:
    """The outcome of a check: the step whose output stands (the checked one, unless it was outvoted) and that
    output; `outvoted`: the peers banned by it."""

    step: RouteStep
    output: Output
    outvoted: tuple[str, ...] = ()


class SpotChecks:
    """One client's spot checks: its draws (`rng`, seed it to repeat them), what they cost and whom they convicted."""

    def __init__(self, connection: SwarmConnection):
        self.connection = connection
        self.rng = random.Random()
        self.requests = 0  # span requests considered (sampled or not)
        self.checks = 0  # of them, checked
        self.traffic = Traffic()  # what the checks sent and received (also counted in the connection's traffic)
        self.convictions: list[Conviction] = []

    def sample(self, fraction: float) -> bool:
        """Whether the next span request is checked."""
        self.requests += 1
        return fraction > 0 and sampled(self.rng.random(), fraction)

    async def forward(self, step: RouteStep, call: SpanCall, output: torch.Tensor, input_codecs: Sequence[str] = (),
                      adapter: str | None = None) -> Checked:
        """Check a forward's `output` of `step` by sending `call` to replicas; `input_codecs`: the encodings by which
        the checked server's input may have differed from `call`'s (a training stream's delta-coded rows)."""
        async def rerun(replica: RouteStep) -> Output:
            (result,) = await self.connection.call("forward", replica, call, traffic=self.traffic)
            return result

        return await self._check("forward", step, output, rerun, call.meta.reply_codec, input_codecs, adapter=adapter)

    async def session_step(self, step: RouteStep, output: runtime_pb2.Tensor,
                           steps: Sequence[tuple[list, list[int]]], batch_size: int, max_length: int,
                           additions: Additions) -> Checked:
        """Check a generation step's `output` of `step` by replaying the stream's `steps` ((inputs, reorder) each, the
        checked one last) into a fresh session on replicas."""
        async def rerun(replica: RouteStep) -> Output:
            stream = SpanStream(self.connection, replica, batch_size, max_length, additions)
            try:
                await stream.open()
                for inputs, rows in steps:
                    stream.submit(inputs, (), rows)
                    result, _ = await stream.result(inputs)
                return result
            finally:
                await stream.close()
                self.traffic += stream.traffic

        tokens = batch_size * max_length
        return await self._check("generation step", step, output, rerun, additions.codecs.reply("inference"),
                                 adapter=additions.adapter or None, session_tokens=tokens, batch_size=batch_size)

    async def _check(self, kind: str, step: RouteStep, output: Output, rerun: Callable[[RouteStep], Awaitable[Output]],
                     reply_codec: str, input_codecs: Sequence[str] = (), adapter: str | None = None,
                     session_tokens: int = 0, batch_size: int = 0) -> Checked:
        self.checks += 1
        request = self.requests
        servers = await asyncio.to_thread(self.connection.servers)  # a DHT read: never on the client's loop
        rules = dict(banned=self.connection.banned(), choice=self.connection.choice, adapter=adapter,
                     compatibility=self.connection.compatibility, session_tokens=session_tokens, batch_size=batch_size)
        candidates = replicas(servers, step.start, step.end, {str(step.peer_id)}, rules)
        self.rng.shuffle(candidates)
        dtype = {str(s.peer_id): s.record.torch_dtype for s in servers}
        quant = {str(s.peer_id): s.record.quant for s in servers}
        steps, outputs = [step], [decoded(output)]
        for server in candidates:
            replica = RouteStep(server.peer_id, step.start, step.end, server.record.max_chunk_tokens)
            try:
                result = decoded(await rerun(replica))
            except RemoteError as exc:  # it could not answer: that says nothing about the output checked
                logger.debug("spot check of %s on %s failed (%s); trying another replica", step.peer_id, replica.peer_id, exc)
                continue
            steps.append(replica)
            outputs.append(result)
            peers = [str(s.peer_id) for s in steps]
            errors = [[relative_error(a, b) for b in outputs] for a in outputs]
            tolerances = [[tolerance(reply_codec, (dtype.get(p, ""), dtype.get(q, "")), input_codecs,
                                     (quant.get(p, "unknown"), quant.get(q, "unknown"))) for q in peers] for p in peers]
            agree = agreement(errors, tolerances)
            if len(steps) == 2 and agree[0][1]:
                return Checked(step, output)
            if len(steps) == 3:
                return self._act(kind, request, steps, output, outputs, errors, judge(agree))
        if len(steps) > 1:
            logger.warning("spot check of blocks %d:%d: server %s and %s disagree (relative error %.3g) and no third "
                           "replica could decide; nobody is banned", step.start, step.end, steps[0].peer_id,
                           steps[1].peer_id, relative_error(outputs[0], outputs[1]))
        else:
            logger.debug("spot check of %s skipped: no other server hosts blocks %d:%d", step.peer_id, step.start, step.end)
        return Checked(step, output)

    def _act(self, kind: str, request: int, steps: list[RouteStep], output: Output, outputs: list[torch.Tensor],
             errors: list[list[float]], verdict) -> Checked:
        if not verdict.decided:
            logger.warning("spot check of blocks %d:%d: servers %s all disagree; nobody is banned", steps[0].start,
                           steps[0].end, [str(s.peer_id) for s in steps])
            return Checked(steps[0], output)
        outvoted = []
        for index in verdict.outvoted:
            peer = str(steps[index].peer_id)
            error = min(errors[index][j] for j in verdict.majority)
            self.connection.ban_for_session(peer)
            self.convictions.append(Conviction(peer, error, kind, request))
            outvoted.append(peer)
            logger.warning("spot check: server %s returned a wrong %s output for blocks %d:%d (relative error %.3g from "
                           "the majority of %d replicas); banned for this client's lifetime", peer, kind,
                           steps[index].start, steps[index].end, error, len(steps))
        if 0 in verdict.majority:
            return Checked(steps[0], output, tuple(outvoted))
        stands = verdict.majority[0]
        return Checked(steps[stands], outputs[stands], tuple(outvoted))
