"""Shared fixtures: a tiny random Llama saved to disk, its local reference, and one swarm of real
server processes on 127.0.0.1 that the whole session shares (starting peers is the slow part)."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.auth import ENV_VAR, generate_key_file
from swarm.launch import LocalSwarm

# Every swarm of the suite is private: one key for the session, found by every peer (and every server process the
# tests start) through SWARM_KEY_FILE, so the whole suite runs the keyed path. Tests of open swarms unset it.
SWARM_KEY_FILE = os.path.join(tempfile.mkdtemp(prefix="swarm-test-key-"), "swarm.key")
generate_key_file(SWARM_KEY_FILE)
os.environ[ENV_VAR] = SWARM_KEY_FILE
# The suite compares with local float32 models on the CPU, so its servers (and clients) run on the CPU even on a GPU
# machine: `--device auto` finds no GPU (set before anything initialises CUDA). bench/ checks the GPU paths.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Servers cache their measured throughput (server.throughput): the suite's servers share one cache, never the home's.
os.environ["SWARM_CACHE_DIR"] = tempfile.mkdtemp(prefix="swarm-test-cache-")

TINY_SPANS = [(0, 2), (2, 4), (4, 6)]
TINY_CACHE_TOKENS = 4096


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_tokenizer():
    """A byte-level BPE trained in-process (the hub is unreachable): 300 tokens, ids 0-2 special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world, a swarm of peers."] * 20,
                                  trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Random init has tiny weights; scale them up so logits are peaked and token-identity tests mean something."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0 if "embed" in name or "lm_head" in name else 2.0)
    return model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    torch.manual_seed(2024)
    model = sharpened(LlamaForCausalLM(tiny_llama_config()))
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reference_model(tiny_model_path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_swarm(tiny_model_path):
    swarm = LocalSwarm()
    try:
        swarm.start_bootstrap()
        swarm.start_servers(tiny_model_path, TINY_SPANS, ["--cache-tokens", str(TINY_CACHE_TOKENS), "--torch-dtype", "float32",
                                                        "--max-chunk-tokens", "16384", "--max-lora-mb", "1"])
        yield swarm
    finally:
        swarm.stop()


class JoinedSwarm(LocalSwarm):
    """A LocalSwarm for a module's own servers (a fault-injecting one, other versions, other limits) that joins the
    shared swarm's DHT through `peers`: no bootstrap node of its own to wait for. Its servers must be started with
    `own_prefix(name)`, so that no other test's client sees them, and it is stopped in the module's teardown."""

    def __init__(self, peers):
        super().__init__()
        self._peers = list(peers)

    @property
    def initial_peers(self) -> list[str]:
        return self._peers

    def stop(self, timeout: float = 30.0) -> None:
        """Kill the servers at once, without the seconds a graceful leave takes: how they leave is not what the tests
        of such a module are about, and their records (own prefix, short-lived) vanish by themselves soon after."""
        for server in self.servers:
            server.stop(signal.SIGKILL)
        self.servers = []


def own_prefix(name: str) -> list[str]:
    """Server flags for a JoinedSwarm: announce under DHT prefix `name` (clients pass dht_prefix=name), in records
    that expire seconds after the server stops, so `swarm status` of the shared swarm soon lists its model alone."""
    return ["--dht-prefix", name, "--update-period", "2", "--expiration-factor", "3"]


EXACT = dict(inference="none", activations="none", gradients="none", delta="none")


def exact(model):
    """Send hidden states uncompressed (float32), for tests that compare with local transformers/peft to float
    precision; the default codecs (client.config.CLIENT) are lossy by design and have tests of their own."""
    model.set_codecs(**EXACT)
    return model


@pytest.fixture(scope="session")
def dist_model(tiny_swarm, tiny_model_path):
    from client.model import DistributedModelForCausalLM

    model = exact(DistributedModelForCausalLM.from_pretrained(tiny_model_path, tiny_swarm.initial_peers))
    yield model
    model.model.layers.connection.shutdown()


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0)


