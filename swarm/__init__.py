"""Shared vocabulary of the swarm: configuration, wire protocol, DHT records and model families."""

__version__ = "0.1.0"
