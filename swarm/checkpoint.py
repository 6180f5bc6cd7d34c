"""Read only the tensors a peer needs from a Hugging Face checkpoint (a local folder or a hub repo)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from swarm.devices import DeviceFacts, choose_dtype, probe
from swarm.dtypes import FLOAT_DTYPES

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's config declares (float32 when it names none)."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return FLOAT_DTYPES.get(str(declared).replace("torch.", ""), torch.float32)


def resolve_dtype(name: str, config: PretrainedConfig, device: DeviceFacts | None = None) -> torch.dtype:
    """The dtype `name` ('auto' or a dtype's name) means for this checkpoint on `device` (default: this machine's
    CPU): see swarm.devices.choose_dtype."""
    return choose_dtype(name, device or probe(torch.device("cpu")), checkpoint_dtype(config))


def default_dht_prefix(model: str) -> str:
    """The name a model is announced under: the last part of its path or repo id, made DHT-safe."""
    name = Path(model.rstrip("/")).name or model
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"


class Checkpoint:
    """A safetensors checkpoint, single-file or sharded, opened without reading its tensors yet."""

    def __init__(self, model: str, revision: str | None = None):
        self.model, self.revision = model, revision
        self.local_dir = Path(model).expanduser() if Path(model).expanduser().is_dir() else None
        self.config = AutoConfig.from_pretrained(self._fetch("config.json").parent)
        self.weight_map = self._read_weight_map()

    def _fetch(self, filename: str) -> Path:
        if self.local_dir is not None:
            path = self.local_dir / filename
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.model, filename, revision=self.revision))
        except Exception as exc:
            raise FileNotFoundError(f"{self.model!r} is not a local folder and could not be fetched from the Hugging Face "
                                    f"hub ({type(exc).__name__}). Pass the path of a folder that holds config.json and "
                                    "*.safetensors.") from None

    def local_file(self, filename: str) -> Path | None:
        """The file on this machine (in the folder, or already in the hub cache); None rather than a download."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.exists() else None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.model, filename, revision=self.revision)
        return Path(cached) if isinstance(cached, str) else None

    def _read_weight_map(self) -> dict[str, str]:
        with contextlib.suppress(FileNotFoundError):  # no index: a single file
            return dict(json.loads(self._fetch(INDEX_FILE).read_text())["weight_map"])
        path = self._fetch(SINGLE_FILE)
        with safe_open(str(path), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)

    def load(self, wanted: Callable[[str], bool], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Load the tensors whose names satisfy `wanted`, reading only the shards that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key, filename in self.weight_map.items():
            if wanted(key):
                by_file[filename].append(key)
        tensors = {}
        for filename, keys in sorted(by_file.items()):
            with safe_open(str(self._fetch(filename)), framework="pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        logger.debug("loaded %d tensors from %d file(s) of %s", len(tensors), len(by_file), self.model)
        return tensors
