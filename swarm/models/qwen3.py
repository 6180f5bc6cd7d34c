"""The Qwen3 family (dense): Qwen2's layout with RMS norms of queries and keys per head, and no q/k/v biases."""

from __future__ import annotations

from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

from swarm.models import ModelFamily, register

QWEN3 = register(ModelFamily(name="qwen3", model_types=("qwen3",), causal_lm_class=Qwen3ForCausalLM,
                             decoder_layer_class=Qwen3DecoderLayer, rotary_class=Qwen3RotaryEmbedding))
