"""End to end through 3 real server processes: the distributed model equals the local transformers model."""

from __future__ import annotations

import pytest
import torch

from client.config import CLIENT
from client.model import DistributedModelForCausalLM
from tests.conftest import exact, run_concurrently


def test_route_spans_three_servers(dist_model, tiny_swarm):
    route = dist_model.model.layers.connection.plan()
    assert [(s.start, s.end) for s in route] == [(0, 2), (2, 4), (4, 6)]
    assert len({s.peer_id for s in route}) == 3


def test_logits_match_local_with_padding(dist_model, reference_model):
    torch.manual_seed(0)
    input_ids = torch.randint(3, 320, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # the second sequence is 4 tokens shorter, left-padded
    input_ids[1, :4] = 0
    with torch.no_grad():
        ours = dist_model(input_ids, attention_mask=attention_mask).logits
        theirs = reference_model(input_ids, attention_mask=attention_mask).logits
    assert ours.shape == theirs.shape == (2, 11, 320)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_loss_with_labels_matches_local(dist_model, reference_model):
    input_ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = dist_model(input_ids, labels=input_ids).loss
        theirs = reference_model(input_ids, labels=input_ids).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 3, 4], [12]])
def test_session_steps_equal_parallel_forward(dist_model, chunks):
    layers = dist_model.model.layers
    hidden = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = layers(hidden)
    outputs, offset = [], 0
    with layers.inference_session(max_length=12) as session:
        for size in chunks:
            outputs.append(session.step(hidden[:, offset : offset + size]))
            offset += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), parallel, atol=1e-4, rtol=0)


def test_greedy_generation_is_token_identical(dist_model, reference_model):
    prompt = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(3))
    ours = dist_model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    theirs = reference_model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.shape == (1, 39)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 7:].tolist())) > 3, "degenerate reference: the test would not tell models apart"


def test_batched_generation_with_padding(dist_model, reference_model):
    prompt = torch.randint(3, 320, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    prompt[0, :3], mask[0, :3] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dist_model.generate(prompt, **kwargs), reference_model.generate(prompt, **kwargs))


def test_seeded_sampling_matches(dist_model, reference_model):
    prompt = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
                  repetition_penalty=1.2)
    torch.manual_seed(123)
    ours = dist_model.generate(prompt, **kwargs)
    torch.manual_seed(123)
    theirs = reference_model.generate(prompt, **kwargs)
    assert torch.equal(ours, theirs)


def test_two_generate_calls_continue_one_session(dist_model, reference_model):
    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(6))
    expected = reference_model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with dist_model.inference_session(max_length=64) as session:
        first = dist_model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert session.position == 15  # the prompt and 9 fed tokens; the 10th is fed by the next call
        second = dist_model.generate(first, max_new_tokens=14, min_new_tokens=14, do_sample=False)
        assert torch.equal(second, expected)
        # Passing only new tokens continues after everything the session holds.
        extra = torch.tensor([[11, 12, 13]])
        third = dist_model.generate(extra, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected_third = reference_model.generate(torch.cat([second, extra], 1), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(third, expected_third)


def test_input_embedding_gradients_match(dist_model, reference_model):
    input_ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    embeds = reference_model.model.embed_tokens(input_ids).detach()
    ours_in = embeds.clone().requires_grad_(True)
    theirs_in = embeds.clone().requires_grad_(True)
    ours = dist_model(inputs_embeds=ours_in, attention_mask=mask, labels=input_ids).loss
    theirs = reference_model(inputs_embeds=theirs_in, attention_mask=mask, labels=input_ids).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert theirs_in.grad.abs().max() > 1e-6
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-4, rtol=0)


def _local_blocks(reference_model, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1])[None]
    embeddings = reference_model.model.rotary_emb(hidden, positions)
    for layer in reference_model.model.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
    return hidden


def _assert_remote_blocks_match_local(layers, reference_model, big: torch.Tensor) -> None:
    """Outputs and input gradients of the remote blocks equal the local model's."""
    ours_in, theirs_in = big.clone().requires_grad_(True), big.clone().requires_grad_(True)
    ours = layers(ours_in)
    theirs = _local_blocks(reference_model, theirs_in)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    weights = torch.randn_like(big)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-4, rtol=0)


def test_large_requests_are_streamed(dist_model, reference_model):
    """32 x 500 hidden states of 64 floats (4.1 MB) exceed the 4 MiB unary limit in both directions."""
    layers = dist_model.model.layers
    layers.configure(max_chunk_tokens=16384)  # one request, as the test swarm's servers allow
    try:
        _assert_remote_blocks_match_local(layers, reference_model, torch.randn(32, 500, 64, generator=torch.Generator().manual_seed(8)))
    finally:
        layers.configure(max_chunk_tokens=CLIENT.max_chunk_tokens)


def test_batches_over_the_request_limit_are_split(dist_model, reference_model):
    """48 x 400 tokens exceed the servers' 16384-token limit: the client sends chunks concurrently."""
    big = torch.randn(48, 400, 64, generator=torch.Generator().manual_seed(18))
    _assert_remote_blocks_match_local(dist_model.model.layers, reference_model, big)


def test_eight_concurrent_clients(tiny_swarm, tiny_model_path, reference_model):
    prompts = [torch.randint(3, 320, (1, 4 + i), generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    expected = [reference_model.generate(p, max_new_tokens=16, min_new_tokens=16, do_sample=False) for p in prompts]
    models = [exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers)) for _ in range(8)]
    try:
        results = run_concurrently([
            lambda i=i: models[i].generate(prompts[i], max_new_tokens=16, min_new_tokens=16, do_sample=False)
            for i in range(8)
        ])
    finally:
        for m in models:
            m.model.layers.connection.shutdown()
    for i in range(8):
        assert torch.equal(results[i], expected[i]), f"client {i} got a wrong continuation"


def test_stopping_criteria_and_streamer(dist_model, reference_model, tiny_model_path):
    from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(9))
    full = reference_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    stop_token = int(full[0, 6 + 7])  # the 8th generated token becomes the end of sequence
    first_stop = 6 + full[0, 6:].tolist().index(stop_token)
    ours = dist_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop_token)
    assert torch.equal(ours, full[:, : first_stop + 1])

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10, dtype=torch.bool)

    ours = dist_model.generate(prompt, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([AtLength()]))
    assert torch.equal(ours, full[:, :10])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    pieces = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            pieces.append(text)

    ours = dist_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=Collect(tokenizer))
    assert "".join(pieces) == tokenizer.decode(ours[0])
