"""Adapters that servers host from disk (`--adapters NAME=PATH`), and saved adapters loaded by a client."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from client.routing import NoRouteError
from tests.conftest import exact


@pytest.fixture(scope="module")
def saved_adapter(tiny_model_path, tmp_path_factory):
    torch.manual_seed(21)
    local = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in local.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("adapters") / "demo-adapter"
    local.save_pretrained(path)
    return str(path), local.eval()


def test_hosted_adapter_serves_generation_and_unknown_adapter_is_clear(tiny_model_path, saved_adapter):
    from client.model import DistributedModelForCausalLM
    from swarm.launch import LocalSwarm

    path, local = saved_adapter
    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(22))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = local.generate(input_ids=prompt, **kwargs)
        expected_logits = local(prompt).logits
        with local.disable_adapter():
            plain = local.generate(input_ids=prompt, **kwargs)
    assert not torch.equal(expected, plain)

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_servers(tiny_model_path, [(0, 3), (3, 6)], ["--torch-dtype", "float32", "--adapters", f"demo={path}"])
        model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, swarm.initial_peers))
        try:
            servers = model.remote_layers.connection.servers(refresh=True)
            assert all(s.record.adapters == ("demo",) for s in servers)
            model.use_hosted_adapter("demo")
            assert torch.equal(model.generate(prompt, **kwargs), expected)
            with torch.no_grad():
                torch.testing.assert_close(model(prompt).logits, expected_logits, atol=1e-4, rtol=0)
            model.use_hosted_adapter(None)
            assert torch.equal(model.generate(prompt, **kwargs), plain)
            _the_gateway_serves_the_hosted_adapter_as_a_model(model, tiny_model_path, local)
            model.use_hosted_adapter("nope")
            with pytest.raises(NoRouteError, match="no online server with adapter 'nope' hosts block 0"):
                model.generate(prompt, **kwargs)
        finally:
            model.model.layers.connection.shutdown()


def _the_gateway_serves_the_hosted_adapter_as_a_model(model, tiny_model_path, local):
    """`swarm api --adapter support=demo`: /v1/models lists "support", which generates with the servers' adapter
    what local peft generates with it; the model's own name still generates without it."""
    import contextlib

    import openai
    from transformers import AutoTokenizer

    from client.api import create_app
    from client.api_schema import ApiConfig
    from client.monitor import serving

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    with serving(create_app(model, tokenizer, ApiConfig(adapter=("support=demo",))), "127.0.0.1", 0) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        names = [m.id for m in client.models.list()]
        assert len(names) == 2 and "support" in names, names
        base = next(name for name in names if name != "support")
        ids = tokenizer("The quick brown fox").input_ids
        texts = {}
        for name, adapter_off in (("support", contextlib.nullcontext), (base, local.disable_adapter)):
            with torch.no_grad(), adapter_off():
                output = local.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            reply = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=12, temperature=0)
            assert reply.choices[0].text == expected, name
            texts[name] = expected
        assert texts["support"] != texts[base]  # the adapter changes what is generated


def test_client_loads_a_saved_adapter(dist_model, saved_adapter):
    path, local = saved_adapter
    lora = dist_model.load_lora_adapter(path)
    try:
        assert len(lora.names) == 6 * 3 * 2
        prompt = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(23))
        with torch.no_grad():
            torch.testing.assert_close(dist_model(prompt).logits, local(prompt).logits, atol=1e-4, rtol=0)
    finally:
        dist_model.remote_layers.lora = None
