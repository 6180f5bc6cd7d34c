"""`swarm api` (client/api.py) through the official openai client, over a uvicorn server on 127.0.0.1 in front of the
shared tiny swarm: it returns the text local greedy generation returns (and `swarm generate`'s decoding of the
swarm's), streamed or not; stop strings cut; usage counts the tokenizer's tokens; bad requests get OpenAI error bodies
naming the field; concurrent requests are served each as alone; a client that leaves frees its servers' sessions."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import openai
import pytest
import torch

try:  # the HTTP client recent openai releases depend on (its module name changed from httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - an older openai brings httpx
    import httpx

from client.monitor import serving
from tests.conftest import JoinedSwarm, exact, own_prefix, run_concurrently

KEY = "sk-test-0123456789"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
PROMPTS = ["The quick brown fox", "Hello world", "a swarm of peers", "The lazy dog", "jumps over", "Hello, fox",
           "quick peers", "world of the dog"]


def _tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE  # in memory only: the shared model folder stays as other tests expect
    return tokenizer


@pytest.fixture(scope="module")
def api(dist_model, tiny_model_path, tmp_path_factory):
    from client.api import create_app
    from client.api_schema import ApiConfig

    key_file = tmp_path_factory.mktemp("api") / "key"
    key_file.write_text(KEY + "\n")
    tokenizer = _tokenizer(tiny_model_path)
    app = create_app(exact(dist_model), tokenizer, ApiConfig(api_key_file=str(key_file), adapter=("absent=no-such-adapter",)))
    with serving(app, "127.0.0.1", 0) as url:
        yield SimpleNamespace(url=url), app.state.gateway, tokenizer


@pytest.fixture(scope="module")
def client(api):
    server, _, _ = api
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def local_greedy(reference_model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """(text, new tokens) of local transformers' greedy generation, decoded as `swarm generate` prints it."""
    output = reference_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
    new = output[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def stream_text(stream, chat: bool) -> tuple[str, list]:
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices]
    return "".join(pieces), chunks


def test_completions_return_local_greedy_text_streamed_or_not(api, client, reference_model, dist_model):
    _, gateway, tokenizer = api
    ids = tokenizer(PROMPTS[0]).input_ids
    expected, new_tokens = local_greedy(reference_model, tokenizer, ids, 12)
    assert expected.strip()
    # `swarm generate`'s path: the model's own generate() through the swarm, decoded the same way.
    swarm = dist_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert tokenizer.decode(swarm[0, len(ids):], skip_special_tokens=True) == expected

    reply = client.completions.create(model=gateway.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == ("length" if new_tokens == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), new_tokens)
    assert reply.usage.total_tokens == len(ids) + new_tokens

    text, chunks = stream_text(client.completions.create(model=gateway.name, prompt=PROMPTS[0], max_tokens=12,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}), chat=False)
    assert text == expected
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason  # with the last text
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == new_tokens


