"""A client's settings: one typed value per model, with the defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    """How one model's client talks to the swarm. Give it to `from_pretrained(..., client_config=...)` (or pass its
    fields as keyword overrides); `swarm generate` and `swarm finetune` map their flags onto these fields."""

    request_timeout: float = 60.0  # seconds for one remote call
    connect_timeout: float = 20.0  # seconds to open a session on one server
    max_length: int = 2048  # inference session length when the caller gives none
    max_chunk_tokens: int = 8192  # tokens per forward/backward request; larger batches are split (servers' default limit)
    # Codecs for hidden states on the wire, by role (see swarm.compression); "none" sends float32 as it is. Chosen
    # from bench/compression.py on SmolLM2 through 3 servers (README, "Compressed activations and gradients").
    inference_codec: str = "int8_outlier"  # both ways: 3.7x fewer bytes, 99.5% top-1 agreement, ppl +0.02%
    activation_codec: str = "int8_outlier"  # training forward: the span's input and output
    # Training backward: the output gradient and the input gradient. 5 bits, not 4: int4 gradients alone moved the
    # loss curve of a 4-epoch LoRA run 4.8% from float32's (int5: 0.9%; int8 activations alone: 1.1%).
    gradient_codec: str = "int5_outlier"
    # Training activations as deltas against the previous epoch's, per sample (swarm.compression.delta): the codec
    # of the deltas, or "none" to send every epoch in full. Needs training streams (keep_activations). With int8
    # activations, int5 gradients and 6-bit deltas, 4-epoch LoRA runs sent 5.07x fewer bytes than float32 and their
    # loss curves stayed within 0.5-1.6% of float32's over three seeds (5-bit deltas: 5.3x, but up to 3.2%).
    delta_codec: str = "int6_outlier"
    # What servers answer in, by role, when it differs from the role's codec ("": the same).
    inference_reply_codec: str = ""
    activation_reply_codec: str = ""
    gradient_reply_codec: str = ""
    delta_state_mb: float = 2048.0  # the client's references (two per sample and span; least recently used go first)
    keep_activations: bool = True  # training: one request per span for forward + backward (no recompute)
    hop_overhead_ms: float = 2.0  # routing cost of a hop to a server whose round trip is not measured yet
    # Round trips to every known server, measured in the background by timing a small rpc_info call.
    ping_period_s: float = 15.0  # seconds between rounds (a newly seen server is pinged at once)
    ping_timeout_s: float = 5.0  # a ping that takes longer marks the server unreachable until it answers again
    ping_smoothing: float = 0.3  # weight of a new ping in the moving average, so one slow answer does not flip routes
    unreachable_rtt_ms: float = 10_000.0  # routing cost of a hop to an unreachable server: used only if nothing else
    ban_base_s: float = 15.0  # a server that failed a call stays out of routes this long, doubling per failure in a row
    ban_max_s: float = 300.0
    max_retries: int = 3  # replacement routes tried for a failed span before giving up
    servers_max_age: float = 5.0  # seconds a view of the swarm's servers is used before it is fetched again
    # Servers by peer id: use only these (None: any), and never these. Servers left out are not even pinged.
    allowed_servers: tuple[str, ...] | None = None
    blocked_servers: tuple[str, ...] = ()
    # Inference steps go server to server (each pushes its output to the next; swarm.forwarding) instead of back to the
    # client at every hop, which saves a client round trip per hop but sends more messages in all (pushes, their
    # acceptances, and every output still to the client for replay). Off: with all peers on one 2-core machine it
    # measured 0.94-1.00x the speed of client-driven hops (bench/generation.py --compare forwarding, 4 servers).
    forwarding: bool = False
    default_ms_per_block: float = 10.0  # routing cost of a block when a server reports no throughput


CLIENT = ClientConfig()  # the defaults; never mutated (a model's own config is a replaced copy)
