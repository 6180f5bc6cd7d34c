"""Model families beyond Llama (swarm/models/): for each, a tiny random checkpoint with the family's own features on
(q/k/v biases, q/k norms, fused projections, soft-capping, sliding windows shorter than the sequences, a mixture of
experts), served by two servers (blocks 0:2 and 2:4), computes what transformers (and peft, for LoRA) compute on the
same checkpoint: logits with left padding, greedy generation with the servers' KV caches, LoRA gradients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.conftest import JoinedSwarm, assert_backward_equals_peft, exact, own_prefix, sharpened

SPANS = [(0, 2), (2, 4)]
VOCAB, WINDOW = 256, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Case:
    config: object  # a tiny config with the family's features on
    lm_class: type
    lora_targets: tuple[str, ...]


CASES = {
    # Blocks 2 and 3 attend within a window of 4 tokens (max_window_layers=2), blocks 0 and 1 to all: two masks.
    "qwen2": Case(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
                  Qwen2ForCausalLM, (*ATTENTION, "down_proj")),
    "qwen3": Case(Qwen3Config(**COMMON, head_dim=16), Qwen3ForCausalLM, (*ATTENTION, "gate_proj", "up_proj")),
    "phi3": Case(Phi3Config(**COMMON), Phi3ForCausalLM, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # Soft caps low enough to bite on these logits (test_the_features_are_on_in_these_checkpoints); sliding-window and full-attention blocks alternate.
    "gemma2": Case(Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                attn_logit_softcapping=0.5, final_logit_softcapping=4.0),
                   Gemma2ForCausalLM, (*ATTENTION, "down_proj")),
    "mixtral": Case(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2), MixtralForCausalLM, tuple(ATTENTION)),
}


def prefix(name: str) -> str:
    return f"families-{name}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for index, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(100 + index)
        path = tmp_path_factory.mktemp("families") / name
        sharpened(case.lm_class(case.config)).save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def family_swarm(tiny_swarm, checkpoints):
    """Two servers per family, all started at once in the shared swarm's DHT, each family under its own prefix."""
    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    common = ["--torch-dtype", "float32", "--cache-tokens", "512", "--max-lora-mb", "1"]
    try:
        started = [process for name, path in checkpoints.items()
                   for process in swarm.start_servers(path, SPANS, [*common, *own_prefix(prefix(name))], wait=False)]
        for process in started:
            process.wait_ready()
        yield tiny_swarm.initial_peers
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def references(checkpoints):
    """For each family, transformers' own model of the checkpoint."""
    return {name: CASES[name].lm_class.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def models(family_swarm, checkpoints, references):
    """For each family: (the distributed model, transformers' own model of the same checkpoint)."""
    from client.model import DistributedModelForCausalLM

    pairs = {name: (exact(DistributedModelForCausalLM.from_pretrained(path, family_swarm, dht_prefix=prefix(name))),
                    references[name]) for name, path in checkpoints.items()}
    yield pairs
    for model, _ in pairs.values():
        model.remote_layers.connection.shutdown()


def left_padded(seed: int, length: int, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of `length` token ids; the second's first `pad` are padding (mask 0)."""
    input_ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(input_ids)
    input_ids[1, :pad], mask[1, :pad] = 0, 0
    return input_ids, mask


@pytest.mark.parametrize("name", CASES)
def test_left_padded_logits_equal_transformers(models, name):
    model, reference = models[name]
    assert isinstance(model, CASES[name].lm_class)
    input_ids, mask = left_padded(1, 10)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=mask).logits
        theirs = reference(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert theirs.std() > 0.5  # peaked logits: token identity below means something


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_equals_transformers_and_the_parallel_forward(models, name):
    """Step by step through the servers' caches, past the sliding window: the tokens of transformers' generate, and
    each the argmax of the parallel forward of the whole sequence at the position before it."""
    model, reference = models[name]
    input_ids, mask = left_padded(2, 6, pad=2)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(input_ids, attention_mask=mask, **settings)
        ours = model.generate(input_ids, attention_mask=mask, **settings)
        assert torch.equal(ours, expected), (ours, expected)
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
        logits = model(ours, attention_mask=full_mask).logits
    logits[..., 2] = -torch.inf  # min_new_tokens kept generate from ending the sequences (eos: id 2)
    assert torch.equal(logits[:, 5:-1].argmax(-1), ours[:, 6:])


@pytest.mark.parametrize("name", CASES)
def test_lora_gradients_equal_peft(models, checkpoints, name):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model, reference = models[name]
    settings = dict(r=4, lora_alpha=8, target_modules=list(CASES[name].lora_targets), lora_dropout=0.0)
    layers = model.remote_layers
    saved = layers.config
    try:
        lora = model.add_lora_adapter(LoraConfig(**settings))
        with torch.no_grad():
            for param in lora.params:
                param.normal_(0, 0.3)
        local = get_peft_model(CASES[name].lm_class.from_pretrained(checkpoints[name], dtype=torch.float32),
                               LoraConfig(**settings))
        result = set_peft_model_state_dict(local, lora.peft_state_dict())
        assert not [k for k in result.unexpected_keys if "lora" in k]
        input_ids, mask = left_padded(3, 9, pad=2)
        ours = model(input_ids, attention_mask=mask, labels=input_ids).loss
        theirs = local(input_ids, attention_mask=mask, labels=input_ids).loss
        assert_backward_equals_peft(ours, theirs, lora, local, count=4 * 2 * len(CASES[name].lora_targets), rel=1e-5)
    finally:
        layers.lora, layers.config = None, saved


def no_window(reference):
    return [(reference.config, "sliding_window", 1000)]


def no_attention_cap(reference):
    return [(layer.self_attn, "attn_logit_softcapping", None) for layer in reference.model.layers]


def no_final_cap(reference):
    return [(reference.config, "final_logit_softcapping", None)]


@pytest.mark.parametrize(("name", "without"), [("qwen2", no_window), ("gemma2", no_window),
                                               ("gemma2", no_attention_cap), ("gemma2", no_final_cap)])
def test_the_features_are_on_in_these_checkpoints(references, name, without):
    """The tests above would pass for a swarm that ignored a feature if the tiny checkpoints did not use it: turning
    it off in transformers' model moves its logits."""
    reference = references[name]
    input_ids, mask = left_padded(1, 10)
    changes = without(reference)
    saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in changes]
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask).logits
        try:
            for owner, attribute, value in changes:
                setattr(owner, attribute, value)
            changed = reference(input_ids, attention_mask=mask).logits
        finally:
            for owner, attribute, value in saved:
                setattr(owner, attribute, value)
    assert (changed - expected).abs().max() > 100 * 1e-4  # far beyond the 1e-4 the swarm's logits are held to


