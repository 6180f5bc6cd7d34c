"""Which bitsandbytes settings keep SmolLM2 close to float32: a fast in-process sweep (no swarm).

SmolLM2-135M-Instruct in one process (transformers, float32), its decoder blocks' linear layers replaced by
bitsandbytes layers per configuration; logits over --positions teacher-forced positions of bench/heldout_en.txt
compared with the float32 model's: top-1 agreement, perplexity change, and bytes of one block's weights.
bench/quantization.py measures the chosen settings through a real swarm; this one finds them.

A configuration is MODE[/KEY=VALUE...], MODE one of int8, nf4, fp4, w8 (int8 weights, float activations: LLM.int8()'s
weight error alone), b8 (int8 weights with a scale per block of bs weights, float activations: a finer int8), noise (random weight errors of relative size e: what
any rounding that large costs, the floor of the measure), and keys:
  e=0.01     noise's relative size
  t=6        int8 outlier threshold (0: every activation in int8)
  bs=64      4-bit blocksize;  dq=1  double quantization of the 4-bit scales
  only=a+b   quantize only layers whose name ends with one of these (q_proj, down_proj, ...)
  int8=a+b   layers kept in int8 instead (a 4-bit mode's sensitive layers)
  float=0+29 blocks left in float32
"swarm-int8" and "swarm-nf4" quantize through swarm.quantize, as a server does.

Run: python bench/quant_sweep.py [--configs int8,int8/t=0,nf4,nf4/int8=down_proj] [--positions 2000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from compression import text_windows  # bench/compression.py
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from swarm import quantize
from swarm.assets import ensure_smollm2

HERE = Path(__file__).resolve().parent
DEFAULTS = {"e": "0.01", "t": "6", "bs": "64", "dq": "1", "only": "", "int8": "", "float": ""}


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    mode, *pairs = text.split("/")
    options = dict(DEFAULTS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in DEFAULTS:
            sys.exit(f"bad option {pair!r} in {text!r}; keys: {', '.join(DEFAULTS)}")
        options[key] = value
    if mode not in ("int8", "nf4", "fp4", "w8", "b8", "noise", "swarm-int8", "swarm-nf4"):
        sys.exit(f"unknown mode {mode!r} in {text!r}")
    return mode, options


def bnb_linear(linear: nn.Linear, mode: str, options: dict[str, str]) -> nn.Module:
    bnb = quantize.require_bitsandbytes()
    weight = linear.weight.detach()
    if mode == "noise":  # Gaussian noise of e times each row's RMS: how much any rounding of that size costs
        torch.manual_seed(0)
        rms = weight.pow(2).mean(1, keepdim=True).sqrt()
        return _float_linear(weight + float(options["e"]) * rms * torch.randn_like(weight))
    if mode == "b8":  # absmax int8 per block of bs consecutive weights of a row
        blocks = weight.reshape(-1, int(options["bs"]))
        scale = blocks.abs().amax(1, keepdim=True) / 127
        return _float_linear((torch.round(blocks / scale) * scale).reshape(weight.shape))
    if mode in ("int8", "w8"):
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=float(options["t"]))
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        if mode == "w8":  # the int8 weights dequantized: only the weights' rounding, no activation quantization
            scale = layer.weight.SCB.float()[:, None] / 127
            return _float_linear(layer.weight.data.float() * scale)
        return layer.eval()
    double = options["dq"] == "1"
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double, quant_type=mode)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=int(options["bs"]),
                                     compress_statistics=double, quant_type=mode, module=layer).to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer.eval()


def _float_linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer.eval()


def quantized_model(model: nn.Module, text: str) -> nn.Module:
    mode, options = parse_config(text)
    model = copy.deepcopy(model)
    keep = {int(b) for b in options["float"].split("+") if b}
    only = [s for s in options["only"].split("+") if s]
    as_int8 = [s for s in options["int8"].split("+") if s]
    for index, block in enumerate(model.model.layers):
        if index in keep:
            continue
        if mode.startswith("swarm-"):
            quantize.quantize_block(block, mode.removeprefix("swarm-"), torch.float32)
            continue
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear or (only and not name.endswith(tuple(only))):
                continue
            parent, _, child = name.rpartition(".")
            layer_mode = "int8" if name.endswith(tuple(as_int8)) and as_int8 else mode
            setattr(block.get_submodule(parent), child, bnb_linear(module, layer_mode, options))
    return model


def evaluate(model: nn.Module, windows: torch.Tensor, positions: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, nll = [], []
    with torch.inference_mode():
        for chunk in windows.split(batch):
            logits = model(chunk).logits[:, :-1].float()
            top.append(logits.argmax(-1).flatten())
            nll.append(nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none"))
    return torch.cat(top)[:positions], torch.cat(nll)[:positions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="swarm-int8,int8/t=0,w8,swarm-nf4,nf4/int8=down_proj",
                        help="comma-separated configurations (see above)")
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=Path, default=HERE / "heldout_en.txt")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = ensure_smollm2()
    windows = text_windows(AutoTokenizer.from_pretrained(path), args.text, args.window, args.positions)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_top, ref_nll = evaluate(model, windows, args.positions, args.batch)
    ref_ppl = ref_nll.mean().exp().item()
    print(f"float32 perplexity {ref_ppl:.3f} over {args.positions} positions; block 0 "
          f"{quantize.weight_bytes(model.model.layers[0]) / 2**20:.2f} MB")
    print(f"{'config':44}{'top-1':>8}{'ppl d':>9}{'block0 MB':>11}{'s':>6}")
    for text in args.configs.split(","):
        began = time.perf_counter()
        quantized = quantized_model(model, text)
        top, nll = evaluate(quantized, windows, args.positions, args.batch)
        agree = 100 * (top == ref_top).float().mean().item()
        change = 100 * (nll.mean().exp().item() / ref_ppl - 1)
        size = quantize.weight_bytes(quantized.model.layers[min(15, len(quantized.model.layers) - 1)]) / 2**20
        print(f"{text:44}{agree:>7.2f}%{change:>+8.2f}%{size:>11.3f}{time.perf_counter() - began:>6.0f}", flush=True)
        del quantized


if __name__ == "__main__":
    main()
