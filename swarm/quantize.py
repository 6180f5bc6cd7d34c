"""Quantized blocks: the linear layers of a decoder block replaced by bitsandbytes int8 or nf4 layers.

A server started with `--quant int8|nf4` quantizes each block as it loads it (swarm.models.span.BlockSpan.from_checkpoint
calls `quantizer(...)` on one block at a time), so at most one block is ever held in floating point beside the
quantized ones. Only the `nn.Linear` layers of attention and MLP are replaced; norms and the rotary embedding keep their
floating-point weights (embeddings and the LM head live on the client and are never quantized).

- int8: LLM.int8() (`Linear8bitLt`): weights int8 per output row; activation columns with a value beyond
  INT8_OUTLIER_THRESHOLD are multiplied in 16-bit floats, the rest in int8.
- nf4: QLoRA's 4-bit NormalFloat (`Linear4bit`), blocks of NF4_BLOCKSIZE weights, their scales quantized again
  (double quantization, as QLoRA does); products in the server's dtype.

The layers stay `nn.Linear` subclasses with `in_features` / `out_features`, so LoRA forward hooks (swarm.lora) and
hosted adapters apply to them as to float layers: LoRA over nf4 blocks is QLoRA. bitsandbytes is imported only when
a quantized mode is used, so a float server (or a machine without bitsandbytes) never needs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

MODES = ("none", "int8", "nf4")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: activations beyond it are outliers
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = True  # QLoRA's double quantization: the blocks' float32 scales become 8-bit (0.5 -> ~0.127 B/weight)

def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def require_bitsandbytes(mode: str = "int8"):
    """The bitsandbytes module for a quantized `mode` (ValueError for an unknown one, RuntimeError without it)."""
    if check_mode(mode) == "none":
        raise ValueError("--quant none needs no bitsandbytes")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise RuntimeError("--quant int8/nf4 needs the bitsandbytes package (pip install bitsandbytes); "
                           "--quant none runs without it") from exc
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast)
    return bitsandbytes


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    """bitsandbytes logs a warning on every int8 product of float32 (or bfloat16) input, that it casts the input to
    float16: on every request of every layer, and nothing an operator can act on (it is how LLM.int8() works)."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> nn.Linear:
    """A bitsandbytes layer computing `linear` in `mode`, its weights quantized on `device` (bitsandbytes quantizes
    when a layer's weights first move to a device). `linear` itself is left as it was."""
    if mode not in ("int8", "nf4"):
        raise ValueError(f"no quantized layer for mode {mode!r}; choose int8 or nf4")
    bnb = require_bitsandbytes(mode)
    weight = linear.weight.detach()
    bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=INT8_OUTLIER_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                         compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4",
                                         module=layer).to(device)
        # On a CPU with AVX-512 BF16, bitsandbytes 0.50 repacks the weights at the first forward without gradients,
        # and from then on matmul_4bit runs them through a kernel outside autograd (gemv_4bit): a later backward request
        # would get no gradient through this layer. A server answers both, so it keeps the differentiable layout.
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    return layer.eval().requires_grad_(False)


def quantize_block(block: nn.Module, mode: str, compute_dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Replace every nn.Linear inside `block` (attention and MLP projections) by its quantized layer, in place, each
    freed as soon as it is replaced; `mode` "none" leaves the block as it is. Returns the block."""
    if check_mode(mode) == "none":
        return block
    names = [name for name, module in block.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, quantized_linear(getattr(parent, child), mode, compute_dtype, device))
    return block


def quantizer(mode: str, compute_dtype: torch.dtype) -> Callable[[nn.Module, torch.device], nn.Module]:
    """What BlockSpan.from_checkpoint calls on each block as it is loaded: quantize it on the device that will hold it
    (on a GPU, bitsandbytes' kernels quantize there, and the float block never occupies GPU memory whole)."""
    check_mode(mode)
    return lambda block, device: quantize_block(block, mode, compute_dtype, device)


def mode_of(block: nn.Module) -> str:
    """The quantization a block's linear layers carry: "none", "int8", "nf4" (or "mixed")."""
    found = set()
    for module in block.modules():
        if isinstance(module, nn.Linear):
            kind = type(module).__name__
            found.add("int8" if kind == "Linear8bitLt" else getattr(module.weight, "quant_type", "nf4")
                      if kind == "Linear4bit" else "none")
    return found.pop() if len(found) == 1 else ("none" if not found else "mixed")


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take as held: parameters and buffers as stored (int8 / packed 4-bit values), plus
    the scales bitsandbytes keeps beside them (int8's row scales, nf4's quantization state)."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for layer in module.modules():
        state = getattr(layer, "state", None)
        scb = getattr(state, "SCB", None) if state is not None else None
        scb = scb if scb is not None else getattr(getattr(layer, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        quant_state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if quant_state is not None:
            total += _quant_state_bytes(quant_state)
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def linear_bytes(out_features: int, in_features: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes of one linear layer's weight matrix in `mode` (the layout bitsandbytes 0.50 keeps; no bias)."""
    n = out_features * in_features
    if check_mode(mode) == "none":
        return n * torch.empty((), dtype=dtype).element_size()
    if mode == "int8":
        return n + 4 * out_features  # int8 values and a float32 scale per output row
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    packed = math.ceil(n / 2)  # two 4-bit values a byte
    if not NF4_DOUBLE_QUANT:
        return packed + 4 * blocks + 4 * 16  # a float32 scale per block, the 16-value NF4 code
    # Block scales in 8 bits, in groups of 256 with a float32 scale each, an offset, the 8-bit code (256 float32).
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 16 + 4 * 256


def estimated_block_bytes(linear_shapes: Sequence[tuple[int, int]], other_weights: int, mode: str,
                          dtype: torch.dtype) -> int:
    """Bytes one block's weights take in `mode`, without building it: its linear layers by (out, in) features, and
    `other_weights` values (norms, biases) kept in `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(linear_bytes(o, i, mode, dtype) for o, i in linear_shapes) + other_weights * itemsize


def block_shapes(block: nn.Module) -> tuple[list[tuple[int, int]], int]:
    """The arguments of estimated_block_bytes for a floating-point block: its linear layers' (out, in) features and
    the count of its other weights."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    shapes = [(m.out_features, m.in_features) for m in linears]
    in_linears = sum(m.weight.numel() for m in linears)
    return shapes, sum(p.numel() for p in block.parameters()) - in_linears
