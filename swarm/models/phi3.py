"""The Phi-3 family: Phi-3 and Phi-3.5 (mini, medium). Fused projections, so LoRA targets qkv_proj, o_proj,
gate_up_proj and down_proj; long-context checkpoints' scaled rotary embedding (longrope) is in its rotary class."""

from __future__ import annotations

from transformers import Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

from swarm.models import ModelFamily, register

PHI3 = register(ModelFamily(name="phi3", model_types=("phi3",), causal_lm_class=Phi3ForCausalLM,
                            decoder_layer_class=Phi3DecoderLayer, rotary_class=Phi3RotaryEmbedding))
