"""`--num-blocks auto`: how many blocks fit the memory a server's devices have free, after what else it keeps there.

The policy (plan_blocks) is a pure function of the free bytes of each memory pool, the cost of one block and the
server's fixed budgets; the probes of this machine (free_bytes) are at the end, where tests replace them.

Where each budget lives (server/handler.py, server/backend.py):

    device memory: the blocks' weights, their KV caches, training activations kept until their backward (the span's
                   outputs stay where they were computed), uploaded LoRA tensors (cached on the devices of the blocks
                   they adapt), and a workspace for one block's intermediate tensors of the largest request
    host RAM:      requests in flight (received and decoded on the host) and the references of delta-coded
                   activations (wire values); on a GPU server they are logged, not planned

On a CPU everything is RAM, plus one block in the compute dtype while it loads (it is read whole, then quantized).
Devices that share memory form one pool: every CPU entry of `--device cpu,cpu` shares the RAM, counted once. The
fixed budgets (and a `--cache-bytes` total) are charged to the pools in proportion to what each has usable, the way
the span is split between them; then every pool holds as many blocks as its rest allows, and the span is split
between the devices in proportion to those counts.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from swarm import quantize
from swarm.config import ServerConfig
from swarm.kv_cache import kv_bytes_per_token
from swarm.models.span import span_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from swarm.models import ModelFamily

logger = logging.getLogger(__name__)

MIB = 2**20


@dataclass(frozen=True)
class Pool:
    """Memory that one or more of the server's devices share: "cpu" (the RAM) or "cuda:N"."""

    name: str
    devices: tuple[int, ...]  # positions in --device's list
    free: int  # bytes free now

    @property
    def on_host(self) -> bool:
        return self.name == "cpu"


@dataclass(frozen=True)
class BlockCost:
    """What one block takes on its device: its weights (as served: dtype and quantization) and its KV cache."""

    weights: int
    kv: int  # its share of --cache-tokens (0 when kv_total is given)
    kv_total: int | None = None  # --cache-bytes: a total over all blocks and devices, charged like a fixed budget
    load: int = 0  # a block in the compute dtype, held while one loads (charged to the RAM once)
    what: str = ""  # "float32", "nf4 computed in bfloat16", ... for the log line
    kv_tokens: int = 0  # what `kv` holds, for the log line

    def describe(self) -> str:
        kv = (f" + {_size(self.kv)} of KV cache ({self.kv_tokens} tokens)" if self.kv_total is None
              else f"; the KV cache takes {_size(self.kv_total)} in all (--cache-bytes)")
        return f"a block takes {_size(self.weights)} of weights ({self.what}){kv}"


@dataclass(frozen=True)
class Budgets:
    """The fixed budgets of ServerConfig, in bytes (see the module's docstring for where each lives)."""

    train_activations: int
    lora_cache: int
    workspace: int
    inflight: int
    delta_state: int

    def device(self) -> dict[str, int]:
        return {"train activations": self.train_activations, "LoRA cache": self.lora_cache, "workspace": self.workspace}

    def host(self) -> dict[str, int]:
        return {"requests in flight": self.inflight, "delta references": self.delta_state}


@dataclass(frozen=True)
class Headroom:
    """Memory left unplanned: allocator fragmentation, the CUDA context, what the estimates miss."""

    fraction: float
    minimum: int

    def of(self, free: int) -> int:
        return max(math.ceil(self.fraction * free), self.minimum)


