"""`swarm monitor` and servers' --metrics-port on a live swarm: the JSON lists the live servers with their spans and
per-block counts, the page carries the script that fills it, /metrics parses and agrees with the records, a server's
own /metrics agrees with its record, and a stopped server's blocks show as a gap within seconds."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from html.parser import HTMLParser

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from swarm.dht_records import ServerState
from tests.conftest import TINY_SPANS, JoinedSwarm, exact, own_prefix

MON = "tiny-llama-monitor"  # the module's own prefix: stopping its servers disturbs no other test
MON_SPANS = [(0, 3), (3, 6)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mon_swarm(tiny_swarm, tiny_model_path):
    """Two servers under MON: 0:3 with --metrics-port, 3:6 without; (peer ids, metrics port, the processes)."""
    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    port = free_port()
    common = ["--torch-dtype", "float32", "--cache-tokens", "1024", *own_prefix(MON)]
    try:
        head = swarm.start_servers(tiny_model_path, [MON_SPANS[0]], [*common, "--public-name", "mon-head",
                                                                   "--metrics-port", str(port)], wait=False)[0]
        tail = swarm.start_servers(tiny_model_path, [MON_SPANS[1]], [*common, "--public-name", "mon-tail"], wait=False)[0]
        ids = [p.wait_ready()[0].rsplit("/p2p/", 1)[1] for p in (head, tail)]
        yield ids, port, (head, tail)
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def monitor(tiny_swarm, mon_swarm):
    """The monitor's app in this process (its poller reading every 0.5 s) and a client of it."""
    from starlette.testclient import TestClient

    from client.monitor import create_app, start_monitor
    from swarm.config import MonitorConfig

    poller = start_monitor(MonitorConfig(initial_peers=tiny_swarm.initial_peers, poll_period=0.5))
    try:
        with TestClient(create_app(poller)) as client:
            yield client
    finally:
        poller.stop()
        poller.dht.shutdown()


def wait_for(client, check, timeout: float = 20.0):
    """The first /api/swarm answer for which `check(view)` is true (AssertionError with the last one otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get("/api/swarm").json()
        if check(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout:.0f} s: {view}")
        time.sleep(0.25)


def model_of(view, name):
    return next((m for m in view["models"] if m["name"] == name), None)


def both_listed(view):
    mon, shared = model_of(view, MON), model_of(view, "tiny-llama")
    return bool(mon and shared and mon["servers_online"] == 2 and shared["servers_online"] == len(TINY_SPANS))


def test_json_lists_the_live_servers_with_spans_and_block_counts(monitor, mon_swarm, tiny_swarm):
    ids, _, _ = mon_swarm
    view = wait_for(monitor, both_listed)
    assert view["private"] is True and view["error"] is None  # the suite's swarm has a key (tests/conftest.py)
    shared = model_of(view, "tiny-llama")
    assert [(s["start"], s["end"]) for s in shared["servers"]] == TINY_SPANS
    assert shared["block_servers"] == [1] * 6 and shared["gaps"] == [] and shared["blocks_covered"] == 6
    shared_ids = {p.maddrs[0].rsplit("/p2p/", 1)[1] for p in tiny_swarm.servers}
    assert {s["peer_id"] for s in shared["servers"]} == shared_ids
    mon = model_of(view, MON)
    rows = {s["peer_id"]: s for s in mon["servers"]}
    assert [(rows[i]["start"], rows[i]["end"], rows[i]["public_name"]) for i in ids] == [(0, 3, "mon-head"),
                                                                                         (3, 6, "mon-tail")]
    head = rows[ids[0]]
    assert head["state"] == "online" and head["dtype"] == "float32" and head["quant"] == "none"
    assert head["device"] and head["ms_per_block"] > 0 and head["forward_tokens_per_s"] > 0
    assert 0 < head["cache_bytes_left"] <= head["cache_bytes"] and "none" in head["codecs"]
    assert time.time() - head["last_seen"] < 10
    everyone = [s for m in view["models"] for s in m["servers"]]
    assert view["traffic"]["bytes_wire"] == sum(s["bytes_wire"] for s in everyone)
    assert view["traffic"]["bytes_raw"] == sum(s["bytes_raw"] for s in everyone)


class Elements(HTMLParser):
    """The ids of a page's elements and the text of its scripts."""

    def __init__(self):
        super().__init__()
        self.ids, self.scripts, self.external, self._in_script = set(), [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self._in_script = True
            if attrs.get("src"):
                self.external.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.external.append(attrs["href"])

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_the_page_is_self_contained_and_its_script_fills_its_elements(monitor):
    reply = monitor.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = Elements()
    page.feed(reply.text)
    page.close()
    script = "".join(page.scripts)
    assert page.external == []  # no CDN, nothing to fetch but /api/swarm
    assert 'fetch("/api/swarm"' in script and "setTimeout(poll, POLL_MS)" in script and "POLL_MS = 2000" in script
    for element in ("banner", "status", "traffic", "models"):
        assert element in page.ids and f'getElementById("{element}")' in script
    assert "innerHTML" not in script  # records are peers' text: shown with textContent only


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of Prometheus' text format."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_agree_with_the_records(monitor, mon_swarm):
    wait_for(monitor, both_listed)
    reply = monitor.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = metric_samples(reply.text)
    view = monitor.get("/api/swarm").json()  # polled every 0.5 s: the records may have been refreshed since
    for model in view["models"]:
        if model["name"] not in (MON, "tiny-llama"):
            continue
        label = (("model", model["name"]),)
        assert samples[("swarm_model_blocks", label)] == model["num_blocks"] == 6
        assert samples[("swarm_model_blocks_covered", label)] == 6
        assert samples[("swarm_model_servers_online", label)] == model["servers_online"]
        for index, count in enumerate(model["block_servers"]):
            assert samples[("swarm_block_servers", (("block", str(index)), *label))] == count
        for s in model["servers"]:
            labels = (("model", model["name"]), ("peer_id", s["peer_id"]))
            assert samples[("swarm_server_span_start", labels)] == s["start"]
            assert samples[("swarm_server_span_end", labels)] == s["end"]
            assert samples[("swarm_server_ms_per_block", labels)] == pytest.approx(s["ms_per_block"])
            assert samples[("swarm_server_kv_cache_bytes", labels)] == s["cache_bytes"]
            assert samples[("swarm_server_online", labels)] == 1
    assert samples[("swarm_private", ())] == 1


def test_a_server_with_metrics_port_serves_counters_that_agree_with_its_record(monitor, mon_swarm, tiny_swarm,
                                                                               tiny_model_path):
    from client.model import DistributedModelForCausalLM

    ids, port, _ = mon_swarm
    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers, dht_prefix=MON))
    try:
        with torch.no_grad():
            model(torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(1)))  # traffic through 0:3
    finally:
        model.remote_layers.connection.shutdown()

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return metric_samples(reply.read().decode())

    labels = (("model", MON), ("peer_id", ids[0]))
    # The record is refreshed every 2 s (own_prefix); the server's own counters count at once.
    view = wait_for(monitor, lambda v: any(s["peer_id"] == ids[0] and s["requests"] >= 1
                                           for s in (model_of(v, MON) or {"servers": []})["servers"]))
    record = next(s for s in model_of(view, MON)["servers"] if s["peer_id"] == ids[0])
    samples = scrape()
    assert samples[("swarm_server_requests_total", labels)] == record["requests"] >= 1
    assert samples[("swarm_server_errors_total", labels)] == record["errors"] == 0
    assert samples[("swarm_server_wire_bytes_total", labels)] == record["bytes_wire"] > 0
    wire = sum(samples[("swarm_server_wire_bytes_by_direction_total", (("direction", d), *labels))] for d in ("in", "out"))
    assert wire == record["bytes_wire"]
    assert samples[("swarm_server_kv_cache_bytes", labels)] == record["cache_bytes"]
    assert samples[("swarm_server_kv_cache_free_bytes", labels)] == record["cache_bytes_left"]
    assert samples[("swarm_server_span_start", labels)] == 0 and samples[("swarm_server_span_end", labels)] == 3
    assert samples[("swarm_server_sessions_open", labels)] == 0
    assert samples[("swarm_server_online", labels)] == 1
    assert samples[("swarm_server_requests_by_kind_total", (("kind", "forward"), *labels))] >= 1


