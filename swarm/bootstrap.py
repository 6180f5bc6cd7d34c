"""`swarm dht`: a DHT-only peer that other peers bootstrap from. It hosts no blocks."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from swarm.config import ServerConfig
from swarm.options import add_arguments as add_options

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    add_swarm_arguments(parser, allow_new_swarm=True)
    add_options(parser, ServerConfig, only=("host_maddrs", "announce_maddrs", "identity_path"))  # as a server's


def run(args: argparse.Namespace) -> int:
    from swarm.join import join_as_configured

    dht = join_as_configured(args)
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
