"""Start a `swarm` peer whose server returns wrong activations (for tests and benches of spot checks).

`LocalSwarm.start_servers(..., python_args=ENTRY, env=lying(scale=1.5))`: every output of the server's span (forwards,
generation steps, training streams) is multiplied by 1.5, and it announces itself as very fast so that routes go
through it. Its KV caches hold the true values: only what it returns is wrong. It runs unchanged otherwise: this
module patches the span in the server's own process before swarm.cli.main runs, so no production flag can do this.
"""

from __future__ import annotations

import json
import os

ENTRY = ("-c", "import tests.dishonest as d; d.install(); from swarm.cli import main; raise SystemExit(main())")
_ENV = "SWARM_TEST_DISHONEST"


def lying(scale: float = 1.5) -> dict[str, str]:
    """The environment that tells install() how to lie."""
    return {_ENV: json.dumps({"scale": scale})}


def install() -> None:
    import server.throughput
    from swarm.models.span import BlockSpan

    scale = float(json.loads(os.environ.get(_ENV, "{}")).get("scale", 1.5))
    iter_blocks = BlockSpan.iter_blocks  # every way a span runs (whole, a block at a time, batched) goes through it

    def lying_iter_blocks(self, hidden, position_ids, masks, cache, first, last, *args, **kwargs):
        blocks, sent = iter_blocks(self, hidden, position_ids, masks, cache, first, last, *args, **kwargs), None
        for index in range(last - first):
            output = blocks.send(sent) if index else next(blocks)
            sent = yield output * scale if index == last - first - 1 else output

    def fast(*args, **kwargs) -> server.throughput.SpanSpeed:  # it wants the traffic (and caches nothing)
        return server.throughput.SpanSpeed(ms_per_block=0.001, forward_tps=1e9)

    BlockSpan.iter_blocks = lying_iter_blocks
    server.throughput.span_speed = fast
