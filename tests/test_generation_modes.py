"""Every generate() mode of transformers, through 3 servers with codec "none": token-identical to the local model, or
refused with a message that says why (beam search reorders the servers' caches with the next step, as Petals' hypo
ids do). Forward options the servers cannot give are refused too; pipeline() takes the distributed class."""

from __future__ import annotations

import logging

import pytest
import torch

PROMPT, NEW = 6, 10


def _prompts(batch: int, padded: bool, seed: int):
    """`batch` prompts; with `padded`, the second is 2 tokens shorter, left-padded (as a tokenizer pads for generation)."""
    input_ids = torch.randint(3, 320, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        input_ids[1, :2], attention_mask[1, :2] = 0, 0
    return input_ids, attention_mask


def _eos_of(reference_model, input_ids) -> int:
    """A token the model generates a few steps in: as the end-of-sequence token, beams finish at different lengths,
    so the length penalty and num_return_sequences decide which of them are returned."""
    greedy = reference_model.generate(input_ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    return int(greedy[0, -2])


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9, seed=5),
    "sampling, 3 sequences": dict(do_sample=True, num_return_sequences=3, seed=6),
    "beam 2": dict(num_beams=2),
    "beam 4": dict(num_beams=4),
    "beam 3, 2 sequences": dict(num_beams=3, num_return_sequences=2, eos=True),
    "beam 2, sampling": dict(num_beams=2, do_sample=True, seed=7),
    "beam 4, length penalty 2": dict(num_beams=4, num_return_sequences=4, length_penalty=2.0, eos=True),
    "beam 2, no KV cache": dict(num_beams=2, use_cache=False),
    "greedy, prefill in chunks of 2": dict(do_sample=False, prefill_chunk_size=2),
    "greedy, batch of 2 padded": dict(do_sample=False, batch=2),
    "beam 3, batch of 2 padded": dict(num_beams=3, num_return_sequences=2, batch=2, eos=True),
}


@pytest.mark.parametrize("mode", MODES)
def test_generation_mode_equals_local(dist_model, reference_model, mode):
    options = dict(MODES[mode])
    seed, batch = options.pop("seed", None), options.pop("batch", 1)
    input_ids, attention_mask = _prompts(batch, padded=batch > 1, seed=len(mode))
    if options.pop("eos", False):
        options["eos_token_id"] = _eos_of(reference_model, input_ids)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True, **options)
    outputs = []
    for model in (reference_model, dist_model):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(input_ids, **kwargs))
    theirs, ours = outputs
    assert ours.sequences.shape == theirs.sequences.shape
    assert torch.equal(ours.sequences, theirs.sequences), f"{mode}:\n{ours.sequences}\n{theirs.sequences}"
    if "sequences_scores" in theirs:  # beam search: the same beams won, with the same scores
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-3, rtol=0)
    assert len(set(theirs.sequences[:, PROMPT:].flatten().tolist())) > 2, "degenerate reference: it tells nothing apart"


def test_beam_search_is_not_plain_greedy(reference_model):
    """The table above would not catch a lost reorder if beam search gave greedy's tokens anyway."""
    input_ids, attention_mask = _prompts(1, padded=False, seed=len("beam 4"))
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=NEW, pad_token_id=0)
    greedy, beams = (reference_model.generate(input_ids, num_beams=n, **kwargs) for n in (1, 4))
    assert not torch.equal(greedy, beams)


REFUSED = {
    "assisted (prompt lookup)": (dict(prompt_lookup_num_tokens=3), "cannot be cropped"),
    "contrastive search": (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
    "DoLa": (dict(dola_layers="high"), "every layer's hidden states"),
    "group beam search": (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "group beam search"),
    "constrained beam search": (dict(num_beams=3, force_words_ids=[[7]]), "constrained beam search"),
    "attentions": (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
    "hidden states": (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states"),
}


@pytest.mark.parametrize("mode", REFUSED)
def test_generation_mode_is_refused_clearly(dist_model, mode):
    options, why = REFUSED[mode]
    input_ids, _ = _prompts(1, padded=False, seed=0)
    with pytest.raises(ValueError, match="generate\\(\\) of a distributed model cannot serve") as info:
        dist_model.generate(input_ids, max_new_tokens=4, pad_token_id=0, **options)
    assert why in str(info.value)


def test_a_session_cannot_continue_after_beam_search(dist_model, reference_model):
    """Its caches hold the last running beams, not the returned sequences: continuing would be silently wrong."""
    input_ids, _ = _prompts(1, padded=False, seed=1)
    with dist_model.inference_session(max_length=PROMPT + 2 * NEW):
        first = dist_model.generate(input_ids, max_new_tokens=NEW, num_beams=3, pad_token_id=0)
        assert torch.equal(first, reference_model.generate(input_ids, max_new_tokens=NEW, num_beams=3, pad_token_id=0))
        with pytest.raises(ValueError, match="ran a beam search.*open a new inference_session"):
            dist_model.generate(first, max_new_tokens=NEW, pad_token_id=0)


def test_a_reorder_names_valid_rows(dist_model):
    layers = dist_model.model.layers
    with layers.inference_session(max_length=4) as session:
        session.step(torch.randn(3, 2, 64))
        with pytest.raises(ValueError, match="one of the session's 3 rows for each row"):
            session.reorder([0, 1])
        with pytest.raises(ValueError, match="one of the session's 3 rows for each row"):
            session.reorder([0, 1, 3])


def test_a_server_refuses_a_reorder_of_rows_it_does_not_have(dist_model):
    from client import aio
    from swarm.errors import RemoteError

    layers = dist_model.model.layers
    with layers.inference_session(max_length=4) as session:
        session.step(torch.randn(2, 2, 64))
        stream, inputs = session.streams[0], [torch.randn(2, 1, 64), torch.full((2, 1), 2)]
        stream.submit(inputs, (), [0, 2])
        with pytest.raises(RemoteError, match=r"hypo_ids must name one row in \[0, 2\) for each of the session's 2 rows"):
            aio.run(stream.result(inputs))


@pytest.mark.parametrize("option", ["output_hidden_states", "output_attentions"])
def test_forward_options_the_servers_cannot_give_are_refused(dist_model, option):
    input_ids, _ = _prompts(1, padded=False, seed=2)
    with torch.no_grad(), pytest.raises(ValueError, match=f"distributed model cannot serve {option}=True"):
        dist_model(input_ids, **{option: True})


def test_pipeline_takes_the_distributed_model_and_matches_local(dist_model, reference_model, tiny_model_path, caplog):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        ours = pipeline("text-generation", model=dist_model, tokenizer=tokenizer)("The quick brown", **kwargs)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()], caplog.text
    theirs = pipeline("text-generation", model=reference_model, tokenizer=tokenizer)("The quick brown", **kwargs)
    assert ours == theirs and ours[0]["generated_text"]
