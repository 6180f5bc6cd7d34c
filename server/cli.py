"""`swarm server`: host a span of blocks of a model and serve it to the swarm."""

from __future__ import annotations

import argparse

from swarm.config import ServerConfig
from swarm.options import add_arguments as add_options
from swarm.options import from_args


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def parse_num_blocks(text: str) -> int | str:
    """--num-blocks: a count of at least 1, or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-blocks takes a count (e.g. 8) or auto, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"--num-blocks {text}: need at least 1 block (or auto)")
    return count


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapters takes NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    # The special ones (see ServerConfig); every other flag is declared in swarm.config.ServerConfig.
    parser.add_argument("model", help="a folder with a Hugging Face checkpoint (config.json + *.safetensors), or a hub repo id")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=parse_blocks, help="host blocks START:END (END exclusive), e.g. 0:10")
    which.add_argument("--num-blocks", type=parse_num_blocks, metavar="N|auto",
                       help="host this many blocks, chosen where the swarm needs them most; auto: as many as fit the "
                            "free memory of the devices (the RAM on a CPU) after the KV cache (--cache-tokens or "
                            "--cache-bytes), training activations, the LoRA cache, a workspace for the largest request "
                            "and --memory-headroom (on a CPU also the requests in flight and delta references), split "
                            "between several devices in proportion to what each holds; the numbers are logged")
    add_swarm_arguments(parser, allow_new_swarm=True)
    parser.add_argument("--adapters", nargs="+", default=[], metavar="NAME=PATH", type=parse_adapter,
                        help="peft LoRA adapters to host (folders with adapter_config.json), which clients pick by NAME")
    add_options(parser, ServerConfig)


def run(args: argparse.Namespace) -> int:
    from server.server import Server

    Server(from_args(ServerConfig, args, adapters=dict(args.adapters))).run()
    return 0
