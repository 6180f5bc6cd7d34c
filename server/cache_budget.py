"""Budgets of what sessions and training streams may hold: KV-cache tokens, kept activations' bytes."""

from __future__ import annotations

from swarm.errors import CacheFull


class CacheBudget:
    """KV-cache tokens (batch_size * max_length summed over sessions) that may be reserved."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def acquire(self, amount: int) -> None:
        """Hold `amount` until `release(amount)`; fail at once with a clear error when it does not fit."""
        if amount > self.free:
            raise CacheFull(self._refusal(amount))
        self.used += amount

    def release(self, amount: int) -> None:
        self.used -= amount

    def _refusal(self, tokens: int) -> str:
        if tokens > self.total:
            return (f"a session of {tokens} tokens (batch_size * max_length) exceeds this server's whole KV-cache "
                    f"budget of {self.total}; use a smaller max_length or batch")
        return f"KV cache is full: {self.free} of {self.total} tokens free, {tokens} requested; retry later or use another server"


class ActivationBudget(CacheBudget):
    """Bytes of activations that training streams may keep between their forward and backward messages."""

    def _refusal(self, nbytes: int) -> str:
        return (f"keeping {nbytes / 2**20:.0f} MiB of activations does not fit: "
                f"{self.free / 2**20:.0f} of {self.total / 2**20:.0f} MiB free")
