"""The monitor's page as a person sees it: headless Chromium renders `swarm monitor` of a local swarm, and the checks
are made on the DOM its script built.

A random 12-block Llama (bench/common.py) on two servers, 0:6 and 6:10, of an open swarm (no key): blocks 10:12 have no
server. `swarm monitor` (polling the DHT every second) runs as its own process, as a user starts it. Checked on the
rendered page (`chromium --headless --dump-dom`, with a virtual-time budget so the page's script has fetched
/api/swarm and drawn it):

- the server table lists both servers with their peer ids, spans and state online;
- the coverage bar has one cell per block, 10 and 11 marked as gaps (0 servers), the others 1;
- the banner says the swarm has no key;
- after server 6:10 is stopped (SIGTERM: it announces offline), the page shows blocks 6:12 as a gap, and how many
  seconds that took from the stop (the page polls every 2 s, the monitor every 1 s).

Screenshots of both states: bench/monitor.png (before) and bench/monitor-stopped.png (after).
Run: python bench/monitor_browser.py [--chromium PATH]; it exits non-zero if a check fails or Chromium is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from common import build_tiny  # bench/common.py

from swarm.auth import ENV_VAR
from swarm.launch import LocalSwarm, PeerProcess

HERE = Path(__file__).resolve().parent
SPANS = [(0, 6), (6, 10)]  # of 12 blocks: 10:12 uncovered
FAST_RECORDS = ["--update-period", "2", "--expiration-factor", "3"]


class RenderedPage(HTMLParser):
    """What the page's script drew: server rows, coverage cells (model -> [servers per block]), the banner."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.cells: dict[str, list[tuple[int, int, bool]]] = {}
        self.banner_hidden: bool | None = None
        self.polls = 0
        self._bar: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.polls = int(a.get("data-polls") or 0)
        if a.get("id") == "banner":
            self.banner_hidden = "hidden" in a
        if tag == "tr" and "server" in classes:
            self.rows.append({"peer_id": a["data-peer-id"], "span": a["data-span"], "state": a["data-state"]})
        if "coverage" in classes:
            self._bar = a["data-model"]
            self.cells[self._bar] = []
        if "cell" in classes and self._bar is not None:
            self.cells[self._bar].append((int(a["data-block"]), int(a["data-servers"]), "gap" in classes))


def find_chromium(given: str | None) -> str | None:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def chromium(binary: str, url: str, *args: str) -> str:
    """Chromium's output for the page at `url` after 5 s of virtual time (the script's first fetches have landed)."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--virtual-time-budget=5000", "--window-size=1900,600", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def render(binary: str, url: str) -> RenderedPage:
    page = RenderedPage()
    page.feed(chromium(binary, url, "--dump-dom"))
    return page


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, monitor: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if monitor.poll() is not None:
            raise RuntimeError(f"swarm monitor exited with code {monitor.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def check(results: list[tuple[str, bool]], what: str, ok: bool) -> None:
    results.append((what, ok))
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: chromium on the PATH)")
    args = parser.parse_args()
    binary = find_chromium(args.chromium)
    if binary is None:
        print("Chromium was not found (try `apt-get install -y chromium`, or --chromium PATH): the page was NOT "
              "checked in a browser.", file=sys.stderr)
        return 2
    results: list[tuple[str, bool]] = []
    os.environ.pop(ENV_VAR, None)  # an open swarm, whatever key the environment names: the banner is checked
    with tempfile.TemporaryDirectory() as folder, LocalSwarm() as swarm:
        model = build_tiny(Path(folder))
        prefix = model.name
        swarm.start_bootstrap()
        servers = [swarm.start_servers(str(model), [span], ["--torch-dtype", "float32", "--cache-tokens", "1024",
                                                            "--public-name", f"bench-{span[0]}-{span[1]}",
                                                            *FAST_RECORDS], wait=False)[0] for span in SPANS]
        for server in servers:
            server.wait_ready()
        ids = {f"{a}:{b}": p.maddrs[0].rsplit("/p2p/", 1)[1] for (a, b), p in zip(SPANS, servers, strict=True)}
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        monitor = PeerProcess(["monitor", "--initial-peers", *swarm.initial_peers, "--port", str(port),
                               "--poll-period", "1"], "monitor")
        try:
            wait_http(url + "api/swarm", monitor.process)
            print(f"{binary}: rendering {url} (swarm of {prefix}: servers {', '.join(ids)} of 12 blocks)")
            page = render(binary, url)
            listed = {(r["span"], r["peer_id"], r["state"]) for r in page.rows}
            check(results, f"the table lists both servers with peer ids and spans: {sorted(listed)}",
                  listed == {(span, peer, "online") for span, peer in ids.items()})
            cells = page.cells.get(prefix, [])
            check(results, f"the coverage bar has 12 cells, blocks 10 and 11 marked as gaps: "
                           f"{[count for _, count, _ in cells]}",
                  [(b, c, g) for b, c, g in cells] == [(b, int(b < 10), b >= 10) for b in range(12)])
            check(results, "the no-key banner is shown (an open swarm)", page.banner_hidden is False)
            chromium(binary, url, f"--screenshot={HERE / 'monitor.png'}")
            stopped = time.monotonic()
            servers[1].stop(signal.SIGTERM)
            waited, after = 0.0, page
            while time.monotonic() - stopped < 30:
                after = render(binary, url)
                waited = time.monotonic() - stopped
                if [g for _, _, g in after.cells.get(prefix, [])] == [b >= 6 for b in range(12)]:
                    break
            gaps = [b for b, _, g in after.cells.get(prefix, []) if g]
            check(results, f"{waited:.1f} s after server 6:10 stopped, the page shows blocks {gaps} as gaps",
                  gaps == list(range(6, 12)) and waited < 15)
            online = {r["span"] for r in after.rows if r["state"] == "online"}
            check(results, f"only 0:6 is listed online now: {sorted(online)}", online == {"0:6"})
            chromium(binary, url, f"--screenshot={HERE / 'monitor-stopped.png'}")
        finally:
            monitor.stop()
    print(f"screenshots: {HERE / 'monitor.png'}, {HERE / 'monitor-stopped.png'}")
    failed = [what for what, ok in results if not ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
