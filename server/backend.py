"""The computation a server offers: validated forward, backward and inference steps over its span.

Tensors come from the wire in host memory, are checked there, and move to the span's device(s); what a step returns
for the wire is back in host memory (swarm.devices.to_host), copied on the compute thread that waited for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm import compression, lora
from swarm.config import ServerConfig
from swarm.devices import to_device, to_host
from swarm.errors import BadRequest, BlocksNotServed, MaxLengthExceeded
from swarm.kv_cache import kv_bytes_per_token
from swarm.models.span import BlockSpan
from swarm.tensors import unpack_tensor


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = ServerConfig.max_batch_size
    max_chunk_tokens: int = ServerConfig.max_chunk_tokens
    max_request_tensors: int = ServerConfig.max_request_tensors


@dataclass
class SpanInputs:
    hidden: torch.Tensor  # [batch, length, hidden_size] in the server's dtype, on the span's (first) device
    position_ids: torch.Tensor  # [batch, length] int64, on that device
    attention_mask: torch.Tensor | None  # [batch, length] int64 of 0/1 there, or None for "attend to everything"


MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class Adaptation:
    """What one request adds to the frozen blocks: LoRA (its own tensors or a hosted adapter), dropout, deep prompts."""

    lora_names: Sequence[str] = ()
    lora_tensors: Sequence[torch.Tensor] = ()
    scaling: float = 1.0
    adapter: str = ""
    dropout: float = 0.0  # on the LoRA input, training only; masks drawn from `seed`
    seed: int = 0
    prompts: torch.Tensor | None = None  # [blocks run, batch or 1, P, hidden], added at the first P tokens


NONE = Adaptation()


def check_tensor_count(count: int, limits: Limits) -> None:
    if count > limits.max_request_tensors:
        raise BadRequest(f"the request carries {count} tensors; this server takes at most {limits.max_request_tensors} "
                         "per request (--max-request-tensors)")


def unpack_request(protos, limits: Limits, first: int = 0) -> list[torch.Tensor]:
    """A request's tensors, counted (within `limits`) before any is decoded, then checked (see
    swarm.tensors.unpack_tensor); `first` numbers them in error messages."""
    check_tensor_count(first + len(protos), limits)
    return [unpack_tensor(t, f"tensor {first + i}") for i, t in enumerate(protos)]


def check_hypo_ids(hypo_ids: Sequence[int], batch_size: int) -> None:
    """A step's reorder of its session's cache rows (beam search) must name one valid row for each row."""
    if hypo_ids and (len(hypo_ids) != batch_size or max(hypo_ids) >= batch_size):
        raise BadRequest(f"hypo_ids must name one row in [0, {batch_size}) for each of the session's {batch_size} rows, "
                         f"got {len(hypo_ids)} with the largest {max(hypo_ids)}")


def check_codec(codec: str) -> None:
    """A codec the client asked for must be one this server knows (see swarm.compression)."""
    if codec and codec not in compression.available():
        raise BadRequest(f"unknown codec {codec!r:.70}; this server supports {compression.available()}")


class SpanBackend:
    def __init__(self, span: BlockSpan, dtype: torch.dtype, limits: Limits = Limits()):
        self.span, self.dtype, self.limits = span, dtype, limits
        self.device = span.device  # where inputs go (a span on several devices moves them on by itself)
        self.start, self.end = span.start, span.end
        self.hidden_size = span.config.hidden_size
        self.adapters: dict[str, tuple[list[lora.LoraPair], float]] = {}  # hosted adapters: name -> (pairs, scaling)
        self.max_position = getattr(span.config, "max_position_embeddings", None) or (1 << 20)
        self.kv_token_bytes = kv_bytes_per_token(span.config, dtype)  # one token in one block's KV cache

    # ------------------------------------------------------------------------------------ validation

    def check_span(self, start: int, end: int) -> None:
        if not (self.start <= start < end <= self.end):
            raise BlocksNotServed(f"this server hosts blocks {self.start}:{self.end}; the request asked for {start}:{end}")

    def check_inputs(self, tensors: list[torch.Tensor], on_device: bool = True) -> SpanInputs:
        """Validate [hidden, position_ids, attention_mask?], then (unless not `on_device`) move them to the span."""
        if len(tensors) not in (2, 3):
            raise BadRequest(f"expected hidden states, position ids and an optional attention mask, got {len(tensors)} tensors")
        hidden, position_ids = tensors[0], tensors[1]
        mask = tensors[2] if len(tensors) == 3 else None
        self.check_hidden(hidden, "hidden states")
        batch, length, _ = hidden.shape
        if position_ids.dtype not in (torch.int64, torch.int32) or tuple(position_ids.shape) != (batch, length):
            raise BadRequest(f"position ids must be integers of shape {[batch, length]}, got {position_ids.dtype} {list(position_ids.shape)}")
        if length and (position_ids.min() < 0 or position_ids.max() >= self.max_position):
            raise BadRequest(f"position ids must lie in [0, {self.max_position})")
        if mask is not None:
            if tuple(mask.shape) != (batch, length) or mask.dtype not in (torch.int64, torch.int32, torch.bool):
                raise BadRequest(f"attention mask must be 0/1 integers of shape {[batch, length]}, got {mask.dtype} {list(mask.shape)}")
            if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
                raise BadRequest("attention mask may only hold 0 and 1")
        if not on_device:
            return SpanInputs(hidden, position_ids, mask)
        mask = None if mask is None else to_device(mask, self.device, torch.int64)
        return SpanInputs(to_device(hidden, self.device, self.dtype), to_device(position_ids, self.device, torch.int64), mask)

    def check_hidden(self, hidden: torch.Tensor, what: str) -> None:
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise BadRequest(f"{what} must have shape [batch, length, {self.hidden_size}], got {list(hidden.shape)}")
        if not hidden.is_floating_point():
            raise BadRequest(f"{what} must be floating point, got {hidden.dtype}")
        batch, length, _ = hidden.shape
        if batch < 1 or batch > self.limits.max_batch_size:
            raise BadRequest(f"batch size {batch} is outside 1..{self.limits.max_batch_size}")
        if batch * length > self.limits.max_chunk_tokens:
            raise BadRequest(f"{batch}x{length} tokens exceed this server's limit of {self.limits.max_chunk_tokens} per request; split the batch")
        if not bool(torch.isfinite(hidden).all()):
            raise BadRequest(f"{what} must not contain NaN or Inf")

    def layers(self, start: int, end: int) -> dict:
        return {i: self.span.layers[i - self.start] for i in range(start, end)}

    def host_adapter(self, name: str, adapter: lora.SavedAdapter) -> None:
        """Serve a peft adapter from disk under `name`; its tensors are checked against the hosted blocks."""
        names = sorted(adapter.tensors)
        pairs = lora.parse_lora(names, [adapter.tensors[n] for n in names], self.layers(self.start, self.end), self.dtype)
        if not pairs:
            raise ValueError(f"adapter {name!r} has no tensors for blocks {self.start}:{self.end}")
        self.adapters[name] = (pairs, adapter.scaling)

    def resolve_lora(self, start: int, end: int, adapter: str, names, tensors, scaling: float):
        """The LoRA pairs and scaling for one request: a hosted adapter by name, or the request's own tensors."""
        if adapter:
            if names:
                raise BadRequest("a request may name a hosted adapter or carry LoRA tensors, not both")
            if adapter not in self.adapters:
                raise BadRequest(f"this server does not host adapter {adapter!r}; it hosts {sorted(self.adapters) or 'none'}")
            pairs, scaling = self.adapters[adapter]
            return [p for p in pairs if start <= p.block < end], scaling
        return lora.parse_lora(names, tensors, self.layers(start, end), self.dtype), scaling

    def lora_on_device(self, names, tensors) -> list[torch.Tensor]:
        """A request's LoRA tensors (validated: see lora.parse_lora) on the devices of the blocks they adapt, in their
        own dtype (the gradients go back in it); so uploaded adapters are cached there."""
        layers = self.layers(self.start, self.end)
        return [to_device(t, lora.layer_device(layers[lora.block_of(n)])) for n, t in zip(names, tensors, strict=True)]

    # ------------------------------------------------------------------------------------ compute

    def check_prompts(self, prompts: torch.Tensor, start: int, end: int, batch: int) -> torch.Tensor:
        shape = list(prompts.shape)
        if (prompts.ndim != 4 or shape[0] != end - start or shape[1] not in (1, batch) or not 1 <= shape[2] <= MAX_PROMPT_TOKENS
                or shape[3] != self.hidden_size):
            raise BadRequest(f"deep prompts must have shape [{end - start} blocks, 1 or {batch}, P <= {MAX_PROMPT_TOKENS}, "
                             f"{self.hidden_size}], got {shape}")
        if not prompts.is_floating_point() or not bool(torch.isfinite(prompts).all()):
            raise BadRequest("deep prompts must be finite floating-point values")
        return to_device(prompts, self.device, self.dtype)

    # Each of forward, backward, forward_for_backward and backward_kept is a generator of chunks, one block per
    # next(), whose return value is its result (server.compute_queue lets decode steps in between chunks).

    def _blocks(self, inputs: SpanInputs, start: int, end: int, adapt: Adaptation, lora_tensors, prompts, grad: bool):
        """run_blocks() over this request's blocks, with its LoRA (or hosted adapter), dropout and deep prompts."""
        pairs, scaling = self.resolve_lora(start, end, adapt.adapter, adapt.lora_names, lora_tensors, adapt.scaling)
        blocks = self.span.blocks(inputs.hidden, inputs.position_ids, inputs.attention_mask, start=start, end=end,
                                  prompts=prompts)
        return (yield from run_blocks(blocks, inputs.hidden, start, end, pairs, scaling, grad, adapt.dropout, adapt.seed))

    def forward(self, inputs: SpanInputs, start: int, end: int, adapt: Adaptation = NONE):
        """The span's output, in host memory."""
        done = yield from self._blocks(inputs, start, end, adapt, adapt.lora_tensors, adapt.prompts, grad=False)
        return to_host(done[-1][1])

    def backward(self, inputs: SpanInputs, grad_output: torch.Tensor, start: int, end: int,
                 adapt: Adaptation = NONE, input_grad: bool = True):
        """Gradients w.r.t. the span's input (unless `input_grad` is False), each LoRA tensor and the deep prompts
        (if any), in that order. The forward is recomputed (servers keep no activations between requests), with the
        same dropout masks as the forward request. In host memory."""
        self.check_hidden(grad_output, "output gradient")
        kept = yield from self.forward_for_backward(inputs, start, end, adapt, input_grad)
        return (yield from self.backward_kept(kept, grad_output))

    def forward_for_backward(self, inputs: SpanInputs, start: int, end: int, adapt: Adaptation = NONE,
                             input_grad: bool = True):
        """The forward with its autograd graphs (KeptForward), for a backward later in the same request; without
        `input_grad`, only the LoRA tensors and deep prompts are differentiated (BadRequest if there are none)."""
        if not input_grad and not adapt.lora_tensors and adapt.prompts is None:
            raise BadRequest("input_grad is false and the request has no LoRA tensors or deep prompts: "
                             "its backward would have no gradient to return")
        with torch.enable_grad():
            hidden = inputs.hidden.detach().requires_grad_(input_grad)
            leaves = [t.detach().to(self.dtype).requires_grad_(True) for t in adapt.lora_tensors]
            prompts = adapt.prompts.detach().requires_grad_(True) if adapt.prompts is not None else None
        done = yield from self._blocks(SpanInputs(hidden, inputs.position_ids, inputs.attention_mask), start, end, adapt,
                                       leaves, prompts, grad=True)
        blocks = [lora.block_of(name) for name in adapt.lora_names]
        return KeptForward(done, leaves, blocks, prompts, input_grad, start, to_host(done[-1][1].detach()))

    def backward_kept(self, kept: KeptForward, grad_output: torch.Tensor):
        """The backward of a kept forward, a block at a time from the last, in host memory; `grad_output` has passed
        check_hidden (finite, floating point)."""
        output = kept.output
        if grad_output.shape != output.shape:
            raise BadRequest(f"output gradient has shape {list(grad_output.shape)}, hidden states {list(output.shape)}")
        grad = to_device(grad_output, output.device, output.dtype)
        leaf_grads: list[torch.Tensor | None] = [None] * len(kept.leaves)
        prompts_grad = None
        for index in reversed(range(len(kept.blocks))):
            block_input, block_output = kept.blocks[index]
            mine = [i for i, block in enumerate(kept.leaf_blocks) if block == kept.start + index]
            wrt = [block_input] if block_input.requires_grad else []
            wrt += [kept.leaves[i] for i in mine] + ([kept.prompts] if kept.prompts is not None else [])
            grads = list(torch.autograd.grad(block_output, wrt, grad, allow_unused=True)) if wrt else []
            grad = grads.pop(0) if block_input.requires_grad else None
            if kept.prompts is not None and (g := grads.pop()) is not None:
                prompts_grad = g if prompts_grad is None else prompts_grad + g
            for i, g in zip(mine, grads, strict=True):
                leaf_grads[i] = g
            kept.blocks[index] = ()  # its graph is freed
            yield
        grads = ([grad] if kept.input_grad else []) + leaf_grads + ([prompts_grad] if kept.prompts is not None else [])
        return [None if g is None else to_host(g) for g in grads]

    def activation_bytes(self, batch: int, length: int, start: int, end: int) -> int:
        """A generous estimate of what autograd keeps for a forward of these blocks (Llama-style blocks)."""
        config = self.span.config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        hidden, inner = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
        per_block = batch * length * (12 * hidden + 4 * inner) + batch * config.num_attention_heads * length * length
        return (end - start) * per_block * itemsize


