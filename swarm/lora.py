"""LoRA tensors on the wire: their names, their validation, and applying them to a span for one call.

A LoRA tensor is named '{block}.{module}.{A|B}', e.g. '3.self_attn.q_proj.A', where `module` is a
linear layer inside the decoder block. A has shape [rank, in_features], B [out_features, rank]; the layer
computes base(x) + scaling * (dropout(x) @ A.T) @ B.T, as peft does. Dropout masks come from a seed the client sends,
so a server's backward pass (which recomputes the forward) draws exactly the masks its forward pass drew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarm.errors import BadRequest

MAX_RANK = 256
_NAME = re.compile(r"(\d+)\.([A-Za-z0-9_.]+)\.(A|B)")


def lora_name(block: int, module: str, kind: str) -> str:
    return f"{block}.{module}.{kind}"


def peft_key(block: int, module: str, kind: str) -> str:
    """The key peft uses for this tensor in adapter_model.safetensors (Llama-style layout)."""
    return f"base_model.model.model.layers.{block}.{module}.lora_{kind}.weight"


_PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.([A-Za-z0-9_.]+)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight")


def name_from_peft_key(key: str) -> str | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> '3.self_attn.q_proj.A' (None if not LoRA)."""
    match = _PEFT_KEY.fullmatch(key)
    return lora_name(int(match.group(1)), match.group(2), match.group(3)) if match else None


