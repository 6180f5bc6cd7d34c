"""The `swarm` command: one entry point whose subcommands are thin layers over the Python API.

Subcommands live beside the code they drive (server/cli.py, client/cli_generate.py, client/cli_status.py, ...) and
are found by name here, so this package never imports the server or the client at module level. Only the module of
the subcommand being run is imported: each imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from swarm.config import apply_colocated_omp_env

# subcommand -> module defining `add_arguments(parser)` and `run(args) -> int | None`
SUBCOMMANDS = {
    "server": ("server.cli", "host a span of a model's blocks and serve it to the swarm"),
    "dht": ("swarm.bootstrap", "run a DHT-only bootstrap node that others join through"),
    "generate": ("client.cli_generate", "generate text through the swarm, streaming tokens as they come"),
    "api": ("client.cli_api", "serve a model of the swarm over an OpenAI-compatible HTTP API"),
    "status": ("client.cli_status", "show the servers of a swarm and the coverage of every block"),
    "finetune": ("client.cli_finetune", "fine-tune a LoRA adapter through the swarm"),
    "monitor": ("client.monitor", "serve a web page, a JSON API and Prometheus metrics of a swarm's servers and coverage"),
    "keygen": ("swarm.cli_keygen", "write a new random key for a private swarm to a file (mode 0600)"),
    "demo": ("client.demo", "start a local swarm of SmolLM2-135M-Instruct, ask it a question, show its status"),
}


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("hivemind", "transformers", "httpx", "httpx2", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `swarm`. With `argv`, only the subcommand it names (its first word that is not an option) gets
    its options (and its module imported); without, every subcommand does."""
    chosen = next((word for word in argv if not word.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Run and fine-tune large language models together: servers host spans of a model's "
        "transformer blocks, clients chain them over a hivemind DHT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if chosen in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def add_swarm_arguments(parser: argparse.ArgumentParser, allow_new_swarm: bool = False) -> None:
    """Options every peer shares: where the swarm is and which addresses to use."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--initial-peers", nargs="+", metavar="MADDR", default=[],
                       help="multiaddresses of peers already in the swarm, as printed by `swarm dht` or `swarm server`")
    if allow_new_swarm:
        group.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    parser.add_argument("--swarm-key-file", action="append", metavar="FILE", default=None,
                        help="the private swarm's key, as written by `swarm keygen`; only peers holding it can join, "
                             "read or call the swarm. Give it twice while rotating keys (the first signs, both are "
                             "accepted). Default: $SWARM_KEY_FILE, else an open swarm")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command in ("generate", "demo", "finetune", "api"):
        # A client mostly waits on the network while servers compute, often on the same machine: its OpenMP threads
        # should not spin long while they wait (set before torch starts its thread pool; the user's setting wins).
        apply_colocated_omp_env()
    try:
        if getattr(args, "initial_peers", None):
            # Before anything slow: a malformed address is refused at once, naming it and the form to use.
            from swarm.join import check_initial_peers

            args.initial_peers = check_initial_peers(args.initial_peers)
        if hasattr(args, "swarm_key_file"):
            # A key file that is missing, unreadable, readable by all or malformed stops the command here (fail closed).
            from swarm.auth import Keyring

            args.swarm_key = Keyring.load(args.swarm_key_file)
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logging.getLogger("swarm").debug("failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
