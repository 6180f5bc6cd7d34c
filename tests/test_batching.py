"""Iteration-level batching on a server: several sessions' decode steps as one batch give each session what it gets
alone (outputs, caches, LoRA terms, a failing session), and the compute queue batches them and runs them first."""

from __future__ import annotations

import os

import pytest
import torch

from server.backend import InferenceState, SpanBackend, SpanInputs
from server.batching import Step, batch_key, run_steps
from swarm import lora
from tests.test_models import load_span


def _session(backend: SpanBackend, prompt: int, rows: int = 1, seed: int = 0, lora_pairs=(), scaling: float = 1.0):
    """A session over the whole span that has run a prompt of `prompt` tokens (rows left-padded differently)."""
    state = InferenceState(backend, backend.start, backend.end, rows, 32, lora_pairs, scaling)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, prompt, dtype=torch.int64)
    if rows > 1:
        mask[1, : prompt // 2] = 0
    state.step(SpanInputs(torch.randn(rows, prompt, backend.hidden_size, generator=generator),
                          (mask.cumsum(-1) - 1).clamp(min=0), mask))
    return state


def _decode_inputs(state: InferenceState, seed: int) -> SpanInputs:
    generator = torch.Generator().manual_seed(1000 + seed)
    positions = state.mask.sum(-1, keepdim=True)
    return SpanInputs(torch.randn(state.batch_size, 1, state.backend.hidden_size, generator=generator), positions, None)


def _lora(backend: SpanBackend, seed: int, rank: int = 4):
    generator = torch.Generator().manual_seed(seed)
    names, tensors = [], []
    for block in range(backend.start, backend.end):
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            linear = lora.linear_modules(backend.span.layers[block - backend.start])[module]
            names += [lora.lora_name(block, module, "A"), lora.lora_name(block, module, "B")]
            tensors += [torch.randn(rank, linear.in_features, generator=generator) * 0.3,
                        torch.randn(linear.out_features, rank, generator=generator) * 0.3]
    return lora.parse_lora(names, tensors, backend.layers(backend.start, backend.end), torch.float32)


def _no_solo_runs(monkeypatch):
    """Fail any step that runs alone: a batch that fell back to one-by-one runs would pass for the wrong reason."""
    def alone(self, inputs, mask):
        raise AssertionError("a step ran alone")

    monkeypatch.setattr(InferenceState, "run", alone)


def test_a_batch_of_decode_steps_equals_each_step_alone(tiny_model_path, monkeypatch):
    backend = SpanBackend(load_span(tiny_model_path, 0, 6), torch.float32)
    # Mixed context lengths, a two-row session, two different LoRA adapters and sessions without.
    specs = [dict(prompt=3), dict(prompt=9, rows=2), dict(prompt=5, lora=1), dict(prompt=1), dict(prompt=7, lora=2, scaling=0.5)]

    def sessions():
        return [_session(backend, s["prompt"], s.get("rows", 1), seed=i,
                         lora_pairs=_lora(backend, s["lora"]) if "lora" in s else (), scaling=s.get("scaling", 1.0))
                for i, s in enumerate(specs)]

    alone, batched = sessions(), sessions()
    for step in range(3):
        expected = [state.step(_decode_inputs(state, 10 * step + i)) for i, state in enumerate(alone)]
        steps = [Step(state, _decode_inputs(state, 10 * step + i)) for i, state in enumerate(batched)]
        assert len({batch_key(s) for s in steps}) == 1
        with monkeypatch.context() as patched:
            _no_solo_runs(patched)
            got = run_steps(steps)
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(alone, batched, strict=True):
        assert a.position == b.position
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-5)


