"""The client side of the swarm: routing, remote blocks with autograd, inference sessions, model classes."""

from client.model import DistributedModelForCausalLM
from client.remote_sequential import RemoteSequential

__all__ = ["DistributedModelForCausalLM", "RemoteSequential"]
