"""`swarm status`: the servers of a swarm and the coverage of every block, as tables."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.dht_records import ServerInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    add_swarm_arguments(parser)
    parser.add_argument("--model", default=None, help="show only this model (its DHT prefix); default: every model")


def block_counts(num_blocks: int, servers: list[ServerInfo]) -> list[int]:
    """How many online servers host each block (0: a gap no client can route through)."""
    from swarm.dht_records import ServerState

    online = [s.record for s in servers if s.record.state == ServerState.ONLINE]
    return [sum(r.start <= index < r.end for r in online) for index in range(num_blocks)]


def coverage_ranges(num_blocks: int, servers: list[ServerInfo]) -> list[tuple[int, int, int]]:
    """Runs of blocks served by the same number of online servers: (start, end, servers)."""
    runs: list[tuple[int, int, int]] = []
    for index, count in enumerate(block_counts(num_blocks, servers)):
        if runs and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], index + 1, count)
        else:
            runs.append((index, index + 1, count))
    return runs


def device_label(record) -> str:
    """What computes a server's blocks, in which dtype, and how their weights are stored when quantized:
    "cuda: NVIDIA H200, bfloat16, nf4" (older records: the dtype)."""
    label = f"{record.device}, {record.torch_dtype}" if record.device else record.torch_dtype
    return label if record.quant == "none" else f"{label}, {record.quant}"


def kv_cache_label(record) -> str:
    """A server's KV cache: "12.0 / 64.0 (6144 tok)", free / total MiB and the tokens (batch_size * max_length) of a
    session over its whole span that fit in the free part (older records: the tokens)."""
    if not record.cache_bytes:
        return f"{record.cache_tokens_left} tok"
    return f"{record.cache_bytes_left / 2**20:.1f} / {record.cache_bytes / 2**20:.1f} ({record.cache_tokens_left} tok)"


def render(models: dict[str, tuple[int, list[ServerInfo]]]):
    from rich.console import Group
    from rich.table import Table

    from swarm.versions import describe, normalized

    parts = []
    if not models:
        parts.append("No models are announced in this swarm yet.")
    for prefix, (num_blocks, servers) in sorted(models.items()):
        table = Table(title=f"{prefix}: {num_blocks} blocks, {len(servers)} server(s)")
        for column in ("server", "name", "blocks", "state", "version / proto", "device, dtype", "ms/block (decode)",
                       "forward tok/s", "KV cache MiB free / total", "traffic MB (wire / raw)"):
            # Peer ids are what users pass to --allowed-servers: never cut; nor the versions they compare.
            table.add_column(column, no_wrap=column in ("server", "version / proto", "device, dtype"))
        for s in servers:
            r = s.record
            table.add_row(str(s.peer_id)[-12:], r.public_name or "-", f"{r.start}:{r.end}", r.state.value,
                          f"{r.version} / {describe(normalized(r.protocol_min, r.protocol_max))}", device_label(r),
                          f"{r.ms_per_block:.2f}" if r.ms_per_block else "-",
                          f"{r.forward_tokens_per_s:.0f}" if r.forward_tokens_per_s else "-", kv_cache_label(r),
                          f"{r.bytes_wire / 1e6:.1f} / {r.bytes_raw / 1e6:.1f}")
        parts.append(table)
        cover = Table(title=f"{prefix}: coverage")
        cover.add_column("blocks")
        cover.add_column("online servers")
        for start, end, count in coverage_ranges(num_blocks, servers):
            cover.add_row(f"{start}:{end}", str(count) if count else "[bold red]0 (not served)[/]")
        parts.append(cover)
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    from swarm.join import start_joining, wait_joined

    joining = start_joining(args.initial_peers, args.swarm_key, client_mode=True)  # the DHT peer joins while the rest imports
    from rich.console import Console

    from swarm.dht_records import fetch_models, fetch_servers

    dht = wait_joined(joining)
    try:
        index = fetch_models(dht)
        if args.model is not None:
            index = {args.model: index[args.model]} if args.model in index else {}
        models = {prefix: (n, fetch_servers(dht, prefix, n)) for prefix, n in index.items()}
        Console(width=120).print(render(models))
    finally:
        dht.shutdown()
    return 0
