"""One source of defaults, read by the command line, the classes and the docs alike."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1

# A unary libp2p message may not exceed 4 MiB; larger payloads go over a stream in chunks this big.
MAX_UNARY_PAYLOAD_BYTES = 3 * 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024

# Seconds a peer may take to join the swarm through its initial peers before it gives up with a clear error
# (swarm.join). A join takes under a second here; the libp2p daemon itself gives up on its bootstrap after 15 s.
JOIN_TIMEOUT = 20.0

# Peers that share a machine (a LocalSwarm, a client beside its servers) let their idle OpenMP threads spin only
# briefly before sleeping. libgomp's default spin (300k iterations) steals the core the next peer in the chain
# needs, and no spin at all (OMP_WAIT_POLICY=PASSIVE) makes every parallel region pay a wake-up: the recompute and
# backward of 10 SmolLM2 blocks ran ~35% slower that way. Measured on 2 cores; the user's own settings win.
COLOCATED_OMP_ENV = {"GOMP_SPINCOUNT": "1000"}
OMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def user_omp_env() -> dict[str, str]:
    """The user's own OpenMP waiting settings (read them before apply_colocated_omp_env)."""
    import os

    return {k: os.environ[k] for k in OMP_WAIT_VARIABLES if k in os.environ}


def apply_colocated_omp_env() -> None:
    """Set COLOCATED_OMP_ENV in this process where the user has not; call before torch starts its thread pool."""
    import os

    for name, value in COLOCATED_OMP_ENV.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class ServerDefaults:
    update_period: float = 30.0  # seconds between DHT announcements
    expiration_factor: float = 2.5  # records live this many update periods, so a crashed server vanishes by itself
    cache_tokens: int = 16384  # KV-cache budget: sum over open sessions of batch_size * max_length
    max_batch_size: int = 64
    max_chunk_tokens: int = 8192  # tokens (batch * length) in one forward/backward/inference step
    request_timeout: float = 300.0  # seconds a client may keep an inference session idle
    shutdown_timeout: float = 10.0  # seconds to let in-flight work finish on SIGTERM
    # Seconds to push an inference step to the next server of a client's route before telling the client to send it
    # there itself (pushes are small and the next server only queues them, so a healthy push takes milliseconds).
    push_timeout: float = 5.0
    torch_dtype: str = "auto"
    max_lora_mb: float = 64.0  # LoRA tensors one request may carry
    lora_cache_mb: float = 256.0  # uploaded LoRA tensors kept for reuse by digest, over all clients
    lora_cache_ttl: float = 120.0  # seconds an unused upload stays in that cache
    train_activation_mb: float = 2048.0  # activations training streams may keep between forward and backward
    delta_state_mb: float = 1024.0  # references of delta-coded training activations, over all clients
    delta_state_ttl: float = 3600.0  # seconds an unused reference is kept (an epoch must come back within it)
    # Rebalancing (servers started with --num-blocks): how often each checks the swarm's coverage (0: never). Each
    # wait is this times a random factor within 1 +- rebalance_jitter, so two servers rarely check (and move) at once.
    rebalance_period: float = 60.0
    rebalance_jitter: float = 0.25
    # Move to even out coverage only when the least-served block would get more than 1 + this times its servers
    # (a move reloads weights and moves sessions; blocks with no server at all are always worth a move).
    balance_margin: float = 0.2


@dataclass(frozen=True)
class ClientDefaults:
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
    # Inference steps go server to server (each pushes its output to the next; swarm.forwarding) instead of back to the
    # client at every hop, which saves a client round trip per hop but sends more messages in all (pushes, their
    # acceptances, and every output still to the client for replay). Off: with all peers on one 2-core machine it
    # measured 0.94-1.00x the speed of client-driven hops (bench/generation.py --compare forwarding, 4 servers).
    forwarding: bool = False
    default_ms_per_block: float = 10.0  # routing cost of a block when a server reports no throughput


SERVER = ServerDefaults()
CLIENT = ClientDefaults()