@dataclass
class KeptForward:
    blocks: list  # per block run: (its input, a leaf where a gradient flows to it, and its output)
    leaves: list[torch.Tensor]  # the LoRA tensors, differentiated
    leaf_blocks: list[int]  # the block of each
    prompts: torch.Tensor | None  # the deep prompts, differentiated
    input_grad: bool  # whether the span's input gets a gradient
    start: int  # the first block run
    host_output: torch.Tensor  # the output, detached, in host memory: the reply

    @property
    def output(self) -> torch.Tensor:
        return self.blocks[-1][1]


def run_blocks(blocks, hidden: torch.Tensor, start: int, end: int, pairs, scaling: float, grad: bool = False,
               dropout: float = 0.0, seed: int = 0):
    """Drive `blocks` (BlockSpan.blocks() over [start, end), whose input is `hidden`) one block per chunk (a yield),
    each block inside its own LoRA hooks and grad mode: no context stays entered between chunks, so whatever the
    compute thread runs in between never sees them. With `grad`, each block's input is a fresh leaf (one autograd
    graph per block, for a backward a block at a time) and every block's (input, output) is returned; without, only
    the last block's."""
    done = []
    for block in range(start, end):
        with (torch.enable_grad() if grad else torch.inference_mode()), \
                lora.applied([p for p in pairs if p.block == block], scaling, dropout, seed):
            output = next(blocks) if block == start else blocks.send(hidden)
        done = [*done, (hidden, output)] if grad else [(hidden, output)]
        hidden = output.detach().requires_grad_(True) if grad else output
        yield
    return done


