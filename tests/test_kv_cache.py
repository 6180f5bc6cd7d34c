"""The preallocated KV cache (decode steps equal a full forward) and KV-cache budgets in bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from swarm.models.preallocated import PreallocatedCache
from swarm.models.span import BlockSpan, SpanPart
from tests.test_models import load_span

CPU = torch.device("cpu")


def _decode(span: BlockSpan, cache, hidden: torch.Tensor, mask: torch.Tensor, prefill: int, start=None, end=None):
    """A prefill of `prefill` tokens, then one token per step, through `cache`: the outputs of every token."""
    batch, length, _ = hidden.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    chunks = [(0, prefill), *((i, i + 1) for i in range(prefill, length))]
    with torch.no_grad():
        return torch.cat([span(hidden[:, a:b], positions[:, a:b], mask[:, :b], cache=cache, start=start, end=end)
                          for a, b in chunks], 1)


def _full(span: BlockSpan, hidden, mask, start=None, end=None):
    with torch.no_grad():
        return span(hidden, (mask.cumsum(-1) - 1).clamp(min=0), mask, start=start, end=end)


def _padded_batch(length: int = 9, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, :3] = 0  # row 1 left-padded
    return torch.randn(2, length, 64, generator=generator), mask


@pytest.mark.parametrize("contiguous", [True, False], ids=["copies", "views"])
def test_decode_steps_with_the_preallocated_cache_equal_a_full_forward(tiny_model_path, contiguous):
    span = load_span(tiny_model_path, 0, 6)
    hidden, mask = _padded_batch()
    cache = span.new_cache(2, 12)
    assert not any(layer.contiguous for layer in cache.layers)  # views, the default (see swarm.models.preallocated)
    for layer in cache.layers:
        layer.contiguous = contiguous
    assert isinstance(cache, PreallocatedCache) and cache.nbytes == 6 * 2 * 2 * 2 * 12 * 16 * 4  # 6 blocks, k+v
    ours = _decode(span, cache, hidden, mask, prefill=4)
    assert cache.get_seq_length() == 9 and cache.layers[0].keys.shape == (2, 2, 9, 16)  # attention sees 9, not 12
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], _full(span, hidden, mask)[keep], atol=1e-5, rtol=0)
    # A session over some of the span's blocks: only those hold buffers.
    cache = span.new_cache(2, 9, start=2, end=5)
    assert [layer.max_length for layer in cache.layers] == [0, 0, 9, 9, 9, 0]
    ours = _decode(span, cache, hidden, mask, prefill=1, start=2, end=5)
    torch.testing.assert_close(ours[keep], _full(span, hidden, mask, start=2, end=5)[keep], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="the cache holds 9 of 9 tokens; 1 more do not fit"):
        _decode(span, cache, hidden[:, :1], mask[:, :1], prefill=1, start=2, end=5)


def test_beam_reorder_moves_the_rows_in_place(tiny_model_path):
    span = load_span(tiny_model_path, 0, 6)
    hidden, mask = _padded_batch(length=6, seed=2)
    mask[:] = 1
    cache = span.new_cache(2, 8)
    buffers = [b.data_ptr() for layer in cache.layers for b in layer.buffers]
    _decode(span, cache, hidden[:, :4], mask[:, :4], prefill=4)
    cache.reorder_cache(torch.tensor([1, 1]))  # both beams continue row 1
    assert [b.data_ptr() for layer in cache.layers for b in layer.buffers] == buffers
    with torch.no_grad():
        ours = span(hidden[:, 4:], torch.arange(4, 6).expand(2, 2), mask, cache=cache)
    history = torch.cat([hidden[[1, 1], :4], hidden[:, 4:]], 1)  # row 1's history, then each row's new tokens
    torch.testing.assert_close(ours, _full(span, history, mask)[:, 4:], atol=1e-5, rtol=0)


def test_a_span_split_between_devices_keeps_each_blocks_cache_on_its_device(tiny_model_path):
    whole = load_span(tiny_model_path, 0, 6)
    split = BlockSpan.of_blocks(whole.family, whole.config, 0, 6, list(whole.layers), [SpanPart(0, 4, CPU), SpanPart(4, 6, CPU)])
    hidden, mask = _padded_batch()
    cache = split.new_cache(2, 9)
    assert all(b.device == CPU and b.dtype == torch.float32 for layer in cache.layers for b in layer.buffers)
    keep = mask.bool()
    torch.testing.assert_close(_decode(split, cache, hidden, mask, prefill=3)[keep], _full(whole, hidden, mask)[keep],
                               atol=1e-5, rtol=0)


def test_a_sliding_window_family_decodes_with_the_preallocated_cache(tmp_path):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=4)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    span = load_span(str(tmp_path / "mistral"), 0, 2)
    hidden, mask = _padded_batch(length=10, seed=3)
    keep = mask.bool()
    ours = _decode(span, span.new_cache(2, 10), hidden, mask, prefill=2)
    torch.testing.assert_close(ours[keep], _full(span, hidden, mask)[keep], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- budgets in bytes


def test_a_sessions_bytes_follow_the_models_kv_geometry_and_cache_bytes_win():
    from swarm.cli import build_parser
    from swarm.config import ServerConfig
    from swarm.kv_cache import cache_budget_bytes, kv_bytes_per_token, session_bytes
    from swarm.options import from_args
    from tests.conftest import tiny_llama_config

    config = tiny_llama_config()  # 2 KV heads of 16 dims
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 16 * 4
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 2 * 16 * 2
    assert session_bytes(2, 100, 3, 256) == 2 * 100 * 3 * 256
    assert cache_budget_bytes(None, 4096, config, torch.float32, 2) == 4096 * 2 * 256  # tokens in each block
    assert cache_budget_bytes(3 * 2**20, 4096, config, torch.float32, 2) == 3 * 2**20
    args = build_parser().parse_args(["server", "m", "--blocks", "0:3", "--new-swarm", "--cache-bytes", "1.5GiB",
                                      "--cache-wait", "0.25"])
    options = from_args(ServerConfig, args, adapters={})
    assert (options.cache_bytes, options.cache_wait) == (3 * 2**29, 0.25)
    assert from_args(ServerConfig, build_parser().parse_args(["server", "m", "--blocks", "0:3", "--new-swarm"]), adapters={}).cache_wait == 1.0
    # What a session's cache allocates is what it is charged.
    span = BlockSpan.of_blocks(*_tiny_span_parts())
    assert span.new_cache(2, 100, start=1, end=4).nbytes == session_bytes(2, 100, 3, kv_bytes_per_token(config, torch.float32))


def _tiny_span_parts():
    from swarm.models import family_for
    from tests.conftest import tiny_llama_config

    config = tiny_llama_config()
    family = family_for(config)
    with torch.device("meta"):
        layers = [family.decoder_layer_class(config, i) for i in range(6)]
    return family, config, 0, 6, [layer.to_empty(device=CPU).float() for layer in layers]


MIB = 2**20


def _budget():
    from server.cache_budget import SessionBudget

    return SessionBudget(100 * MIB, max_sessions=8, token_bytes=MIB // 4, blocks=4)  # a token over 4 blocks: 1 MiB


def test_a_session_that_does_not_fit_waits_without_blocking_then_gets_a_clear_error():
    import asyncio
    import time

    from swarm.errors import CacheFull, LimitReached

    budget = _budget()
    budget.acquire("a", "a1", 60 * MIB, print)
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main():
        beat = asyncio.create_task(ticker())
        began = time.monotonic()
        with pytest.raises(CacheFull, match=r"KV cache is full: 40.0 MiB free \(40 tokens\) of 100.0 MiB \(100 tokens "
                                            r"over its 4 blocks\), 50.0 MiB requested .* smaller max_length or batch"):
            await budget.acquire_waiting("a", "a2", 50 * MIB, print, wait=0.3)  # the sole holder: simply full
        waited = time.monotonic() - began
        # Over the fair share (a holds 60 of 100 and 2 peers hold some): refused at once, no wait.
        budget.acquire("b", "b0", 30 * MIB, print)
        began = time.monotonic()
        with pytest.raises(LimitReached, match="over its fair share"):
            await budget.acquire_waiting("a", "a3", 20 * MIB, print, wait=5.0)
        refused = time.monotonic() - began
        beat.cancel()
        return waited, refused

    waited, refused = asyncio.run(main())
    assert 0.3 <= waited < 1.0 and refused < 0.1
    assert len(ticks) >= 15  # the event loop ran other work while the session waited


def test_a_waiting_session_gets_in_when_another_closes():
    import asyncio
    import time

    budget = _budget()
    budget.acquire("a", "a1", 80 * MIB, print)

    async def main():
        began = time.monotonic()
        waiting = asyncio.create_task(budget.acquire_waiting("a", "a2", 50 * MIB, print, wait=10.0))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        budget.release("a1")  # the other session closes
        await waiting
        return time.monotonic() - began

    assert asyncio.run(main()) < 1.0
    assert budget.free == 50 * MIB and budget.tokens_left == 50
