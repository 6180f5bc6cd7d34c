"""The Mixtral family: Mistral's attention with a sparse mixture of experts (top-k routing) for the MLP. Checkpoints
store one tensor per expert (block_sparse_moe.experts.E.w1/w2/w3); transformers' layer holds them stacked, gate and up
fused (mlp.experts.gate_up_proj, mlp.experts.down_proj), so each block's tensors are merged as its loader merges them.
The experts and the router hold 3-D and bare parameters, not linear layers: LoRA targets the attention projections."""

from __future__ import annotations

import torch
from transformers import MixtralForCausalLM, PretrainedConfig
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from swarm.models import ModelFamily, register

OLD, NEW = "block_sparse_moe.", "mlp."


def fused_experts(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """One block's tensors as the checkpoint names them -> MixtralDecoderLayer's state dict (already fused: as is)."""
    state = {(NEW + k[len(OLD):] if k.startswith(OLD) else k): v for k, v in tensors.items()}
    experts = range(config.num_local_experts)
    weights = {w: [state.pop(f"{NEW}experts.{e}.{w}.weight", None) for e in experts] for w in ("w1", "w2", "w3")}
    present = [w for w, ts in weights.items() if any(t is not None for t in ts)]
    if not present:
        return state
    missing = [f"{OLD}experts.{e}.{w}.weight" for w, ts in weights.items() for e, t in zip(experts, ts, strict=True)
               if t is None]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} expert tensors of a block, e.g. {missing[0]}")
    state[f"{NEW}experts.gate_up_proj"] = torch.cat([torch.stack(weights["w1"]), torch.stack(weights["w3"])], dim=1)
    state[f"{NEW}experts.down_proj"] = torch.stack(weights["w2"])
    return state


MIXTRAL = register(ModelFamily(name="mixtral", model_types=("mixtral",), causal_lm_class=MixtralForCausalLM,
                               decoder_layer_class=MixtralDecoderLayer, rotary_class=MixtralRotaryEmbedding,
                               block_state=fused_experts, base_output_class=MoeModelOutputWithPast))
