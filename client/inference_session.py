"""Inference sessions: one KV-cached stream per route step, and the history needed to rebuild them."""

from __future__ import annotations

import logging

import torch

from client import aio
from client.connection import SpanStream, SwarmConnection
from swarm.protocol import Traffic

logger = logging.getLogger(__name__)


class InferenceSession:
    """Sends new tokens' hidden states through a chain of servers that keep the past in their KV caches.

    Usable as a context manager; the streams open on the first step (when the batch size is known).
    `token_ids` keeps the tokens a model-level caller has fed, so `generate()` can continue the session.
    """

    def __init__(self, connection: SwarmConnection, max_length: int, start: int = 0, end: int | None = None,
                 batch_size: int | None = None, lora=None, adapter: str | None = None, prompts=None, codec: str = "none",
                 reply_codec: str | None = None):
        self.connection, self.max_length = connection, max_length
        self.prompts = prompts  # a client.prompts.RemotePrompts: deep prompts go to each server when its stream opens
        self.codec = codec  # for hidden states sent (see swarm.compression)
        self.reply_codec = codec if reply_codec is None else reply_codec  # for the servers' outputs
        self.virtual_tokens = 0  # shallow prompt tokens this session holds before the caller's tokens
        self.adapter = adapter  # a named adapter hosted by the servers
        self.lora = lora  # a client.lora.RemoteLora; its values are snapshotted when the streams open
        self.start, self.end = start, connection.num_blocks if end is None else end
        self.batch_size = batch_size
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed so far
        self.token_ids: torch.Tensor | None = None  # the last generate() output, kept by the model class
        self.closed = False

    async def _open(self, batch_size: int) -> None:
        route = self.connection.plan(self.start, self.end, self.adapter)
        streams = []
        for step in route:
            names, tensors, scaling = [], [], 1.0
            if self.lora is not None:
                names, params = self.lora.for_blocks(step.start, step.end)
                tensors, scaling = [p.detach().clone() for p in params], self.lora.scaling
            deep = None
            if self.prompts is not None:
                deep = self.prompts.deep_for_blocks(step.start - self.start, step.end - self.start)
            streams.append(SpanStream(self.connection, step, batch_size, self.max_length, names, tensors, scaling,
                                      self.adapter or "", deep, self.codec, self.reply_codec))
        try:
            for stream in streams:
                await stream.open()
        except BaseException:
            for stream in streams:
                await stream.close()
            raise
        self.streams = streams
        logger.debug("opened inference session through %s", [(str(s.step.peer_id)[-6:], s.step.start, s.step.end) for s in streams])

    async def _step(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not self.streams:
            await self._open(tensors[0].shape[0])
        hidden = tensors[0]
        for stream in self.streams:
            hidden = await stream.send([hidden, *tensors[1:]])
        return hidden

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens [batch, length, hidden] through every block; returns the last block's output."""
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
        tensors = [hidden.detach(), position_ids.expand(batch, length).to(torch.int64).contiguous()]
        if attention_mask is not None:
            tensors.append(attention_mask.to(torch.int64).contiguous())
        output = aio.run(self._step(tensors))
        self.batch_size = batch
        self.position += length
        return output.to(hidden.dtype)

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

        async def close_all():
            for stream in self.streams:
                await stream.close()

        aio.run(close_all())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
