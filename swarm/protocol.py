"""Wire records: the typed metadata of every request and reply, checked by pydantic before use.

Nothing a peer sends is unpickled or executed: metadata is JSON validated against these models (unknown fields
from newer peers are ignored, missing ones defaulted); tensors travel as raw buffers (swarm.tensors).
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm import versions
from swarm.config import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from swarm.errors import BadRequest


class _Meta(BaseModel):
    # Unknown fields from newer peers are ignored; missing ones take their defaults. JSON's NaN and Infinity are refused
    # (json.loads reads them): no float of a request means anything when it is not finite.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    # The range of protocol versions the sender speaks (swarm.versions); messages older than ranges carry `version`.
    version: int = PROTOCOL_VERSION
    min_version: int = MIN_PROTOCOL_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes):
        if len(raw) > 64 * 1024:
            raise BadRequest(f"metadata of {len(raw)} bytes is larger than the 64 KiB limit")
        try:
            meta = cls.model_validate(_json(raw, cls.__name__))
        except ValidationError as exc:
            raise BadRequest(f"malformed {cls.__name__}: {_fields(exc)}") from None
        # Every request a server reads (and reply a client reads) passes here: the one place versions are checked.
        versions.check_message(versions.normalized(meta.min_version, meta.version), cls.__name__)
        return meta


_KEY = r"^[0-9a-f]{32}$"
_REF = r"^([0-9a-f]{16})?$"
MAX_DELTA_ROWS = 1024


class DeltaInfo(BaseModel):
    """Delta coding of a training stream's hidden states (see swarm.compression.delta), one entry per batch row.

    With it, the request's first two tensors are the rows sent in full (the activations codec) and the deltas of
    the others (`codec`), in row order; rows in mode "s" are not sent. `refs` names the reference each "d"/"s" row
    is relative to, `out_refs` the reference the client holds for each row of the output ("" for none): the
    server answers a row as a delta only where its own reference has that digest.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[Annotated[str, Field(pattern=_KEY)]] = Field(max_length=MAX_DELTA_ROWS)
    modes: str = Field(pattern=r"^[fds]*$", max_length=MAX_DELTA_ROWS)
    refs: list[Annotated[str, Field(pattern=_REF)]] = Field(max_length=MAX_DELTA_ROWS)
    out_refs: list[Annotated[str, Field(pattern=_REF)]] = Field(max_length=MAX_DELTA_ROWS)
    codec: str = Field(max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> DeltaInfo:
        rows = len(self.keys)
        if not rows or not len(self.modes) == len(self.refs) == len(self.out_refs) == rows:
            raise ValueError(f"delta needs one key, mode, ref and out_ref per row (got {rows} keys, {len(self.modes)} "
                             f"modes, {len(self.refs)} refs, {len(self.out_refs)} out_refs)")
        if any((mode == "f") != (ref == "") for mode, ref in zip(self.modes, self.refs, strict=True)):
            raise ValueError("delta refs must be empty exactly for the rows sent in full ('f')")
        return self


class _SpanMeta(_Meta):
    """What every request to blocks [start, end) carries: the blocks and what the client adds to them."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    # The client's own LoRA tensors, in this order (names as in swarm.lora); scaling = alpha / rank.
    lora: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=4096)
    lora_scaling: float = 1.0
    adapter: str = Field(default="", max_length=256)  # a named adapter the server hosts (instead of `lora`)
    deep_prompts: bool = False  # deep prompt tuning: a tensor [blocks, batch or 1, P, hidden] rides along
    reply_codec: str = Field(default="", max_length=64)  # codec of the reply's hidden states (or their gradient); "" = none


class SpanRequest(_SpanMeta):
    """Forward or backward through blocks [start, end) of the model. Its tensors: the inputs (hidden states, position
    ids, an optional mask), the deep prompts, a backward's output gradient, then the LoRA tensors."""

    # swarm.lora.digest of the LoRA tensors. With the tensors: the server may keep them under it for a while.
    # With lora_by_digest and no tensors: use the ones this peer uploaded under it (or fail with lora_not_cached).
    lora_digest: str = Field(default="", max_length=64, pattern=r"^[0-9a-f]*$")
    lora_by_digest: bool = False
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # masks drawn from dropout_seed (see swarm.lora.dropout_mask)
    dropout_seed: int = Field(default=0, ge=0, lt=1 << 63)
    grad_reply_codec: str = Field(default="", max_length=64)  # rpc_train only: codec of the backward's input gradient
    # Backward: whether the reply starts with the gradient w.r.t. the input hidden states. A client whose input
    # needs none (the first span, after a frozen embedding) saves that tensor on the wire.
    input_grad: bool = True
    delta: DeltaInfo | None = None  # rpc_train only: delta-coded hidden states (the output answered likewise)


class InferenceOpen(_SpanMeta):
    """First message of an inference stream: reserve a KV cache for the session. Its tensors: the deep prompts, then
    the LoRA tensors for the whole session; `reply_codec` is each step's output's."""

    max_length: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    # Forwarding (swarm.forwarding): the id the previous server of the route pushes steps into this session under
    # ("" = none are accepted), and the codec those pushed hidden states must come in.
    session_id: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    input_codec: str = Field(default="", max_length=64)


MAX_HYPO_IDS = 4096  # rows one reorder may name; a server also checks them against its session's batch size


class InferenceStep(_Meta):
    """One step of an inference stream: the new tokens' hidden states (and their positions and mask)."""

    step: int = Field(ge=0)
    # Beam search: before this step, row i of the session's KV cache becomes row hypo_ids[i] (the beams the client
    # keeps; a row may be kept twice). Empty: the rows stay as they are. See server.backend.check_hypo_ids.
    hypo_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_HYPO_IDS)


class TrainGrad(_Meta):
    """Second message of a training stream (rpc_train): the gradient w.r.t. the output of its forward."""


class SpanReply(_Meta):
    # With a request's `delta`: the output's mode per row; its tensors are then the full rows and the deltas.
    delta_modes: str = Field(default="", pattern=r"^[fds]*$", max_length=MAX_DELTA_ROWS)


class InferenceReply(_Meta):
    position: int = 0  # tokens in the session's cache after this step
    cache_tokens_left: int = 0
    forwarded: bool = False  # the step named later servers and its output was pushed to the next one
    forward_error: str = Field(default="", max_length=1024)  # why it could not be pushed
    # Not a step's reply but a report, sent when it happens: the push of this session's step `push_failed` (done and
    # answered already) to the next server failed, for `forward_error`; the client sends that hop itself. -1: a reply.
    push_failed: int = Field(default=-1, ge=-1)


def _json(raw: bytes, kind: str):
    """Metadata bytes as JSON, or BadRequest saying why they are not. Only UTF-8: json.loads would guess UTF-16 or 32
    from the first bytes and then report an unrelated syntax error."""
    try:
        text = raw.decode() if raw else "{}"
    except UnicodeDecodeError as exc:
        raise BadRequest(f"malformed {kind}: metadata is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        return json.loads(text)
    except RecursionError:  # 64 KiB of brackets is deeper than the parser goes
        raise BadRequest(f"malformed {kind}: metadata is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"malformed {kind}: metadata is not JSON ({_short(str(exc))})") from None


def _fields(exc: ValidationError) -> str:
    """Each problem as 'field: what is wrong' (e.g. 'start: Input should be greater than or equal to 0')."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors(include_url=False)]
    return _short("; ".join(problems))


def _short(text: str) -> str:
    return text if len(text) < 300 else text[:300] + "..."
