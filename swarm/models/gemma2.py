"""The Gemma 2 family. Its scaled embeddings are the client's embedding module and its final logit soft-capping the
client's causal LM head; blocks alternate sliding-window and full attention (config.layer_types, one mask each) and
soft-cap attention logits, which sdpa cannot: they run eager attention, as transformers runs Gemma 2."""

from __future__ import annotations

from transformers import Gemma2ForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding

from swarm.models import ModelFamily, register

GEMMA2 = register(ModelFamily(name="gemma2", model_types=("gemma2",), causal_lm_class=Gemma2ForCausalLM,
                              decoder_layer_class=Gemma2DecoderLayer, rotary_class=Gemma2RotaryEmbedding,
                              attn_implementation="eager"))
