"""Server-to-server forwarding of inference steps: the wire records and the client's choice of where to forward.

A client's step to the first server of its route names the rest of the route (`ForwardStep.forward`); each server,
after its span, pushes its output straight into the next server's session (rpc_push with a `PushStep`), so a token
crosses each link once. The session id a client chose when it opened a session is the capability to push into it:
128 random bits known only to the client and the servers of its route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from swarm.protocol import InferenceStep

SESSION_ID = r"^[0-9a-f]{32}$"
PEER_ID = r"^[1-9A-HJ-NP-Za-km-z]{20,128}$"  # base58, as hivemind prints a PeerID
MAX_HOPS = 256  # longest rest of a route one step may carry


class ForwardHop(BaseModel):
    """A later server of the route: where to push, into which of its sessions, as which step, in which codec."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    peer_id: str = Field(pattern=PEER_ID)
    session_id: str = Field(pattern=SESSION_ID)
    step: int = Field(ge=0)  # the step number this session expects next
    codec: str = Field(default="", max_length=64)  # how that session takes its input hidden states ("" = none)


class ForwardStep(InferenceStep):
    """A step of an inference stream that also names the rest of the route to push the output along."""

    forward: list[ForwardHop] = Field(default_factory=list, max_length=MAX_HOPS)


class PushStep(ForwardStep):
    """rpc_push: a step for one session of the receiving server, computed by the previous server of the route.

    Tensors as an inference step's: hidden states (in the session's input codec), position ids, an optional mask.
    """

    session_id: str = Field(pattern=SESSION_ID)


@dataclass(frozen=True)
class HopTarget:
    """What the client knows of one stream of its route, for choosing where a step is forwarded."""

    peer_id: str
    session_id: str
    step: int
    codec: str
    accepts_pushes: bool  # False once a push into it failed: the client drives that hop itself


def forward_chain(targets: Sequence[HopTarget], index: int, step_bytes: int, max_bytes: int) -> list[ForwardHop]:
    """The hops after stream `index` that its server should push a step along: the following streams up to the first
    one that pushes failed into. None when the step's hidden states (`step_bytes` uncompressed) are too large for a
    single push message (`max_bytes`): the client then drives every hop of that step, as without forwarding."""
    if step_bytes > max_bytes:
        return []
    hops = []
    for target in targets[index + 1 :]:
        if not target.accepts_pushes:
            break
        hops.append(ForwardHop(peer_id=target.peer_id, session_id=target.session_id, step=target.step,
                               codec="" if target.codec == "none" else target.codec))
    return hops


FORWARDING_SETTINGS = {"auto": "auto", "on": True, "off": False}


def forwarding_setting(value: bool | str) -> bool | str:
    """A forwarding setting as the client keeps it: True (always), False (never) or "auto" (decided per step from
    measured round trips, forwarding_pays); given as a bool or as one of "auto", "on", "off"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in FORWARDING_SETTINGS:
        return FORWARDING_SETTINGS[value.strip().lower()]
    raise ValueError(f"forwarding must be one of auto, on, off (or True / False), got {value!r}")


def forwarding_pays(rtt_ms: Sequence[float | None], min_rtt_ms: float) -> bool:
    """Whether a route's servers are far enough from the client that forwarding is faster: the median of their
    measured round trips (ms; None: not measured yet, inf: unreachable, both left out) is at least `min_rtt_ms`.

    Client-driven hops cost a round trip from the client per server; forwarding crosses each link once but sends more
    messages (a push per link, besides every output still going back to the client), which on one machine costs more
    than the round trips it saves (measured 0.94-1.00x on loopback, 1.43x at 25 ms one way: bench/wan.py). The client
    sees only its own round trips, so it takes the servers to be no farther from each other than from it."""
    measured = sorted(r for r in rtt_ms if r is not None and r != float("inf"))
    if not measured:
        return False
    middle = len(measured) // 2
    median = measured[middle] if len(measured) % 2 else (measured[middle - 1] + measured[middle]) / 2
    return median >= min_rtt_ms
