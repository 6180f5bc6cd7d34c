"""Model families and checkpoint loading: spans built from checkpoint tensors equal the full model."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import swarm.checkpoint as checkpoint_module
from swarm.checkpoint import Checkpoint, default_dht_prefix, resolve_dtype
from swarm.devices import DeviceFacts, probe
from swarm.models import family_for
from swarm.models.span import BlockSpan
from tests.conftest import tiny_llama_config


def load_span(path: str, start: int, end: int, dtype=torch.float32) -> BlockSpan:
    checkpoint = Checkpoint(path)
    family = family_for(checkpoint.config)
    prefixes = tuple(family.block_keys_prefix(i) for i in range(start, end))
    tensors = checkpoint.load(lambda k: k.startswith(prefixes), dtype)
    return BlockSpan.from_state_dict(family, checkpoint.config, start, end, tensors, dtype)


def full_model_hidden(model, input_ids, attention_mask):
    """Output of the last block, before the final norm."""
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)
    handle.remove()
    return captured["h"]


def run_spans(spans, embeds, attention_mask):
    positions = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
    hidden = embeds
    with torch.no_grad():
        for span in spans:
            hidden = span(hidden, positions, attention_mask)
    return hidden


def test_sharded_checkpoint_loads_only_needed_shards(tmp_path, reference_model, monkeypatch):
    reference_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    opened = []
    real_open = checkpoint_module.safe_open
    monkeypatch.setattr(checkpoint_module, "safe_open", lambda f, **kw: opened.append(f) or real_open(f, **kw))
    span = load_span(str(tmp_path / "sharded"), 4, 6)
    assert 0 < len(set(opened)) < len(shards)
    input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    first = load_span(str(tmp_path / "sharded"), 0, 4)
    ours = run_spans([first, span], reference_model.model.embed_tokens(input_ids), mask)
    torch.testing.assert_close(ours, full_model_hidden(reference_model, input_ids, mask), atol=1e-5, rtol=0)


def test_sub_range_with_cache_matches_full_forward(tiny_model_path):
    span = load_span(tiny_model_path, 0, 6)
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8)[None]
    with torch.no_grad():
        expected = span(hidden, positions, start=2, end=5)
        cache = span.new_cache()
        steps = [span(hidden[:, i : i + 1], positions[:, i : i + 1], cache=cache, start=2, end=5) for i in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=0)


def test_mistral_family_with_sliding_window(tmp_path):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "mistral")
    model = MistralForCausalLM.from_pretrained(tmp_path / "mistral", dtype=torch.float32).eval()
    input_ids = torch.randint(0, 256, (1, 12))
    spans = [load_span(str(tmp_path / "mistral"), 0, 2), load_span(str(tmp_path / "mistral"), 2, 4)]
    assert family_for(config).name == "mistral"
    ours = run_spans(spans, model.model.embed_tokens(input_ids), None)
    torch.testing.assert_close(ours, full_model_hidden(model, input_ids, None), atol=1e-5, rtol=0)


def test_bfloat16_span_matches_bfloat16_model(tiny_model_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).eval()
    span = load_span(tiny_model_path, 0, 6, torch.bfloat16)
    assert span.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    input_ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    ours = run_spans([span], model.model.embed_tokens(input_ids), None)
    torch.testing.assert_close(ours, full_model_hidden(model, input_ids, None), atol=0, rtol=0)


def test_unsupported_family_and_missing_tensors(tiny_model_path):
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model type 'gpt2' is not supported yet"):
        family_for(GPT2Config())
    checkpoint = Checkpoint(tiny_model_path)
    family = family_for(checkpoint.config)
    with pytest.raises(ValueError, match="checkpoint lacks .* tensors of block 1"):
        BlockSpan.from_state_dict(family, checkpoint.config, 0, 2, checkpoint.load(lambda k: ".0." in k, torch.float32),
                                  torch.float32)


def test_checkpoint_helpers(tmp_path):
    config = tiny_llama_config()
    assert resolve_dtype("auto", config) == torch.float32
    config.dtype = "bfloat16"
    # auto follows the dtype table (swarm.devices.auto_dtype; every row: tests/test_devices.py): a bfloat16
    # checkpoint keeps its dtype only where bfloat16 is fast; on this machine's CPU by default.
    assert resolve_dtype("auto", config, DeviceFacts("cpu", fast_bf16=True)) == torch.bfloat16
    assert resolve_dtype("auto", config, DeviceFacts("cpu", fast_bf16=False)) == torch.float32
    assert resolve_dtype("auto", config, DeviceFacts("cuda", fast_bf16=True, name="GPU")) == torch.bfloat16
    assert resolve_dtype("auto", config) == (torch.bfloat16 if probe(torch.device("cpu")).fast_bf16 else torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", config)
    assert default_dht_prefix("/models/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct"
    assert default_dht_prefix("meta-llama/Llama 3.1") == "Llama-3-1"
    with pytest.raises(FileNotFoundError, match="Pass the path of a folder"):
        Checkpoint(str(tmp_path / "no-such-model"))
