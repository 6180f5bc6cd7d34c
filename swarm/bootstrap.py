"""`swarm dht`: a DHT-only peer that other peers bootstrap from. It hosts no blocks."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    add_swarm_arguments(parser, allow_new_swarm=True)
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"],
                        help="addresses to listen on, e.g. /ip4/127.0.0.1/tcp/31337")
    parser.add_argument("--announce-maddrs", nargs="+", default=None, help="public addresses others should dial")
    parser.add_argument("--identity-path", default=None,
                        help="file with this peer's private key; keeps the peer ID (and so the join address) stable across restarts")


def run(args: argparse.Namespace) -> int:
    from swarm.auth import warn_if_open
    from swarm.join import join_swarm

    if args.new_swarm:
        warn_if_open(args.swarm_key)
    dht = join_swarm([] if args.new_swarm else args.initial_peers, host_maddrs=args.host_maddrs,
                     announce_maddrs=args.announce_maddrs, identity_path=args.identity_path, swarm_key=args.swarm_key)
    print("Bootstrap node ready", flush=True)
    for maddr in dht.get_visible_maddrs():
        print(f"Join with: --initial-peers {maddr}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down the bootstrap node")
    dht.shutdown()
    return 0
