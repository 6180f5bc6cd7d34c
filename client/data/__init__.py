"""Data shipped with the client: `instructions.jsonl`, a small instruction-tuning set that
`make_instructions.py` generates deterministically (the default dataset of `swarm finetune`)."""

from __future__ import annotations

from pathlib import Path

INSTRUCTIONS = Path(__file__).with_name("instructions.jsonl")