class InferenceState:
    """One client's KV cache on this server, for blocks [start, end) and up to max_length tokens."""

    def __init__(self, backend: SpanBackend, start: int, end: int, batch_size: int, max_length: int,
                 lora_pairs=(), lora_scaling: float = 1.0, prompts: torch.Tensor | None = None):
        self.backend, self.start, self.end = backend, start, end
        self.lora_pairs, self.lora_scaling, self.prompts = list(lora_pairs), lora_scaling, prompts
        self.batch_size, self.max_length = batch_size, max_length
        # Both allocated once for max_length (swarm.models.preallocated): a step writes its tokens in place.
        self.cache = backend.span.new_cache(batch_size, max_length, backend.dtype, start, end)
        self._mask = torch.ones(batch_size, max_length, dtype=torch.int64, device=backend.device)
        self.position = 0
        self.broken = False

    @torch.inference_mode()
    def step(self, inputs: SpanInputs, hypo_ids: Sequence[int] = ()) -> torch.Tensor:
        """Run new tokens, after reordering the cached rows by `hypo_ids` (beam search: the beams the client keeps);
        the output is in host memory."""
        return to_host(self.run(inputs, self.begin(inputs, hypo_ids)))

    def begin(self, inputs: SpanInputs, hypo_ids: Sequence[int] = ()) -> torch.Tensor:
        """Check a step and prepare the cache for it (rows reordered, the new tokens' padding mask written): the mask
        over cached + new tokens, for run()."""
        if self.broken:
            raise BadRequest("this session failed earlier; open a new one")
        batch, length, _ = inputs.hidden.shape
        if batch != self.batch_size:
            raise BadRequest(f"session was opened for batch size {self.batch_size}, step has {batch}")
        check_hypo_ids(hypo_ids, batch)
        if self.position + length > self.max_length:
            raise MaxLengthExceeded(f"session holds {self.position} tokens and max_length={self.max_length}; "
                                    f"{length} more do not fit. Open the session with a larger max_length")
        if hypo_ids:
            self._reorder(torch.tensor(hypo_ids, dtype=torch.int64).to(self.backend.device))
        end = self.position + length
        if inputs.attention_mask is not None:
            self._mask[:, self.position : end].copy_(inputs.attention_mask)
        else:
            self._mask[:, self.position : end].fill_(1)
        return self._mask[:, :end]

    def step_chunks(self, inputs: SpanInputs, hypo_ids: Sequence[int] = ()):
        """step() a block per chunk (see SpanBackend.forward): for long prefills, which give way to decode steps."""
        mask = self.begin(inputs, hypo_ids)
        blocks = self.backend.span.blocks(inputs.hidden, inputs.position_ids, mask, cache=self.cache, start=self.start,
                                          end=self.end, prompts=self.prompts, first_token=self.position)
        try:
            done = yield from run_blocks(blocks, inputs.hidden, self.start, self.end, self.lora_pairs, self.lora_scaling)
        except BaseException:
            self.broken = True  # the cache may hold part of this step: never serve from it again
            raise
        self.position = mask.shape[1]
        return to_host(done[-1][1])

    def run(self, inputs: SpanInputs, mask: torch.Tensor) -> torch.Tensor:
        """The step alone, after begin(): its output on the span's (last) device."""
        try:
            with lora.applied(self.lora_pairs, self.lora_scaling):
                output = self.backend.span(inputs.hidden, inputs.position_ids, mask, cache=self.cache, start=self.start,
                                           end=self.end, prompts=self.prompts, first_token=self.position)
        except Exception:
            self.broken = True  # the cache may hold part of this step: never serve from it again
            raise
        self.position = mask.shape[1]
        return output

    @property
    def mask(self) -> torch.Tensor:
        """The 2-D padding mask of the tokens the cache holds."""
        return self._mask[:, : self.position]

    def _reorder(self, rows: torch.Tensor) -> None:
        """Everything kept per row follows the rows: the KV cache, the padding mask and per-row deep prompts."""
        self.cache.reorder_cache(rows)
        self.mask.copy_(self.mask[rows])
        if self.prompts is not None and self.prompts.shape[1] > 1:
            self.prompts = self.prompts[:, rows]
