"""What a client adds to the frozen blocks (its LoRA tensors or a hosted adapter, prompts, dropout, codecs by role),
as one value, and the one place every request to a span is built from it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from client.config import CLIENT, CODEC_FIELDS, ClientConfig
from client.routing import RouteStep
from swarm.protocol import DeltaInfo, InferenceOpen, SpanRequest

if TYPE_CHECKING:
    from client.lora import RemoteLora
    from client.prompts import RemotePrompts

@dataclass(frozen=True)
class Codecs:
    """Codecs of hidden states on the wire by role (swarm.compression ids; "none" sends float32 as it is):
    inference (both ways), activations (a training forward's input and output), gradients (a backward's output
    and input gradients), delta (training activations as changes since the sample's previous pass). The `*_reply`
    ones, when set, are what servers answer in instead."""

    inference: str = CLIENT.inference_codec
    activations: str = CLIENT.activation_codec
    gradients: str = CLIENT.gradient_codec
    delta: str = CLIENT.delta_codec
    inference_reply: str = ""
    activations_reply: str = ""
    gradients_reply: str = ""

    @classmethod
    def of(cls, config: ClientConfig) -> Codecs:
        return cls(**{role: getattr(config, name) for role, name in CODEC_FIELDS.items()})

    @classmethod
    def uncompressed(cls) -> Codecs:
        return cls("none", "none", "none", "none")

    def reply(self, role: str) -> str:
        return getattr(self, f"{role}_reply") or getattr(self, role)


@dataclass(frozen=True)
class Additions:
    """Everything a client adds to a request beyond its hidden states. `first_block`: the block the chain starts at
    (deep prompts are indexed from it)."""

    codecs: Codecs = field(default_factory=Codecs)
    lora: RemoteLora | None = None
    adapter: str = ""  # a named adapter the servers host (instead of `lora`)
    prompts: RemotePrompts | None = None
    first_block: int = 0

    def deep_prompts(self, start: int, end: int) -> torch.Tensor | None:
        if self.prompts is None:
            return None
        return self.prompts.deep_for_blocks(start - self.first_block, end - self.first_block)

    def lora_for(self, start: int, end: int) -> tuple[list[str], list[torch.Tensor]]:
        """The LoRA tensors of blocks [start, end) as they are now (detached), with their names."""
        if self.lora is None:
            return [], []
        names, params = self.lora.for_blocks(start, end)
        return names, [p.detach() for p in params]


@dataclass(frozen=True)
class SpanCall:
    """One forward or backward request to a route step, ready to send; the LoRA tensors follow `tensors` unless the
    server already holds them by digest. `grad_codec`: a training stream's gradient message."""

    meta: SpanRequest
    tensors: list
    codecs: list
    lora: list[torch.Tensor]
    grad_codec: str

    def sent(self, by_digest: bool) -> tuple[SpanRequest, list, list]:
        """(metadata, tensors, codecs) as sent: with the LoRA tensors, or naming the uploaded ones by digest."""
        if by_digest:
            return self.meta.model_copy(update={"lora_by_digest": True}), self.tensors, self.codecs
        return self.meta, [*self.tensors, *self.lora], self.codecs

    def with_delta(self, slots: list, info: DeltaInfo) -> SpanCall:
        """The same request with its hidden states as delta-coded slots (already encoded)."""
        return replace(self, meta=self.meta.model_copy(update={"delta": info}), tensors=[*slots, *self.tensors[1:]],
                       codecs=[None, None, *self.codecs[1:]])


def span_call(additions: Additions, step: RouteStep, inputs: list[torch.Tensor], grad: torch.Tensor | None = None, *,
              seed: int = 0, digest: str = "", input_grad: bool = True) -> SpanCall:
    """The request for `inputs` ([hidden, positions, mask?]) through one route step: a backward when `grad` (the
    output's gradient) is given. `seed` draws the servers' LoRA dropout masks; `digest` names the LoRA tensors
    (swarm.lora.digest); `input_grad`: whether the backward (now or on a training stream) returns the input's
    gradient."""
    codecs = additions.codecs
    tensors = [t.detach() for t in inputs]
    slot_codecs = [codecs.activations] + [None] * (len(tensors) - 1)  # positions, mask and prompts go as they are
    fields: dict = dict(start=step.start, end=step.end, input_grad=input_grad,
                        reply_codec=codecs.reply("activations" if grad is None else "gradients"),
                        grad_reply_codec=codecs.reply("gradients"))  # a training stream's backward reply
    deep = additions.deep_prompts(step.start, step.end)
    if deep is not None:
        tensors.append(deep)
        slot_codecs.append(None)
        fields["deep_prompts"] = True
    if grad is not None:
        tensors.append(grad.detach())
        slot_codecs.append(codecs.gradients)
    names, lora = additions.lora_for(step.start, step.end)
    if additions.lora is not None:
        fields.update(lora=names, lora_scaling=additions.lora.scaling, lora_digest=digest)
        if seed and additions.lora.dropout:  # seeds are drawn in training mode only
            fields.update(lora_dropout=additions.lora.dropout, dropout_seed=seed)
    else:
        fields["adapter"] = additions.adapter
    return SpanCall(SpanRequest(**fields), tensors, slot_codecs, lora, codecs.gradients)


def session_opening(additions: Additions, step: RouteStep, batch_size: int, max_length: int,
                    session_id: str) -> tuple[InferenceOpen, list[torch.Tensor]]:
    """The opening message of an inference stream: its metadata and tensors (deep prompts first, then the LoRA
    tensors, copied: a session keeps the values it opened with)."""
    names, lora = additions.lora_for(step.start, step.end)
    deep = additions.deep_prompts(step.start, step.end)
    codecs = additions.codecs
    meta = InferenceOpen(start=step.start, end=step.end, max_length=max_length, batch_size=batch_size, lora=names,
                         lora_scaling=additions.lora.scaling if additions.lora is not None else 1.0,
                         adapter=additions.adapter, deep_prompts=deep is not None, reply_codec=codecs.reply("inference"),
                         session_id=session_id, input_codec=codecs.inference)
    return meta, ([deep] if deep is not None else []) + [t.clone() for t in lora]
