"""The Mistral family: Llama's shape with optional sliding-window attention (see swarm.models.causal_mask_for)."""

from __future__ import annotations

from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding

from swarm.models import ModelFamily, register

MISTRAL = register(ModelFamily(name="mistral", model_types=("mistral",), causal_lm_class=MistralForCausalLM,
                               decoder_layer_class=MistralDecoderLayer, rotary_class=MistralRotaryEmbedding))
