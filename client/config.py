"""A client's settings: one typed value per model, declared once (defaults, help, the flags of `swarm generate` and
`swarm finetune`: see swarm.options)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from swarm.forwarding import forwarding_setting
from swarm.options import add_arguments, option

CODEC_HELP = " (see swarm.compression: int8_outlier, bfloat16, float16, 'none' for float32 as it is, ...)"


def _fraction(value: float, error: type[Exception] = ValueError) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise error(f"verify_fraction must be in [0, 1] (a share of span requests), got {value}")
    return value


def _forwarding_flag(text: str) -> bool | str:
    try:
        return forwarding_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction_flag(text: str) -> float:
    """--verify-fraction's value, refused by argparse with the same message as ClientConfig's."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"verify_fraction must be a number in [0, 1], got {text!r}") from None
    return _fraction(value, argparse.ArgumentTypeError)


@dataclass(frozen=True)
class ClientConfig:
    """How one model's client talks to the swarm. Give it to `from_pretrained(..., client_config=...)` (or pass its
    fields as keyword overrides); `swarm generate` and `swarm finetune` map their flags onto these fields."""

    request_timeout: float = option(60.0, "seconds to wait for one remote call")
    connect_timeout: float = option(20.0, "seconds to open a session on one server")
    max_length: int = option(2048, "inference session length when the caller gives none")
    max_chunk_tokens: int = option(8192, "tokens (batch x length) per request; larger batches are split, and servers "
                                         "that announce a lower limit get smaller pieces")
    # Codecs by role. Chosen from bench/compression.py on SmolLM2 through 3 servers (README, "Compressed activations").
    # Inference, both ways: 3.7x fewer bytes than float32, 99.5% top-1 agreement, perplexity +0.02%.
    inference_codec: str = option("int8_outlier", "codec of hidden states in generation, both ways" + CODEC_HELP,
                                  metavar="ID")
    activation_codec: str = option("int8_outlier", "codec of hidden states sent forward while training" + CODEC_HELP,
                                   metavar="ID")
    # 5 bits, not 4: int4 gradients alone moved the loss curve of a 4-epoch LoRA run 4.8% from float32's (int5: 0.9%;
    # int8 activations alone: 1.1%).
    gradient_codec: str = option("int5_outlier", "codec of gradients sent backward while training", metavar="ID")
    # With int8 activations, int5 gradients and 6-bit deltas, 4-epoch LoRA runs sent 5.07x fewer bytes than float32 and
    # their loss curves stayed within 0.5-1.6% of float32's over three seeds (5-bit deltas: 5.3x, but up to 3.2%).
    delta_codec: str = option("int6_outlier", "from the second epoch, send each sample's hidden states as the change "
                                              "since its previous pass, in this codec ('none': every epoch in full)",
                              metavar="ID")
    inference_reply_codec: str = option("", "codec servers answer generation steps in ('': the inference codec)",
                                        metavar="ID")
    activation_reply_codec: str = option("", "codec servers answer training forwards in ('': the activation codec)",
                                         metavar="ID")
    gradient_reply_codec: str = option("", "codec servers answer backwards in ('': the gradient codec)", metavar="ID")
    delta_state_mb: float = option(2048.0, "memory for the references of delta-coded activations (two per sample and "
                                           "span; the least recently used go first)")
    keep_activations: bool = option(True, "training: one request per span for forward and backward, the server "
                                          "keeping the activations in between (--no-keep-activations: recompute)")
    hop_overhead_ms: float = option(2.0, "routing cost of a hop to a server whose round trip is not measured yet")
    ping_period_s: float = option(15.0, "seconds between rounds of pings to every known server")
    ping_timeout_s: float = option(5.0, "a ping slower than this marks the server unreachable until it answers")
    ping_smoothing: float = option(0.3, "weight of a new ping in the moving average of a round trip")
    unreachable_rtt_ms: float = option(10_000.0, "routing cost of a hop to an unreachable server (used only if "
                                                 "nothing else serves its blocks)")
    ban_base_s: float = option(15.0, "seconds a server that failed a call stays out of routes, doubling per failure "
                                     "in a row")
    ban_max_s: float = option(300.0, "the longest such ban, in seconds")
    full_backoff_s: float = option(30.0, "seconds a server that answered it has no room (its sessions or this "
                                         "client's share of them taken) is left out of new routes while other "
                                         "servers host its blocks")
    max_retries: int = option(3, "replacement servers tried for a failed span before giving up")
    servers_max_age: float = option(5.0, "seconds a view of the swarm's servers is used before it is read again")
    allowed_servers: tuple[str, ...] | None = option(None, "use only these servers, by peer id (the part after /p2p/ in "
                                                           "a server's address)", metavar="PEER_ID")
    blocked_servers: tuple[str, ...] = option((), "never send anything to these servers, by peer id", metavar="PEER_ID")
    # Off by default: on loopback forwarding measured 0.94-1.00x the speed of client-driven hops (bench/generation.py
    # --compare forwarding, 4 servers, one 2-core machine), at 25 ms one way 1.43x (bench/wan.py). auto decides from
    # the pinger's round trips (swarm.forwarding.forwarding_pays), which are not yet a default's signal: one ping per
    # 15 s, and on a loaded machine the first ones measured 30-56 ms on loopback.
    forwarding: bool | str = option(False, "servers push each token's hidden states straight to the next server of "
                                            "the route, so they cross each link once (on), or return them to this "
                                            "client at every hop (off); auto: on when the measured round trip to the "
                                            "route's servers is at least --forwarding-min-rtt-ms",
                                    type=_forwarding_flag, nargs="?", const=True, metavar="{auto,on,off}")
    forwarding_min_rtt_ms: float = option(10.0, "with --forwarding auto, the median round trip (ms) to a route's "
                                               "servers from which their steps are forwarded")
    default_ms_per_block: float = option(10.0, "routing cost of a block when a server reports no throughput")
    # Spot checks (client.spot_checks): a key holder can still run a server that returns wrong outputs.
    verify_fraction: float = option(0.0, "share of span requests (forwards and generation steps; backwards are not "
                                         "checked) also sent to another replica of the same blocks and compared; on a "
                                         "disagreement a third replica decides and the server out of the majority is "
                                         "banned for this client's lifetime (0: off, 1: every request)",
                                    type=_fraction_flag, metavar="F")

    def __post_init__(self):
        _fraction(self.verify_fraction)
        object.__setattr__(self, "forwarding", forwarding_setting(self.forwarding))  # "on" -> True, "off" -> False

    def replace(self, **changes) -> ClientConfig:
        """A copy with some fields changed; an unknown name is refused, naming the fields there are."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are ClientConfig's fields: {', '.join(sorted(known))}")
        for name in ("allowed_servers", "blocked_servers"):  # lists of peer ids are kept as tuples (hashable)
            if changes.get(name) is not None and not isinstance(changes[name], str):
                changes[name] = tuple(changes[name])
        return dataclasses.replace(self, **changes)

    def check_codecs(self, available) -> None:
        """Raise ValueError naming the role of any codec that is not among `available` (swarm.compression)."""
        for role, name in CODEC_FIELDS.items():
            value = getattr(self, name)
            if value and value not in available:
                raise ValueError(f"unknown codec {value!r} for {role.replace('_reply', ' replies')}; "
                                 f"choose from {list(available)}")


# The codec roles (client.requests.Codecs) and the field of each.
CODEC_FIELDS = {"inference": "inference_codec", "activations": "activation_codec", "gradients": "gradient_codec",
                "delta": "delta_codec", "inference_reply": "inference_reply_codec",
                "activations_reply": "activation_reply_codec", "gradients_reply": "gradient_reply_codec"}
CLIENT = ClientConfig()  # the defaults; never mutated (a model's own config is a replaced copy)
# The settings `swarm generate` and `swarm finetune` take as flags (the others are for the Python API).
COMMON_FLAGS = ("request_timeout", "connect_timeout", "max_retries", "allowed_servers", "blocked_servers",
                "max_chunk_tokens", "verify_fraction")
GENERATE_FLAGS = (*COMMON_FLAGS, "inference_codec", "inference_reply_codec", "forwarding", "forwarding_min_rtt_ms")
FINETUNE_FLAGS = (*COMMON_FLAGS, "activation_codec", "gradient_codec", "delta_codec", "activation_reply_codec",
                  "gradient_reply_codec", "keep_activations", "delta_state_mb")


def add_client_arguments(parser, names) -> None:
    """The flags of ClientConfig fields `names`, each named after its field (--request-timeout, ...)."""
    group = parser.add_argument_group("client settings", "fields of client.ClientConfig, as from_pretrained takes them")
    add_arguments(group, ClientConfig, only=names)


def client_config_from(args, names) -> ClientConfig:
    return CLIENT.replace(**{name: getattr(args, name) for name in names})
