"""The KV-cache budget: how many tokens (batch_size * max_length summed over sessions) may be reserved."""

from __future__ import annotations

from swarm.errors import CacheFull


class CacheBudget:
    def __init__(self, total_tokens: int):
        self.total = total_tokens
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def acquire(self, tokens: int) -> None:
        """Hold `tokens` until `release(tokens)`; fail at once with a clear error when they do not fit."""
        if tokens > self.total:
            raise CacheFull(
                f"a session of {tokens} tokens (batch_size * max_length) exceeds this server's whole KV-cache "
                f"budget of {self.total}; use a smaller max_length or batch"
            )
        if tokens > self.free:
            raise CacheFull(f"KV cache is full: {self.free} of {self.total} tokens free, {tokens} requested; retry later or use another server")
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens


class ActivationBudget:
    """Bytes of activations that training streams may keep between their forward and backward messages."""

    def __init__(self, total_bytes: int):
        self.total, self.used = total_bytes, 0

    def acquire(self, nbytes: int) -> None:
        if nbytes > self.total - self.used:
            raise CacheFull(f"keeping {nbytes / 2**20:.0f} MiB of activations does not fit: "
                            f"{(self.total - self.used) / 2**20:.0f} of {self.total / 2**20:.0f} MiB free")
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
