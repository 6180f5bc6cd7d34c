"""Quantized blocks (`swarm server --quant int8|nf4`): a mixed swarm of float32, int8 and nf4 servers computes what the
same model quantized by transformers' own bitsandbytes loading computes, LoRA through nf4 servers (QLoRA across a
swarm) has peft's gradients on that model, records and `swarm status` say how each server's blocks are stored, and a
quantized load holds about one float32 block beyond its result."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from swarm import quantize
from swarm.dht_records import ServerRecord, ServerState
from tests.conftest import LORA, JoinedSwarm, assert_backward_equals_peft, exact, own_prefix, tiny_llama_config

QUANT = "tiny-llama-quant"  # the module's own DHT prefix: no other test's client routes through these servers
# Blocks 0:2 float32, 2:4 int8, 4:6 nf4 (the mixed route), and 0:4 nf4 (with 4:6, the all-nf4 route).
SERVERS = {"float": ((0, 2), "none"), "int8": ((2, 4), "int8"), "nf4": ((4, 6), "nf4"), "nf4-head": ((0, 4), "nf4")}
BNB = {"int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quantize.INT8_OUTLIER_THRESHOLD),
       "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_use_double_quant=quantize.NF4_DOUBLE_QUANT)}


# ---------------------------------------------------------------------------------------------- the layers


def tiny_block(**overrides):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    return LlamaDecoderLayer(tiny_llama_config(**overrides), 0).eval()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_only_linear_layers_are_quantized_and_their_bytes_are_as_estimated(mode):
    block = tiny_block(hidden_size=96, intermediate_size=200)  # 96 * 200 weights: not a multiple of 64 * 256
    shapes, others = quantize.block_shapes(block)
    float_bytes = quantize.weight_bytes(block)
    quantize.quantize_block(block, mode, torch.float32)
    kinds = {name: type(m).__name__ for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = "Linear8bitLt" if mode == "int8" else "Linear4bit"
    assert len(kinds) == 7 and set(kinds.values()) == {expected}, kinds
    assert block.input_layernorm.weight.dtype == torch.float32  # norms keep their weights
    assert quantize.mode_of(block) == mode
    measured = quantize.weight_bytes(block)
    assert measured == quantize.estimated_block_bytes(shapes, others, mode, torch.float32)
    assert measured < float_bytes * (0.27 if mode == "int8" else 0.16)


def test_unknown_modes_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose one of none, int8, nf4"):
        quantize.quantizer("int4", torch.float32)
    assert quantize.quantize_block(block := tiny_block(), "none", torch.float32) is block
    assert quantize.mode_of(block) == "none"


def test_records_announce_the_quantization_and_old_records_still_parse():
    record = ServerRecord(ServerState.ONLINE, 0, 2, quant="nf4")
    assert ServerRecord.from_dict(record.to_dict()).quant == "nf4"
    old = record.to_dict()
    del old["quant"]  # a server from before quantization
    assert ServerRecord.from_dict(old).quant == "none"
    assert ServerRecord.from_dict({**record.to_dict(), "quant": 4}).quant == "none"  # a bad field, not a lost record


def test_spot_checks_allow_for_quantized_replicas():
    from client.spot_checks import QUANT_ERROR, tolerance

    exact_pair = tolerance("none")
    assert tolerance("none", quants=("none", "int8")) == exact_pair + QUANT_ERROR["int8"]
    assert tolerance("none", quants=("nf4", "nf4")) == exact_pair + 2 * QUANT_ERROR["nf4"]
    assert 0 < QUANT_ERROR["int8"] < QUANT_ERROR["nf4"]  # 4 bits round more than 8


# ---------------------------------------------------------------------------------------------- a mixed swarm


@pytest.fixture(scope="module")
def quant_swarm(tiny_swarm, tiny_model_path):
    """The SERVERS beside the shared swarm, in its DHT; their peer ids by name."""
    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    common = ["--torch-dtype", "float32", "--cache-tokens", "2048", *own_prefix(QUANT)]
    try:
        started = {name: swarm.start_servers(tiny_model_path, [span], [*common, "--quant", mode], wait=False)[0]
                   for name, (span, mode) in SERVERS.items()}
        ids = {name: process.wait_ready()[0].rsplit("/p2p/", 1)[1] for name, process in started.items()}
        yield ids
    finally:
        swarm.stop()


def swarm_model(tiny_swarm, tiny_model_path, ids, names):
    from client.model import DistributedModelForCausalLM

    return exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers, dht_prefix=QUANT,
                                                             allowed_servers=[ids[n] for n in names]))


@pytest.fixture(scope="module")
def references(tiny_model_path):
    """The tiny model as transformers loads it: float32, and quantized by its own bitsandbytes integration (which
    quantizes the decoder blocks' linear layers, not the head); "mixed" takes the blocks each server of the mixed
    route computes."""
    def load(quant=None):
        extra = dict(quantization_config=BNB[quant], device_map="cpu") if quant else {}
        return LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, **extra).eval()

    models = {"float": load(), "int8": load("int8"), "nf4": load("nf4")}
    # On a CPU with AVX-512 BF16, bitsandbytes repacks a Linear4bit's weights at its first forward without gradients and
    # from then on computes it with another kernel (other rounding, no autograd). Servers keep the differentiable layout
    # (swarm.quantize.quantized_linear); the reference computes the same way, so both run the same arithmetic.
    for module in models["nf4"].modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    mixed = copy.deepcopy(models["float"])
    for index, source in ((2, "int8"), (3, "int8"), (4, "nf4"), (5, "nf4")):  # as SERVERS' mixed route
        mixed.model.layers[index] = models[source].model.layers[index]
    models["mixed"] = mixed
    return models


@pytest.fixture(scope="module")
def mixed_model(tiny_swarm, tiny_model_path, quant_swarm):
    model = swarm_model(tiny_swarm, tiny_model_path, quant_swarm, ["float", "int8", "nf4"])
    yield model
    model.remote_layers.connection.shutdown()


# The swarm and the reference run the same quantized layers; a float32 sum in another order (threads, batch shapes)
# moves an activation by ~1e-7 relative, and where that lands on an int8 rounding boundary the value moves by one step of
# its row (absmax / 127). Measured locally: splitting the batch moves these logits (scale ~5) by 2e-6, perturbing the
# input by 1e-6 relative by 7e-6, while the quantization itself moves them by 0.3 from float32's (asserted > 0.05 below).
LOGITS_TOL = dict(atol=2e-3, rtol=1e-3)


def test_mixed_swarm_forward_and_backward_match_the_quantized_reference(mixed_model, references, quant_swarm):
    records = {str(s.peer_id): s.record for s in mixed_model.remote_layers.connection.servers()}
    assert {name: records[peer].quant for name, peer in quant_swarm.items()} == {n: m for n, (_, m) in SERVERS.items()}
    reference = references["mixed"]
    input_ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(3))
    embeds = reference.get_input_embeddings()(input_ids).detach()
    ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    ours = mixed_model(inputs_embeds=ours_in, labels=input_ids)
    theirs = reference(inputs_embeds=theirs_in, labels=input_ids)
    torch.testing.assert_close(ours.logits, theirs.logits, **LOGITS_TOL)
    with torch.no_grad():
        plain = references["float"](inputs_embeds=embeds).logits
    assert (plain - theirs.logits).abs().max() > 0.05  # the servers really quantize: float32 logits are far off
    ours.loss.backward()
    theirs.loss.backward()
    scale = theirs_in.grad.abs().max()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=2e-3 * scale, rtol=1e-3)


def test_mixed_swarm_generates_as_the_quantized_reference(mixed_model, references):
    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = references["mixed"].generate(prompt, **settings)
    assert torch.equal(mixed_model.generate(prompt, **settings), expected)


def test_lora_gradients_through_nf4_servers_equal_peft_on_the_nf4_model(tiny_swarm, tiny_model_path, quant_swarm,
                                                                       references):
    """QLoRA across a swarm: the client's LoRA through blocks 0:4 and 4:6 of two nf4 servers, against peft's LoRA
    layers over transformers' nf4 model with the same adapter."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = swarm_model(tiny_swarm, tiny_model_path, quant_swarm, ["nf4-head", "nf4"])
    try:
        lora = model.add_lora_adapter(LoraConfig(**LORA))
        with torch.no_grad():
            for param in lora.params:
                param.normal_(0, 0.3)
        reference = get_peft_model(copy.deepcopy(references["nf4"]), LoraConfig(**LORA))
        assert type(reference.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
        set_peft_model_state_dict(reference, lora.peft_state_dict())
        input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(input_ids)
        mask[1, :2] = 0
        ours = model(input_ids, attention_mask=mask, labels=input_ids).loss
        theirs = reference(input_ids, attention_mask=mask, labels=input_ids).loss
        assert_backward_equals_peft(ours, theirs, lora, reference, count=6 * 5 * 2, rel=1e-4)
    finally:
        model.remote_layers.connection.shutdown()


def test_status_shows_each_servers_quantization(mixed_model, quant_swarm):
    from rich.console import Console

    from client.cli_status import render

    connection = mixed_model.remote_layers.connection
    console = Console(width=120, record=True)
    console.print(render({QUANT: (6, connection.servers())}))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 5}
    for name, (_, mode) in SERVERS.items():
        row = rows[quant_swarm[name][-12:]]
        assert ("float32, " + mode if mode != "none" else "float32 ") in row, row


def test_records_and_status_give_each_servers_kv_cache_in_bytes(mixed_model, quant_swarm, tiny_model_path):
    """--cache-tokens 2048 is 2048 tokens in each block of the span: the record announces those bytes (by the model's
    KV geometry), and `swarm status` shows them free / total in MiB."""
    from rich.console import Console
    from transformers import AutoConfig

    from client.cli_status import render
    from swarm.kv_cache import kv_bytes_per_token

    token_bytes = kv_bytes_per_token(AutoConfig.from_pretrained(tiny_model_path), torch.float32)
    connection = mixed_model.remote_layers.connection
    servers = {str(s.peer_id): s.record for s in connection.servers()}
    console = Console(width=200, record=True)
    console.print(render({QUANT: (6, connection.servers())}))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 5}
    for name, ((start, end), _) in SERVERS.items():
        record = servers[quant_swarm[name]]
        assert record.cache_bytes == 2048 * (end - start) * token_bytes, name
        assert 0 < record.cache_bytes_left <= record.cache_bytes
        assert record.cache_tokens_left == record.cache_bytes_left // ((end - start) * token_bytes)
        total = f"/ {record.cache_bytes / 2**20:.1f} ({record.cache_tokens_left} tok)"
        assert total in rows[quant_swarm[name][-12:]], rows[quant_swarm[name][-12:]]