def digest(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> str:
    """A content digest of named LoRA tensors: names, dtypes, shapes and bytes (client and server compute the same)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in zip(names, tensors, strict=True):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def block_of(name: str) -> int:
    return int(name.split(".", 1)[0])


@dataclass(frozen=True)
class SavedAdapter:
    """A peft LoRA adapter read from disk: wire-named tensors and their scaling."""

    tensors: dict[str, torch.Tensor]
    scaling: float


def read_peft_adapter(directory: str | Path, blocks: range | None = None) -> SavedAdapter:
    """Read adapter_config.json and adapter_model.safetensors (only the tensors of `blocks`, if given)."""
    from safetensors import safe_open

    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{directory} is not a peft adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{directory}: only plain LoRA adapters are supported (peft_type LORA, no DoRA)")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            name = name_from_peft_key(key)
            if name is None:
                raise ValueError(f"{directory}: tensor {key!r} is not a LoRA matrix of a decoder block")
            if blocks is None or block_of(name) in blocks:
                tensors[name] = f.get_tensor(key)
    return SavedAdapter(tensors, scaling)


def layer_device(layer: nn.Module) -> torch.device:
    """The device of a block's weights, where the LoRA tensors for it live."""
    return next(layer.parameters()).device


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


@dataclass(frozen=True)
class LoraPair:
    block: int
    module: str
    A: torch.Tensor  # [rank, in_features]
    B: torch.Tensor  # [out_features, rank]
    linear: nn.Linear  # the layer it adapts, resolved once when the request is validated


def parse_lora(names: Sequence[str], tensors: Sequence[torch.Tensor], layers: dict[int, nn.Module],
               dtype: torch.dtype) -> list[LoraPair]:
    """Validate every name and shape against the hosted blocks; pair A with B, in `dtype`, on the device of their
    block. Raises BadRequest."""
    if len(names) != len(tensors):
        raise BadRequest(f"{len(names)} LoRA names but {len(tensors)} LoRA tensors")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in zip(names, tensors, strict=True):
        match = _NAME.fullmatch(name)
        if match is None:
            raise BadRequest(f"LoRA tensor name {name!r} is not of the form BLOCK.MODULE.A or BLOCK.MODULE.B")
        block, module, kind = int(match.group(1)), match.group(2), match.group(3)
        if block not in layers:
            raise BadRequest(f"LoRA tensor {name!r} is for block {block}, which this request does not run")
        linear = linear_modules(layers[block]).get(module)
        if linear is None:
            raise BadRequest(f"LoRA tensor {name!r}: block {block} has no linear layer {module!r}")
        if not tensor.is_floating_point() or tensor.ndim != 2:
            raise BadRequest(f"LoRA tensor {name!r} must be a 2-D floating-point matrix, got {tensor.dtype} {list(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise BadRequest(f"LoRA tensor {name!r} contains NaN or Inf")
        slot = found.setdefault((block, module), {})
        if kind in slot:
            raise BadRequest(f"LoRA tensor {name!r} appears twice")
        slot[kind] = tensor.to(layer_device(layers[block]), dtype, non_blocking=True)
    pairs = []
    for (block, module), slot in sorted(found.items()):
        if set(slot) != {"A", "B"}:
            raise BadRequest(f"LoRA for block {block} {module} needs both A and B")
        linear = linear_modules(layers[block])[module]
        a, b = slot["A"], slot["B"]
        rank = a.shape[0]
        if not 1 <= rank <= MAX_RANK or tuple(a.shape) != (rank, linear.in_features) or tuple(b.shape) != (linear.out_features, rank):
            raise BadRequest(
                f"LoRA for block {block} {module}: A must be [rank, {linear.in_features}] and B [{linear.out_features}, rank] "
                f"with 1 <= rank <= {MAX_RANK}; got A {list(a.shape)}, B {list(b.shape)}"
            )
        pairs.append(LoraPair(block, module, a, b, linear))
    return pairs


def dropout_mask(seed: int, block: int, module: str, shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout mask (0 or 1/(1-p)) for one linear layer's LoRA input, a pure function of its arguments. It is
    drawn on the CPU (whose generator gives the same masks on every machine), then moved where it is used."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + block * 7_919 + zlib.crc32(module.encode())) % (1 << 63))
    keep = torch.rand(tuple(shape), generator=generator) >= p
    return keep.to(dtype) / (1.0 - p)


@contextlib.contextmanager
def applied(pairs: Sequence[LoraPair], scaling: float, dropout: float = 0.0, seed: int = 0) -> Iterator[None]:
    """Add the LoRA deltas to the outputs of their linear layers for the duration of one call.

    The hooks live only inside this block, so the adapter is passed per call rather than stored on the model.
    With `dropout`, each layer's LoRA input is masked by dropout_mask(seed, block, module, ...).
    Callers must not run two calls on the same layers at once (servers use one compute thread).
    """
    handles = []

    def hook_for(pair: LoraPair):
        def hook(module, inputs, output):
            x = inputs[0]
            if dropout:
                x = x * dropout_mask(seed, pair.block, pair.module, x.shape, dropout, x.dtype).to(x.device, non_blocking=True)
            return output + scaling * (x @ pair.A.T) @ pair.B.T

        return hook

    try:
        for pair in pairs:
            handles.append(pair.linear.register_forward_hook(hook_for(pair)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def applied_rows(groups: Sequence[tuple[slice, Sequence[LoraPair], float]]) -> Iterator[None]:
    """`applied` for a batch of sessions (inference, no dropout): each group's pairs add their deltas to the group's
    rows of the batch only, as `applied` adds them to a lone session's output."""
    by_linear: dict[int, tuple[nn.Linear, list[tuple[slice, LoraPair, float]]]] = {}
    for rows, pairs, scaling in groups:
        for pair in pairs:
            by_linear.setdefault(id(pair.linear), (pair.linear, []))[1].append((rows, pair, scaling))

    def hook_for(terms: list[tuple[slice, LoraPair, float]]):
        def hook(module, inputs, output):
            x = inputs[0]
            for rows, pair, scaling in terms:
                output[rows] = output[rows] + scaling * (x[rows] @ pair.A.T) @ pair.B.T
            return output

        return hook

    handles = []
    try:
        for linear, terms in by_linear.values():
            handles.append(linear.register_forward_hook(hook_for(terms)))
        yield
    finally:
        for handle in handles:
            handle.remove()

