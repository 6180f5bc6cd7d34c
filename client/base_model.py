"""The base model of a distributed causal LM (embeddings, remote blocks, final norm) and the stand-in for its KV
cache during generate(): the real caches live on the servers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from client.generation_modes import unsupported_forward_options
from client.inference_session import InferenceSession
from client.remote_sequential import RemoteSequential
from swarm.models import CACHE_KWARG, ModelFamily


class RemoteSessionCache(DynamicCache):
    """Stands in for the KV cache during `generate()`, the real one living on the servers: it tells transformers how
    many tokens the session has seen (so new calls send only new tokens) and carries beam reorders to the servers."""

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session
        self.reordered = False  # by beam search: the cached rows are its running beams, not the sequences it returns

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.virtual_tokens  # the caller's tokens, not the prompt's

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search keeps rows `beam_idx`: the servers reorder their caches with the next step."""
        self.session.reorder(beam_idx)
        self.reordered = True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("the servers' KV cache cannot be cropped; this generation mode is not supported remotely")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("the servers' KV cache cannot drop rows; this generation mode is not supported remotely")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("the servers' KV cache cannot grow rows; this generation mode is not supported remotely")

    @property
    def is_linear(self) -> list[bool]:
        # It holds no layers here; transformers >= 5.24 only trims already-seen tokens when some layer is attention.
        return [False]


class DistributedBaseModel(nn.Module):
    def __init__(self, config: PretrainedConfig, family: ModelFamily, embed_tokens: nn.Module, norm: nn.Module,
                 layers: RemoteSequential):
        super().__init__()
        self.config, self.family = config, family
        self.embed_tokens, self.norm, self.layers = embed_tokens, norm, layers

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # the name depends on the transformers release
        options = {key: kwargs.get(key, getattr(self.config, key, False)) for key in ("output_attentions", "output_hidden_states",
                                                                              "output_router_logits")}
        if reason := unsupported_forward_options(options):
            raise ValueError(f"a distributed model cannot serve {reason}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.family.embed(self, input_ids)
        batch, length, _ = inputs_embeds.shape
        session = past_key_values.session if isinstance(past_key_values, RemoteSessionCache) else None
        past = session.position if session is not None else 0
        # Prompt tuning: P virtual tokens go before each sequence (once per session); outputs keep their positions,
        # as peft's prompt tuning does, and the caller's position ids count from after them.
        prompts, virtual = self.layers.prompts, 0
        if prompts is not None and past == 0:
            virtual = prompts.num_virtual_tokens
            inputs_embeds = prompts.prepend(inputs_embeds)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)
        offset = virtual or (session.virtual_tokens if session is not None else 0)
        if position_ids is None:
            position_ids = torch.arange(past, past + virtual + length, device=inputs_embeds.device).expand(batch, -1)
        else:
            position_ids = position_ids.expand(batch, length) + offset
            if virtual:
                position_ids = torch.cat([torch.arange(virtual, device=position_ids.device).expand(batch, virtual),
                                          position_ids], dim=1)
        if session is not None:
            new_mask = attention_mask[:, -(virtual + length):] if attention_mask is not None else None
            hidden = session.step(inputs_embeds, position_ids, None if new_mask is None or bool(new_mask.all()) else new_mask)
            session.virtual_tokens = session.virtual_tokens or virtual
        else:
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("a local KV cache cannot be used with remote blocks; use model.inference_session()")
            hidden = self.layers(inputs_embeds, position_ids, attention_mask)
        hidden = self.family.final_norm(self, hidden)
        return self.family.base_output_class(last_hidden_state=hidden, **{CACHE_KWARG: past_key_values})