# ---------------------------------------------------------------------------------------------- memory while loading


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from swarm.checkpoint import Checkpoint
    from swarm.models import family_for
    from swarm.models.span import BlockSpan
    from swarm.quantize import quantizer, require_bitsandbytes, weight_bytes

    def memory():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}

    checkpoint = Checkpoint(sys.argv[1])
    family = family_for(checkpoint.config)
    # Imports, and the first quantization (bitsandbytes' library, the code pages of the ops it runs), before the peak
    # is reset: what is measured is the memory of the load alone.
    require_bitsandbytes("nf4")
    BlockSpan.from_checkpoint(family, checkpoint.config, 0, 1, checkpoint, torch.float32, prepare=quantizer("nf4", torch.float32))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size (VmHWM) starts again from the present one
    before = memory()["VmRSS"]
    span = BlockSpan.from_checkpoint(family, checkpoint.config, 0, checkpoint.config.num_hidden_layers, checkpoint,
                                     torch.float32, prepare=quantizer("nf4", torch.float32))
    after = memory()
    print(json.dumps(dict(before=before, peak=after["VmHWM"], after=after["VmRSS"], weights=weight_bytes(span))))
""")


def test_a_quantized_load_holds_about_one_float32_block_beyond_its_result(tmp_path):
    """8 blocks of 9.4 MB in float32, stored in bfloat16, loaded as nf4 in a fresh process: its resident memory peaks
    within 2 float32 blocks of what it holds after loading (the block being quantized, and the stored bfloat16 tensors
    it was read from, mapped while read), where reading the span before quantizing it would need 8."""
    hidden, inner, blocks = 384, 1536, 8
    config = tiny_llama_config(hidden_size=hidden, intermediate_size=inner, num_attention_heads=6, num_key_value_heads=6,
                               num_hidden_layers=blocks, vocab_size=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "wide")
    block_bytes = 4 * (4 * hidden * hidden + 3 * hidden * inner)
    # Freed tensors go back to the system at once (no heap arena keeps them), so resident memory follows live tensors.
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "wide")], capture_output=True, text=True,
                            env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    in_mb = {k: round(v / 2**20, 1) for k, v in memory.items()}
    assert memory["weights"] < blocks * block_bytes * 0.14, in_mb  # nf4: ~0.13x the float32 bytes
    # What the load left resident is its result (and a few MB of allocator and library state)...
    assert memory["after"] - memory["before"] < memory["weights"] + block_bytes / 2, in_mb
    # ...and on the way it held at most 2 float32 blocks more.
    assert memory["peak"] - memory["after"] < 2 * block_bytes, in_mb
