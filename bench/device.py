"""Device check: do the servers' blocks compute right, and how fast, on this machine's accelerator?

Run from a checkout: `python bench/device.py` (no install needed; under 5 minutes on one NVIDIA GPU).

Step 1, the blocks (needs only torch, transformers, and bitsandbytes for int8/nf4): a random Llama with the geometry of
a 7-8B Llama (hidden 4096, intermediate 14336, 32 heads, 8 KV heads; --blocks blocks, a 32000-token vocabulary) is the
CPU float32 reference. For each of none / int8 / nf4 its blocks are built as a server builds them
(swarm.models.span.BlockSpan, swarm.quantize) on the device, in the device's dtype (bfloat16 on CUDA), and checked:

- logits: the device's against the CPU float32 reference (relative error per token, L2 over the vocabulary; top-1
  agreement, shown only: a random model's logits are nearly flat, so its argmax flips under any rounding);
- decode: a prefill then single-token steps with the KV cache, against one full forward on the device;
- backward: the gradient of a loss w.r.t. the input hidden states against the reference's;
- memory: bytes the blocks take on the device (allocated) against swarm.quantize.estimated_block_bytes, and the
  peak while building them;
- speed: ms per decode step (batch 1, after a 128-token prefill) and per 1024-token forward.

Step 2, a swarm (needs hivemind and pydantic too, and servers with --device): 2 local servers of a tiny random Llama
on the device, float32; a client's greedy generations must equal local transformers' on the CPU token for token.

Without an NVIDIA GPU it says so and runs both steps on the CPU, step 1 with a smaller geometry (hidden 1024,
intermediate 3584, 8 heads, 2 KV heads: the 8B shapes / 4, so a CPU finishes in a minute or two) and float32.
Exit status 0 when every check that ran passed (skips are reported, not failures), 1 otherwise.

Run: python bench/device.py [--blocks N] [--geometry 8b|small] [--modes none,int8,nf4] [--skip-swarm]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a plain checkout: nothing installed

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from swarm import quantize  # noqa: E402  (torch only; bitsandbytes when a quantized mode runs)
from swarm.models import family_for  # noqa: E402  (torch and transformers only)
from swarm.models.span import BlockSpan, SpanPart  # noqa: E402

GEOMETRY = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32000),
    "small": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=8192),
}
CHECK_TOKENS = 64  # tokens of the accuracy checks (the timed forward takes 1024)
DECODE_STEPS = 8  # of the T tokens, the last ones run as single-token steps
# Largest relative errors accepted, by mode: the CPU float32 reference against the device. float32 differs only in
# summation order; bfloat16 keeps 8 bits of mantissa (BF16_EXTRA more); int8 and nf4 add their rounding of weights (and
# int8 of activations). On random weights the blocks' own outputs dominate the residual stream, so that rounding shows
# far more than on a trained model's: measured on the CPU (small geometry, 2 blocks, float32) int8 0.046 and nf4 0.36
# (SmolLM2's whole-model figures are in bench/quantization.py). These bounds catch a broken path (NaN, a wrong layout:
# errors ~1); the figures printed are what to read. The gradient gets twice the bound.
LOGIT_TOL = {"none": 1e-4, "int8": 0.15, "nf4": 0.6}
BF16_EXTRA = 0.05
DECODE_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.05}  # the same blocks, cached or not: order of operations only


@dataclasses.dataclass
class Report:
    failures: list[str] = dataclasses.field(default_factory=list)
    skips: list[str] = dataclasses.field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def skip(self, what: str) -> None:
        print(f"  SKIP {what}", flush=True)
        self.skips.append(what)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token relative error (L2 over the last dimension), in float32 on the CPU."""
    a, b = a.detach().float().cpu().flatten(0, -2), b.detach().float().cpu().flatten(0, -2)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, caches)
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# ---------------------------------------------------------------------------------------------- step 1: blocks


