"""The generation behind `swarm api`: one request's tokens, sampled through its own inference session, and the text
they make (stop strings cut, incomplete characters held back). Each request gets its own session so that concurrent
requests never share a model-level one (DistributedModelForCausalLM.generate keeps one per model)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from client.base_model import RemoteSessionCache
from client.inference_session import InferenceSession
from client.requests import Additions
from swarm.models import CACHE_KWARG

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a request picks each token: temperature 0 is greedy (argmax), as `swarm generate` without --do-sample."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class TextAssembler:
    """Turns the tokens generated so far into text deltas to send: the decoded text of all of them (as `swarm
    generate` prints it: skip_special_tokens), less what was sent, less a tail that may be the start of a stop string
    or an incomplete UTF-8 character. `stopped` once a stop string appears: the text ends before it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # the final text so far: decoded, cut before any stop string
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one more token; the text that may be sent now."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        hold = _held_back(text, self.stop)
        ready = max(self.sent, len(text) - hold)
        delta, self.sent = text[self.sent : ready], ready
        return delta

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters to keep back: a replacement character (the decoder saw part of a UTF-8 sequence)
    or the longest tail that begins a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from the last position's logits [vocab] (float32): argmax at temperature 0, else a draw after
    temperature and nucleus (top_p) filtering, as transformers' warpers do."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = (logits / sampling.temperature)[None]
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


@dataclass
class Outcome:
    """What a finished generation reports: finish_reason ("stop" or "length") and the tokens it generated."""

    finish_reason: str
    completion_tokens: int
    text: str


@dataclass(eq=False)  # compared (and hashed) by identity: the gateway keeps a set of those running
class GenerationJob:
    """One request's generation, run in a thread of its own (`run`); `cancel()` (the HTTP client went away) makes it
    stop before its next step, and its servers' sessions close."""

    model: object  # a DistributedCausalLMMixin
    additions: Additions
    prompt_ids: list[int]
    sampling: Sampling
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: InferenceSession | None = None
    steps: int = 0  # tokens generated so far

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self, emit: Callable[[str], None]) -> Outcome | None:
        """Generate, calling `emit(text)` as text is ready; the outcome, or None when cancelled."""
        layers = self.model.remote_layers
        max_length = len(self.prompt_ids) + self.sampling.max_tokens
        self.session = InferenceSession(layers.connection, max_length, layers.start, layers.end, 1, self.additions,
                                        None, layers.config)
        generator = torch.Generator()
        if self.sampling.seed is not None:
            generator.manual_seed(self.sampling.seed)
        else:
            generator.seed()
        assembler = TextAssembler(self.decode, self.sampling.stop)
        cache = RemoteSessionCache(self.session)
        inputs = torch.tensor([self.prompt_ids])
        finish = "length"
        try:
            with torch.no_grad():
                for _ in range(self.sampling.max_tokens):
                    if self.cancelled.is_set():
                        return None
                    out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
                    token = pick_token(out.logits[0, -1].float(), self.sampling, generator)
                    self.steps += 1
                    inputs = torch.tensor([[token]])
                    if token in self.eos_ids:
                        assembler.tokens.append(token)  # counted, never shown (skip_special_tokens)
                        finish = "stop"
                        break
                    if delta := assembler.add(token):
                        emit(delta)
                    if assembler.stopped:
                        finish = "stop"
                        break
        finally:
            self.session.close()
        if rest := assembler.flush():
            emit(rest)
        return Outcome(finish, len(assembler.tokens), assembler.text)
