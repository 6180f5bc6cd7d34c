"""`swarm generate`: generate text through the swarm and stream it to the terminal as it comes."""

from __future__ import annotations

import argparse
from pathlib import Path

from client.config import GENERATE_FLAGS, add_client_arguments, client_config_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments

    parser.add_argument("model", help="folder (or hub repo id) with the model's config, tokenizer and client-side weights")
    parser.add_argument("prompt", help="the text to continue, or the user message with --chat")
    add_swarm_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (1 = none)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--torch-dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                        help="dtype of the client-side embeddings and LM head")
    parser.add_argument("--adapter", default=None, metavar="DIR_OR_NAME",
                        help="a peft LoRA adapter folder (applied by this client) or the name of an adapter the servers host")
    parser.add_argument("--dht-prefix", default=None, help="name the model is announced under (default: folder or repo name)")
    add_client_arguments(parser, GENERATE_FLAGS)


def load_model(args: argparse.Namespace):
    """(tokenizer, distributed model) of `args.model` as `swarm generate`'s flags say (`swarm api` shares them)."""
    from swarm.join import interrupted_if_join_fails, start_joining

    # The DHT peer joins in its own process while transformers imports and the tokenizer and weights load here; if
    # the join fails, that is said at once.
    dht = start_joining(args.initial_peers, args.swarm_key, client_mode=True)
    try:
        with interrupted_if_join_fails(dht):
            from transformers import AutoTokenizer

            from client.model import DistributedModelForCausalLM

            tokenizer = AutoTokenizer.from_pretrained(args.model)
            model = DistributedModelForCausalLM.from_pretrained(
                args.model, args.initial_peers, dht_prefix=args.dht_prefix, torch_dtype=args.torch_dtype,
                client_config=client_config_from(args, GENERATE_FLAGS), dht=dht)
    except BaseException:
        dht.shutdown()
        raise
    return tokenizer, model


def run(args: argparse.Namespace) -> int:
    tokenizer, model = load_model(args)
    import torch
    from transformers import TextStreamer

    try:
        if args.adapter is not None:
            if Path(args.adapter).is_dir():
                model.load_lora_adapter(args.adapter)
            else:
                model.use_hosted_adapter(args.adapter)
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True) if args.chat else args.prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.do_sample else dict(do_sample=False)
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                       streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    finally:
        model.model.layers.connection.shutdown()
    return 0