def test_chat_completions_use_the_chat_template(api, client, reference_model):
    _, gateway, tokenizer = api
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    expected, new_tokens = local_greedy(reference_model, tokenizer, ids, 10)

    reply = client.chat.completions.create(model=gateway.name, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), new_tokens)

    text, chunks = stream_text(client.chat.completions.create(model=gateway.name, messages=messages, max_tokens=10,
                                                              temperature=0, stream=True), chat=True)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_stop_strings_cut_the_text(api, client, reference_model):
    _, gateway, tokenizer = api
    ids = tokenizer(PROMPTS[0]).input_ids
    full, _ = local_greedy(reference_model, tokenizer, ids, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2, full
    expected = full[: full.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        reply = client.completions.create(model=gateway.name, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stops)
        assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
        text, chunks = stream_text(client.completions.create(model=gateway.name, prompt=PROMPTS[0], max_tokens=24,
                                                             temperature=0, stop=stops, stream=True), chat=False)
        assert (text, chunks[-1].choices[0].finish_reason) == (expected, "stop")


def test_seeded_sampling_repeats(api, client):
    _, gateway, _ = api
    runs = [client.completions.create(model=gateway.name, prompt=PROMPTS[1], max_tokens=8, temperature=1.5, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_keys_and_bad_requests(api, client):
    server, gateway, _ = api
    assert [m.id for m in client.models.list().data] == [gateway.name, "absent"]
    for key in ("wrong-key", ""):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0).models.list()
        assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no Authorization header at all

    cases = [(dict(n=2), "n"), (dict(temperature=3), "temperature"), (dict(max_tokens=0), "max_tokens"),
             (dict(top_p=0), "top_p"), (dict(max_tokens=100_000), "max_tokens"), (dict(stop=["a"] * 5), "stop")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**{"model": gateway.name, "prompt": "Hello", "max_tokens": 4, **fields})
        assert caught.value.body["param"] == param and param in caught.value.body["message"], caught.value.body
    reply = httpx.post(server.url + "/v1/completions", json={"model": gateway.name},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="other", prompt="Hello", max_tokens=4)
    assert caught.value.body["param"] == "model"
    # An adapter that no server hosts: the swarm cannot serve that model name.
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="absent", prompt="Hello", max_tokens=4, temperature=0)
    assert caught.value.status_code == 503 and "no-such-adapter" in caught.value.body["message"]


def test_concurrent_streams_each_return_their_own_text(api, client, reference_model):
    _, gateway, tokenizer = api
    expected = [local_greedy(reference_model, tokenizer, tokenizer(p).input_ids, 16)[0] for p in PROMPTS]

    def stream(prompt: str) -> str:
        return stream_text(client.completions.create(model=gateway.name, prompt=prompt, max_tokens=16, temperature=0,
                                                     stream=True), chat=False)[0]

    assert run_concurrently([lambda p=p: stream(p) for p in PROMPTS]) == expected


def server_sessions(connection) -> list[int]:
    from hivemind.proto import runtime_pb2

    from client import aio
    from swarm.service import BlockService

    counts = []
    for info in connection.servers(refresh=True):
        stub = BlockService.get_stub(connection.p2p, info.peer_id, namespace=connection.prefix)
        counts.append(json.loads(aio.run(stub.rpc_info(runtime_pb2.ExpertUID(), timeout=10)).serialized_info)["sessions_open"])
    return counts


def test_a_client_that_leaves_mid_stream_frees_the_servers_sessions(api):
    server, gateway, _ = api
    connection = gateway.layers.connection
    assert server_sessions(connection) == [0, 0, 0]
    body = dict(model=gateway.name, prompt=PROMPTS[0], max_tokens=480, temperature=0, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        (job,) = gateway.jobs
        assert server_sessions(connection) == [1, 1, 1]  # one session per server of the route, generating
    deadline = time.monotonic() + 15
    while (gateway.jobs or any(server_sessions(connection))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not gateway.jobs and job.session.closed and job.steps < 480
    assert server_sessions(connection) == [0, 0, 0]


@pytest.fixture(scope="module")
def partial_swarm(tiny_swarm, tiny_model_path):
    """Blocks 0:2 of the tiny model under a prefix of their own: blocks 2:6 have no server there."""
    from client.model import DistributedModelForCausalLM

    swarm = JoinedSwarm(tiny_swarm.initial_peers)
    try:
        swarm.start_servers(tiny_model_path, [(0, 2)], ["--torch-dtype", "float32", *own_prefix("api-partial")])
        model = DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers,
                                                            dht_prefix="api-partial")
        yield model
        model.model.layers.connection.shutdown()
    finally:
        swarm.stop()


def test_uncovered_blocks_are_a_503_naming_them(partial_swarm, tiny_model_path):
    from fastapi.testclient import TestClient

    from client.api import create_app

    with TestClient(create_app(partial_swarm, _tokenizer(tiny_model_path))) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["uncovered"] == ["2:6"]
        assert "blocks 2:6" in health.json()["error"]["message"]
        for stream in (False, True):
            reply = http.post("/v1/completions", json=dict(model="api-partial", prompt="Hello", max_tokens=4,
                                                           stream=stream))
            assert reply.status_code == 503, reply.text
            assert "block 2" in reply.json()["error"]["message"] and reply.json()["error"]["code"] == "blocks_uncovered"


def test_health_says_ok_when_every_block_is_served(api):
    server, gateway, _ = api
    reply = httpx.get(server.url + "/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok", "model": gateway.name, "blocks": 6}
