"""Prompt tuning: trainable virtual tokens the client owns. Shallow prompts (as peft's PromptTuning) are P embeddings
put before every sequence; the servers just see longer inputs. Deep prompts (as Petals' deep prompt tuning) add a
trainable vector to the input of every block at those P positions; each request carries its span's slice and the
backward returns its gradient."""

from __future__ import annotations

import torch
from torch import nn


class RemotePrompts(nn.Module):
    def __init__(self, num_virtual_tokens: int, hidden_size: int, num_blocks: int, deep: bool = False,
                 init_from: torch.Tensor | None = None):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError("num_virtual_tokens must be at least 1")
        self.num_virtual_tokens = num_virtual_tokens
        if init_from is not None:  # rows of the word embeddings: prompts start at the scale the model expects
            rows = torch.randint(init_from.shape[0], (num_virtual_tokens,))
            shallow = init_from[rows].detach().clone().float()
        else:
            shallow = torch.randn(num_virtual_tokens, hidden_size) * 0.02
        self.shallow = nn.Parameter(shallow)  # [P, hidden]
        # Deep prompts start at zero, so training starts from the shallow-only model.
        self.deep = nn.Parameter(torch.zeros(num_blocks, num_virtual_tokens, hidden_size)) if deep else None

    def deep_for_blocks(self, start: int, end: int) -> torch.Tensor | None:
        """The deep prompts of blocks [start, end) as sent on the wire: [blocks, 1, P, hidden]."""
        return None if self.deep is None else self.deep[start:end].detach().unsqueeze(1).contiguous()

    def prepend(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        batch = inputs_embeds.shape[0]
        return torch.cat([self.shallow.to(inputs_embeds.dtype).expand(batch, -1, -1), inputs_embeds], dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_virtual_tokens} virtual tokens, {'deep' if self.deep is not None else 'shallow'}"
