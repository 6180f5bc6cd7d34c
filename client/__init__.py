"""The client side of the swarm: routing, remote blocks with autograd, inference sessions, model classes."""

import importlib

from client.config import ClientConfig

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "RemoteSequential"]


# Imported on first use, so `swarm --help` and the pure policies load without torch and hivemind.
_LAZY = {"DistributedModelForCausalLM": "client.model", "RemoteSequential": "client.remote_sequential"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    return getattr(importlib.import_module(_LAZY[name]), name)