@dataclass(frozen=True)
class PoolPlan:
    pool: Pool
    headroom: int
    charges: dict[str, int]  # fixed bytes charged to this pool, by budget
    per_block: int
    blocks: int  # how many fit (before the cap at the model's size)

    @property
    def left(self) -> int:
        return self.pool.free - self.headroom - sum(self.charges.values())


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int  # capped at the model's blocks
    num_model_blocks: int
    pools: tuple[PoolPlan, ...]
    cost: BlockCost
    host_budgets: dict[str, int]  # on a GPU server: what it keeps in host RAM, not planned
    device_weights: tuple[float, ...]  # blocks each device (in --device's order) can hold: the span's split

    def describe(self) -> str:
        """The numbers behind the choice, for the log."""
        lines = [f"--num-blocks auto: {self.num_blocks} of the model's {self.num_model_blocks} blocks fit; "
                 f"{self.cost.describe()}"]
        for p in self.pools:
            charges = ", ".join(f"{name} {_size(n)}" for name, n in p.charges.items() if n)
            lines.append(f"  {p.pool.name}: {_size(p.pool.free)} free - headroom {_size(p.headroom)}"
                         f"{' - ' + charges if charges else ''} = {_size(max(p.left, 0))} for blocks of "
                         f"{_size(p.per_block)}: {p.blocks} block(s)")
        if self.host_budgets:
            lines.append("  host RAM (not planned): " + ", ".join(f"{k} {_size(v)}" for k, v in self.host_budgets.items()))
        return "\n".join(lines)


