"""A server's throughput: measured on its devices at start within a few seconds, once per kind of device, dtype,
quantization and block shape, then read back from a cache file on later starts (and on every move).

Figures are per block, per device: a span's figures follow from its parts, whatever its length, so a server that
moves or hosts a different number of blocks needs no new measurement. They go into the server's record, where
clients route by them (client.routing).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swarm.devices import probe, synchronize
from swarm.kv_cache import head_dim, kv_heads

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "SWARM_CACHE_DIR"
CACHE_FILE = "throughput.json"
FILE_VERSION = 1
# A measurement of one device stops taking new samples past BOUND_S seconds (it always takes one of each kind, so a
# very slow device still gives a figure, after about one prompt, one decode step and one forward more).
BOUND_S = 3.0
PROMPT_TOKENS = 8  # the cached prefix of the decode steps; its forward also warms the kernels up
DECODE_STEPS = 8  # at most; the median counts (the first steps may still pay for one-time setup)
FORWARD_TOKENS = 128
FORWARDS = 2  # at most; the fastest counts
MEASURED_BLOCKS = 4  # at most, of each device's part: per-block figures need no more


@dataclass(frozen=True)
class BlockSpeed:
    """One block on one device: a decode step (batch 1) and a forward of FORWARD_TOKENS tokens, in milliseconds."""

    decode_ms: float
    forward_ms: float


@dataclass(frozen=True)
class SpanSpeed:
    """What a server announces: ms per block for a decode step, and forward tokens/s through its whole span."""

    ms_per_block: float
    forward_tps: float


# ---------------------------------------------------------------------------------------------- policy (pure)


def span_figures(parts: list[tuple[int, BlockSpeed]]) -> SpanSpeed:
    """The span's figures from (blocks, per-block speed) of each of its parts, run one after the other."""
    blocks = sum(n for n, _ in parts)
    decode_ms = sum(n * s.decode_ms for n, s in parts)
    forward_ms = sum(n * s.forward_ms for n, s in parts)
    return SpanSpeed(decode_ms / blocks, FORWARD_TOKENS * 1000 / forward_ms)


def cache_key(label: str, dtype: torch.dtype, quant: str, config, versions: dict[str, str]) -> str:
    """What a figure depends on: the device, how the blocks compute, their shape and the kernels' versions."""
    return json.dumps({
        "device": label, "dtype": str(dtype).replace("torch.", ""), "quant": quant,
        "model_type": getattr(config, "model_type", ""), "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "heads": config.num_attention_heads,
        "kv_heads": kv_heads(config), "head_dim": head_dim(config), **versions,
    }, sort_keys=True)


def library_versions() -> dict[str, str]:
    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = "none"
    return {"torch": torch.__version__, "bitsandbytes": bnb}


# ---------------------------------------------------------------------------------------------- the cache file


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "swarm")


class ThroughputCache:
    """Figures by cache_key in one JSON file. Written whole to a temporary file, then renamed over the old one, so a
    reader never sees half a file; servers starting together may each write, and the last one's entries win (the
    others measure again on their next start). A file that cannot be read as one is ignored, with a warning."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the throughput cache %s, which cannot be read (%s): measuring", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("entries"), dict):
            logger.warning("ignoring the throughput cache %s, which is not a version-%d cache file: measuring",
                           self.path, FILE_VERSION)
            return {}
        return data["entries"]

    def get(self, key: str) -> BlockSpeed | None:
        entry = self._read().get(key)
        try:
            speed = BlockSpeed(float(entry["decode_ms"]), float(entry["forward_ms"]))
        except (TypeError, KeyError, ValueError):
            return None
        return speed if speed.decode_ms > 0 and speed.forward_ms > 0 else None

    def put(self, key: str, speed: BlockSpeed) -> None:
        entries = {**self._read(), key: {**asdict(speed), "measured_at": round(time.time())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".throughput-", suffix=".json", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": FILE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home is no reason not to serve
            logger.warning("cannot write the throughput cache %s (%s): the next start measures again", self.path, exc)


# ---------------------------------------------------------------------------------------------- measuring (I/O)


def measure_part(span, part, dtype: torch.dtype, bound_s: float = BOUND_S,
                 clock: Callable[[], float] = time.perf_counter) -> BlockSpeed:
    """Per-block speed of `part` of `span` (a swarm.models.span.BlockSpan), on its first MEASURED_BLOCKS blocks, on
    random input; new samples stop past `bound_s` seconds (half of it for the decode steps)."""
    hidden_size, device = span.config.hidden_size, part.device
    first, last = part.start, min(part.end, part.start + MEASURED_BLOCKS)
    began = clock()

    def timed(hidden, positions, cache=None) -> float:
        synchronize([device])  # GPU kernels run asynchronously: wait for them before each clock
        start = clock()
        span(hidden, positions, cache=cache, start=first, end=last)
        synchronize([device])
        return clock() - start

    def random(length: int) -> torch.Tensor:
        return torch.randn(1, length, hidden_size, dtype=dtype, device=device)

    with torch.inference_mode():
        cache = span.new_cache(1, PROMPT_TOKENS + DECODE_STEPS, dtype, first, last)  # as a session's (preallocated)
        timed(random(PROMPT_TOKENS), torch.arange(PROMPT_TOKENS, device=device)[None], cache)
        steps: list[float] = []
        while not steps or (len(steps) < DECODE_STEPS and clock() - began < bound_s / 2):
            position = torch.tensor([[PROMPT_TOKENS + len(steps)]], device=device)
            steps.append(timed(random(1), position, cache))
        forwards: list[float] = []
        while not forwards or (len(forwards) < FORWARDS and clock() - began < bound_s):
            forwards.append(timed(random(FORWARD_TOKENS), torch.arange(FORWARD_TOKENS, device=device)[None]))
    blocks = last - first
    return BlockSpeed(sorted(steps)[len(steps) // 2] * 1000 / blocks, min(forwards) * 1000 / blocks)


def span_speed(span, dtype: torch.dtype, quant: str, remeasure: bool = False, cache: ThroughputCache | None = None,
               bound_s: float = BOUND_S, measure: Callable[..., BlockSpeed] | None = None) -> SpanSpeed:
    """The span's figures: each kind of device's per-block speed from the cache, or measured (then cached) when it
    has none, or when `remeasure`."""
    cache = cache if cache is not None else ThroughputCache()
    measure = measure if measure is not None else measure_part
    versions = library_versions()
    what = str(dtype).replace("torch.", "") + ("" if quant == "none" else f", {quant}")
    known: dict[str, BlockSpeed] = {}
    parts = []
    for part in span.parts:
        label = probe(part.device).label
        if label not in known:
            key = cache_key(label, dtype, quant, span.config, versions)
            speed = None if remeasure else cache.get(key)
            if speed is not None:
                logger.info("throughput on %s (%s): %.3f ms per block per decode step, %.2f ms per block per "
                            "%d-token forward, as measured by an earlier start (--remeasure measures again)",
                            label, what, speed.decode_ms, speed.forward_ms, FORWARD_TOKENS)
            else:
                began = time.perf_counter()
                speed = measure(span, part, dtype, bound_s)
                cache.put(key, speed)
                logger.info("throughput on %s (%s): %.3f ms per block per decode step, %.2f ms per block per "
                            "%d-token forward, measured in %.1f s (cached in %s)", label, what, speed.decode_ms,
                            speed.forward_ms, FORWARD_TOKENS, time.perf_counter() - began, cache.path)
            known[label] = speed
        parts.append((part.end - part.start, known[label]))
    return span_figures(parts)
