"""`swarm server --num-blocks auto`: the memory arithmetic (server.memory_plan) against sums done by hand, the bytes of
a block against real (quantized) blocks, the probes of free memory against /proc and cgroup texts, the flag's parsing,
and a real server that hosts the 3 blocks its faked device memory holds, with the numbers in its log."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from server import memory_plan
from server.cli import parse_num_blocks
from server.memory_plan import BlockCost, Budgets, Headroom, NothingFits, Pool, plan_blocks
from swarm import quantize
from swarm.config import ServerConfig
from swarm.launch import LOCALHOST, PeerProcess
from swarm.models import family_for
from tests.conftest import tiny_llama_config

GiB, MiB = 2**30, 2**20
NO_BUDGETS = Budgets(0, 0, 0, 0, 0)


def gpu(index: int, free: int) -> Pool:
    return Pool(f"cuda:{index}", (index,), free)


# ---------------------------------------------------------------------------------------------- the arithmetic


# (pools, block cost, budgets, headroom, model blocks) -> (blocks, what each device holds), each worked out by hand.
CASES = {
    # 10 GiB - headroom 1 GiB (10%) - 1 GiB activations - 256 MiB LoRA = 7936 MiB = 31 blocks of 200 + 56 MiB
    "one GPU": ([gpu(0, 10 * GiB)], BlockCost(200 * MiB, 56 * MiB), Budgets(GiB, 256 * MiB, 0, 0, 0),
                Headroom(0.1, GiB), 80, 31, (31,)),
    # 4 GiB: 10% is 0.4 GiB, so the 1 GiB minimum counts: 4 - 1 - 1.25 GiB = 1792 MiB = 7 blocks
    "headroom minimum": ([gpu(0, 4 * GiB)], BlockCost(200 * MiB, 56 * MiB), Budgets(GiB, 256 * MiB, 0, 0, 0),
                         Headroom(0.1, GiB), 80, 7, (7,)),
    # a 20% headroom of 10 GiB: 10 - 2 - 1.25 GiB = 6912 MiB = 27 blocks
    "headroom fraction": ([gpu(0, 10 * GiB)], BlockCost(200 * MiB, 56 * MiB), Budgets(GiB, 256 * MiB, 0, 0, 0),
                          Headroom(0.2, GiB), 80, 27, (27,)),
    # --cache-bytes 2 GiB is a fixed charge: 10 - 1 - 1.25 - 2 GiB = 5888 MiB = 29 blocks of 200 MiB (29.4)
    "cache bytes": ([gpu(0, 10 * GiB)], BlockCost(200 * MiB, 0, kv_total=2 * GiB), Budgets(GiB, 256 * MiB, 0, 0, 0),
                    Headroom(0.1, GiB), 80, 29, (29,)),
    # host budgets are not planned on a GPU (requests in flight, delta references are in RAM)
    "host budgets off the GPU": ([gpu(0, 10 * GiB)], BlockCost(200 * MiB, 56 * MiB),
                                 Budgets(GiB, 256 * MiB, 0, 4 * GiB, 4 * GiB), Headroom(0.1, GiB), 80, 31, (31,)),
    # on a CPU they are, and so is one block loading: 16 GiB - 1.6 GiB headroom = 14745.6 MiB, - 1 GiB of device
    #   budgets (the workspace included) - 1 GiB of host ones - 512 MiB loading = 12185.6 MiB = 23 blocks of 512 MiB
    "CPU": ([Pool("cpu", (0,), 16 * GiB)], BlockCost(384 * MiB, 128 * MiB, load=512 * MiB),
            Budgets(768 * MiB, 128 * MiB, 128 * MiB, GiB // 2, GiB // 2), Headroom(0.1, GiB), 80, 23, (23,)),
    # two GPUs, 12 and 4 GiB usable: 2 GiB of budgets charged 3/4 and 1/4, 10.5 and 3.5 GiB = 21 + 7 blocks of 512 MiB
    "two GPUs": ([gpu(0, 13 * GiB), gpu(1, 5 * GiB)], BlockCost(384 * MiB, 128 * MiB), Budgets(GiB, GiB, 0, 0, 0),
                 Headroom(0.0, GiB), 80, 28, (21, 7)),
    # cpu,cpu share the RAM: one headroom, one pool of 12 GiB - 2 GiB = 20 blocks of 512 MiB, half on each
    "cpu,cpu": ([Pool("cpu", (0, 1), 12 * GiB)], BlockCost(384 * MiB, 128 * MiB), NO_BUDGETS, Headroom(0.0, 2 * GiB), 80,
                20, (10, 10)),
    # room for 31 blocks of a 24-block model: all of it, the split still by what each device holds
    "capped at the model": ([gpu(0, 10 * GiB)], BlockCost(200 * MiB, 56 * MiB), Budgets(GiB, 256 * MiB, 0, 0, 0),
                            Headroom(0.1, GiB), 24, 24, (31,)),
    # a GPU with no room after its headroom holds nothing; the other all
    "one full GPU": ([gpu(0, GiB // 2), gpu(1, 5 * GiB)], BlockCost(384 * MiB, 128 * MiB), NO_BUDGETS,
                     Headroom(0.0, GiB), 80, 8, (0, 8)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_the_blocks_that_fit_are_as_worked_out_by_hand(case):
    pools, cost, budgets, headroom, model_blocks, blocks, per_device = CASES[case]
    plan = plan_blocks(pools, cost, budgets, headroom, model_blocks)
    assert plan.num_blocks == blocks and plan.device_weights == pytest.approx(per_device)
    assert all(p.left >= p.blocks * p.per_block for p in plan.pools)  # what it plans fits


def test_the_log_line_names_the_numbers():
    pools, cost, budgets, headroom, model_blocks, *_ = CASES["CPU"]
    text = plan_blocks(pools, BlockCost(384 * MiB, 128 * MiB, load=512 * MiB, what="float32", kv_tokens=16384),
                       budgets, headroom, model_blocks).describe()
    assert text.startswith("--num-blocks auto: 23 of the model's 80 blocks fit; a block takes 384.00 MiB of weights "
                           "(float32) + 128.00 MiB of KV cache (16384 tokens)")
    for part in ("cpu: 16.00 GiB free - headroom 1.60 GiB", "train activations 768.00 MiB", "LoRA cache 128.00 MiB",
                 "workspace 128.00 MiB", "requests in flight 512.00 MiB", "delta references 512.00 MiB",
                 "loading a block 512.00 MiB", "for blocks of 512.00 MiB: 23 block(s)"):
        assert part in text, (part, text)
    gpu_text = plan_blocks(*CASES["host budgets off the GPU"][:5]).describe()
    assert "host RAM (not planned): requests in flight 4.00 GiB, delta references 4.00 GiB" in gpu_text


def test_nothing_fits_is_a_clear_error_with_the_numbers_and_what_to_do():
    with pytest.raises(NothingFits) as info:
        plan_blocks([gpu(0, 3 * GiB)], BlockCost(2 * GiB, 56 * MiB, what="bfloat16"), Budgets(GiB, 256 * MiB, 0, 0, 0),
                    Headroom(0.1, GiB), 32)
    message = str(info.value)
    assert isinstance(info.value, ValueError)  # `swarm server` prints it as "error: ..." and exits 2
    for part in ("cuda:0: 3.00 GiB free - headroom 1.00 GiB", "2.00 GiB of weights (bfloat16)", "0 block(s)",
                 "not even one block fits", "--train-activation-mb", "--quant nf4", "--blocks A:B"):
        assert part in message, (part, message)


def test_pools_group_devices_that_share_memory_and_are_queried_once():
    asked = []

    def free(device):
        asked.append(str(device))
        return 4 * GiB

    cpus = memory_plan.pools_of([torch.device("cpu"), torch.device("cpu")], free)
    gpus = memory_plan.pools_of([torch.device("cuda", 0), torch.device("cuda", 1)], free)
    assert cpus == [Pool("cpu", (0, 1), 4 * GiB)]
    assert gpus == [Pool("cuda:0", (0,), 4 * GiB), Pool("cuda:1", (1,), 4 * GiB)]
    assert asked == ["cpu", "cuda:0", "cuda:1"]


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_a_blocks_bytes_are_those_of_a_real_block_as_served(mode):
    config = tiny_llama_config()
    torch.manual_seed(0)
    block = quantize.quantize_block(LlamaDecoderLayer(config, 0).eval(), mode, torch.float32)
    cost = memory_plan.block_cost(family_for(config), config, mode, torch.float32, cache_tokens=1000, cache_bytes=None)
    assert cost.weights == quantize.weight_bytes(block)
    assert cost.load == sum(p.numel() for p in LlamaDecoderLayer(config, 0).parameters()) * 4  # one float32 block
    # a token's keys and values: 2 KV heads of 16 dimensions each, in float32
    assert cost.kv == 1000 * 2 * 2 * 16 * 4 and cost.kv_total is None
    fixed = memory_plan.block_cost(family_for(config), config, mode, torch.float32, 1000, cache_bytes=5 * MiB)
    assert (fixed.kv, fixed.kv_total) == (0, 5 * MiB)


def test_the_server_options_become_the_plans_budgets():
    config = tiny_llama_config()
    options = ServerConfig(model="x", num_blocks="auto", train_activation_mb=3, lora_cache_mb=2, inflight_mb=1,
                           delta_state_mb=1, max_chunk_tokens=100, memory_headroom=0, memory_headroom_min=0)
    plan = memory_plan.server_plan(options, family_for(config), config, torch.float32, [torch.device("cpu")],
                                   free=lambda device: 100 * MiB)
    charges = plan.pools[0].charges
    assert charges["train activations"] == 3 * MiB and charges["LoRA cache"] == 2 * MiB
    assert charges["workspace"] == 100 * (7 * 64 + 3 * 128) * 4
    assert charges["requests in flight"] == charges["delta references"] == MiB
    assert ServerConfig.memory_headroom == 0.1 and ServerConfig.memory_headroom_min == GiB


# ---------------------------------------------------------------------------------------------- the probes

MEMINFO = "MemTotal:       32594312 kB\nMemFree:         1048576 kB\nMemAvailable:   20971520 kB\nBuffers: 4 kB\n"


def test_meminfo_and_cgroup_texts_are_read():
    assert memory_plan.meminfo_available(MEMINFO) == 20 * GiB
    with pytest.raises(ValueError, match="no MemAvailable"):
        memory_plan.meminfo_available("MemTotal: 1 kB\n")
    assert memory_plan.cgroup_room("max\n", "123456\n") is None  # no limit
    assert memory_plan.cgroup_room(f"{8 * GiB}\n", f"{3 * GiB}\n") == 5 * GiB
    stat = f"anon 100\nfile 200\ninactive_file {GiB}\nactive_file 5\n"
    assert memory_plan.cgroup_room(f"{8 * GiB}\n", f"{3 * GiB}\n", stat) == 6 * GiB  # page cache it can reclaim
    assert memory_plan.cgroup_room(f"{GiB}\n", f"{2 * GiB}\n") == 0


def test_the_hosts_free_memory_is_the_lower_of_meminfo_and_the_cgroup(tmp_path):
    proc = tmp_path / "meminfo"
    proc.write_text(MEMINFO)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory_plan.host_free_bytes(proc, cgroup) == 20 * GiB  # no memory controller: /proc alone
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{GiB}\n")
    assert memory_plan.host_free_bytes(proc, cgroup) == 20 * GiB
    (cgroup / "memory.max").write_text(f"{5 * GiB}\n")
    assert memory_plan.host_free_bytes(proc, cgroup) == 4 * GiB
    assert 0 < memory_plan.free_bytes(torch.device("cpu"))  # this machine's, through the same path


# ---------------------------------------------------------------------------------------------- the flag


def test_num_blocks_takes_a_count_or_auto():
    from swarm.cli import build_parser

    parser = build_parser(["server"])
    args = parser.parse_args(["server", "m", "--num-blocks", "auto", "--new-swarm"])
    assert args.num_blocks == "auto"
    assert parser.parse_args(["server", "m", "--num-blocks", "4", "--new-swarm"]).num_blocks == 4
    assert parse_num_blocks("AUTO") == "auto"
    for bad, why in (("0", "at least 1 block"), ("some", "takes a count")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse_num_blocks(bad)
    help_text = parser._subparsers._group_actions[0].choices["server"].format_help()
    assert "auto: as many as fit the free memory" in " ".join(help_text.split())
    assert "--memory-headroom" in help_text and "--remeasure" in help_text


# ---------------------------------------------------------------------------------------------- a real server


def test_a_server_with_auto_hosts_what_its_memory_holds(tiny_model_path):
    """Device memory faked (in the server's own process) to hold 3.5 blocks after the budgets: it serves 3 of the
    tiny model's 6, split between its two CPUs, and says why."""
    config = tiny_llama_config()
    flags = ["--train-activation-mb", "1", "--lora-cache-mb", "1", "--inflight-mb", "1", "--delta-state-mb", "1",
             "--max-chunk-tokens", "256", "--cache-tokens", "1024", "--memory-headroom", "0",
             "--memory-headroom-min", "0", "--torch-dtype", "float32"]
    cost = memory_plan.block_cost(family_for(config), config, "none", torch.float32, 1024, None)
    fixed = 4 * MiB + memory_plan.workspace_bytes(256, 64, 128, 4) + cost.load
    free = fixed + int(3.5 * (cost.weights + cost.kv))
    entry = ("-c", f"import server.memory_plan as m; m.free_bytes = lambda device: {free}; "
                   "from swarm.cli import main; raise SystemExit(main())")
    server = PeerProcess(["server", tiny_model_path, "--num-blocks", "auto", "--device", "cpu,cpu", "--new-swarm",
                          "--host-maddrs", LOCALHOST, *flags], "auto-blocks", python_args=entry)
    try:
        server.wait_ready(timeout=90)
        log = server.log()
    finally:
        server.stop()
    assert "Server ready: blocks 0:3 of" in log
    assert "--num-blocks auto: 3 of the model's 6 blocks fit" in log
    assert "for blocks of 400.50 KiB: 3 block(s)" in log  # 144.5 KiB of weights + 256 KiB of KV cache
    assert "0:2 cpu, 2:3 cpu" in log  # the span split between the devices by what each holds (half the RAM each)
    assert "throughput on cpu (float32)" in log