class NothingFits(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- policy (pure)


def pools_of(devices: Sequence[torch.device], free: Callable[[torch.device], int]) -> list[Pool]:
    """The memory pools of `devices` (in order of first use), each queried once with `free`."""
    groups: dict[str, list[int]] = {}
    for index, device in enumerate(devices):
        device = torch.device(device)
        name = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
        groups.setdefault(name, []).append(index)
    return [Pool(name, tuple(indices), free(devices[indices[0]])) for name, indices in groups.items()]


def plan_blocks(pools: Sequence[Pool], cost: BlockCost, budgets: Budgets, headroom: Headroom,
                num_model_blocks: int) -> MemoryPlan:
    """As many blocks as the pools hold (at most the model's), and what each device holds. NothingFits when not
    even one block does, with the numbers and what to change."""
    usable = [max(p.free - headroom.of(p.free), 0) for p in pools]
    total_usable = sum(usable)
    shared = dict(budgets.device())
    if cost.kv_total is not None:
        shared["KV cache"] = cost.kv_total
    plans = []
    for pool, room in zip(pools, usable, strict=True):
        share = room / total_usable if total_usable else 1 / len(pools)
        charges = {name: math.ceil(n * share) for name, n in shared.items()}
        if pool.on_host:
            charges.update(budgets.host())
            charges["loading a block"] = cost.load
        per_block = cost.weights + cost.kv
        left = room - sum(charges.values())
        plans.append(PoolPlan(pool, pool.free - room, charges, per_block, max(left // per_block, 0)))
    capacity = sum(p.blocks for p in plans)
    on_gpu = not any(p.pool.on_host for p in plans)
    plan = MemoryPlan(min(capacity, num_model_blocks), num_model_blocks, tuple(plans), cost,
                      budgets.host() if on_gpu else {}, _device_weights(plans))
    if capacity < 1:
        raise NothingFits(f"{plan.describe()}\nnot even one block fits. Lower the budgets (--train-activation-mb, "
                          "--lora-cache-mb, --cache-tokens or --cache-bytes, --inflight-mb, --delta-state-mb on a "
                          "CPU), quantize the blocks (--quant int8: about 0.25x the float32 bytes, --quant nf4: "
                          "0.13x), lower --memory-headroom, or host a fixed span (--blocks A:B or --num-blocks N)")
    return plan


def _device_weights(plans: Sequence[PoolPlan]) -> tuple[float, ...]:
    """Blocks per device: a pool's count shared equally by its devices."""
    weights: dict[int, float] = {}
    for p in plans:
        for index in p.pool.devices:
            weights[index] = p.blocks / len(p.pool.devices)
    return tuple(weights[i] for i in sorted(weights))


def workspace_bytes(max_chunk_tokens: int, hidden_size: int, intermediate_size: int, itemsize: int) -> int:
    """Transient tensors of one block over the largest request a server accepts: the hidden states in, out and
    normed, the attention's queries, keys, values and output, and the MLP's gate, up and their product."""
    return max_chunk_tokens * (7 * hidden_size + 3 * intermediate_size) * itemsize


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def block_cost(family: ModelFamily, config: PretrainedConfig, quant: str, dtype: torch.dtype, cache_tokens: int,
               cache_bytes: int | None) -> BlockCost:
    """One block's cost as a server with these settings holds it, from the model's config alone (a block built on
    the meta device gives the shapes; nothing is read from the checkpoint)."""
    with torch.device("meta"):
        block = family.decoder_layer_class(span_config(config, 0, 1), 0)
    shapes, others = quantize.block_shapes(block)
    name = str(dtype).replace("torch.", "")
    return BlockCost(weights=quantize.estimated_block_bytes(shapes, others, quant, dtype),
                     kv=0 if cache_bytes is not None else cache_tokens * kv_bytes_per_token(config, dtype),
                     kv_total=cache_bytes, load=quantize.estimated_block_bytes(shapes, others, "none", dtype),
                     what=name if quant == "none" else f"{quant}, computed in {name}", kv_tokens=cache_tokens)


def server_plan(options: ServerConfig, family: ModelFamily, config: PretrainedConfig, dtype: torch.dtype,
                devices: Sequence[torch.device], free: Callable[[torch.device], int] | None = None) -> MemoryPlan:
    """plan_blocks for a server's options on its devices, their free memory queried with `free` (default:
    free_bytes, looked up when called, so a test can replace it in the server's process)."""
    free = free if free is not None else free_bytes
    budgets = Budgets(train_activations=round(options.train_activation_mb * MIB),
                      lora_cache=round(options.lora_cache_mb * MIB),
                      workspace=workspace_bytes(options.max_chunk_tokens, config.hidden_size, config.intermediate_size,
                                                dtype.itemsize),
                      inflight=round(options.inflight_mb * MIB), delta_state=round(options.delta_state_mb * MIB))
    cost = block_cost(family, config, options.quant, dtype, options.cache_tokens, options.cache_bytes)
    return plan_blocks(pools_of(devices, free), cost, budgets,
                       Headroom(options.memory_headroom, options.memory_headroom_min), config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------- this machine (I/O)


def meminfo_available(text: str) -> int:
    """MemAvailable of /proc/meminfo's text, in bytes (the kernel's estimate of what can be allocated without
    swapping: free memory plus reclaimable page cache)."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    if match is None:
        raise ValueError("/proc/meminfo has no MemAvailable line (Linux 3.14 or newer has one)")
    return int(match.group(1)) * 1024


def cgroup_room(max_text: str, current_text: str, stat_text: str = "") -> int | None:
    """Bytes a cgroup v2 may still take: memory.max - memory.current, plus its inactive file cache (memory.stat),
    which the kernel reclaims before it counts against the limit; None when the limit is "max" (none)."""
    limit = max_text.strip()
    if limit == "max":
        return None
    inactive = re.search(r"^inactive_file\s+(\d+)", stat_text, re.MULTILINE)
    room = int(limit) - int(current_text.strip()) + (int(inactive.group(1)) if inactive else 0)
    return max(room, 0)


def host_free_bytes(proc: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """RAM this process can still take: MemAvailable, or its cgroup's room when lower (in a container)."""
    free = meminfo_available(proc.read_text())
    try:
        room = cgroup_room((cgroup / "memory.max").read_text(), (cgroup / "memory.current").read_text(),
                           (cgroup / "memory.stat").read_text() if (cgroup / "memory.stat").exists() else "")
    except OSError:  # no cgroup v2 memory controller here
        room = None
    return free if room is None else min(free, room)


def free_bytes(device: torch.device) -> int:
    """Bytes free on `device` now: a GPU's (the CUDA driver's count), or the host's RAM for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_free_bytes()
