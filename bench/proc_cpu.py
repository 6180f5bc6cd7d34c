"""CPU time as the OS counts it (/proc), by process of a local swarm: the client's Python process, its p2pd, each
server and its p2pd, the DHT processes. For benchmarks on Linux; elsewhere the table is empty."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, user + system CPU ticks so far, command line) of every process readable now."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., utime (11), stime (12)
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), command)
    return table


def role(pid: int, table: Mapping[int, tuple[int, int, str]], owners: Mapping[int, str]) -> str | None:
    """`owners` names some processes (the client's, each server's); a process below one of them is that owner's, and
    its kind is "p2pd" (hivemind's daemon), "DHT process" (another Python process: hivemind's DHT) or itself."""
    kind, current = None, pid
    while current in table:
        if current in owners:
            return owners[current] if kind is None else f"{owners[current]}'s {kind}"
        if kind is None:
            kind = "p2pd" if "p2pd" in table[current][2] else "DHT process"
        current = table[current][0]
    return None


def cpu_by_role(before: Mapping, after: Mapping, owners: Mapping[int, str]) -> Counter:
    """Seconds of CPU each role used between two process_table()s (processes that ran in both)."""
    used: Counter = Counter()
    for pid, (_, ticks, _) in after.items():
        name = role(pid, after, owners)
        if name is not None and pid in before:
            used[name] += (ticks - before[pid][1]) / TICKS_PER_S
    return used
