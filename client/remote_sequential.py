"""RemoteSequential: the model's transformer blocks, run by the swarm, differentiable w.r.t. their input."""

from __future__ import annotations

import asyncio
import functools
import logging
import warnings
import weakref
from collections import Counter

import torch
from torch import nn

from client import aio
from client.config import ClientConfig
from client.connection import SwarmConnection
from client.delta_client import ClientDelta
from client.failover import full_servers, with_failover
from client.inference_session import InferenceSession
from client.limits import RequestLimits, announced_limits, forward_in_sessions, forward_needs_session, split_batch
from client.requests import Additions, Codecs, SpanCall, span_call
from client.routing import NoRouteError, RouteStep
from swarm.compression.delta import row_keys
from swarm.config import MAX_UNARY_PAYLOAD_BYTES
from swarm.errors import RemoteError
from swarm.tensors import decoded, unpack_tensor

logger = logging.getLogger(__name__)


def _extras(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, where: slice) -> list[torch.Tensor]:
    """A chunk's positions and mask (if any): what each span request sends after the hidden states."""
    return [position_ids[where]] + ([] if attention_mask is None else [attention_mask[where]])


async def _gather(coroutines) -> list:
    return await asyncio.gather(*coroutines)


class _OpenStreams:
    """Training streams waiting for their backward, by (chunk, step start). If the graph is dropped without a
    backward, a finalizer ends them so the servers free the activations at once."""

    def __init__(self):
        self.items: dict = {}
        weakref.finalize(self, _abandon, self.items)


def _abandon(items: dict) -> None:
    if items:
        streams = list(items.values())
        items.clear()
        aio.get_loop().call_soon_threadsafe(lambda: [stream.abandon() for stream in streams])


