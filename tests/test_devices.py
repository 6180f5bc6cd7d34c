"""Devices and dtypes: `--device` parsing and its errors, the dtype table of `auto`, a span split between devices
(tested as cpu,cpu: the parts hold their blocks and hidden states go from one to the next, with the output of one
device), a `--device cpu,cpu` server equal to the single-device swarm, and a client moved with `.to()`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import swarm.models.span as span_module
from swarm.checkpoint import Checkpoint
from swarm.devices import (
    DeviceFacts,
    auto_dtype,
    choose_dtype,
    cpu_fast_bf16,
    cuda_native_bf16,
    describe_devices,
    parse_devices,
    probe,
    split_span,
)
from swarm.models import family_for
from swarm.models.span import BlockSpan, SpanPart
from tests.conftest import exact

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the dtype table


@pytest.mark.parametrize(("kind", "fast_bf16", "checkpoint", "expected"), [
    ("cuda", True, F32, BF16), ("cuda", True, F16, BF16), ("cuda", True, BF16, BF16),  # a GPU: bfloat16 always
    ("cuda", False, F32, F16), ("cuda", False, F16, F16), ("cuda", False, BF16, F16),  # pre-Ampere: float16
    ("cpu", True, F32, F32), ("cpu", True, BF16, BF16), ("cpu", True, F16, BF16),  # fast bf16: the checkpoint's
    ("cpu", False, F32, F32), ("cpu", False, BF16, F32), ("cpu", False, F16, F32),  # AVX2 and older: float32
])
def test_auto_dtype_table(kind, fast_bf16, checkpoint, expected):
    assert auto_dtype(kind, fast_bf16, checkpoint) == expected
    assert choose_dtype("auto", DeviceFacts(kind, fast_bf16), checkpoint) == expected


def test_explicit_dtypes_and_refusals():
    cpu, gpu = DeviceFacts("cpu", False), DeviceFacts("cuda", True, "GPU")
    assert choose_dtype("bfloat16", cpu, F32) == BF16  # asked for: slow here, but not wrong
    assert choose_dtype("float32", gpu, BF16) == F32
    assert choose_dtype("float16", gpu, BF16) == F16
    with pytest.raises(ValueError, match="float16 is not supported on a CPU; use --torch-dtype float32 or bfloat16"):
        choose_dtype("float16", cpu, F16)
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of auto, float32"):
        choose_dtype("float8", gpu, F32)


def test_fast_bf16_detection_rules_and_this_machine():
    assert cpu_fast_bf16({"avx2", "avx512f", "avx512_bf16"}) and cpu_fast_bf16({"amx_bf16", "amx_tile"})
    assert not cpu_fast_bf16({"avx2", "fma", "avx512f", "avx512bw"})  # AVX-512 without BF16 is not enough
    assert cuda_native_bf16((8, 0)) and cuda_native_bf16((9, 0)) and not cuda_native_bf16((7, 5))
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    facts = probe(CPU)
    assert facts.kind == "cpu" and facts.label == "cpu"
    if not flags & {"avx512_bf16", "amx_bf16"}:  # what /proc/cpuinfo says, read here on its own
        assert not facts.fast_bf16
    assert DeviceFacts("cuda", True, "NVIDIA H200").label == "cuda: NVIDIA H200"


# ---------------------------------------------------------------------------------------------- --device


@pytest.mark.parametrize(("text", "gpus", "expected"), [
    ("auto", 0, ["cpu"]),
    ("auto", 2, ["cuda:0"]),
    ("cpu", 4, ["cpu"]),
    ("cuda", 1, ["cuda:0"]),
    ("cuda:1", 2, ["cuda:1"]),
    ("cuda:0,cuda:1", 2, ["cuda:0", "cuda:1"]),
    (" cpu , cpu ", 0, ["cpu", "cpu"]),
])
def test_device_lists(text, gpus, expected):
    assert [str(d) for d in parse_devices(text, gpus)] == expected


@pytest.mark.parametrize(("text", "gpus", "message"), [
    ("cuda:3", 1, r"cuda:3 is not available; this process sees 1 GPU\(s\) \(cuda:0..cuda:0\)"),
    ("cuda", 0, r"cuda is not available; this process sees no GPU \(CUDA is not available\)"),
    ("cuda:0,cuda:1", 1, "cuda:1 is not available"),
    ("tpu", 0, "'tpu' is not a device; use auto, cpu, cuda, cuda:N or several"),
    ("cpu,", 0, "'' is not a device"),
    ("cpu:1", 0, "the CPU takes no index"),
    ("auto,cpu", 0, "'auto' is not a device"),
    ("cpu,cuda:0", 1, "mixes CPU and GPU"),
])
def test_device_errors_name_what_is_wrong(text, gpus, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(text, gpus)


@pytest.mark.parametrize(("start", "end", "weights", "expected"), [
    (0, 6, [1, 1], [(0, 3), (3, 6)]),
    (2, 9, [1, 1, 1], [(2, 4), (4, 7), (7, 9)]),
    (0, 8, [3, 1], [(0, 6), (6, 8)]),  # in proportion (memory, later)
    (0, 4, [100, 1, 1], [(0, 2), (2, 3), (3, 4)]),  # every device keeps a block
    (5, 7, [1, 1, 1], [(5, 6), (6, 7)]),  # more devices than blocks: the first ones
    (0, 1, [1], [(0, 1)]),
])
def test_split_span_is_contiguous_and_proportional(start, end, weights, expected):
    assert split_span(start, end, weights) == expected


def test_device_descriptions():
    assert describe_devices(["cpu"]) == "cpu"
    assert describe_devices(["cpu", "cpu"]) == "2 x cpu"
    assert describe_devices(["cuda: A", "cuda: A", "cuda: B"]) == "2 x cuda: A + cuda: B"


def test_records_and_status_show_the_device():
    from hivemind.p2p import PeerID
    from rich.console import Console

    from client.cli_status import render
    from swarm.dht_records import ServerInfo, ServerRecord, ServerState

    record = ServerRecord(state=ServerState.ONLINE, start=0, end=4, torch_dtype="bfloat16", device="cuda: NVIDIA H200")
    assert ServerRecord.from_dict(record.to_dict()) == record
    assert ServerRecord.from_dict({**record.to_dict(), "device": ["not", "text"]}).device == ""  # ignored, not fatal
    assert ServerRecord.from_dict({"state": "online", "start": 0, "end": 1}).device == ""  # an older server's
    console = Console(width=120, record=True)  # as `swarm status` prints it
    console.print(render({"m": (4, [ServerInfo(PeerID(b"x" * 34), record)])}))
    words = console.export_text().split()
    assert {"device,", "cuda:", "NVIDIA", "H200,", "bfloat16"} <= set(words)  # wrapped in its cell, never cut


def test_an_unavailable_device_or_float16_on_a_cpu_stops_the_server_at_start(tiny_model_path, capsys):
    from swarm.cli import main

    common = ["server", tiny_model_path, "--blocks", "0:6", "--new-swarm"]
    assert main([*common, "--device", f"cuda:{torch.cuda.device_count() + 3}"]) == 2
    assert "is not available; this process sees" in capsys.readouterr().err
    assert main([*common, "--device", "cpu", "--torch-dtype", "float16"]) == 2
    assert "error: float16 is not supported on a CPU" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a span on two devices


def _span(path: str, parts=()) -> BlockSpan:
    checkpoint = Checkpoint(path)
    family = family_for(checkpoint.config)
    tensors = checkpoint.load(lambda k: k.startswith("model.layers."), F32)
    return BlockSpan.from_state_dict(family, checkpoint.config, 0, 6, tensors, F32, parts)


def test_a_span_split_between_two_devices_passes_hidden_states_between_them(tiny_model_path, monkeypatch):
    whole = _span(tiny_model_path)
    split = _span(tiny_model_path, [SpanPart(0, 4, CPU), SpanPart(4, 6, CPU)])
    assert [(p.start, p.end) for p in split.parts] == [(0, 4), (4, 6)]
    assert all(p.device == CPU for layer in split.layers for p in layer.parameters())
    moves = []
    real = span_module.to_part
    monkeypatch.setattr(span_module, "to_part", lambda tensors, device: moves.append(len(tensors)) or real(tensors, device))
    generator = torch.Generator().manual_seed(3)
    hidden, positions = torch.randn(2, 7, 64, generator=generator), torch.arange(7).expand(2, 7)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = whole(hidden, positions, mask)
        moves.clear()
        assert torch.equal(split(hidden, positions, mask), expected)
        # Inputs go to the first part; then hidden states, mask, position embeddings and positions to the second.
        assert moves == [3, 4]
        moves.clear()
        assert torch.equal(split(hidden, positions, mask, start=1, end=4), whole(hidden, positions, mask, start=1, end=4))
        assert moves == [3, 3]  # never reaches the second part (one move of the inputs for each span)
        cache, steps = split.new_cache(), []
        for i in range(7):  # decode steps across the boundary equal the full forward
            steps.append(split(hidden[:, i : i + 1], positions[:, i : i + 1], mask[:, : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="do not cover blocks 0:6"):
        _span(tiny_model_path, [SpanPart(0, 3, CPU), SpanPart(4, 6, CPU)])


SPLIT = "tiny-llama-split"


@pytest.fixture(scope="module")
def split_server(tiny_swarm, tiny_model_path):
    """All 6 blocks on one server whose span is split between two devices (cpu,cpu), beside the shared swarm."""
    from tests.conftest import JoinedSwarm, own_prefix

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        swarm.start_servers(tiny_model_path, [(0, 6)], ["--torch-dtype", "float32", "--device", "cpu,cpu", *own_prefix(SPLIT)])
        yield swarm
    finally:
        swarm.stop()


def test_a_server_on_two_devices_equals_the_single_device_swarm(split_server, tiny_model_path, dist_model, reference_model):
    from client.model import DistributedModelForCausalLM
    from tests.test_training_stream import _info

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, split_server.initial_peers, dht_prefix=SPLIT))
    try:
        connection = model.remote_layers.connection
        (server,) = connection.servers()
        assert server.record.device == "2 x cpu" and server.record.torch_dtype == "float32"
        assert _info(connection, server.peer_id)["parts"] == [{"start": 0, "end": 3, "device": "cpu"},
                                                              {"start": 3, "end": 6, "device": "cpu"}]
        input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            ours, single = model(input_ids).logits, dist_model(input_ids).logits
        torch.testing.assert_close(ours, single, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours, reference_model(input_ids).logits, atol=1e-5, rtol=0)
        prompt = input_ids[:1, :5]
        expected = reference_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False), expected)
        # LoRA tensors go to the device of the block each adapts, dropout masks to the device of its input.
        lora = model.add_lora_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 lora_dropout=0.1))
        for param in lora.params:
            torch.nn.init.normal_(param, std=0.05)
        model.train()
        torch.manual_seed(5)
        model(input_ids, labels=input_ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.params)
    finally:
        connection.shutdown()


# ---------------------------------------------------------------------------------------------- the client's device


def test_a_client_moved_with_to_computes_on_its_device_and_dtype(tiny_swarm, tiny_model_path, reference_model):
    from client.model import DistributedModelForCausalLM

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers))
    try:
        assert model.to("cpu") is model and model.device == CPU
        input_ids = torch.randint(3, 320, (2, 8), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = reference_model(input_ids).logits
            torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)
            model.to(BF16)  # embeddings and head in bfloat16: the hidden states come back in it
            hidden = model.model.embed_tokens(input_ids)
            out = model.model.layers(hidden)
            assert out.dtype == BF16 and out.device == hidden.device
            logits = model(input_ids).logits
        assert logits.dtype == BF16
        torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)  # bfloat16 rounding, float32 servers
    finally:
        model.remote_layers.connection.shutdown()
