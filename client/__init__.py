"""The client side of the swarm: routing, remote blocks with autograd, inference sessions, model classes."""

from client.config import ClientConfig

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "RemoteSequential"]


def __getattr__(name: str):
    # Imported on first use, so `swarm --help` and the pure policies load without torch and hivemind.
    if name == "DistributedModelForCausalLM":
        from client.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    if name == "RemoteSequential":
        from client.remote_sequential import RemoteSequential

        return RemoteSequential
    raise AttributeError(name)
