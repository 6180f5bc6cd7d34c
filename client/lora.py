"""Client-owned LoRA adapters for remote blocks: ordinary torch parameters, saved in the peft format."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from swarm.lora import digest, linear_modules, lora_name, peft_key, read_peft_adapter
from swarm.models import ModelFamily

if TYPE_CHECKING:  # peft takes seconds to import (it loads bitsandbytes): only adapters that are created or saved need it
    from peft import LoraConfig


def target_linear_shapes(family: ModelFamily, config: PretrainedConfig, lora_config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of the linear layers of one block that the config targets."""
    with torch.device("meta"):
        layer = family.decoder_layer_class(config, 0)
    targets = lora_config.target_modules
    targets = {targets} if isinstance(targets, str) else set(targets or ())
    shapes = {path: (m.in_features, m.out_features) for path, m in linear_modules(layer).items()
              if path.rsplit(".", 1)[-1] in targets}
    if not shapes:
        raise ValueError(f"target_modules {sorted(targets)} match no linear layer of a block; "
                         f"choose from {sorted({p.rsplit('.', 1)[-1] for p in linear_modules(layer)})}")
    return shapes


class RemoteLora(nn.Module):
    """LoRA tensors for every block of a model; the servers apply them per request and keep nothing."""

    def __init__(self, family: ModelFamily, config: PretrainedConfig, lora_config: LoraConfig, num_blocks: int):
        super().__init__()
        if not 0 <= lora_config.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_config.lora_dropout}")
        if getattr(lora_config, "use_dora", False):
            raise ValueError("DoRA is not supported for remote blocks")
        self.lora_config = lora_config
        self.dropout = float(lora_config.lora_dropout)  # applied by the servers in training mode, as peft does
        rank = lora_config.r
        self.scaling = lora_config.lora_alpha / (math.sqrt(rank) if lora_config.use_rslora else rank)
        self.shapes = target_linear_shapes(family, config, lora_config)
        self.names: list[str] = []
        self.params = nn.ParameterList()
        for block in range(num_blocks):
            for module, (in_features, out_features) in sorted(self.shapes.items()):
                a = torch.empty(rank, in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's default initialisation: B = 0, so the delta starts at 0
                for kind, tensor in (("A", a), ("B", torch.zeros(out_features, rank))):
                    self.names.append(lora_name(block, module, kind))
                    self.params.append(nn.Parameter(tensor))
        self._index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_pretrained(cls, directory: str | Path, family: ModelFamily, config: PretrainedConfig, num_blocks: int) -> RemoteLora:
        """Load a peft adapter saved by `save_pretrained` (or by peft on the local model)."""
        from peft import LoraConfig

        saved = read_peft_adapter(directory)
        lora = cls(family, config, LoraConfig.from_pretrained(str(directory)), num_blocks)
        missing = set(lora.names) - set(saved.tensors)
        extra = set(saved.tensors) - set(lora.names)
        if missing or extra:
            raise ValueError(f"{directory}: adapter tensors do not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]})")
        with torch.no_grad():
            for name, param in lora.named_lora().items():
                param.copy_(saved.tensors[name])
        return lora

    def named_lora(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

    def for_blocks(self, start: int, end: int) -> tuple[list[str], list[nn.Parameter]]:
        names = [n for n in self.names if start <= int(n.split(".", 1)[0]) < end]
        return names, [self.params[self._index[n]] for n in names]

    def digest(self, start: int, end: int) -> str:
        """swarm.lora.digest of the current values of blocks [start, end).

        Computed from the contents every time: optimizers such as fused AdamW update parameters without bumping
        their version counters, so nothing cheaper tells reliably whether they changed.
        """
        return digest(*self.for_blocks(start, end))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        result = {}
        for name, param in self.named_lora().items():
            block, rest = name.split(".", 1)
            module, kind = rest.rsplit(".", 1)
            result[peft_key(int(block), module, kind)] = param.detach().contiguous()
        return result

    def save_pretrained(self, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
        """Write adapter_config.json and adapter_model.safetensors, loadable with peft on the local model."""
        from peft import LoraConfig

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(**{**self.lora_config.to_dict(), "base_model_name_or_path": base_model_name_or_path,
                               "task_type": "CAUSAL_LM", "target_modules": sorted({m.rsplit(".", 1)[-1] for m in self.shapes})})
        config.save_pretrained(str(directory))
        save_file(self.peft_state_dict(), str(directory / "adapter_model.safetensors"))
