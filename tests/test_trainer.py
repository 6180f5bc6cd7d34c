"""Hugging Face `Trainer` fine-tunes the client's LoRA adapter through the swarm exactly as it does local peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
STEPS, BATCH = 8, 4
ADAPTER = "model.layers.lora."  # the names of the RemoteLora parameters in the distributed model


def token_dataset(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Random token ids of varying length, left-padded: the padding has no loss, and only the attention mask keeps
    the other tokens from attending to it (so a run that lost the mask would not match)."""
    generator = torch.Generator().manual_seed(21)
    rows = []
    for index in range(n):
        padding = index % 4
        input_ids = torch.randint(3, 320, (length,), generator=generator)
        input_ids[:padding] = 0
        attention_mask = (torch.arange(length) >= padding).long()
        rows.append(dict(input_ids=input_ids, attention_mask=attention_mask,
                         labels=input_ids.masked_fill(attention_mask == 0, -100)))
    return rows


def train_losses(model, output_dir, optim: str) -> list[float]:
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], seed=7,
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, optim=optim)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("optim", [
    "adamw_torch",  # foreach AdamW
    "adamw_torch_fused",  # Trainer's default on CPU: its kernel updates the parameters without bumping their _version
])
def test_trainer_on_the_swarm_matches_trainer_on_local_peft(dist_model, tiny_model_path, tmp_path, optim):
    torch.manual_seed(0)
    lora = dist_model.add_lora_adapter(LoraConfig(**LORA))
    with torch.no_grad():  # a random B too, so the adapter matters from the first step
        for param in lora.params:
            param.normal_(0, 0.1)
    reference = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), LoraConfig(**LORA))
    set_peft_model_state_dict(reference, lora.peft_state_dict())
    initial = {name: param.detach().clone() for name, param in dist_model.named_parameters()}
    # Trainer trains whatever requires grad: adding the adapter froze the client's embeddings and LM head, as
    # get_peft_model does for the local model, so only the adapter trains on both sides.
    assert [name for name, p in dist_model.named_parameters() if p.requires_grad and not name.startswith(ADAPTER)] == []
    use_cache = dist_model.config.use_cache
    try:
        ours = train_losses(dist_model, tmp_path / "swarm", optim)
        changed = {name: not torch.equal(param.detach(), initial[name]) for name, param in dist_model.named_parameters()}
    finally:
        dist_model.remote_layers.lora = None
        dist_model.config.use_cache = use_cache  # Trainer sets it to TrainingArguments.use_cache
        dist_model.eval()  # and leaves the model in training mode; other tests share it
    theirs = train_losses(reference, tmp_path / "local", optim)

    assert len(ours) == len(theirs) == STEPS
    # The first epoch agrees to float precision. Later steps may drift apart by ~1e-3: AdamW at lr 1e-2 turns
    # last-bit differences in summation order (a loaded machine) into visible ones. test_lora.py pins the
    # gradients of every step from identical parameters.
    per_epoch = len(token_dataset()) // BATCH
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        bound = 1e-5 if step < per_epoch else 1e-2
        assert abs(a - b) <= bound * abs(b), f"step {step}: swarm {a:.6f} vs local {b:.6f} (swarm {ours}, local {theirs})"
    # the second epoch sees the same examples again, after some training
    assert sum(ours[per_epoch:2 * per_epoch]) < 0.95 * sum(ours[:per_epoch]), ours
    assert all(changed[name] for name in changed if name.startswith(ADAPTER))
    assert not [name for name in changed if changed[name] and not name.startswith(ADAPTER)]
