"""RemoteSequential: the model's transformer blocks, run by the swarm, differentiable w.r.t. their input."""

from __future__ import annotations

import torch
from torch import nn

from client import aio
from client.connection import SwarmConnection
from client.inference_session import InferenceSession
from client.routing import RouteStep


def _span_tensors(hidden, position_ids, attention_mask) -> list[torch.Tensor]:
    tensors = [hidden, position_ids]
    if attention_mask is not None:
        tensors.append(attention_mask)
    return tensors


class _RemoteChain(torch.autograd.Function):
    """Forward through every route step, keeping each step's input on the client for the backward pass.

    The chain's LoRA parameters are inputs of the function, so autograd hands them their gradients.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask, chain: RemoteSequential, *lora_params):
        route = chain.connection.plan(chain.start, chain.end, chain.adapter)
        step_inputs = []
        for step in route:
            step_inputs.append(hidden)
            (hidden,) = chain.call("forward", step, _span_tensors(hidden, position_ids, attention_mask))
        ctx.chain, ctx.route, ctx.step_inputs = chain, route, step_inputs
        ctx.position_ids, ctx.attention_mask = position_ids, attention_mask
        return hidden

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output
        lora = ctx.chain.lora
        lora_grads: list[torch.Tensor | None] = [None] * (len(lora.names) if lora is not None else 0)
        for step, hidden in zip(reversed(ctx.route), reversed(ctx.step_inputs), strict=True):
            tensors = _span_tensors(hidden, ctx.position_ids, ctx.attention_mask) + [grad.contiguous()]
            grad, *step_lora_grads = ctx.chain.call("backward", step, tensors)
            if lora is not None:
                names, _ = lora.for_blocks(step.start, step.end)
                for name, value in zip(names, step_lora_grads, strict=True):
                    lora_grads[lora.index(name)] = value
        return (grad, None, None, None, *lora_grads)


class RemoteSequential(nn.Module):
    """Blocks [start, end) of a model served by the swarm.

    Calling it maps hidden states [batch, length, hidden] to the output of those blocks, with autograd
    support for the input; `inference_session()` opens KV-cached sessions for generation.
    """

    def __init__(self, connection: SwarmConnection, start: int = 0, end: int | None = None):
        super().__init__()
        self.connection = connection
        self.start, self.end = start, connection.num_blocks if end is None else end
        self.lora = None  # a client.lora.RemoteLora once an adapter is attached
        self.adapter: str | None = None  # or the name of an adapter that servers host

    def __len__(self) -> int:
        return self.end - self.start

    def call(self, kind: str, step: RouteStep, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        names, scaling = [], 1.0
        if self.lora is not None:
            names, params = self.lora.for_blocks(step.start, step.end)
            tensors, scaling = [*tensors, *params], self.lora.scaling
        return aio.run(self.connection.span_call(kind, step, [t.detach() for t in tensors], names, scaling,
                                                 self.adapter or ""))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        position_ids = position_ids.expand(batch, length).to(torch.int64).contiguous()
        if attention_mask is not None:
            attention_mask = None if bool(attention_mask.all()) else attention_mask.to(torch.int64).contiguous()
        lora_params = list(self.lora.params) if self.lora is not None else []
        output = _RemoteChain.apply(hidden, position_ids, attention_mask, self, *lora_params)
        return output.to(hidden.dtype)

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        return InferenceSession(self.connection, max_length, self.start, self.end, batch_size, self.lora, self.adapter)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end} of {self.connection.prefix!r} (remote)"
