"""The Llama family (Llama 2/3, SmolLM2) and its Mistral-style sibling with sliding-window attention."""

from __future__ import annotations

from transformers import LlamaForCausalLM, MistralForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding

from swarm.models import ModelFamily, register


def _llama_mask(config):
    return create_causal_mask


def _mistral_mask(config):
    return create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask


LLAMA = register(
    ModelFamily(
        name="llama",
        model_types=("llama",),
        causal_lm_class=LlamaForCausalLM,
        decoder_layer_class=LlamaDecoderLayer,
        rotary_class=LlamaRotaryEmbedding,
        mask_function=_llama_mask,
    )
)

MISTRAL = register(
    ModelFamily(
        name="mistral",
        model_types=("mistral",),
        causal_lm_class=MistralForCausalLM,
        decoder_layer_class=MistralDecoderLayer,
        rotary_class=MistralRotaryEmbedding,
        mask_function=_mistral_mask,
    )
)
