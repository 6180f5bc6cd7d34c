"""Servers a client cannot work with, in a real swarm: one that loaded other weights under the same model name, one
a protocol version ahead (which still serves this client), one whose versions this client does not speak. The
client routes around the two it cannot use, says why, and generates exactly as local transformers does."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from hivemind.proto import runtime_pb2
from rich.console import Console
from safetensors.torch import load_file, save_file

from client import aio
from client.cli_status import render
from client.model import DistributedModelForCausalLM
from client.routing import NoRouteError, ServerChoice, plan_route
from swarm import versions
from swarm.errors import RemoteError
from swarm.launch import LOCALHOST, PeerProcess
from swarm.protocol import InferenceOpen, SpanRequest
from swarm.service import BlockService
from swarm.tensors import pack_tensor
from tests.conftest import JoinedSwarm, exact, own_prefix

# A server whose swarm.config speaks other protocol versions: set before anything reads them, then the usual command.
SHIFTED = ("import sys, swarm.config as c; c.MIN_PROTOCOL_VERSION += {low}; c.PROTOCOL_VERSION += {high}; "
           "from swarm.cli import main; sys.exit(main(sys.argv[1:]))")
OURS = versions.ours()
AHEAD = (OURS[0], OURS[1] + 1)  # one version ahead, still speaks ours
FUTURE = (OURS[1] + 1, OURS[1] + 2)  # speaks none of ours
MIXED = "tiny-llama-mixed"  # its own DHT prefix: no other test's client routes through these servers


@pytest.fixture(scope="module")
def mixed_swarm(tiny_swarm, tiny_model_path, tmp_path_factory):
    """Blocks 0:3 on a server one version ahead; 3:6 on a server of the real checkpoint and on one that loaded a
    copy whose block 4 has other weights, announced under the same name; 0:6 on a server of protocol versions FUTURE.
    Beside the shared swarm, in its DHT."""
    other = tmp_path_factory.mktemp("elsewhere") / "tiny-llama"
    shutil.copytree(tiny_model_path, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.4.mlp.down_proj.weight"] = -tensors["model.layers.4.mlp.down_proj.weight"]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        common = ["--initial-peers", *swarm.initial_peers, "--host-maddrs", LOCALHOST, "--torch-dtype", "float32",
                  *own_prefix(MIXED)]

        def server(name, model, blocks, shift=None):
            python_args = ("-c", SHIFTED.format(low=shift[0], high=shift[1])) if shift else ("-m", "swarm.cli")
            return PeerProcess(["server", model, "--blocks", blocks, *common], name, python_args=python_args)

        peers = {"ahead": server("ahead", tiny_model_path, "0:3", (0, 1)), "real": server("real", tiny_model_path, "3:6"),
                 "other": server("other", str(other), "3:6"), "future": server("future", tiny_model_path, "0:6", (1, 2))}
        swarm.servers += peers.values()
        for peer in peers.values():
            peer.wait_ready()
        yield swarm, peers
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def client(mixed_swarm, tiny_model_path):
    swarm, peers = mixed_swarm
    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, swarm.initial_peers, dht_prefix=MIXED))
    connection = model.model.layers.connection
    by_span = {(s.record.start, s.record.end, s.record.protocol_max): s for s in connection.servers()}
    ids = {"ahead": by_span[0, 3, AHEAD[1]].peer_id, "future": by_span[0, 6, FUTURE[1]].peer_id}
    for s in connection.servers():
        if (s.record.start, s.record.end) == (3, 6):
            name = "real" if s.record.weights_digest == connection.compatibility.identity.span(3, 6) else "other"
            ids[name] = s.peer_id
    assert len(ids) == 4, f"expected four distinct servers, found {ids}"
    yield model, ids
    connection.shutdown()


def info(connection, peer_id) -> dict:
    stub = BlockService.get_stub(connection.p2p, peer_id, namespace=connection.prefix)
    return json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)


def test_client_routes_only_through_compatible_servers_and_generates_like_local(client, reference_model, caplog):
    model, ids = client
    connection = model.model.layers.connection
    connection.compatibility._logged.clear()  # the fixture's planning may have logged them already
    with caplog.at_level(logging.INFO, logger="client.compatibility"):
        route = connection.plan()
    # The one-hop route through `future` would be cheapest; `other` and `real` are equally good otherwise.
    assert [(s.peer_id, s.start, s.end) for s in route] == [(ids["ahead"], 0, 3), (ids["real"], 3, 6)]
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{ids['other']} out of routes: it loaded other weights for blocks 3:6" in logged
    assert (f"{ids['future']} out of routes: it speaks protocol version {versions.describe(FUTURE)} (software "
            f"0.1.0), this client {versions.describe(OURS)}") in logged

    prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(12))
    ours = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    theirs = reference_model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, reference_model(prompt).logits, atol=1e-4, rtol=0)
    assert info(connection, ids["ahead"])["requests"] > 0  # a server one version ahead served this client
    assert info(connection, ids["real"])["requests"] > 0
    assert info(connection, ids["other"])["requests"] == info(connection, ids["future"])["requests"] == 0


def test_no_route_errors_name_the_servers_left_out_and_why(client, mixed_swarm, tiny_model_path):
    model, ids = client
    connection = model.model.layers.connection
    servers = connection.servers()
    # The rule the client routes with, over its real view of the swarm, with one good server blocked each time.
    with pytest.raises(NoRouteError) as no_route:
        plan_route(servers, 0, 6, choice=ServerChoice.of(blocked=[ids["real"]]), compatibility=connection.compatibility)
    assert no_route.value.block == 3 and no_route.value.reasons == {"blocked", "model", "protocol"}
    assert f"{str(ids['other'])[-8:]} (loaded other weights for blocks 3:6" in str(no_route.value)
    with pytest.raises(NoRouteError) as no_route:
        plan_route(servers, 0, 6, choice=ServerChoice.of(blocked=[ids["ahead"]]), compatibility=connection.compatibility)
    assert no_route.value.block == 0 and no_route.value.reasons == {"blocked", "protocol"}
    assert f"{str(ids['future'])[-8:]} (speaks protocol version {versions.describe(FUTURE)}" in str(no_route.value)

    # And through the public API: a client that may not use the real 3:6 server does not fall back on the other one.
    swarm, _ = mixed_swarm
    blocked = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, swarm.initial_peers, dht_prefix=MIXED,
                                                                blocked_servers=[str(ids["real"])]))
    try:
        with pytest.raises(NoRouteError, match="loaded other weights for blocks 3:6"):
            blocked.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        blocked.model.layers.connection.shutdown()


def test_a_server_without_a_common_version_refuses_requests_naming_both_ranges(client):
    model, ids = client
    connection = model.model.layers.connection
    stub = BlockService.get_stub(connection.p2p, ids["future"], namespace=connection.prefix)
    hidden, positions = torch.randn(1, 3, 64), torch.arange(3)[None]
    request = runtime_pb2.ExpertRequest(metadata=SpanRequest(start=0, end=6).encode(),
                                        tensors=[pack_tensor(hidden), pack_tensor(positions)])
    opening = runtime_pb2.ExpertRequest(metadata=InferenceOpen(start=0, end=6, max_length=8, batch_size=1).encode())

    async def open_session():
        async def requests():
            yield opening

        return [reply async for reply in await stub.rpc_inference(requests())]

    for call in (stub.rpc_forward(request, timeout=10), open_session()):
        with pytest.raises(Exception) as refused:  # noqa: PT011 - the transport's own error type, parsed below
            aio.run(call)
        error = RemoteError.from_exception(refused.value)
        assert error.code == "protocol_version", error
        assert (f"speaks protocol version {versions.describe(OURS)}; the peer receiving it speaks "
                f"{versions.describe(FUTURE)}. Upgrade the sending peer") in error.message
    assert info(connection, ids["ahead"])["protocol_max"] == AHEAD[1]  # info answers whatever the version


def test_status_and_records_show_versions_and_digests(client):
    model, ids = client
    connection = model.model.layers.connection
    expected = connection.compatibility.identity
    records = {name: next(s.record for s in connection.servers() if s.peer_id == peer) for name, peer in ids.items()}
    assert {name: (r.protocol_min, r.protocol_max) for name, r in records.items()} == {
        "ahead": AHEAD, "real": OURS, "other": OURS, "future": FUTURE}
    assert {r.config_digest for r in records.values()} == {expected.config}  # same config: only weights differ
    assert records["real"].weights_digest == expected.span(3, 6) != records["other"].weights_digest
    assert records["ahead"].weights_digest == expected.span(0, 3)
    assert records["future"].weights_digest == expected.span(0, 6)

    console = Console(width=120, record=True)
    console.print(render({connection.prefix: (6, connection.servers())}))
    text = console.export_text()
    assert f"{MIXED}: 6 blocks, 4 server(s)" in text
    for name, record in records.items():
        assert f"{record.version} / {versions.describe((record.protocol_min, record.protocol_max))}" in text, name
        assert str(ids[name])[-12:] in text
