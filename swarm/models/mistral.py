"""The Mistral family: Llama's shape with optional sliding-window attention."""

from __future__ import annotations

from transformers import MistralForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding

from swarm.models import ModelFamily, register


def _mistral_mask(config):
    return create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask


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
