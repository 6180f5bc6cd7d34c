"""Where a server computes: `--device` parsed into devices, the dtype `auto` gives on them, the contiguous part of a
span each device holds, and tensors to the host at the wire. Pure functions first; probes of this machine at the end.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.dtypes import FLOAT_DTYPES

logger = logging.getLogger(__name__)

CPU, CUDA = "cpu", "cuda"
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")
# CPU flags (as /proc/cpuinfo names them) whose bfloat16 matmuls beat float32: AVX-512 BF16 and AMX. Without them
# (AVX2 only) a bfloat16 matmul of a 4x128 batch took ~6x as long as in float32 here.
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class DeviceFacts:
    """What the dtype rule and the record need to know about a device (see probe())."""

    kind: str  # CPU or CUDA
    fast_bf16: bool  # CUDA: native bfloat16 (compute capability 8.0 or newer); CPU: AVX-512 BF16 or AMX
    name: str = ""  # "NVIDIA H200"; empty for a CPU

    @property
    def label(self) -> str:
        """How records and `swarm status` name it: "cpu", "cuda: NVIDIA H200"."""
        return f"{self.kind}: {self.name}" if self.name else self.kind


# ---------------------------------------------------------------------------------------------- policy (pure)


def parse_devices(text: str, cuda_count: int) -> tuple[torch.device, ...]:
    """`--device` as devices: "auto" (the first GPU if there is one, else the CPU), "cpu", "cuda" (the first GPU),
    "cuda:N", or several separated by commas (a span split between them). `cuda_count`: the GPUs this process sees.
    Raises ValueError naming what is wrong."""
    names = [part.strip() for part in text.split(",")]
    if names == ["auto"]:
        return (torch.device(CUDA, 0),) if cuda_count else (torch.device(CPU),)
    devices = []
    for name in names:
        match = _DEVICE.fullmatch(name)
        if match is None:
            raise ValueError(f"--device {text!r}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or several "
                             "separated by commas (e.g. cuda:0,cuda:1)")
        kind, index = match.group(1), match.group(2)
        if kind == CPU:
            if index is not None:
                raise ValueError(f"--device {text!r}: the CPU takes no index; use cpu")
            devices.append(torch.device(CPU))
            continue
        number = int(index or 0)
        if number >= cuda_count:
            seen = f"{cuda_count} GPU(s) (cuda:0..cuda:{cuda_count - 1})" if cuda_count else "no GPU (CUDA is not available)"
            raise ValueError(f"--device {text!r}: {name} is not available; this process sees {seen}")
        devices.append(torch.device(CUDA, number))
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"--device {text!r} mixes CPU and GPU; a server's devices must all be CPUs or all be GPUs")
    return tuple(devices)


def auto_dtype(kind: str, fast_bf16: bool, checkpoint: torch.dtype) -> torch.dtype:
    """The dtype `--torch-dtype auto` gives:

        device | fast bfloat16 | checkpoint's dtype | auto
        cuda   | yes           | any                | bfloat16
        cuda   | no            | any                | float16
        cpu    | yes           | any                | the checkpoint's (float16 checkpoints: bfloat16)
        cpu    | no            | any                | float32
    """
    if kind == CUDA:
        return torch.bfloat16 if fast_bf16 else torch.float16
    if not fast_bf16:
        return torch.float32
    return torch.bfloat16 if checkpoint == torch.float16 else checkpoint  # float16 is refused on a CPU


def choose_dtype(requested: str, facts: DeviceFacts, checkpoint: torch.dtype) -> torch.dtype:
    """The dtype to compute in on `facts`' device: `requested` ("auto" or a name in swarm.dtypes.FLOAT_DTYPES), for
    a checkpoint stored in `checkpoint`. Raises ValueError for an unknown name and for float16 on a CPU."""
    if requested == "auto":
        return auto_dtype(facts.kind, facts.fast_bf16, checkpoint)
    if requested not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of auto, {', '.join(FLOAT_DTYPES)}")
    if requested == "float16" and facts.kind == CPU:
        # CPU kernels for float16 are few and slow, and its range overflows where bfloat16's does not.
        raise ValueError("float16 is not supported on a CPU; use --torch-dtype float32 or bfloat16 (or auto)")
    return FLOAT_DTYPES[requested]


def cpu_fast_bf16(flags: set[str] | frozenset[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags computes bfloat16 faster than float32."""
    return bool(FAST_BF16_CPU_FLAGS & set(flags))


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has bfloat16 tensor cores (Ampere, 8.0, and newer)."""
    return tuple(capability) >= (8, 0)


def split_span(start: int, end: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Blocks [start, end) cut into one contiguous part per weight, in order, sized in proportion to the weights (each
    part at least one block). With fewer blocks than weights, only the first end - start get a block."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"need at least one positive weight, got {list(weights)}")
    n, parts = end - start, min(len(weights), end - start)
    weights = list(weights[:parts])
    total, acc, bounds = sum(weights), 0.0, [0]
    for weight in weights[:-1]:
        acc += weight
        bounds.append(round(n * acc / total))
    bounds.append(n)
    for i in range(1, parts):  # every part keeps at least one block, from the left and from the right
        bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), n - (parts - i))
    return [(start + a, start + b) for a, b in zip(bounds, bounds[1:])]  # noqa: B905 - bounds[1:] is one shorter


def describe_devices(labels: Sequence[str]) -> str:
    """One string for the devices of a span, in order: "cpu", "cuda: NVIDIA H200", "2 x cuda: NVIDIA H200"."""
    groups: list[list] = []
    for label in labels:
        if groups and groups[-1][0] == label:
            groups[-1][1] += 1
        else:
            groups.append([label, 1])
    return " + ".join(label if count == 1 else f"{count} x {label}" for label, count in groups)


# ---------------------------------------------------------------------------------------------- this machine (I/O)


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(text: str) -> tuple[torch.device, ...]:
    """`--device` on this machine (see parse_devices)."""
    return parse_devices(text, cuda_count())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them, with the bfloat16 ones that torch's own CPU probe finds
    (where /proc/cpuinfo is missing or hides them, as in some containers)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
                break
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, probe_name in probes.items():  # private, but torch's own view; absent in some releases
        probe_fn = getattr(torch.cpu, probe_name, None)
        try:
            if probe_fn is not None and probe_fn():
                flags.add(flag)
        except RuntimeError:
            pass
    return frozenset(flags)


@functools.cache
def probe(device: torch.device) -> DeviceFacts:
    """The facts of one device of this machine."""
    device = torch.device(device)
    if device.type == CUDA:
        index = device.index if device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        return DeviceFacts(CUDA, cuda_native_bf16((props.major, props.minor)), props.name)
    # oneDNN runs torch's fast bfloat16 CPU matmuls: without it the flags do not help.
    return DeviceFacts(CPU, cpu_fast_bf16(cpu_flags()) and torch.backends.mkldnn.is_available())


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in host memory, for the wire. From a GPU it goes through a pinned buffer (torch caches them), which
    copies at full bandwidth; the copy is asynchronous, so wait for it before the bytes are read."""
    if tensor.device.type == CPU:
        return tensor
    if tensor.device.type != CUDA:
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from the wire (host memory) on `device`, in `dtype` (default: its own); converted on the device, where
    it is faster, and with a copy that does not hold up the compute thread."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor if dtype is None else tensor.to(dtype)


def synchronize(devices: Sequence[torch.device]) -> None:
    """Wait for the work queued on these devices (GPU kernels run asynchronously): before reading a clock."""
    for device in {torch.device(d) for d in devices}:
        if device.type == CUDA:
            torch.cuda.synchronize(device)
