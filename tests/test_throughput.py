"""A server's throughput (server.throughput): measured within its time bound, cached per device, dtype, quantization
and block shape, read back without measuring on the next load, measured again for another key or with --remeasure,
and a corrupt cache file ignored."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from server import throughput
from server.throughput import BlockSpeed, SpanSpeed, ThroughputCache
from swarm.models import family_for
from swarm.models.span import BlockSpan, SpanPart
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_span():
    config = tiny_llama_config()
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    cpu = torch.device("cpu")
    return BlockSpan.from_state_dict(family_for(config), config, 0, 6, state, torch.float32,
                                     [SpanPart(0, 4, cpu), SpanPart(4, 6, cpu)])


class Counting:
    """A measurement that counts its calls and gives a set figure."""

    def __init__(self, speed=BlockSpeed(2.0, 40.0)):
        self.calls, self.speed = [], speed

    def __call__(self, span, part, dtype, bound_s):
        self.calls.append((part.start, part.end, dtype))
        return self.speed


def test_the_conftest_keeps_the_cache_out_of_the_home_folder():
    assert throughput.cache_dir() == throughput.Path(os.environ["SWARM_CACHE_DIR"])
    assert not str(throughput.cache_dir()).startswith(os.path.expanduser("~/.cache"))


def test_a_real_measurement_gives_per_block_figures_within_its_bound(tiny_span):
    began = throughput.time.perf_counter()
    speed = throughput.measure_part(tiny_span, tiny_span.parts[0], torch.float32, bound_s=1.0)
    assert throughput.time.perf_counter() - began < 3.0
    assert 0 < speed.decode_ms < 1000 and 0 < speed.forward_ms < 1000


def test_the_second_load_reads_the_cache_and_another_key_measures(tiny_span, tmp_path):
    cache, measure = ThroughputCache(tmp_path / "throughput.json"), Counting()
    first = throughput.span_speed(tiny_span, torch.float32, "none", cache=cache, measure=measure)
    # The span's two parts are on one kind of device (the CPU): measured once, per block, then both parts use it.
    assert measure.calls == [(0, 4, torch.float32)]
    assert first == SpanSpeed(ms_per_block=2.0, forward_tps=throughput.FORWARD_TOKENS * 1000 / (6 * 40.0))
    again = throughput.span_speed(tiny_span, torch.float32, "none", cache=ThroughputCache(cache.path), measure=measure)
    assert again == first and len(measure.calls) == 1  # a new start (a new cache object) reads the file
    throughput.span_speed(tiny_span, torch.float32, "nf4", cache=cache, measure=measure)  # another quantization
    throughput.span_speed(tiny_span, torch.bfloat16, "none", cache=cache, measure=measure)  # another dtype
    assert len(measure.calls) == 3
    throughput.span_speed(tiny_span, torch.float32, "none", cache=cache, measure=measure, remeasure=True)
    assert len(measure.calls) == 4
    entries = json.loads(cache.path.read_text())["entries"]
    assert len(entries) == 3 and {json.loads(k)["quant"] for k in entries} == {"none", "nf4"}
    key = json.loads(next(iter(entries)))
    assert key["torch"] == torch.__version__ and key["device"] == "cpu" and key["hidden_size"] == 64
    assert {key["heads"], key["kv_heads"], key["head_dim"], key["intermediate_size"]} == {4, 2, 16, 128}


def test_another_block_shape_measures_again(tmp_path):
    versions = throughput.library_versions()
    keys = {throughput.cache_key("cpu", torch.float32, "none", tiny_llama_config(**change), versions)
            for change in ({}, {"hidden_size": 128}, {"intermediate_size": 256}, {"num_key_value_heads": 4})}
    assert len(keys) == 4
    other = throughput.cache_key("cpu", torch.float32, "none", tiny_llama_config(), {**versions, "torch": "0"})
    assert other not in keys  # a new torch measures again


def test_the_figures_of_a_span_on_two_kinds_of_device_add_up():
    speed = throughput.span_figures([(3, BlockSpeed(1.0, 10.0)), (1, BlockSpeed(5.0, 50.0))])
    assert speed.ms_per_block == pytest.approx((3 * 1.0 + 5.0) / 4)
    assert speed.forward_tps == pytest.approx(throughput.FORWARD_TOKENS * 1000 / (3 * 10.0 + 50.0))


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}), json.dumps([1, 2])])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tiny_span, tmp_path, caplog, content):
    path = tmp_path / "throughput.json"
    path.write_text(content)
    measure = Counting()
    with caplog.at_level(logging.WARNING, logger="server.throughput"):
        speed = throughput.span_speed(tiny_span, torch.float32, "none", cache=ThroughputCache(path), measure=measure)
    assert len(measure.calls) == 1 and speed.ms_per_block == 2.0
    assert "ignoring the throughput cache" in caplog.text
    assert ThroughputCache(path).get(next(iter(json.loads(path.read_text())["entries"]))) == measure.speed
    assert [p.name for p in tmp_path.iterdir()] == ["throughput.json"]  # written whole, no temporary file left


class SlowSpan:
    """A span whose every call takes `seconds` of a fake clock."""

    def __init__(self, seconds: float):
        self.now, self.seconds, self.calls = 0.0, seconds, 0
        self.config = SimpleNamespace(hidden_size=8)

    def clock(self) -> float:
        return self.now

    def new_cache(self, *sizes):
        return None

    def __call__(self, hidden, positions, cache=None, start=None, end=None):
        self.calls += 1
        self.now += self.seconds


@pytest.mark.parametrize("seconds, bound, calls", [(0.001, 3.0, 1 + throughput.DECODE_STEPS + throughput.FORWARDS),
                                                   (1.0, 4.0, 4), (1.0, 0.5, 3), (30.0, 3.0, 3)])
def test_a_slow_device_stops_measuring_at_the_bound_and_still_gives_a_figure(seconds, bound, calls):
    span = SlowSpan(seconds)
    part = SpanPart(0, 10, torch.device("cpu"))
    speed = throughput.measure_part(span, part, torch.float32, bound_s=bound, clock=span.clock)
    assert span.calls == calls  # a prompt, then decode steps until half the bound, forwards until the bound
    assert span.now <= max(bound, 0) + 3 * seconds  # past the bound, at most one call of each kind
    per_block = seconds * 1000 / throughput.MEASURED_BLOCKS  # 10 blocks in the part, the first 4 measured
    assert speed == BlockSpeed(pytest.approx(per_block), pytest.approx(per_block))