def test_a_stopped_server_leaves_a_gap_within_seconds(monitor, mon_swarm):
    ids, _, (_, tail) = mon_swarm
    wait_for(monitor, both_listed)
    stopped_at = time.monotonic()
    tail.stop(signal.SIGTERM)  # announces offline, then leaves
    view = wait_for(monitor, lambda v: model_of(v, MON) and model_of(v, MON)["gaps"] == [[3, 6]], timeout=10)
    mon = model_of(view, MON)
    assert mon["block_servers"] == [1, 1, 1, 0, 0, 0] and mon["blocks_covered"] == 3 and mon["servers_online"] == 1
    assert all(s["state"] != ServerState.ONLINE.value for s in mon["servers"] if s["peer_id"] == ids[1])
    samples = metric_samples(monitor.get("/metrics").text)
    assert samples[("swarm_model_blocks_covered", (("model", MON),))] == 3
    assert samples[("swarm_block_servers", (("block", "4"), ("model", MON)))] == 0
    # Its offline record expires (2 s updates x 3) and the server is gone from the list.
    wait_for(monitor, lambda v: ids[1] not in {s["peer_id"] for s in model_of(v, MON)["servers"]}, timeout=15)
    assert time.monotonic() - stopped_at < 25


def test_gaps_are_the_runs_of_blocks_without_an_online_server():
    from client.monitor import gaps

    assert gaps([1, 0, 0, 2, 0]) == [[1, 3], [4, 5]]
    assert gaps([1, 1]) == [] and gaps([0, 0]) == [[0, 2]] and gaps([]) == []


def test_records_carry_requests_and_errors_and_older_or_bad_ones_still_parse():
    from swarm.dht_records import ServerRecord

    record = ServerRecord(ServerState.ONLINE, 0, 2, requests=7, errors=1)
    assert ServerRecord.from_dict(record.to_dict()) == record
    older = {k: v for k, v in record.to_dict().items() if k not in ("requests", "errors")}
    assert ServerRecord.from_dict(older).requests == 0
    parsed = ServerRecord.from_dict({**record.to_dict(), "requests": -3, "errors": "many"})
    assert (parsed.requests, parsed.errors) == (0, 0)  # a bad figure, not a lost record


def test_a_port_in_use_is_one_clear_error():
    from client.monitor import listen
    from server.metrics import MetricsEndpoint

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            MetricsEndpoint("127.0.0.1", port, lambda: None)
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}.*choose another --port"):
            listen("127.0.0.1", port)
    with pytest.raises(ValueError, match="--port must be a TCP port"):
        listen("127.0.0.1", 70000)
