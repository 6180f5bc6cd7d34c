"""Start swarm peers as local processes (for the demo, tests and benchmarks) and stop them cleanly."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from swarm.config import COLOCATED_OMP_ENV

logger = logging.getLogger(__name__)


_JOIN = re.compile(r"Join with: --initial-peers (\S+)")
LOCALHOST = "/ip4/127.0.0.1/tcp/0"


def even_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    """Split blocks [0, num_blocks) into `servers` contiguous spans of nearly equal length."""
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]  # noqa: B905 - bounds[1:] is one shorter


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to the child when the process that started it dies (no orphaned peers)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PeerProcess:
    """A `swarm dht` or `swarm server` child process whose output goes to a log file. `python_args` start the
    command line (e.g. `-c CODE` that calls swarm.cli.main after setting something up, as tests of other versions do)."""

    def __init__(self, args: Sequence[str], name: str, env: dict | None = None,
                 python_args: Sequence[str] = ("-m", "swarm.cli")):
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"swarm-{name}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, *python_args, *args], stdout=self._log, stderr=subprocess.STDOUT,
            # Co-located peers spin only briefly (see swarm.config); the user's own setting, or `env`, wins.
            env={**COLOCATED_OMP_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=_die_with_parent,
            start_new_session=True,  # its own process group: stopping it also ends its DHT process and p2pd
        )
        self.maddrs: list[str] = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """Whether it has printed its addresses (a server: after announcing itself online); raises if it exited."""
        if not self.maddrs:
            text = self.log()
            self.maddrs = _JOIN.findall(text)
            if not self.maddrs and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{text[-3000:]}")
        return bool(self.maddrs)

    def wait_ready(self, timeout: float = 120.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return self.maddrs
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig` (SIGKILL goes to the whole process group, as when a machine dies) and wait; then kill whatever
        of its group is left (a hivemind DHT process or p2pd outlives a killed server otherwise)."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                self._kill_group()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit in %.0f s; killing it", self.name, timeout)
                self.process.kill()
                self.process.wait()
        self._kill_group()
        self._log.close()
        return self.process.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class LocalSwarm:
    """A bootstrap node and servers on 127.0.0.1, each its own process; with `swarm_key_file`, a private swarm (else
    each peer takes SWARM_KEY_FILE's key from the environment, if set)."""

    def __init__(self, swarm_key_file: str | None = None):
        self.key_args = ["--swarm-key-file", str(swarm_key_file)] if swarm_key_file else []
        self.bootstrap: PeerProcess | None = None
        self.servers: list[PeerProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return self.bootstrap.maddrs if self.bootstrap else []

    def start_bootstrap(self) -> list[str]:
        self.bootstrap = PeerProcess(["dht", "--new-swarm", "--host-maddrs", LOCALHOST, *self.key_args], "dht")
        return self.bootstrap.wait_ready()

    def start_servers(self, model: str, spans: Sequence[tuple[int, int]], extra_args: Sequence[str] = (),
                      env: dict | None = None, timeout: float = 180.0, wait: bool = True,
                      python_args: Sequence[str] = ("-m", "swarm.cli")) -> list[PeerProcess]:
        """Start one server per span, all at once, and wait until every one is serving (unless `wait` is False:
        then PeerProcess.ready() tells when one is). `python_args`: as PeerProcess's."""
        started = []
        for start, end in spans:
            args = ["server", model, "--blocks", f"{start}:{end}", "--initial-peers", *self.initial_peers,
                    "--host-maddrs", LOCALHOST, *self.key_args, *extra_args]
            started.append(PeerProcess(args, f"server-{start}-{end}", env, python_args))
        self.servers += started
        for server in started if wait else ():
            server.wait_ready(timeout)
        return started

    def stop(self, timeout: float = 30.0) -> None:
        """Servers leave all at once (each announces offline and drains its sessions), then the bootstrap node."""
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):  # stop() below signals it again, then kills it
                server.process.wait(max(0.0, deadline - time.monotonic()))
        for peer in [*self.servers, *([self.bootstrap] if self.bootstrap else [])]:
            peer.stop()
        self.servers, self.bootstrap = [], None

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
