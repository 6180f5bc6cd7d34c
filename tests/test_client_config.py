"""Per-model client settings (client.config.ClientConfig) and a client loop that nothing blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import client.connection as connection_module
from client import ClientConfig, aio
from client.connection import SwarmConnection
from client.model import DistributedModelForCausalLM
from client.streams import SpanStream
from swarm.errors import RemoteError
from tests.conftest import run_concurrently

NONE = dict(inference_codec="none", activation_codec="none", gradient_codec="none", delta_codec="none")


def test_two_models_in_one_process_keep_their_own_settings(tiny_swarm, tiny_model_path, reference_model, monkeypatch):
    """Each request carries its own model's codec and forwarding; timeouts are per model too."""
    sent = []  # (connection, what, codec, later hops named) for every step and span request, as sent
    submit, send = SpanStream.submit, SwarmConnection.send

    def spy_submit(self, tensors, forward=(), *rest):
        sent.append((self.connection, "step", self.codec, len(forward)))
        return submit(self, tensors, forward, *rest)

    async def spy_send(self, kind, step, meta, tensors, codecs=()):
        sent.append((self, kind, codecs[0] if codecs else None, meta.reply_codec))
        return await send(self, kind, step, meta, tensors, codecs)

    monkeypatch.setattr(SpanStream, "submit", spy_submit)
    monkeypatch.setattr(SwarmConnection, "send", spy_send)
    exact = DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers,
                                                        client_config=ClientConfig(**NONE, forwarding=True))
    lossy = DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers,
                                                        inference_codec="bfloat16", activation_codec="bfloat16")
    hasty = DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers,
                                                        client_config=ClientConfig(**NONE), request_timeout=1e-4)
    models = (exact, lossy, hasty)
    try:
        assert isinstance(exact, DistributedModelForCausalLM) and type(exact).__name__ == "DistributedLlamaForCausalLM"
        prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(41))
        expected = reference_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            local = reference_model(prompt).logits

        def run(model):
            with torch.no_grad():
                logits = model(prompt).logits
            return model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False), logits

        (exact_tokens, exact_logits), (_, lossy_logits) = run_concurrently([lambda: run(exact), lambda: run(lossy)])
        assert torch.equal(exact_tokens, expected)
        torch.testing.assert_close(exact_logits, local, atol=1e-4, rtol=0)
        assert 0 < (lossy_logits - local).abs().max() < 0.5  # bfloat16 on the wire: close, not equal

        def of(model):
            return [entry[1:] for entry in sent if entry[0] is model.remote_layers.connection]

        exact_steps = [e for e in of(exact) if e[0] == "step"]
        assert exact_steps[0] == ("step", "none", 2)  # forwarding: the first server is told the two later hops
        assert {e[1] for e in exact_steps} == {"none"} and ("forward", "none", "none") in of(exact)
        assert set(of(lossy)) == {("step", "bfloat16", 0), ("forward", "bfloat16", "bfloat16")}
        with pytest.raises(RemoteError, match="TimeoutError"):  # its 0.1 ms timeout, not the others' 60 s
            run(hasty)
        assert torch.equal(run(exact)[0], expected)  # the others are undisturbed

        with pytest.warns(DeprecationWarning, match="forwarding is deprecated"):
            exact.remote_layers.forwarding = False  # the documented setter still works, for this model only
        assert (exact.remote_layers.config.forwarding, lossy.remote_layers.config.forwarding) == (False, False)
        assert exact.remote_layers.config.request_timeout == lossy.remote_layers.config.request_timeout == 60
    finally:
        for model in models:
            model.remote_layers.connection.shutdown()


def test_unknown_options_are_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['request_timout'\].*request_timeout"):
        DistributedModelForCausalLM.from_pretrained("unused", ["/ip4/127.0.0.1/tcp/1"], request_timout=5)


