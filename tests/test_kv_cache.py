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


def test_decode_steps_with_the_preallocated_cache_equal_a_full_forward(tiny_model_path):
    span = load_span(tiny_model_path, 0, 6)
    hidden, mask = _padded_batch()
    cache = span.new_cache(2, 12)
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
