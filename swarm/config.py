"""One source of defaults, read by the command line, the classes and the docs alike."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarm.kv_cache import parse_size
from swarm.options import option

# The wire protocol: this build writes version PROTOCOL_VERSION and still reads every version down to
# MIN_PROTOCOL_VERSION (swarm.versions). A change a peer one version behind cannot read raises PROTOCOL_VERSION; one
# that drops an old format raises MIN_PROTOCOL_VERSION.
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

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
    return {k: os.environ[k] for k in OMP_WAIT_VARIABLES if k in os.environ}


def apply_colocated_omp_env() -> None:
    """Set COLOCATED_OMP_ENV in this process where the user has not; call before torch starts its thread pool."""
    for name, value in COLOCATED_OMP_ENV.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class ServerConfig:
    """A server's settings: the `swarm server` flags (with this help) and the options of server.server.Server. A
    default is also the class attribute (ServerConfig.max_batch_size), which the classes that use it read."""

    # Parsed by server/cli.py itself: the positional model, --blocks/--num-blocks (exactly one), --initial-peers /
    # --new-swarm (swarm.cli.add_swarm_arguments) and --adapters NAME=PATH (name -> folder of a peft LoRA adapter).
    model: str
    blocks: tuple[int, int] | None = None
    num_blocks: int | str | None = None  # a count, or "auto": as many as fit the devices' memory (server.memory_plan)
    initial_peers: Sequence[str] = ()
    new_swarm: bool = False
    adapters: Mapping[str, str] = field(default_factory=dict)
    # --swarm-key-file (swarm.cli.add_swarm_arguments): a swarm.auth.Keyring or what Keyring.load takes; None: the
    # SWARM_KEY_FILE environment variable's key, else an open swarm.
    swarm_key: Any = None

    host_maddrs: tuple[str, ...] = option(("/ip4/0.0.0.0/tcp/0",), "addresses to listen on, e.g. /ip4/127.0.0.1/tcp/0",
                                          metavar="MADDR")
    announce_maddrs: tuple[str, ...] | None = option(None, "public addresses others should dial", metavar="MADDR")
    identity_path: str | None = option(None, "file with this peer's private key; keeps its peer ID (and so its join "
                                             "address) stable across restarts")
    dht_prefix: str | None = option(None, "name the model is announced under (default: the folder or repo name)")
    public_name: str = option("", "a name shown to others in `swarm status`")
    device: str = option("auto", "where to compute: auto (the first GPU if there is one, else the CPU), cpu, cuda, "
                                 "cuda:N, or several separated by commas (e.g. cuda:0,cuda:1), which split the span "
                                 "into contiguous parts, one per device")
    torch_dtype: str = option("auto", "dtype to compute in; auto: bfloat16 on a GPU (float16 where it lacks bfloat16), "
                                      "on a CPU float32, or the checkpoint's where the CPU has fast bfloat16 (AVX-512 "
                                      "BF16 or AMX); float16 is refused on a CPU",
                              choices=["auto", "float32", "bfloat16", "float16"])
    # swarm.quantize: blocks are quantized one at a time as they load, so loading needs about one float block more.
    quant: str = option("none", "quantize the blocks' linear layers with bitsandbytes: int8 (LLM.int8(), outliers "
                                "beyond 6 in 16 bits; 0.25x the float32 bytes) or nf4 (4-bit NormalFloat in blocks of "
                                "64, computed in the server's dtype; 0.13x). Clients see it in the record",
                        choices=["none", "int8", "nf4"])
    # Every budget below is shared fairly among the peers that hold some (server.fair_share): when it is short, a peer
    # over its share gets a "limit reached" error, and a peer that holds less takes the place of the largest holder's
    # least recently used holding.
    cache_tokens: int = option(16384, "KV-cache budget in tokens, summed over sessions as batch_size * max_length, "
                                      "converted to bytes with the model's KV geometry and the span's length (unless "
                                      "--cache-bytes is given)")
    cache_bytes: int | None = option(None, "KV-cache budget in bytes (e.g. 2GiB, 512MiB), over all the span's blocks "
                                           "and devices; wins over --cache-tokens", type=parse_size, metavar="SIZE")
    cache_wait: float = option(1.0, "seconds a session waits for KV-cache memory when the cache is full (others' "
                                    "sessions may close meanwhile) before it is refused")
    max_sessions: int = option(256, "inference sessions open at once, all peers together")
    inflight_mb: float = option(512.0, "memory for requests received and waiting for (or in) compute, each charged "
                                       "as it arrives, its copies included (swarm.ingress); the compute thread serves "
                                       "the peer that used the least compute lately first")
    # server.compute_queue: decode steps waiting for the same blocks run as one batch (never waiting for company).
    batch_rows: int = option(64, "most rows (sessions' sequences) of decode steps run as one batch; 1 runs each "
                                 "step alone")
    # Announced in the server's record: clients split their requests to fit (client.limits).
    max_batch_size: int = option(64, "largest batch accepted")
    max_chunk_tokens: int = option(8192, "largest batch * length accepted in one request (forward, backward or "
                                         "inference step)")
    # Each tensor of a request costs the server objects far larger than its few bytes on the wire (an empty tensor
    # takes 2 bytes there and about a kilobyte decoded): counted before any is decoded.
    max_request_tensors: int = option(4096, "most tensors one request (or an inference session's opening) may carry: "
                                            "its inputs and every LoRA tensor")
    update_period: float = option(30.0, "seconds between DHT announcements")
    # Records outlive a few announcements (a late one is no gap) and still vanish by themselves when a server crashes.
    expiration_factor: float = option(2.5, "DHT records live this many update periods")
    request_timeout: float = option(300.0, "seconds a client may keep an inference session (or a training stream "
                                           "waiting for its backward) idle")
    shutdown_timeout: float = option(10.0, "seconds to let open sessions finish on SIGTERM (and on the old blocks "
                                           "after a move)")
    # Pushes are small and the next server only queues them, so a healthy push takes milliseconds.
    push_timeout: float = option(5.0, "seconds to push an inference step to the next server of a client's route "
                                      "before telling the client to send it there itself")
    max_lora_mb: float = option(64.0, "largest total size of the LoRA tensors one training request may carry")
    lora_cache_mb: float = option(256.0, "memory for clients' uploaded LoRA tensors, reused by digest so a backward "
                                         "pass need not resend them")
    lora_cache_ttl: float = option(120.0, "seconds an unused uploaded adapter stays in that cache")
    train_activation_mb: float = option(2048.0, "memory for activations that training requests keep between their "
                                                "forward and backward (beyond it, clients fall back to requests whose "
                                                "backward recomputes the forward)")
    delta_state_mb: float = option(1024.0, "memory for references of clients' delta-coded training activations (the "
                                           "previous epoch's value of each sample; beyond it the oldest go and those "
                                           "rows are sent in full again)")
    # An epoch must come back within it for its deltas to apply.
    delta_state_ttl: float = option(3600.0, "seconds an unused reference of delta-coded training activations is kept")
    rebalance_period: float = option(60.0, "with --num-blocks: seconds between checks of the swarm's coverage; the "
                                           "server moves to blocks that have no server or are much less served than "
                                           "others, if its own blocks stay covered. 0 disables")
    # Random waits, so that two servers rarely check (and move) at once.
    rebalance_jitter: float = option(0.25, "each wait between checks is --rebalance-period times a random factor "
                                           "within 1 +- this")
    # A move reloads weights and moves sessions: worth it only for a clear gain.
    balance_margin: float = option(0.2, "move to even out coverage only if the least-served block would get more "
                                        "than 1 + this times as many servers (blocks with no server always get one)")
    # --num-blocks auto (server.memory_plan): memory it leaves unplanned on each device (on a CPU, of the RAM), for
    # allocator fragmentation, the CUDA context and what the estimates miss.
    memory_headroom: float = option(0.1, "with --num-blocks auto: fraction of each device's free memory left unused "
                                         "(at least --memory-headroom-min)")
    memory_headroom_min: int = option(2**30, "with --num-blocks auto: the least memory left unused on each device "
                                             "(e.g. 1GiB, 512MiB)", type=parse_size, metavar="SIZE")
    # server.throughput: measured once per device, dtype, quantization and block shape, then read from
    # $SWARM_CACHE_DIR (default ~/.cache/swarm)/throughput.json.
    remeasure: bool = option(False, "measure this device's throughput again instead of using the figures cached by "
                                    "an earlier start")
    # server.metrics: the server's own counters for Prometheus (requests, errors, sessions, KV cache, bytes).
    metrics_port: int | None = option(None, "serve this server's own counters in Prometheus' text format at "
                                            "http://HOST:PORT/metrics (default: off)", metavar="PORT")
    metrics_host: str = option("127.0.0.1", "address --metrics-port listens on (0.0.0.0: every interface, for a "
                                            "Prometheus on another machine)")


@dataclass(frozen=True)
class MonitorConfig:
    """`swarm monitor` (client.monitor): a web page, a JSON API and Prometheus metrics of a swarm, read from its DHT."""

    # --initial-peers and --swarm-key-file: swarm.cli.add_swarm_arguments.
    initial_peers: Sequence[str] = ()
    swarm_key: Any = None

    host: str = option("127.0.0.1", "address the monitor's web server listens on (0.0.0.0: every interface)")
    port: int = option(8001, "port of the monitor's web server: / (the page), /api/swarm (JSON), /metrics (Prometheus)")
    # The page polls every ~2 s; servers announce every --update-period (30 s by default), so a shorter poll only
    # notices records that expired or went offline sooner.
    poll_period: float = option(2.0, "seconds between reads of the swarm's records from the DHT")
