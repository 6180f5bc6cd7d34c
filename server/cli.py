"""`swarm server`: host a span of blocks of a model and serve it to the swarm."""

from __future__ import annotations

import argparse

from swarm.config import SERVER


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapters takes NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    parser.add_argument("model", help="a folder with a Hugging Face checkpoint (config.json + *.safetensors), or a hub repo id")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=parse_blocks, help="host blocks START:END (END exclusive), e.g. 0:10")
    which.add_argument("--num-blocks", type=int, help="host this many blocks, chosen where the swarm needs them most")
    add_swarm_arguments(parser, allow_new_swarm=True)
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"],
                        help="addresses to listen on, e.g. /ip4/127.0.0.1/tcp/0")
    parser.add_argument("--announce-maddrs", nargs="+", default=None, help="public addresses others should dial")
    parser.add_argument("--identity-path", default=None, help="private key file; keeps this server's peer ID stable")
    parser.add_argument("--torch-dtype", choices=["auto", "float32", "bfloat16", "float16"], default=SERVER.torch_dtype,
                        help="dtype to compute in; auto takes the checkpoint's")
    parser.add_argument("--cache-tokens", type=int, default=SERVER.cache_tokens,
                        help="KV-cache budget in tokens, summed over sessions as batch_size * max_length")
    parser.add_argument("--max-batch-size", type=int, default=SERVER.max_batch_size, help="largest batch accepted")
    parser.add_argument("--max-chunk-tokens", type=int, default=SERVER.max_chunk_tokens,
                        help="largest batch * length accepted in one request")
    parser.add_argument("--dht-prefix", default=None, help="name the model is announced under (default: the folder or repo name)")
    parser.add_argument("--public-name", default="", help="a name shown to others in `swarm status`")
    parser.add_argument("--update-period", type=float, default=SERVER.update_period, help="seconds between DHT announcements")
    parser.add_argument("--adapters", nargs="+", default=[], metavar="NAME=PATH", type=parse_adapter,
                        help="peft LoRA adapters to host (folders with adapter_config.json), which clients pick by NAME")
    parser.add_argument("--max-lora-mb", type=float, default=SERVER.max_lora_mb,
                        help="largest total size of the LoRA tensors one training request may carry")
    parser.add_argument("--lora-cache-mb", type=float, default=SERVER.lora_cache_mb,
                        help="memory for clients' uploaded LoRA tensors, reused by digest so a backward pass need not resend them")
    parser.add_argument("--lora-cache-ttl", type=float, default=SERVER.lora_cache_ttl,
                        help="seconds an unused uploaded adapter stays in that cache")
    parser.add_argument("--train-activation-mb", type=float, default=SERVER.train_activation_mb,
                        help="memory for activations that training requests keep between their forward and backward "
                             "(beyond it, clients fall back to requests whose backward recomputes the forward)")
    parser.add_argument("--delta-state-mb", type=float, default=SERVER.delta_state_mb,
                        help="memory for references of clients' delta-coded training activations (the previous epoch's "
                             "value of each sample; beyond it the oldest go and those rows are sent in full again)")
    parser.add_argument("--delta-state-ttl", type=float, default=SERVER.delta_state_ttl,
                        help="seconds an unused reference of delta-coded training activations is kept")
    parser.add_argument("--shutdown-timeout", type=float, default=SERVER.shutdown_timeout,
                        help="seconds to let open sessions finish on SIGTERM (and on the old blocks after a move)")
    parser.add_argument("--rebalance-period", type=float, default=SERVER.rebalance_period,
                        help="with --num-blocks: seconds between checks of the swarm's coverage (randomized by "
                             f"+-{SERVER.rebalance_jitter * 100:.0f}%%); the server moves to blocks that have no server or are "
                             "much less served than others, if its own blocks stay covered. 0 disables")
    parser.add_argument("--balance-margin", type=float, default=SERVER.balance_margin,
                        help="move to even out coverage only if the least-served block would get more than 1 + this "
                             "times as many servers (blocks with no server always get one)")


def run(args: argparse.Namespace) -> int:
    from server.server import Server, ServerOptions

    server = Server(ServerOptions(
        model=args.model, blocks=args.blocks, num_blocks=args.num_blocks, initial_peers=args.initial_peers,
        new_swarm=args.new_swarm, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
        identity_path=args.identity_path, torch_dtype=args.torch_dtype, cache_tokens=args.cache_tokens,
        dht_prefix=args.dht_prefix, public_name=args.public_name, update_period=args.update_period,
        max_batch_size=args.max_batch_size, max_chunk_tokens=args.max_chunk_tokens,
        shutdown_timeout=args.shutdown_timeout, adapters=dict(args.adapters), max_lora_mb=args.max_lora_mb,
        lora_cache_mb=args.lora_cache_mb, lora_cache_ttl=args.lora_cache_ttl, train_activation_mb=args.train_activation_mb,
        delta_state_mb=args.delta_state_mb, delta_state_ttl=args.delta_state_ttl,
        rebalance_period=args.rebalance_period, balance_margin=args.balance_margin,
    ))
    server.run()
    return 0