@pytest.fixture
def lora_model(dist_model):
    """dist_model with a LoRA adapter (LORA) whose A and B are both random, so every gradient is non-trivial;
    afterwards the adapter is removed and the model's codecs and keep_activations are as before."""
    from peft import LoraConfig

    layers = dist_model.remote_layers
    saved = layers.config
    lora = dist_model.add_lora_adapter(LoraConfig(**LORA))
    with torch.no_grad():
        for param in lora.params:
            param.normal_(0, 0.3)
    yield dist_model, lora
    layers.lora, layers.config = None, saved


def local_peft(tiny_model_path, lora) -> torch.nn.Module:
    """The same adapter on a local peft model of the tiny Llama: the reference for the swarm's LoRA."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**LORA))
    result = set_peft_model_state_dict(peft_model, lora.peft_state_dict())
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return peft_model


def assert_backward_equals_peft(ours: torch.Tensor, theirs: torch.Tensor, lora, reference, count: int,
                                rel: float) -> None:
    """Back-propagate the swarm's loss `ours` and peft's `theirs` (of `reference`, holding the same adapter): equal
    losses, and each of the `count` LoRA tensors' gradient equal to peft's to `rel` of its largest value."""
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    reference_grads = {k.replace(".default", ""): p.grad for k, p in reference.named_parameters() if "lora_" in k}
    ours_by_key = dict(zip(lora.peft_state_dict(), lora.params, strict=True))
    assert set(ours_by_key) == set(reference_grads) and len(ours_by_key) == count
    for key, param in ours_by_key.items():
        scale = reference_grads[key].abs().max()
        assert scale > 0, key
        torch.testing.assert_close(param.grad, reference_grads[key], atol=rel * scale, rtol=rel, msg=key)


class HonestGeneration:
    """Greedy generation by an honest client, over and over in a thread, while a module's attacks or malformed requests
    run; `finish()` stops it and checks that each of its outputs equals the local model's, token for token."""

    def __init__(self, model, reference, seed: int = 13, new_tokens: int = 10):
        import threading

        self.prompt = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(seed))
        self.settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        self.expected = reference.generate(self.prompt, **self.settings)
        self.model, self.outputs, self.errors = model, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._generate, daemon=True)
        self._thread.start()

    def _generate(self) -> None:
        try:
            while not self._stop.is_set():
                self.outputs.append(self.model.generate(self.prompt, **self.settings))
        except Exception as exc:  # noqa: BLE001 - reported by finish()
            self.errors.append(exc)

    def wait_for_more(self, count: int = 2, timeout: float = 120.0) -> None:
        """Wait until `count` more generations are done: with 2, one of them began after this call."""
        import time

        target, deadline = len(self.outputs) + count, time.monotonic() + timeout
        while len(self.outputs) < target and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self) -> int:
        """Stop (after the generation under way), check every output; the number of generations done."""
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the honest generation did not finish within 120 s"
        assert not self.errors, self.errors
        assert self.outputs and all(torch.equal(output, self.expected) for output in self.outputs)
        return len(self.outputs)


@pytest.fixture(scope="module")
def honest_generation(dist_model, reference_model):
    """An HonestGeneration by dist_model for as long as the module's tests run, checked at the end."""
    honest = HonestGeneration(dist_model, reference_model)
    yield honest
    honest.finish()


def run_concurrently(tasks, timeout: float = 120.0) -> list:
    """Run each zero-argument callable in its own thread, all released at once; their results in order.

    Re-raises the first failure, so a test sees what went wrong in any client.
    """
    import threading

    results: list = [None] * len(tasks)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tasks))

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = tasks[index]()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"a concurrent task did not finish in {timeout:.0f} s")
    return results


async def raw_span_call(connection, kind: str, step, tensors, lora=(), lora_scaling: float = 1.0, **fields):
    """One forward or backward request exactly as given (SpanRequest `fields`, no client additions), for tests of
    what servers accept and refuse."""
    from swarm.protocol import SpanRequest

    meta = SpanRequest(start=step.start, end=step.end, lora=list(lora), lora_scaling=lora_scaling, **fields)
    return await connection.send(kind, step, meta, tensors)