class _RemoteChain(torch.autograd.Function):
    """Forward through every route step, keeping each step's input on the client for the backward pass. The batch
    travels in chunks, concurrently; the chain's trainable tensors (LoRA, deep prompts) are inputs of the function,
    so autograd hands them their gradients (summed over chunks)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask, chain: RemoteSequential,
                expect_backward: bool, *params):
        limits = chain.request_limits()
        slices = split_batch(hidden.shape[0], hidden.shape[1], limits.max_chunk_tokens, limits.max_batch_size)
        routes = chain.plan_chunks(len(slices), slices[0].stop - slices[0].start)  # per chunk: who ran it (or replaced it)
        base_seed = chain.draw_dropout_seed()
        # The adapter's digest per span, once per call: its backward then uses the tensors its forward used.
        spans = {(step.start, step.end) for route in routes for step in route}
        digests = {span: chain.lora.digest(*span) for span in spans} if chain.lora is not None else {}
        # With a backward to come, each step's forward opens a training stream whose backward reuses its activations.
        keep = chain.config.keep_activations and expect_backward
        streams = _OpenStreams()
        additions = chain.additions()  # one value for the whole call: its backward adds the same
        # The chain's input needs no gradient (the output of a frozen embedding): the first step's backward skips it.
        input_grad = ctx.needs_input_grad[0]

        async def run_chunk(index: int, where: slice):
            h, step_inputs, extras = hidden[where], [], _extras(position_ids, attention_mask, where)
            # Delta coding names each sample by its input row (see swarm.compression.delta).
            keys = row_keys(h, *extras) if keep and chain.delta_coder() else None
            for position, step in enumerate(list(routes[index])):
                step_inputs.append(h)

                async def forward(step: RouteStep, h=h, wants_grad=input_grad or position > 0):
                    """(the step whose output stands, that output): a spot check may replace a lying server's."""
                    call = span_call(additions, step, [h, *extras], seed=base_seed + index,
                                     digest=digests.get((step.start, step.end), ""), input_grad=wants_grad)
                    output, delta_coded = None, ()
                    if keep and chain.fits_one_message(h, step):
                        try:
                            stream, output = await chain.atrain_forward(step, call, keys)
                            streams.items[(index, step.start)] = stream
                            delta_coded = (chain.config.delta_codec, chain.config.activation_codec) if keys else ()
                        except RemoteError as exc:  # e.g. the server's activation memory is full: recompute instead
                            logger.debug("training stream to %s failed (%s); using a plain forward", step.peer_id, exc)
                    if output is None:
                        (output,) = await chain.connection.call("forward", step, call)
                    fraction = chain.config.verify_fraction
                    if not fraction or not chain.connection.spot_checks.sample(fraction):
                        return step, output
                    checked = await chain.connection.spot_checks.forward(step, call, output, delta_coded, chain.adapter)
                    if checked.step != step:  # its training stream would run a backward through wrong activations
                        kept = streams.items.pop((index, step.start), None)
                        if kept is not None:
                            kept.abandon()
                    return checked.step, checked.output

                _, (routes[index][position], h) = await chain.on_replica(step, forward)
            return step_inputs, h

        try:
            results = aio.run(_gather(run_chunk(i, where) for i, where in enumerate(slices)))
        except BaseException:
            _abandon(streams.items)
            raise
        ctx.chain, ctx.routes, ctx.slices, ctx.base_seed, ctx.digests = chain, routes, slices, base_seed, digests
        ctx.additions, ctx.input_grad, ctx.streams = additions, input_grad, streams
        ctx.chunk_inputs = [inputs for inputs, _ in results]
        ctx.position_ids, ctx.attention_mask = position_ids, attention_mask
        return torch.cat([output for _, output in results], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        chain, additions, open_streams = ctx.chain, ctx.additions, ctx.streams.items
        lora, prompts = additions.lora, additions.prompts

        async def step_backward(index: int, step: RouteStep, inputs: list[torch.Tensor], grad, input_grad: bool) -> list:
            """[the input's gradient (a packed slot, to relay to the previous step, or a tensor), if `input_grad`;
            the LoRA and deep-prompt gradients]"""
            stream = open_streams.pop((index, step.start), None)
            if stream is not None:
                try:
                    with chain.connection.in_flight.request(step.peer_id):
                        packed = await stream.backward(grad)
                    params = [unpack_tensor(t, "server gradient") for t in packed[1 if input_grad else 0:]]
                    return ([packed[0]] if input_grad else []) + params
                except RemoteError as exc:  # the server lost it: recompute from the inputs kept here
                    logger.info("training stream to %s failed in backward (%s); recomputing", step.peer_id, exc)
            grad = decoded(grad, "server gradient")

            async def backward(step: RouteStep):
                call = span_call(additions, step, inputs, grad, seed=ctx.base_seed + index,
                                 digest=ctx.digests.get((step.start, step.end), ""), input_grad=input_grad)
                return await chain.connection.call("backward", step, call)

            return (await chain.on_replica(step, backward))[1]

        async def run_chunk(index: int, where: slice, step_inputs: list[torch.Tensor]):
            """(the gradient of the chunk's input, [(each step, its LoRA and deep-prompt gradients)])"""
            grad, extras, param_grads = grad_output[where], _extras(ctx.position_ids, ctx.attention_mask, where), []
            steps = list(enumerate(zip(ctx.routes[index], step_inputs, strict=True)))
            for position, (step, hidden) in reversed(steps):  # the last span first
                wants_grad = ctx.input_grad or position > 0  # as in the forward
                grads = await step_backward(index, step, [hidden, *extras], grad, wants_grad)
                grad = grads.pop(0) if wants_grad else None
                param_grads.append((step, grads))
            return decoded(grad, "server gradient"), param_grads

        chunks = zip(ctx.slices, ctx.chunk_inputs, strict=True)
        try:
            results = aio.run(_gather(run_chunk(i, w, inputs) for i, (w, inputs) in enumerate(chunks)))
        finally:
            _abandon(open_streams)
        grad_input = torch.cat([grad for grad, _ in results], dim=0) if ctx.input_grad else None
        # Summed in chunk order, so that the same batch gives the same gradients.
        lora_sums: dict[str, torch.Tensor] = {}
        deep = torch.zeros_like(prompts.deep) if prompts is not None and prompts.deep is not None else None
        for _, param_grads in results:
            for step, grads in param_grads:
                if deep is not None:
                    blocks = slice(step.start - additions.first_block, step.end - additions.first_block)
                    deep[blocks] += grads.pop()[:, 0].to(deep.device, deep.dtype)
                if lora is not None:
                    for name, value in zip(lora.for_blocks(step.start, step.end)[0], grads, strict=True):
                        lora_sums[name] = lora_sums[name] + value if name in lora_sums else value
        # Gradients come from the wire in host memory; autograd wants each on its parameter's device.
        lora_grads = [lora_sums[name].to(param.device) if name in lora_sums else None
                      for name, param in zip(lora.names, lora.params, strict=True)] if lora is not None else []
        return (grad_input, None, None, None, None, *lora_grads, *([deep] if deep is not None else []))


def _deprecated_setting(name: str) -> property:
    """remote_layers.<name>: reads the config's field; setting it still works, with a DeprecationWarning."""
    def set_value(self, value) -> None:
        warnings.warn(f"setting remote_layers.{name} is deprecated: pass client_config=ClientConfig({name}=...) to "
                      f"from_pretrained, or call remote_layers.configure({name}=...)", DeprecationWarning, stacklevel=2)
        self.configure(**{name: bool(value)})

    return property(lambda self: getattr(self.config, name), set_value)


class RemoteSequential(nn.Module):
    """Blocks [start, end) of a model served by the swarm: hidden states [batch, length, hidden] to the output of
    those blocks, differentiable; `inference_session()` opens KV-cached sessions for generation."""

    def __init__(self, connection: SwarmConnection, start: int = 0, end: int | None = None):
        super().__init__()
        self.connection = connection
        self.config: ClientConfig = connection.config  # replace it (configure) to change settings
        self.start, self.end = start, connection.num_blocks if end is None else end
        self.lora = None  # a client.lora.RemoteLora once an adapter is attached
        self.adapter: str | None = None  # or the name of an adapter that servers host
        self.prompts = None  # a client.prompts.RemotePrompts for prompt tuning
        self.last_routes: list[list[RouteStep]] = []  # the routes the last forward ran, per chunk (failed servers replaced)
        # "delta" (not "none"): training streams send each sample's activations as deltas against the previous
        # epoch's (swarm.compression.delta); the references live here, created on first use.
        self.delta: ClientDelta | None = None

    def configure(self, **changes) -> None:
        """Change some of this chain's settings (fields of client.config.ClientConfig); other models keep theirs."""
        self.config = self.config.replace(**changes)

    @property
    def codecs(self) -> Codecs:
        return Codecs.of(self.config)

    def reply_codec(self, role: str) -> str:
        """The codec servers answer a role's hidden states in (see client.requests.Codecs)."""
        return self.codecs.reply(role)

    def additions(self) -> Additions:
        return Additions(self.codecs, self.lora, self.adapter or "", self.prompts, self.start)

    # Deprecated setters: settings live in the chain's config (from_pretrained(client_config=...), configure()).
    forwarding = _deprecated_setting("forwarding")
    keep_activations = _deprecated_setting("keep_activations")

    def __len__(self) -> int:
        return self.end - self.start

    def plan_chunks(self, chunks: int, batch_size: int = 0) -> list[list[RouteStep]]:
        """A training route per chunk of a batch (of `batch_size` sequences at most), drawn by throughput so that
        concurrent chunks (and calls) spread over the replicas of each span; each counts earlier ones as load."""
        planned: Counter[str] = Counter()
        routes = []
        for _ in range(chunks):
            route = self.connection.plan_training(self.start, self.end, self.adapter, planned, batch_size)
            planned.update(str(step.peer_id) for step in route)
            routes.append(route)
        self.last_routes = routes
        return routes

    def request_limits(self) -> RequestLimits:
        """What every server that may run these blocks takes per request (client.limits), within max_chunk_tokens."""
        return announced_limits(self.connection.servers(), self.start, self.end, self.config.max_chunk_tokens,
                                choice=self.connection.choice, adapter=self.adapter)

    def draw_dropout_seed(self) -> int:
        """A seed for the servers' LoRA dropout masks (from torch's RNG), or 0 when no dropout applies."""
        if self.lora is None or not self.lora.dropout or not self.training:
            return 0
        return int(torch.randint(0, 1 << 62, ()))

    async def on_replica(self, step: RouteStep, call):
        """(the step that answered, `await call(step)`): if the server is gone or full, the same blocks go to another
        server that hosts all of them (client.failover decides); the inputs are the ones kept here, so the result is the
        same."""
        current, tried = step, []  # tried: list[Attempt], whose full servers a replacement leaves out

        async def attempt(number: int):
            nonlocal current
            if number:
                replacement = await self.connection.aplan(step.start, step.end, self.adapter, full=full_servers(tried))
                if len(replacement) != 1:
                    raise NoRouteError(f"no other single server hosts blocks {step.start}:{step.end}")
                current = replacement[0]
            with self.connection.in_flight.request(current.peer_id):  # load that later training routes avoid
                return current, await call(current)

        return await with_failover(self.connection, f"blocks {step.start}:{step.end} failed", attempt,
                                   self.config.max_retries, tried)

    def delta_coder(self) -> ClientDelta | None:
        codec, full = self.config.delta_codec, self.config.activation_codec
        if codec in ("", "none"):
            return None
        if self.delta is None or (self.delta.codec, self.delta.full_codec) != (codec, full):
            self.delta = ClientDelta(codec, full, int(self.config.delta_state_mb * 2**20))
        return self.delta

    async def atrain_forward(self, step: RouteStep, call: SpanCall, keys: list[str] | None = None):
        """(a training stream, for the backward; its forward's output). With `keys` (one per batch row) and a delta
        codec, the hidden states go as deltas against the references both ends hold (in full if the server lacks them)."""
        delta = self.delta_coder() if keys is not None else None
        if delta is None:
            return await self.connection.train_forward(step, call)
        for retried in (False, True):
            info, slots, commit = delta.encode_input(keys, step.start, step.end, call.tensors[0])
            decode = functools.partial(delta.decode_output, info, step.start, step.end)
            try:
                result = await self.connection.train_forward(step, call.with_delta(slots, info), decode)
            except RemoteError as exc:
                if exc.code != "delta_state_missing" or retried:
                    raise
                logger.info("server %s lacks references of delta-coded rows; sending them in full", step.peer_id)
                delta.forget_inputs(keys, step.start, step.end)
                continue
            commit()
            return result

    def fits_one_message(self, hidden: torch.Tensor, step: RouteStep) -> bool:
        """Whether a training stream's messages (one each, not chunked) stay under the unary limit: the largest are the
        forward request and the backward's reply (hidden states, positions, mask, prompts, LoRA or their gradients)."""
        extra = 0
        if self.lora is not None:
            extra += sum(p.numel() * p.element_size() for p in self.lora.for_blocks(step.start, step.end)[1])
        if self.prompts is not None and self.prompts.deep is not None:
            extra += (step.end - step.start) * self.prompts.deep[0].numel() * self.prompts.deep.element_size()
        return hidden.numel() * hidden.element_size() + 16 * hidden.shape[0] * hidden.shape[1] + extra <= MAX_UNARY_PAYLOAD_BYTES

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' output, on `hidden`'s device and in its dtype (the hidden states travel from host memory)."""
        batch, length, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        position_ids = position_ids.expand(batch, length).to("cpu", torch.int64).contiguous()
        if attention_mask is not None:
            attention_mask = None if bool(attention_mask.all()) else attention_mask.to("cpu", torch.int64).contiguous()
        params = list(self.lora.params) if self.lora is not None else []
        if self.prompts is not None and self.prompts.deep is not None:
            params.append(self.prompts.deep)
        expect_backward = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
        limits = self.request_limits()
        host = hidden.to("cpu")  # differentiable, as the move back is: gradients find their way to the device
        if forward_needs_session(length, limits, expect_backward):  # sequences longer than a request may hold
            output = forward_in_sessions(self, host, position_ids, attention_mask, limits)
        else:
            output = _RemoteChain.apply(host, position_ids, attention_mask, self, expect_backward, *params)
        return output.to(hidden.device, hidden.dtype)

    def inference_session(self, max_length: int, batch_size: int | None = None,
                          forwarding: bool | str | None = None) -> InferenceSession:
        """A KV-cached session; `forwarding` (default: the config's) has servers push each step to the next one."""
        return InferenceSession(self.connection, max_length, self.start, self.end, batch_size, self.additions(),
                                forwarding, self.config)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end} of {self.connection.prefix!r} (remote)"
