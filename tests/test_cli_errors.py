"""A wrong --initial-peers gets one line that says what was wrong and what to pass, soon, from every entry point."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from swarm.config import JOIN_TIMEOUT
from swarm.join import (
    ADDRESS_FORM,
    BadPeerAddress,
    SwarmUnreachable,
    address_problem,
    check_initial_peers,
    interrupted_if_join_fails,
    join_error,
    join_swarm,
    start_joining,
)

# A well-formed peer id; nothing listens at the addresses the tests build with it.
PEER_ID = "12D3KooWH2C6vk6Dt2ezMxaBCLQiUw55mL9nGt28D7jDGmXd9W8c"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("address", "problem"), [
    (f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}", None),
    (f"/ip4/10.0.0.7/udp/4001/quic-v1/p2p/{PEER_ID}", None),
    (f"/ip6/::1/tcp/31337/p2p/{PEER_ID}", None),
    (f"/dns4/swarm.example.org/tcp/31337/p2p/{PEER_ID}", None),
    ("/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", None),
    ("not-an-address", "is not a multiaddress"),
    ("", "is not a multiaddress"),
    ("/ip4/127.0.0.1/tcp/31337", "names no peer"),
    (f"/ip4/127.0.0.1/p2p/{PEER_ID}", "names no transport"),
    (f"/ip4/127.0.0.1/tcp/99999/p2p/{PEER_ID}", "'99999' where a tcp port"),
    (f"/ip4/127.0.0.1/tcp/port/p2p/{PEER_ID}", "'port' where a tcp port"),
    (f"/ip4/1.2.3/tcp/31337/p2p/{PEER_ID}", "'1.2.3' where an IPv4 address"),
    (f"/ip6/::g/tcp/31337/p2p/{PEER_ID}", "where an IPv6 address"),
    ("/ip4/127.0.0.1/tcp/31337/p2p/12D3KooW0OIl", "where a peer id belongs"),  # 0, O, I, l are not base58
    ("/ip4/127.0.0.1/tcp/31337/p2p/Qmbad", "where a peer id belongs"),  # base58, but no multihash
    (f"/ipv4/127.0.0.1/tcp/31337/p2p/{PEER_ID}", "unknown protocol 'ipv4'"),
    ("/ip4/127.0.0.1/tcp/31337/p2p", "no value after /p2p"),
])
def test_address_problems_are_named(address, problem):
    found = address_problem(address)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_check_names_the_bad_address_and_the_form_to_use():
    good = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"
    assert check_initial_peers([good]) == [good]
    with pytest.raises(BadPeerAddress) as caught:
        check_initial_peers([good, "127.0.0.1:31337"])
    message = str(caught.value)
    assert "'127.0.0.1:31337'" in message and ADDRESS_FORM in message and "swarm dht" in message
    assert "\n" not in message


@pytest.mark.parametrize(("error", "kind", "words"), [
    (RuntimeError("Daemon failed to start: 2026/12/01 23:52:36 failed to connect to bootstrap peers"), SwarmUnreachable,
     "could not connect to any initial peer"),
    (RuntimeError("Daemon failed to start in 15.0 seconds"), SwarmUnreachable, "no answer from the initial peers in 20 s"),
    (TimeoutError(), SwarmUnreachable, "no answer from the initial peers in 20 s"),
    (RuntimeError("DHTNode bootstrap failed: none of the initial_peers responded to a ping. (set ...)"), SwarmUnreachable,
     "no initial peer answered as a DHT peer"),
    (RuntimeError("Daemon failed to start: 2026/12/01 23:52:55 invalid p2p multiaddr"), BadPeerAddress,
     "invalid p2p multiaddr;"),
    (OSError("something else"), SwarmUnreachable, "could not join the swarm (something else)"),
])
def test_join_failures_become_one_line_that_says_what_to_do(error, kind, words):
    peers = [f"/ip4/127.0.0.1/tcp/9/p2p/{PEER_ID}"]
    result = join_error(error, peers, timeout=20.0)
    assert type(result) is kind
    text = str(result)
    assert words in text and peers[0] in text and ADDRESS_FORM in text and "\n" not in text
    assert "2026/12/01" not in text  # the daemon's timestamp is noise


def test_unreachable_peer_fails_fast_in_process():
    began = time.monotonic()
    with pytest.raises(SwarmUnreachable, match="could not connect to any initial peer"):
        join_swarm([f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"], client_mode=True)
    assert time.monotonic() - began < 15


def test_a_failed_join_interrupts_the_work_it_overlaps():
    dht = start_joining([f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"], client_mode=True)
    began = time.monotonic()
    with pytest.raises(SwarmUnreachable, match="could not connect to any initial peer"):
        with interrupted_if_join_fails(dht):
            while time.monotonic() - began < 60:  # stands for imports and loading that would go on for long
                time.sleep(0.05)
    assert time.monotonic() - began < 15
    assert not dht.is_alive()


def test_a_join_that_succeeds_interrupts_nothing():
    first = join_swarm([], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        dht = start_joining([str(a) for a in first.get_visible_maddrs()], client_mode=True)
        try:
            with interrupted_if_join_fails(dht):
                time.sleep(1.0)
            time.sleep(0.3)  # nor later
            assert dht.is_alive() and dht.peer_id != first.peer_id
        finally:
            dht.shutdown()
    finally:
        first.shutdown()


def test_from_pretrained_says_what_was_wrong(tiny_model_path):
    from client.model import DistributedModelForCausalLM

    with pytest.raises(BadPeerAddress, match="names no peer"):
        DistributedModelForCausalLM.from_pretrained(tiny_model_path, ["/ip4/127.0.0.1/tcp/31337"])
    with pytest.raises(SwarmUnreachable, match="could not connect to any initial peer"):
        DistributedModelForCausalLM.from_pretrained(tiny_model_path, [f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"])


def run_cli(*args: str, join_timeout: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`swarm ARGS` in a subprocess, and how long it took; `join_timeout` replaces swarm.config.JOIN_TIMEOUT in it."""
    python = ("-m", "swarm.cli") if join_timeout is None else (
        "-c", f"import swarm.config as c; c.JOIN_TIMEOUT = {join_timeout}; from swarm.cli import main; raise SystemExit(main())")
    began = time.monotonic()
    result = subprocess.run([sys.executable, *python, *args], capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - began


def assert_one_line_error(result: subprocess.CompletedProcess, elapsed: float, *words: str) -> None:
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("command", ["generate", "status"])
def test_commands_refuse_a_malformed_address_at_once(command, tiny_model_path):
    args = [tiny_model_path, "hi"] if command == "generate" else []
    result, elapsed = run_cli(command, *args, "--initial-peers", "not-an-address")
    assert_one_line_error(result, elapsed, "'not-an-address'", ADDRESS_FORM)
    assert elapsed < 10  # refused before torch, transformers or hivemind is imported


@pytest.mark.parametrize("command", ["generate", "status"])
def test_commands_report_an_unreachable_swarm(command, tiny_model_path):
    args = [tiny_model_path, "hi"] if command == "generate" else []
    address = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"
    result, elapsed = run_cli(command, *args, "--initial-peers", address)
    assert_one_line_error(result, elapsed, "could not connect to any initial peer", address, ADDRESS_FORM)


def test_status_gives_up_on_a_peer_that_never_answers():
    """A listener that accepts the connection and then says nothing (as a hung peer would): the join ends anyway, when
    its timeout ends it. JOIN_TIMEOUT is under the 30 s a command may take; the run shortens it to 5 s, which the
    daemon's dial still fits in."""
    assert JOIN_TIMEOUT < 30
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        address = f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}/p2p/{PEER_ID}"
        result, elapsed = run_cli("status", "--initial-peers", address, join_timeout=5.0)
        assert_one_line_error(result, elapsed, "got no answer from the initial peers in 5 s", address, ADDRESS_FORM)
        assert accepted, "the daemon never connected: this test did not test a silent peer"
    finally:
        stop.set()
        thread.join()
        for sock in accepted:
            sock.close()
        listener.close()
