"""Spot checks as pure policy: which span request to check, how far two servers' outputs may honestly differ, and
which server a disagreement convicts. client.verification gathers the outputs and acts on the decision.

A key holder can run a server that returns wrong outputs; the swarm key cannot stop it. A client with
`verify_fraction` f sends each sampled span request (a forward, or a generation step) to a second server hosting the
same blocks too; on a disagreement a third one decides. A server that lies on every request is caught after 1/f of
the span requests it serves on average (geometric: within 3/f with 95% probability); one that lies on a share q of
them, after 1/(f q). The bound is only as good as the tolerance: a lie smaller than the codec's error passes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from client.routing import exclusion
from swarm.dht_records import ServerInfo

# The worst relative error per token (L2 over channels) of each codec on real hidden states: SmolLM2-135M's 30 layers'
# outputs for 256 tokens of bench/heldout_en.txt, float32 (measured when spot checks were added). A codec not listed
# gets UNKNOWN_CODEC_ERROR.
CODEC_ERROR = {"none": 0.0, "float16": 4e-4, "bfloat16": 3.7e-3, "int8_outlier": 6.1e-3, "int8_static_outlier": 6.1e-3,
               "hadamard_int8": 6.9e-3, "int6_outlier": 2.1e-2, "int5_outlier": 4.6e-2, "int4_outlier": 9.2e-2,
               "int4_outlier_k4": 0.138}
UNKNOWN_CODEC_ERROR = 0.15
# How far a server's span output may drift from a float32 computation of the same blocks, by the dtype it computes in
# (its record's torch_dtype): float32 only differs in the order of operations (kernels, thread counts).
COMPUTE_ERROR = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}
UNKNOWN_DTYPE_ERROR = 3e-2
# And by how its blocks are quantized (its record's quant, swarm.quantize): the same model computed approximately, so a
# quantized server is compared with the others within this much more, never treated as another model. bench/quantization.py
# measured the worst per-token error of SmolLM2's 10-block spans against float32 at 0.147 (int8) and 0.511 (nf4); these
# are 1.5x that, rounded up. So a spot check with an nf4 replica on either side only catches gross lies (a scaled output
# is 0.5 away, a random one ~1.4): int8 and float replicas check each other far more tightly.
QUANT_ERROR = {"none": 0.0, "int8": 0.25, "nf4": 0.8}
UNKNOWN_QUANT_ERROR = 0.8
# Two outputs that each went through a codec once differ by at most the sum of both errors; the margin covers inputs
# whose statistics differ from SmolLM2's. A server that scales its outputs by 1.5 is 0.5 away (see relative_error).
CODEC_MARGIN = 1.5


def sampled(draw: float, fraction: float) -> bool:
    """Whether a span request is checked, given a uniform draw in [0, 1): a share `fraction` of them."""
    return draw < fraction


def tolerance(reply_codec: str, dtypes: Sequence[str] = ("float32", "float32"), input_codecs: Sequence[str] = (),
              quants: Sequence[str] = ()) -> float:
    """The largest relative_error two honest servers' outputs may show: each computed in its dtype (`dtypes`, one per
    server) with its blocks quantized as in `quants` (one per server; none by default) and encoded in `reply_codec`,
    from inputs that were the same bytes, or differed by one encoding in each of `input_codecs` (e.g. a training
    stream's delta-coded input against the same rows sent in full)."""
    def codec_error(codec: str) -> float:
        return CODEC_ERROR.get(codec or "none", UNKNOWN_CODEC_ERROR)

    compute = sum(COMPUTE_ERROR.get(dtype, UNKNOWN_DTYPE_ERROR) for dtype in dtypes)
    compute += sum(QUANT_ERROR.get(quant or "none", UNKNOWN_QUANT_ERROR) for quant in quants)
    return compute + CODEC_MARGIN * (2 * codec_error(reply_codec) + sum(map(codec_error, input_codecs)))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between two outputs of the same request, token by token: |a - b| over the smaller of
    |a| and |b| (L2 over the last dimension), so a lie about one token of a batch is not averaged away. Outputs of
    different shapes, or not finite, are infinitely apart."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.float().reshape(-1, a.shape[-1] if a.ndim else 1), b.float().reshape(-1, b.shape[-1] if b.ndim else 1)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    if a.numel() == 0:
        return 0.0
    scale = torch.minimum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((a - b).norm(dim=-1) / scale).max())


@dataclass(frozen=True)
class Verdict:
    """Who is in the majority and who is out of it (indices into the servers judged); `decided`: a majority exists."""

    majority: tuple[int, ...]
    outvoted: tuple[int, ...]

    @property
    def decided(self) -> bool:
        return bool(self.majority)


def judge(agree: Sequence[Sequence[bool]]) -> Verdict:
    """Given which outputs agree (`agree[i][j]`, symmetric), the servers whose output agrees with more than half of all
    outputs (its own included) form the majority; the others are outvoted. With two servers that disagree there is no
    majority (a third must be asked); three that all disagree leave it undecided too."""
    n = len(agree)
    majority = tuple(i for i in range(n) if 1 + sum(bool(agree[i][j]) for j in range(n) if j != i) > n / 2)
    outvoted = tuple(i for i in range(n) if i not in majority) if majority else ()
    return Verdict(majority, outvoted)


def agreement(errors: Sequence[Sequence[float]], tolerances: Sequence[Sequence[float]]) -> list[list[bool]]:
    """agree[i][j]: outputs i and j are within their pair's tolerance."""
    return [[i == j or errors[i][j] <= tolerances[i][j] for j in range(len(errors))] for i in range(len(errors))]


def replicas(servers: Sequence[ServerInfo], start: int, end: int, exclude: Collection[str], rules: dict) -> list[ServerInfo]:
    """Servers that may check a request to blocks [start, end): each hosts all of them (so its output is comparable
    as it is), is usable by client.routing.exclusion under `rules` and is not in `exclude` (the servers that already
    answered)."""
    return [s for s in servers if s.record.start <= start and end <= s.record.end and str(s.peer_id) not in exclude
            and exclusion(s, **rules) is None]
