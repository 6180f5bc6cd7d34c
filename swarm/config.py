"""One source of defaults, read by the command line, the classes and the docs alike."""

from __future__ import annotations

from dataclasses import dataclass

# The wire protocol: this build writes version PROTOCOL_VERSION and still reads every version down to
# MIN_PROTOCOL_VERSION (swarm.versions). A change a peer one version behind cannot read raises PROTOCOL_VERSION; one
# that drops an old format raises MIN_PROTOCOL_VERSION.
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

# A unary libp2p message may not exceed 4 MiB; larger payloads go over a stream in chunks this big.
MAX_UNARY_PAYLOAD_BYTES = 3 * 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024

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


SERVER = ServerDefaults()
