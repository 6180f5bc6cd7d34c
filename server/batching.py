"""Inference steps of several sessions run as one batch on the compute thread (swarm.models.batched): which steps can
share a batch, and running them so that each session gets what it would get alone, a failing one included."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from server.backend import InferenceState, SpanInputs
from swarm import lora
from swarm.devices import to_host
from swarm.models.batched import BatchItem, row_slices

logger = logging.getLogger(__name__)

# Steps of at most this many tokens per row are decode steps: they batch with each other and go before bulk work
# (training, long prefills), which the compute thread runs a block at a time between them.
DECODE_TOKENS = 8


@dataclass
class Step:
    """One session's step, as the compute thread gets it."""

    state: InferenceState
    inputs: SpanInputs
    hypo_ids: Sequence[int] = ()

    @property
    def rows(self) -> int:
        return self.inputs.hidden.shape[0]


def batch_key(step: Step) -> Hashable | None:
    """Decode steps with equal keys can run as one batch: steps of one length over the same blocks. Sessions with
    deep prompts run alone (None)."""
    if step.state.prompts is not None:
        return None
    return (step.state.start, step.state.end, step.inputs.hidden.shape[1])


@torch.inference_mode()
def run_steps(steps: Sequence[Step]) -> list[torch.Tensor | BaseException]:
    """Each step's output in host memory, or the exception it raised. A step that fails its checks fails alone; if
    the batch itself fails, the caches go back to before it and the steps run one by one, so only the one at fault
    fails."""
    results: list[torch.Tensor | BaseException | None] = [None] * len(steps)
    ready: list[tuple[int, torch.Tensor]] = []
    for index, step in enumerate(steps):
        try:
            ready.append((index, step.state.begin(step.inputs, step.hypo_ids)))
        except Exception as exc:  # noqa: BLE001 - this step's own error, for its own session
            results[index] = exc
    if len(ready) > 1:
        try:
            outputs = _batched([steps[i] for i, _ in ready], [mask for _, mask in ready])
        except Exception as exc:  # noqa: BLE001 - run each alone below: only the one at fault fails
            logger.info("a batch of %d steps failed (%s: %s); running them one by one", len(ready), type(exc).__name__, exc)
        else:
            for (index, _), output in zip(ready, outputs, strict=True):
                results[index] = to_host(output)
            return results
    for index, mask in ready:
        try:
            results[index] = to_host(steps[index].state.run(steps[index].inputs, mask))
        except Exception as exc:  # noqa: BLE001
            results[index] = exc
    return results


def _batched(steps: Sequence[Step], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    states = [step.state for step in steps]
    lengths = [state.cache.lengths() for state in states]
    groups = [(rows, step.state.lora_pairs, step.state.lora_scaling)
              for rows, step in zip(row_slices([step.rows for step in steps]), steps, strict=True) if step.state.lora_pairs]
    span, start, end = states[0].backend.span, states[0].start, states[0].end
    items = [BatchItem(step.inputs.hidden, step.inputs.position_ids, mask, step.state.cache) for step, mask in zip(steps, masks, strict=True)]
    try:
        with lora.applied_rows(groups):
            outputs = span.forward_batch(items, start, end)
    except Exception:
        for state, kept in zip(states, lengths, strict=True):
            state.cache.restore(kept)
        raise
    for state, mask in zip(states, masks, strict=True):
        state.position = mask.shape[1]
    return outputs
