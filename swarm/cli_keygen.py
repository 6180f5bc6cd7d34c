"""`swarm keygen FILE`: a new random key for a private swarm."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="where to write the key (must not exist yet); pass it to every peer of the swarm "
                                     "with --swarm-key-file FILE (or SWARM_KEY_FILE=FILE)")


def run(args: argparse.Namespace) -> int:
    from swarm.auth import generate_key_file

    key = generate_key_file(args.file)
    print(f"Wrote a new swarm key to {args.file} (mode 0600, key id {key.key_id}).")
    print("Give this file to every peer of the swarm, as a secret: --swarm-key-file FILE or SWARM_KEY_FILE=FILE.")
    return 0
