"""The Llama family: Llama 2/3, SmolLM2."""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from swarm.models import ModelFamily, register

LLAMA = register(ModelFamily(name="llama", model_types=("llama",), causal_lm_class=LlamaForCausalLM,
                             decoder_layer_class=LlamaDecoderLayer, rotary_class=LlamaRotaryEmbedding))
