"""Prompt tuning through the swarm (shallow like peft's PromptTuning, deep like Petals') equals the same model run
locally: peft's prompt tuning on plain transformers, plus hooks that add the deep prompts at each block's input."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import LlamaForCausalLM

P = 3


@pytest.fixture(params=[False, True], ids=["shallow", "deep"])
def prompt_model(request, dist_model):
    prompts = dist_model.add_prompt_tuning(P, deep=request.param)
    with torch.no_grad():  # non-trivial values everywhere, so every gradient matters
        prompts.shallow.normal_(0, 0.5)
        if prompts.deep is not None:
            prompts.deep.normal_(0, 0.5)
    yield dist_model, prompts
    dist_model.remote_layers.prompts = None


def local_reference(tiny_model_path, prompts):
    """peft prompt tuning with our shallow prompt; deep prompts added by pre-hooks on every decoder layer."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    shallow = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        shallow.copy_(prompts.shallow)
    deep = None
    if prompts.deep is not None:
        deep = torch.nn.Parameter(prompts.deep.detach().clone())
        for index, layer in enumerate(base.model.layers):
            def hook(module, args, kwargs, index=index):
                hidden = args[0]
                if hidden.shape[1] >= P:  # only where the virtual tokens are in the input (no cache used here)
                    hidden = torch.cat([hidden[:, :P] + deep[index], hidden[:, P:]], dim=1)
                return (hidden, *args[1:]), kwargs

            layer.register_forward_pre_hook(hook, with_kwargs=True)
    return model, shallow, deep


def test_loss_logits_and_prompt_gradients_match_local(prompt_model, tiny_model_path):
    model, prompts = prompt_model
    reference, ref_shallow, ref_deep = local_reference(tiny_model_path, prompts)
    input_ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(21))
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    ours = model(input_ids, attention_mask=mask, labels=input_ids)
    theirs = reference(input_ids=input_ids, attention_mask=mask, labels=input_ids)
    assert ours.logits.shape == theirs.logits.shape == (2, P + 7, 320)  # virtual positions included, as in peft
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    assert ref_shallow.grad.abs().max() > 0
    torch.testing.assert_close(prompts.shallow.grad, ref_shallow.grad, atol=1e-6, rtol=1e-5)
    if ref_deep is not None:
        assert (ref_deep.grad.abs().amax(dim=(1, 2)) > 0).all()  # every block's deep prompt gets a gradient
        torch.testing.assert_close(prompts.deep.grad, ref_deep.grad, atol=1e-6, rtol=1e-5)


def test_prompt_training_follows_the_local_run(prompt_model, tiny_model_path):
    model, prompts = prompt_model
    reference, ref_shallow, ref_deep = local_reference(tiny_model_path, prompts)
    ours_opt = torch.optim.Adam(list(prompts.parameters()), lr=1e-2)
    theirs_opt = torch.optim.Adam([p for p in (ref_shallow, ref_deep) if p is not None], lr=1e-2)
    input_ids = torch.randint(3, 320, (4, 9), generator=torch.Generator().manual_seed(22))
    losses = []
    for _ in range(6):
        for opt in (ours_opt, theirs_opt):
            opt.zero_grad()
        ours = model(input_ids, labels=input_ids).loss
        theirs = reference(input_ids=input_ids, labels=input_ids).loss
        ours.backward()
        theirs.backward()
        ours_opt.step()
        theirs_opt.step()
        losses.append((ours.item(), theirs.item()))
    for step, (a, b) in enumerate(losses):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: swarm {a:.6f} vs local {b:.6f}"
    assert losses[-1][1] < losses[0][1]  # it trained


def test_generation_with_prompts_matches_local_greedy(prompt_model, tiny_model_path):
    model, prompts = prompt_model
    reference, _, _ = local_reference(tiny_model_path, prompts)
    prompt = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(23))
    ours = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    tokens = prompt
    with torch.no_grad():  # greedy decoding by full forward passes: no cache in the reference at all
        for _ in range(8):
            logits = reference(input_ids=tokens).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, tokens)
