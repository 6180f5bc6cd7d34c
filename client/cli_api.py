"""`swarm api`: serve one model of a swarm over an OpenAI-compatible HTTP API (client/api.py)."""

from __future__ import annotations

import argparse
import logging

from client.api_schema import ApiConfig
from client.config import GENERATE_FLAGS, add_client_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarm.cli import add_swarm_arguments
    from swarm.options import add_arguments as add_options

    parser.add_argument("model", help="folder (or hub repo id) with the model's config, tokenizer and client-side weights")
    add_swarm_arguments(parser)
    add_options(parser.add_argument_group("gateway", "fields of client.api_schema.ApiConfig"), ApiConfig)
    parser.add_argument("--torch-dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                        help="dtype of the client-side embeddings and LM head")
    parser.add_argument("--dht-prefix", default=None, help="name the model is announced under (default: folder or repo name)")
    add_client_arguments(parser, GENERATE_FLAGS)


def run(args: argparse.Namespace) -> int:
    from client.cli_generate import load_model
    from swarm.options import from_args

    config = from_args(ApiConfig, args)
    tokenizer, model = load_model(args)  # the DHT join overlaps the imports below
    import uvicorn

    from client.api import create_app
    try:
        app = create_app(model, tokenizer, config)
        if config.api_key_file is None and config.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("serving on %s without --api-key-file: anyone who reaches it can generate", config.host)
        logger.info("serving %s on http://%s:%d/v1", app.state.gateway.model_names(), config.host, config.port)
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        model.model.layers.connection.shutdown()
    return 0
