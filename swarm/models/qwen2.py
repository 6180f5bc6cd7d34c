"""The Qwen2 family: Qwen2, Qwen2.5. Llama's shape with biased q/k/v projections; with `use_sliding_window`, the
blocks from `max_window_layers` on attend within a window (config.layer_types says which)."""

from __future__ import annotations

from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from swarm.models import ModelFamily, register

QWEN2 = register(ModelFamily(name="qwen2", model_types=("qwen2",), causal_lm_class=Qwen2ForCausalLM,
                             decoder_layer_class=Qwen2DecoderLayer, rotary_class=Qwen2RotaryEmbedding))
