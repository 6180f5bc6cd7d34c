"""LoRA dropout through the swarm: the servers draw masks from a seed the client sends, so a backward pass
(recomputed on the server) uses the same masks as its forward; with peft's dropout given those masks, loss and
gradients equal the local peft model's. In eval mode there is no dropout."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import nn
from transformers import LlamaForCausalLM

from swarm.lora import dropout_mask

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.3)


class SeededDropout(nn.Module):
    def __init__(self, block: int, module: str, p: float):
        super().__init__()
        self.block, self.module, self.p, self.seed = block, module, p, 0

    def forward(self, x):
        return x * dropout_mask(self.seed, self.block, self.module, x.shape, self.p, x.dtype) if self.training else x


def local_peft_with_seeded_dropout(tiny_model_path, lora):
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), LoraConfig(**LORA))
    set_peft_model_state_dict(model, lora.peft_state_dict())
    droppers = []
    for name, module in model.named_modules():
        match = re.fullmatch(r".*\.layers\.(\d+)\.(.+)", name)
        if match and hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            dropper = SeededDropout(int(match.group(1)), match.group(2), LORA["lora_dropout"])
            module.lora_dropout["default"] = dropper
            droppers.append(dropper)
    assert len(droppers) == 6 * 3
    return model, droppers


def test_dropout_masks_match_between_forward_and_backward(dist_model, tiny_model_path):
    lora = dist_model.add_lora_adapter(LoraConfig(**LORA))
    try:
        with torch.no_grad():
            for param in lora.params:
                param.normal_(0, 0.3)
        reference, droppers = local_peft_with_seeded_dropout(tiny_model_path, lora)
        input_ids = torch.randint(3, 320, (2, 8), generator=torch.Generator().manual_seed(31))

        dist_model.train()
        reference.train()
        torch.manual_seed(5)
        seed = int(torch.randint(0, 1 << 62, ()))  # what the client draws for its one chunk
        for dropper in droppers:
            dropper.seed = seed
        torch.manual_seed(5)
        ours = dist_model(input_ids, labels=input_ids).loss
        theirs = reference(input_ids=input_ids, labels=input_ids).loss
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        reference_grads = {k.replace(".default", ""): p.grad for k, p in reference.named_parameters() if "lora_" in k}
        for key, param in zip(lora.peft_state_dict(), lora.params, strict=True):
            torch.testing.assert_close(param.grad, reference_grads[key], atol=1e-6, rtol=1e-5, msg=key)

        # Another seed gives another loss (the masks are live), and eval mode turns dropout off on both sides.
        torch.manual_seed(6)
        with torch.no_grad():
            assert abs(dist_model(input_ids, labels=input_ids).loss.item() - ours.item()) > 1e-4
        dist_model.eval()
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(dist_model(input_ids).logits, reference(input_ids=input_ids).logits,
                                       atol=1e-4, rtol=1e-4)
    finally:
        dist_model.eval()
        dist_model.remote_layers.lora = None