def deep_prompted(reference, prompts, virtual: int):
    """peft's prompt tuning over transformers' model with our shallow prompt, and pre-hooks that add the deep prompts
    at each block's input (as tests/test_prompts.py does for Llama); the hooks' handles."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    local = get_peft_model(reference, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual))
    with torch.no_grad():
        local.prompt_encoder["default"].embedding.weight.copy_(prompts.shallow)

    def hook(module, args, kwargs, index):
        hidden = args[0]
        return (torch.cat([hidden[:, :virtual] + prompts.deep[index].detach(), hidden[:, virtual:]], dim=1),
                *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(reference.model.layers)]
    return local, handles


@pytest.mark.parametrize("name", CASES)
def test_deep_prompts_and_compressed_activations_work_for_each_family(models, checkpoints, name):
    """Deep prompt tuning equals peft's prompt tuning plus the same deep prompts locally; with the default lossy
    codecs (int8 activations, int5 gradients) the loss and the prompts' gradients stay close to the exact ones."""
    model, _ = models[name]
    reference = CASES[name].lm_class.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    prompts, handles = model.add_prompt_tuning(2, deep=True), []
    try:
        with torch.no_grad():
            prompts.shallow.normal_(0, 0.5)
            prompts.deep.normal_(0, 0.5)
        local, handles = deep_prompted(reference, prompts, 2)
        input_ids, mask = left_padded(4, 8, pad=2)
        with torch.no_grad():
            expected = local(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        exact_run = model(input_ids, attention_mask=mask, labels=input_ids)
        torch.testing.assert_close(exact_run.logits, expected.logits, atol=1e-4, rtol=1e-4)
        exact_run.loss.backward()
        exact_grad, prompts.deep.grad = prompts.deep.grad.clone(), None
        model.set_codecs(activations="int8_outlier", gradients="int5_outlier")
        lossy = model(input_ids, attention_mask=mask, labels=input_ids).loss
        lossy.backward()
        assert lossy.item() != exact_run.loss.item()  # the codecs were used
        assert abs(lossy.item() - expected.loss.item()) < 0.02 * expected.loss.item()
        cosine = torch.nn.functional.cosine_similarity(prompts.deep.grad.flatten(), exact_grad.flatten(), dim=0)
        assert cosine > 0.98, cosine
    finally:
        model.set_codecs(activations="none", gradients="none")
        model.remote_layers.prompts = None
        for handle in handles:
            handle.remove()