def test_a_slow_swarm_view_refresh_does_not_stall_the_client_loop(dist_model, reference_model, monkeypatch):
    """A failover refreshes the view of the swarm (here slowed to 2 s) off the client's loop: meanwhile the other
    chunk's requests and a ping round go on, and the result is exact."""
    layers = dist_model.model.layers
    saved = layers.config
    layers.configure(max_chunk_tokens=8, keep_activations=False)  # 2 x 8 tokens: two chunks, plain requests
    connection = layers.connection
    fetch, send = connection_module.fetch_servers, SwarmConnection.send
    refresh, answered, failed_once = {}, [], threading.Event()

    def slow_fetch(*args, **kwargs):
        refresh["began"] = time.monotonic()
        time.sleep(2.0)
        refresh["ended"] = time.monotonic()
        return fetch(*args, **kwargs)

    async def flaky_send(self, kind, step, meta, tensors, codecs=()):
        if self is connection and not failed_once.is_set():
            failed_once.set()
            # The server said it is leaving: the policy refreshes the swarm view (slowly), then tries again.
            monkeypatch.setattr(connection_module, "fetch_servers", slow_fetch)
            raise RemoteError("server_leaving", "this server is leaving the swarm", str(step.peer_id))
        result = await send(self, kind, step, meta, tensors, codecs)
        answered.append(time.monotonic())
        return result

    async def ticker(gaps: list, stop: asyncio.Event):
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def ping_during_refresh(pinged: list):
        while "began" not in refresh:
            await asyncio.sleep(0.01)
        await connection.pinger.ping_round()
        pinged.append(time.monotonic())

    monkeypatch.setattr(SwarmConnection, "send", flaky_send)
    gaps, pinged, stop = [], [], asyncio.Event()
    loop = aio.get_loop()
    ticking = asyncio.run_coroutine_threadsafe(ticker(gaps, stop), loop)
    pinging = asyncio.run_coroutine_threadsafe(ping_during_refresh(pinged), loop)
    hidden = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(43))
    try:
        with torch.no_grad():
            output = layers(hidden)
        pinging.result(10)
    finally:
        loop.call_soon_threadsafe(stop.set)
        ticking.result(10)
        monkeypatch.setattr(connection_module, "fetch_servers", fetch)
        layers.config = saved
    assert refresh["ended"] - refresh["began"] >= 2.0
    assert max(gaps) < 1.0, f"the client loop stalled for {max(gaps):.2f} s"
    assert any(refresh["began"] < t < refresh["ended"] for t in answered), "the other chunk waited for the refresh"
    assert refresh["began"] < pinged[0] < refresh["ended"], "the ping round waited for the refresh"
    reference = reference_model.model
    position_ids = torch.arange(8)[None]
    with torch.no_grad():
        h, pe = hidden, reference.rotary_emb(hidden, position_ids.expand(2, 8))
        for block in reference.layers:
            h = block(h, attention_mask=None, position_ids=position_ids.expand(2, 8), position_embeddings=pe)
    torch.testing.assert_close(output, h, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("command", "flags"), [("generate", "GENERATE_FLAGS"), ("finetune", "FINETUNE_FLAGS")])
def test_command_flags_map_onto_client_config_fields_one_to_one(command, flags):
    import dataclasses

    import client.config as config
    from swarm.cli import build_parser

    names = getattr(config, flags)
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]
    group = next(g for g in sub._action_groups if g.title == "client settings")
    assert sorted(a.dest for a in group._group_actions) == sorted(names)
    assert set(names) <= {f.name for f in dataclasses.fields(ClientConfig)}
    positional = ["MODEL", "hi"] if command == "generate" else ["MODEL"]
    args = parser.parse_args([command, *positional, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer",
                              "--request-timeout", "7", "--max-retries", "1", "--blocked-servers", "QmA", "QmB"])
    built = config.client_config_from(args, names)
    assert (built.request_timeout, built.max_retries, built.blocked_servers) == (7.0, 1, ("QmA", "QmB"))
    assert config.client_config_from(parser.parse_args([command, *positional, "--initial-peers", "x"]), names) == config.CLIENT
