"""Which transformers generate() modes and forward options a distributed model serves exactly, and why the others are
refused: the servers hold the KV cache (its rows can be reordered, for beam search, but not cropped or split) and
return only the last block's output."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

_HUB_MODES = {
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search (penalty_alpha with top_k > 1)",
    GenerationMode.GROUP_BEAM_SEARCH: "group beam search (num_beam_groups > 1)",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constrained beam search (constraints, force_words_ids)",
}


def generation_config_of(default: GenerationConfig, kwargs: Mapping[str, object]) -> GenerationConfig:
    """The generation config a generate(**kwargs) call runs with: kwargs' generation_config (or `default`) with the
    call's overrides."""
    config = copy.deepcopy(kwargs.get("generation_config") or default)
    for key, value in kwargs.items():
        if key != "generation_config" and hasattr(config, key):
            setattr(config, key, value)
    return config


def unsupported_generation(config: GenerationConfig, assistant: bool = False) -> str | None:
    """Why generate() with `config` (and an assistant model, if `assistant`) cannot be served exactly; None if it can
    (greedy search, sampling and beam search, with sampling, num_return_sequences, length penalty, ...)."""
    if assistant or config.prompt_lookup_num_tokens is not None or config.assistant_early_exit is not None \
            or getattr(config, "use_mtp", False):
        return ("assisted generation (assistant_model, prompt_lookup_num_tokens, assistant_early_exit, use_mtp) crops "
                "the KV cache back after rejected draft tokens, and the servers' caches cannot be cropped")
    if config.dola_layers is not None:
        return "DoLa decoding (dola_layers) needs every layer's hidden states at each step; the servers return the last block's"
    mode = config.get_generation_mode()
    if mode in _HUB_MODES:
        return (f"{_HUB_MODES[mode]} is no longer part of transformers but code from the Hugging Face Hub, which may use "
                "cache operations the servers do not offer (crop, split); it is not supported")
    return unsupported_forward_options({"output_attentions": config.output_attentions,
                                        "output_hidden_states": config.output_hidden_states})


def unsupported_forward_options(options: Mapping[str, object]) -> str | None:
    """Why a forward with these options (e.g. {"output_hidden_states": True}) cannot be served; None if it can."""
    if options.get("output_attentions"):
        return "output_attentions=True: the servers run attention without keeping its weights, so none can be returned"
    if options.get("output_hidden_states"):
        return ("output_hidden_states=True: the servers return only the last block's output, not each block's; run the "
                "model locally to inspect intermediate layers")
    if options.get("output_router_logits"):
        return ("output_router_logits=True: the servers return only hidden states, not their experts' router logits (so "
                "no auxiliary load-balancing loss); set model.config.output_router_logits = False")
    return None
