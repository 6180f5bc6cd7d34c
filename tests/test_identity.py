"""Versions and model identity as pure functions: protocol ranges and the check every decoded message passes, the
record fields and their tolerant parsing, the config and weight digests (stable where the model is the same,
sensitive where it is not), and the client's rule that leaves out servers it cannot work with."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from client.compatibility import Compatibility, incompatibility
from client.routing import NoRouteError, plan_route
from swarm import versions
from swarm.checkpoint import Checkpoint
from swarm.dht_records import ServerInfo, ServerRecord, ServerState
from swarm.errors import VersionMismatch
from swarm.identity import ModelIdentity, config_digest, sample_windows, span_digest, weights_digest
from swarm.models import family_for
from swarm.protocol import InferenceOpen, SpanRequest
from tests.conftest import tiny_llama_config

# ---------------------------------------------------------------------------------------------- protocol versions


@pytest.mark.parametrize("a, b, common", [
    ((1, 1), (1, 1), 1),
    ((1, 1), (1, 2), 1),  # a server one version ahead that still speaks the client's
    ((1, 2), (1, 1), 1),  # and the other way round
    ((2, 3), (1, 2), 2),
    ((1, 3), (2, 5), 3),
    ((1, 1), (2, 2), None),  # a server that dropped the client's version
    ((3, 4), (1, 2), None),
])
def test_common_version_is_the_highest_both_speak(a, b, common):
    assert versions.common_version(a, b) == common
    assert versions.common_version(b, a) == common


def test_a_message_from_a_peer_without_a_common_version_is_refused_naming_both_ranges():
    ours = versions.ours()
    ahead = InferenceOpen(start=0, end=2, max_length=8, batch_size=1, version=ours[1] + 1, min_version=ours[0])
    assert InferenceOpen.decode(ahead.encode()) == ahead  # newer, but still speaks ours
    future = SpanRequest(start=0, end=2, version=ours[1] + 2, min_version=ours[1] + 1)
    with pytest.raises(VersionMismatch) as refused:
        SpanRequest.decode(future.encode())
    message = str(refused.value)
    assert refused.value.code == "protocol_version"
    assert versions.describe((ours[1] + 1, ours[1] + 2)) in message and versions.describe(ours) in message
    assert "Upgrade the receiving peer" in message
    # A message from before ranges carries only its version: it speaks that one.
    assert SpanRequest.decode(b'{"start": 0, "end": 2, "version": 1}').start == 0
    with pytest.raises(VersionMismatch, match="Upgrade the sending peer"):
        versions.check_message((1, 1), "SpanRequest", mine=(2, 3))


def test_records_carry_versions_and_digests_and_old_ones_mean_version_1():
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=2, protocol_min=1, protocol_max=3,
                          config_digest="ab" * 16, weights_digest="cd" * 16)
    assert ServerRecord.from_dict(record.to_dict()) == record
    old = ServerRecord.from_dict({"state": "online", "start": 0, "end": 2, "version": "0.0.9"})
    assert (old.protocol_min, old.protocol_max, old.config_digest, old.weights_digest) == (1, 1, "", "")
    odd = ServerRecord.from_dict({**record.to_dict(), "weights_digest": 7, "protocol_max": "2"})
    assert odd.weights_digest == "" and odd.protocol_max == 2
    assert ServerRecord.from_dict({**record.to_dict(), "protocol_min": "x"}) is None


# ---------------------------------------------------------------------------------------------- digests


@pytest.fixture(scope="module")
def saved(tiny_model_path, tmp_path_factory):
    """The tiny checkpoint under another folder name, and saved again sharded (other files, same tensors)."""
    root = tmp_path_factory.mktemp("identity")
    renamed = shutil.copytree(tiny_model_path, root / "renamed-copy")
    sharded = root / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    return renamed, sharded


def identity(path) -> ModelIdentity:
    checkpoint = Checkpoint(str(path))
    return ModelIdentity(checkpoint, family_for(checkpoint.config))


def test_digests_do_not_depend_on_folder_name_sharding_or_load_dtype(tiny_model_path, saved):
    renamed, sharded = saved
    original, copy, resharded = identity(tiny_model_path), identity(renamed), identity(sharded)
    blocks = [original.block(i) for i in range(6)]
    assert len(set(blocks)) == 6  # each block its own
    assert [copy.block(i) for i in range(6)] == blocks == [resharded.block(i) for i in range(6)]
    assert original.config == copy.config == resharded.config
    assert original.span(2, 4) == span_digest(blocks[2:4]) != original.span(2, 5)
    config = tiny_llama_config()
    stamped = tiny_llama_config()
    stamped.dtype, stamped.transformers_version, stamped._name_or_path = torch.bfloat16, "0.0.1", "/elsewhere"
    assert config_digest(config) == config_digest(stamped) == original.config


def test_config_digest_changes_with_what_the_model_computes():
    base = config_digest(tiny_llama_config())
    assert config_digest(tiny_llama_config(rms_norm_eps=1e-6)) != base
    assert config_digest(tiny_llama_config(num_hidden_layers=4)) != base


def _rewrite(path, name: str, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_changed_byte_in_the_sample_changes_the_block_digest(tiny_model_path, tmp_path):
    name = "model.layers.3.mlp.down_proj.weight"  # [64, 128]
    windows = sample_windows(name, [64, 128])
    assert len(windows) == 8 and all(w[-1].stop - w[-1].start == 16 for w in windows)
    sampled = {(w[0].start, c) for w in windows for c in range(w[1].start, w[1].stop)}
    row, col = windows[3][0].start, windows[3][1].start + 5
    outside = next((r, c) for r in range(64) for c in range(128) if (r, c) not in sampled)
    before = identity(tiny_model_path)

    inside_copy = shutil.copytree(tiny_model_path, tmp_path / "a" / "tiny-llama")
    _rewrite(inside_copy, name, lambda t: t.index_put_((torch.tensor(row), torch.tensor(col)), t[row, col] + 1e-3))
    changed = identity(inside_copy)
    assert changed.block(3) != before.block(3)
    assert [changed.block(i) for i in (0, 1, 2, 4, 5)] == [before.block(i) for i in (0, 1, 2, 4, 5)]

    # A value outside the sample is not seen: the digest is against mistakes (a whole other tensor), not forgery.
    outside_copy = shutil.copytree(tiny_model_path, tmp_path / "b" / "tiny-llama")
    _rewrite(outside_copy, name, lambda t: t.index_put_((torch.tensor(outside[0]), torch.tensor(outside[1])), t[outside] + 1))
    assert identity(outside_copy).block(3) == before.block(3)

    # The dtype it is stored in counts (other stored bytes), as does a tensor's shape.
    bf16 = shutil.copytree(tiny_model_path, tmp_path / "c" / "tiny-llama")
    _rewrite(bf16, name, lambda t: t.to(torch.bfloat16))
    assert identity(bf16).block(3) != before.block(3)


class FakeSlice:
    def __init__(self, tensor, dtype="F32"):
        self.tensor, self.dtype = tensor, dtype

    def get_shape(self):
        return list(self.tensor.shape)

    def get_dtype(self):
        return self.dtype

    def __getitem__(self, index):
        return self.tensor[index]


def test_weights_digest_covers_names_shapes_dtypes_and_scalars():
    tensors = {"a": torch.arange(40.0).reshape(2, 20), "b": torch.tensor(3.0), "c": torch.zeros(0, 4)}
    base = weights_digest({k: FakeSlice(v) for k, v in tensors.items()})
    assert weights_digest({k: FakeSlice(v.clone()) for k, v in tensors.items()}) == base
    assert weights_digest({**{k: FakeSlice(v) for k, v in tensors.items()}, "b": FakeSlice(torch.tensor(4.0))}) != base
    assert weights_digest({("z" if k == "a" else k): FakeSlice(v) for k, v in tensors.items()}) != base
    assert weights_digest({**{k: FakeSlice(v) for k, v in tensors.items()}, "a": FakeSlice(tensors["a"], "F16")}) != base
    assert weights_digest({**{k: FakeSlice(v) for k, v in tensors.items()}, "a": FakeSlice(tensors["a"].reshape(4, 10))}) != base
    assert sample_windows("a", [2, 20])[0] == (slice(0, 1), slice(0, 16))
    assert sample_windows("a", [2, 20]) == sample_windows("a", [2, 20]) != sample_windows("b", [2, 20])


def test_a_block_whose_files_are_not_here_cannot_be_digested(tiny_model_path, monkeypatch):
    found = identity(tiny_model_path)
    monkeypatch.setattr(found.checkpoint, "local_file", lambda filename: None)
    assert found.block(1) is None and found.span(0, 2) is None


# ---------------------------------------------------------------------------------------------- the client's rule


MINE = (1, 1)
CONFIG, WEIGHTS = "c" * 32, "w" * 32


def record(**fields) -> ServerRecord:
    values = dict(state=ServerState.ONLINE, start=0, end=6, ms_per_block=1.0, cache_tokens_left=10_000,
                  config_digest=CONFIG, weights_digest=WEIGHTS)
    return ServerRecord(**{**values, **fields})


@pytest.mark.parametrize("fields, expected_weights, code, text", [
    ({}, WEIGHTS, None, None),
    (dict(protocol_min=1, protocol_max=2), WEIGHTS, None, None),  # one version ahead, still speaks ours
    (dict(protocol_min=2, protocol_max=3, version="9.9"), WEIGHTS, "protocol", "speaks protocol version 2..3 (software 9.9), this client 1"),
    (dict(config_digest="d" * 32), WEIGHTS, "model", "another config"),
    (dict(weights_digest="x" * 32), WEIGHTS, "model", "other weights for blocks 0:6 (digest xxxxxxxx"),
    (dict(config_digest="", weights_digest=""), WEIGHTS, None, None),  # announces none: cannot be checked
    (dict(weights_digest="x" * 32), None, None, None),  # the client cannot tell (its files for those blocks are elsewhere)
])
def test_incompatibility(fields, expected_weights, code, text):
    reason = incompatibility(record(**fields), MINE, CONFIG, expected_weights)
    assert (reason and reason[0]) == code
    if text is not None:
        assert text in reason[1]


def test_routes_leave_out_incompatible_servers_and_say_why(caplog):
    servers = [ServerInfo("far-ahead", record(protocol_min=2, protocol_max=2)),
               ServerInfo("other-w", record(start=3, weights_digest="x" * 32)),
               ServerInfo("good", record(end=3, ms_per_block=5.0)), ServerInfo("good2", record(start=3, ms_per_block=5.0))]
    rule = Compatibility(client_versions=MINE)
    rule.identity = type("Expected", (), {"config": CONFIG, "span": staticmethod(lambda start, end: WEIGHTS)})()
    with caplog.at_level(logging.INFO, logger="client.compatibility"):
        steps = plan_route(servers, 0, 6, compatibility=rule)
        plan_route(servers, 0, 6, compatibility=rule)
    assert [(s.peer_id, s.start, s.end) for s in steps] == [("good", 0, 3), ("good2", 3, 6)]
    assert plan_route(servers, 0, 6)[0].peer_id == "far-ahead"  # without the rule, one hop would win
    left_out = [r.getMessage() for r in caplog.records]
    assert len(left_out) == 2  # once per server, not once per plan
    assert any("far-ahead" in m and "protocol version 2 (software 0.1.0), this client 1" in m for m in left_out)
    assert any("other-w" in m and "other weights" in m for m in left_out)
    with pytest.raises(NoRouteError) as no_route:
        plan_route(servers[:2], 0, 6, compatibility=rule)
    assert no_route.value.reasons == {"protocol"}
    assert "speaks protocol version 2 (software 0.1.0), this client 1" in str(no_route.value) and "Upgrade the older side" in str(no_route.value)
    with pytest.raises(NoRouteError) as no_route:
        plan_route(servers[1:3], 0, 6, compatibility=rule)
    assert no_route.value.reasons == {"model"} and "other-w" in str(no_route.value)
    assert "Serve the checkpoint this client loaded" in str(no_route.value)