def test_a_session_that_fails_in_a_batch_does_not_break_the_others(tiny_model_path):
    backend = SpanBackend(load_span(tiny_model_path, 0, 6), torch.float32)
    alone = [_session(backend, 4, seed=i) for i in range(3)]
    batched = [_session(backend, 4, seed=i) for i in range(3)]
    expected = [state.step(_decode_inputs(state, i)) for i, state in enumerate(alone)]

    class Broken:  # a cache that fails at the third block, after the batch wrote the first two
        def __init__(self, cache):
            self.cache = cache

        def update(self, keys, values, layer_idx, *args, **kwargs):
            if layer_idx == 2:
                raise RuntimeError("disk on fire")
            return self.cache.update(keys, values, layer_idx, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.cache, name)

    batched[1].cache = Broken(batched[1].cache)
    full = _session(backend, 4, seed=9)
    full.position = full.max_length  # a step that does not fit fails its checks, before the batch
    got = run_steps([Step(batched[0], _decode_inputs(batched[0], 0)), Step(batched[1], _decode_inputs(batched[1], 1)),
                     Step(full, _decode_inputs(full, 5)), Step(batched[2], _decode_inputs(batched[2], 2))])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], expected[2], atol=1e-5, rtol=1e-5)
    assert isinstance(got[1], RuntimeError) and "disk on fire" in str(got[1]) and batched[1].broken
    assert "more do not fit" in str(got[2])
    # The others go on: their caches hold exactly one step more, and the next step is right too.
    for i in (0, 2):
        assert batched[i].cache.get_seq_length() == 5
        nxt = run_steps([Step(batched[i], _decode_inputs(batched[i], 7))])[0]
        torch.testing.assert_close(nxt, alone[i].step(_decode_inputs(alone[i], 7)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma2", "mixtral"])
def test_every_family_batches_exactly(family, tmp_path, monkeypatch):
    """Biases, q/k norms, fused projections, Gemma 2's soft-capped eager attention, sliding windows shorter than the
    contexts (so sessions' masks differ by layer type), experts."""
    from tests.test_families import CASES, sharpened

    case = CASES[family]
    torch.manual_seed(5)
    sharpened(case.lm_class(case.config)).save_pretrained(tmp_path)
    backend = SpanBackend(load_span(str(tmp_path), 0, 4), torch.float32)
    alone = [_session(backend, prompt, seed=i) for i, prompt in enumerate((2, 7, 11))]
    batched = [_session(backend, prompt, seed=i) for i, prompt in enumerate((2, 7, 11))]
    for step in range(2):
        expected = [state.step(_decode_inputs(state, 10 * step + i)) for i, state in enumerate(alone)]
        with monkeypatch.context() as patched:
            _no_solo_runs(patched)
            got = run_steps([Step(state, _decode_inputs(state, 10 * step + i)) for i, state in enumerate(batched)])
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the compute queue


def _queue_run(main):
    import asyncio

    asyncio.run(main())


def test_the_queue_batches_decode_steps_and_runs_them_before_bulk_work():
    """A chunked bulk job gives way between chunks to decode steps that came meanwhile; those waiting together run
    as one batch, filled one per peer in turn (the least used first) up to the row limit; a lone step runs at once."""
    import asyncio
    import threading

    from server.compute_queue import Batchable, FairCompute

    order: list = []
    gate = threading.Event()

    def bulk(name: str, chunks: int):
        for index in range(chunks):
            if index == 1:
                gate.wait(5)  # the test queues decode steps while chunk 1 runs
            order.append(f"{name}:{index}")
            yield
        return name

    def runner(items: list) -> list:
        order.append(tuple(items))
        return [ValueError("bad step") if item == "bad" else item.upper() for item in items]

    async def main():
        compute = FairCompute(inflight_bytes=10_000, max_batch_rows=4)
        try:
            step = lambda peer, item, key="k": compute.run(peer, 1, None, step=Batchable(key, item, runner))  # noqa: E731
            lone = await step("a", "alone")
            assert lone == "ALONE" and order == [("alone",)]  # nobody to wait for: it ran at once
            order.clear()
            training = asyncio.create_task(compute.run("trainer", 1, bulk, "train", 3))
            other_bulk = asyncio.create_task(compute.run("b", 1, bulk, "other", 1))
            await asyncio.sleep(0.05)  # chunk 1 of the training job is running (waiting for the gate)
            # Peer "a" floods with three sessions' steps; b, c and d have one each; one step has another key.
            steps = [asyncio.create_task(step(peer, item)) for peer, item in
                     (("a", "a1"), ("a", "a2"), ("a", "bad"), ("b", "b1"), ("c", "c1"), ("d", "d1"))]
            odd = asyncio.create_task(step("c", "other-blocks", key="k2"))
            await asyncio.sleep(0.01)
            gate.set()
            results = await asyncio.gather(*steps, odd, training, other_bulk, return_exceptions=True)
            assert results[:2] + results[3:6] == ["A1", "A2", "B1", "C1", "D1"] and isinstance(results[2], ValueError)
            assert results[6:] == ["OTHER-BLOCKS", "train", "other"]
            # Chunk 1 of the training job, then the decode steps (before the job's last chunk and the other bulk job):
            # one batch of 4 rows, a peer at a time (a first: it came first among equals), then the rest.
            assert order[:2] == ["train:0", "train:1"]
            first_batch = order[2]
            assert len(first_batch) == 4 and {"b1", "c1", "d1"} <= set(first_batch)
            decode = [entry for entry in order if isinstance(entry, tuple)]
            assert sorted(x for batch in decode for x in batch) == sorted(["a1", "a2", "bad", "b1", "c1", "d1", "other-blocks"])
            assert all(isinstance(entry, tuple) for entry in order[2:2 + len(decode)])  # all before bulk resumed
            assert order[2 + len(decode):] == ["train:2", "other:0"] or order[2 + len(decode):] == ["other:0", "train:2"]
            assert compute.batches >= 3 and compute.inflight.used == 0
        finally:
            compute.shutdown()

    _queue_run(main)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a Linux feature")
def test_bulk_work_runs_at_a_lower_os_priority_than_decode_steps():
    """So that peers sharing the cores (other servers, clients) get decode steps through first as well."""
    import asyncio
    import threading

    from server.compute_queue import BULK_NICENESS, Batchable, FairCompute

    def niceness(*_):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def main():
        compute = FairCompute(1000)
        try:
            bulk = await compute.run("p", 1, niceness)
            decode = await compute.run("p", 1, None, step=Batchable(None, 0, lambda items: [niceness()]))
            return bulk, decode
        finally:
            compute.shutdown()

    bulk, decode = asyncio.run(main())
    assert bulk == min(19, decode + BULK_NICENESS) and decode == niceness()