def reference_model(geometry: dict, blocks: int) -> LlamaForCausalLM:
    config = LlamaConfig(**geometry, num_hidden_layers=blocks, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()  # initialized as transformers does: normal(0, 0.02)


def device_span(model: LlamaForCausalLM, mode: str, device: torch.device, dtype: torch.dtype) -> BlockSpan:
    """The reference's blocks as a server with --quant `mode` builds them on `device`: one block at a time, each in
    `dtype`, quantized (on the device) before the next."""
    layers = []
    for layer in model.model.layers:
        block = copy.deepcopy(layer).to(dtype)
        layers.append(quantize.quantize_block(block, mode, dtype, device).to(device))
    n = len(layers)
    return BlockSpan.of_blocks(family_for(model.config), model.config, 0, n, layers, [SpanPart(0, n, device)])


def head_on(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype):
    norm = copy.deepcopy(model.model.norm).to(device=device, dtype=dtype)
    head = copy.deepcopy(model.lm_head).to(device=device, dtype=dtype)
    return lambda hidden: head(norm(hidden)).float()


@dataclasses.dataclass
class Reference:
    """The CPU float32 model's answers on the check's input: logits, and the gradient of a loss w.r.t. the input."""

    embeds: torch.Tensor  # [1, T, hidden]: the blocks' input
    labels: torch.Tensor  # [1, T]: the loss's targets
    logits: torch.Tensor
    grad: torch.Tensor

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> Reference:
        generator = torch.Generator().manual_seed(1)
        ids, labels = torch.randint(0, model.config.vocab_size, (2, 1, CHECK_TOKENS), generator=generator)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        torch.nn.functional.cross_entropy(logits[0], labels[0]).backward()
        return cls(embeds.detach(), labels, logits.detach(), embeds.grad)


def block_checks(model: LlamaForCausalLM, modes: list[str], device: torch.device, dtype: torch.dtype,
                 report: Report) -> list[dict]:
    began = time.perf_counter()
    reference = Reference.of(model)
    print(f"  CPU float32 reference: logits and gradient of {CHECK_TOKENS} tokens in {time.perf_counter() - began:.1f} s")
    rows = []
    for mode in modes:
        print(f"  {mode} ({dtype}, {device}):", flush=True)
        if mode != "none" and importlib.util.find_spec("bitsandbytes") is None:
            report.skip(f"{mode}: bitsandbytes is not installed (pip install bitsandbytes, one wheel)")
            continue
        rows.append(check_on_device(model, reference, mode, device, dtype, report))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_on_device(model: LlamaForCausalLM, reference: Reference, mode: str, device: torch.device, dtype: torch.dtype,
                    report: Report) -> dict:
    base = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    span = device_span(model, mode, device, dtype)
    held = allocated(device) - base
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    measured = held if device.type == "cuda" else quantize.weight_bytes(span.layers)
    shapes, others = quantize.block_shapes(model.model.layers[0])
    estimate = len(span.layers) * quantize.estimated_block_bytes(shapes, others, mode, dtype)
    head = head_on(model, device, dtype)
    row = {"mode": mode, "bytes": measured, "estimate": estimate, "peak": peak}
    x, pos = reference.embeds.to(device=device, dtype=dtype), torch.arange(CHECK_TOKENS, device=device)[None]

    with torch.inference_mode():
        logits = head(span(x, pos))
    row["logits"] = relative_error(logits, reference.logits)
    row["top1"] = 100 * float((logits.cpu().argmax(-1) == reference.logits.argmax(-1)).float().mean())
    tol = LOGIT_TOL[mode] + (BF16_EXTRA if dtype != torch.float32 else 0.0)
    report.check(row["logits"] <= tol, f"{mode}: logits vs CPU float32, relative error {row['logits']:.3g} <= {tol:g} "
                                       f"(top-1 agreement {row['top1']:.1f}%)")

    with torch.inference_mode():
        full = span(x, pos)
        cache = span.new_cache()
        prefix = CHECK_TOKENS - DECODE_STEPS
        steps = [span(x[:, :prefix], pos[:, :prefix], cache=cache)[:, -1:]]
        for t in range(prefix, CHECK_TOKENS - 1):
            steps.append(span(x[:, t : t + 1], pos[:, t : t + 1], cache=cache))
    row["decode"] = relative_error(torch.cat(steps, 1), full[:, prefix - 1 : CHECK_TOKENS - 1])
    report.check(row["decode"] <= DECODE_TOL[dtype], f"{mode}: {DECODE_STEPS - 1} decode steps vs a full forward, "
                                                    f"relative error {row['decode']:.3g} <= {DECODE_TOL[dtype]:g}")

    x_grad = x.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(head(span(x_grad, pos))[0], reference.labels[0].to(device))
    (grad,) = torch.autograd.grad(loss, x_grad)
    row["grad"] = relative_error(grad, reference.grad)
    report.check(row["grad"] <= 2 * tol and float(grad.abs().max()) > 0,
                 f"{mode}: gradient w.r.t. the input vs CPU float32, relative error {row['grad']:.3g} <= {2 * tol:g}")
    report.check(abs(measured - estimate) <= 0.02 * estimate + (1 << 20),
                 f"{mode}: weights take {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB"
                 + (f" (peak while building {peak / 2**20:.1f} MiB)" if device.type == "cuda" else " (tensor bytes)"))

    row["decode_ms"], row["forward_ms"] = timings(span, device, dtype)
    print(f"    {row['decode_ms']:.2f} ms per decode step, {row['forward_ms']:.1f} ms per 1024-token forward "
          f"({len(span.layers)} blocks)", flush=True)
    return row


@torch.inference_mode()
def timings(span: BlockSpan, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(ms per decode step in a session after a 128-token prefill, ms per 1024-token forward), batch 1."""
    hidden_size = span.config.hidden_size
    cache = span.new_cache()
    span(torch.randn(1, 128, hidden_size, device=device, dtype=dtype), torch.arange(128, device=device)[None], cache=cache)
    token = torch.randn(1, 1, hidden_size, device=device, dtype=dtype)
    position = [128]

    def decode_step() -> None:  # one token more in the same session, as generation runs
        span(token, torch.tensor([[position[0]]], device=device), cache=cache)
        position[0] += 1

    long = torch.randn(1, 1024, hidden_size, device=device, dtype=dtype)
    positions = torch.arange(1024, device=device)[None]
    return (median_ms(decode_step, device, 10),
            median_ms(lambda: span(long, positions), device, 5 if device.type == "cuda" else 2))


# ---------------------------------------------------------------------------------------------- step 2: a swarm


def swarm_check(device: torch.device, report: Report) -> None:
    print("step 2: a 2-server local swarm", flush=True)
    missing = [name for name in ("hivemind", "pydantic", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:
        report.skip(f"the swarm step: this machine lacks {', '.join(missing)} (pip install {' '.join(missing)}); "
                    "the block checks above need none of them")
        return
    from swarm.config import ServerConfig

    device_flag = "device" in {f.name for f in dataclasses.fields(ServerConfig)}
    if device.type != "cpu" and not device_flag:
        report.skip(f"the swarm step on {device}: this checkout's servers have no --device option")
        return
    ok, detail = tiny_generation_check(device, device_flag)
    report.check(ok, f"greedy generation through 2 servers on {device} equals local transformers on the CPU: {detail}")


def tiny_generation_check(device: torch.device, device_flag: bool, new_tokens: int = 24) -> tuple[bool, str]:
    """Greedy generations of a tiny random Llama (bench/common.py's) through 2 servers on `device` against local
    transformers on the CPU, float32 both."""
    from common import build_tiny  # bench/common.py

    from client.model import DistributedModelForCausalLM
    from swarm.launch import LocalSwarm, even_spans

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with tempfile.TemporaryDirectory(prefix="device-check-") as folder:
        path = build_tiny(Path(folder))
        reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, reference.config.vocab_size, (1, 8), generator=generator) for _ in range(3)]
        with torch.no_grad():
            expected = [reference.generate(p, attention_mask=torch.ones_like(p), **settings) for p in prompts]
        extra = ["--torch-dtype", "float32", *(["--device", str(device)] if device_flag else [])]
        with LocalSwarm() as swarm:
            began = time.perf_counter()
            swarm.start_bootstrap()
            swarm.start_servers(str(path), even_spans(reference.config.num_hidden_layers, 2), extra)
            print(f"  2 servers ready in {time.perf_counter() - began:.1f} s ({' '.join(extra)})", flush=True)
            model = DistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, torch_dtype="float32")
            try:
                model.set_codecs(inference="none", activations="none")
                began = time.perf_counter()
                outputs = [model.generate(p, attention_mask=torch.ones_like(p), **settings) for p in prompts]
                seconds = time.perf_counter() - began
            finally:
                model.remote_layers.connection.shutdown()
    same = sum(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    return same == len(prompts), (f"{same}/{len(prompts)} prompts x {new_tokens} tokens identical "
                                  f"({1000 * seconds / (len(prompts) * new_tokens):.1f} ms per token)")


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=list(GEOMETRY), default=None, help="8b on a GPU, small on a CPU")
    parser.add_argument("--blocks", type=int, default=None, help="blocks to check (default: 3 on a GPU, 2 on a CPU)")
    parser.add_argument("--modes", default=",".join(quantize.MODES), help="comma-separated quantizations")
    parser.add_argument("--skip-swarm", action="store_true", help="run step 1 only")
    args = parser.parse_args()
    began = time.perf_counter()
    report = Report()
    gpu = torch.cuda.is_available()
    if gpu:
        device = torch.device("cuda:0")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"compute in {dtype}")
    else:
        device, dtype = torch.device("cpu"), torch.float32
        print(f"No NVIDIA GPU on this machine (torch {torch.__version__}, cuda available: False): checking the CPU paths "
              f"instead, {torch.get_num_threads()} threads, float32")
    geometry = args.geometry or ("8b" if gpu else "small")
    blocks = args.blocks or (3 if gpu else 2)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        quantize.check_mode(mode)
    print(f"step 1: {blocks} blocks of a random Llama, geometry {geometry} {GEOMETRY[geometry]}", flush=True)
    model = reference_model(GEOMETRY[geometry], blocks)
    rows = block_checks(model, modes, device, dtype, report)
    if rows:
        print(f"\n  {'mode':6}{'MiB':>9}{'est MiB':>9}{'logits err':>12}{'top-1':>8}{'decode err':>12}{'grad err':>10}"
              f"{'ms/step':>9}{'ms/1024 tok':>13}")
        for r in rows:
            print(f"  {r['mode']:6}{r['bytes'] / 2**20:>9.1f}{r['estimate'] / 2**20:>9.1f}{r['logits']:>12.3g}"
                  f"{r['top1']:>7.1f}%{r['decode']:>12.3g}{r['grad']:>10.3g}{r['decode_ms']:>9.2f}{r['forward_ms']:>13.1f}")
    del model
    if args.skip_swarm:
        report.skip("the swarm step (--skip-swarm)")
    else:
        swarm_check(device, report)
    elapsed = time.perf_counter() - began
    where = f"on {torch.cuda.get_device_name(device)}" if gpu else "on the CPU (no GPU available)"
    print(f"\n{len(report.failures)} failed, {len(report.skips)} skipped, {elapsed:.0f} s {where}")
    for failure in report.failures:
        print(f"  FAILED: {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
