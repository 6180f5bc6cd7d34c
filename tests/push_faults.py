"""Start a `swarm` peer whose server delays or loses the pushes of chosen steps (for tests of forwarding).

`LocalSwarm.start_servers(..., python_args=ENTRY, env=faults(delay={3: 2.0}, fail={6: 0.5}))`: the push of each session's
step 3 waits 2 s before it goes; the push of step 6 fails after 0.5 s, as a lost connection would. The server runs
unchanged otherwise: this module patches the push in the server's own process before swarm.cli.main runs.
"""

from __future__ import annotations

import asyncio
import json
import os

ENTRY = ("-c", "import tests.push_faults as f; f.install(); from swarm.cli import main; raise SystemExit(main())")
_ENV = "SWARM_TEST_PUSH_FAULTS"


def faults(delay: dict[int, float] | None = None, fail: dict[int, float] | None = None) -> dict[str, str]:
    """The environment that tells install() which steps' pushes to delay or fail (after how many seconds)."""
    return {_ENV: json.dumps({"delay": delay or {}, "fail": fail or {}})}


def install() -> None:
    from server.inference import PushLink
    from swarm.forwarding import PushStep

    table = json.loads(os.environ.get(_ENV, "{}"))
    delay = {int(k): float(v) for k, v in table.get("delay", {}).items()}
    fail = {int(k): float(v) for k, v in table.get("fail", {}).items()}
    push = PushLink.push

    async def faulty_push(self, request, timeout: float) -> None:
        step = PushStep.decode(request.metadata).step
        await asyncio.sleep(delay.get(step, 0.0) + fail.get(step, 0.0))
        if step in fail:
            raise ConnectionError(f"injected for a test: the push of step {step} was lost")
        await push(self, request, timeout)

    PushLink.push = faulty_push
