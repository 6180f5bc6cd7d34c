"""Distributed causal LMs: real transformers models whose transformer blocks run in the swarm, while embeddings, the
final norm and the LM head stay on the client; `generate()` keeps Hugging Face semantics, the servers holding the KV
cache."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_utils import local_torch_dtype
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from client.base_model import DistributedBaseModel, RemoteSessionCache
from client.config import CODEC_FIELDS, ClientConfig
from client.connection import SwarmConnection
from client.generation_modes import generation_config_of, unsupported_generation
from client.inference_session import InferenceSession
from client.lora import RemoteLora
from client.prompts import RemotePrompts
from client.remote_sequential import RemoteSequential
from swarm.checkpoint import Checkpoint, default_dht_prefix, resolve_dtype
from swarm.identity import ModelIdentity
from swarm.join import start_joining
from swarm.models import CACHE_KWARG, ModelFamily, family_for

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM:
    """Entry point: `DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])` returns an instance of
    a subclass of the model's own transformers class (e.g. LlamaForCausalLM) and of this class."""

    @staticmethod
    def from_pretrained(model: str, initial_peers: Sequence[str], *, dht_prefix: str | None = None,
                        torch_dtype: str | torch.dtype = "float32", client_config: ClientConfig | None = None,
                        dht: hivemind.DHT | None = None, swarm_key=None, **overrides):
        """`client_config` (default: ClientConfig()) says how this model's client talks to the swarm; keyword
        `overrides` replace some of its fields (e.g. request_timeout=20, allowed_servers=[...]). Each model keeps
        its own: two models in one process may differ. `dht`: a client DHT peer already joining through
        `initial_peers` (swarm.join.start_joining(initial_peers, client_mode=True)), started early so that the join
        overlaps other work; the model's connection owns it. `swarm_key`: a private swarm's key (its key file's path
        or its 32 bytes; default: the SWARM_KEY_FILE environment variable's, else an open swarm)."""
        from swarm import compression

        client_config = (client_config or ClientConfig()).replace(**overrides)
        client_config.check_codecs(compression.available())
        checkpoint = Checkpoint(model)
        model_config = checkpoint.config
        family = family_for(model_config)
        dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else resolve_dtype(torch_dtype, model_config)
        cls = _distributed_class(family)

        # The DHT peer joins in its own process while the client-side weights load here.
        dht = dht if dht is not None else start_joining(initial_peers, swarm_key, client_mode=True)
        try:
            lm = _client_side_model(cls, checkpoint, family, dtype)
            connection = SwarmConnection(initial_peers, dht_prefix or default_dht_prefix(model), model_config.num_hidden_layers,
                                         client_config, identity=ModelIdentity(checkpoint, family), dht=dht)
        except BaseException:
            dht.shutdown()
            raise
        local_base = getattr(lm, family.base_model_attr)
        base = DistributedBaseModel(model_config, family, local_base.embed_tokens, local_base.norm, RemoteSequential(connection))
        setattr(lm, family.base_model_attr, base)
        lm.config = model_config
        if getattr(model_config, "tie_word_embeddings", False):
            lm.lm_head.weight = base.embed_tokens.weight
        try:
            lm.generation_config = GenerationConfig.from_pretrained(checkpoint.local_dir or model)
        except OSError:
            lm.generation_config = GenerationConfig.from_model_config(model_config)
        return lm.to(dtype).eval()


def _client_side_model(cls: type, checkpoint: Checkpoint, family: ModelFamily, dtype: torch.dtype) -> nn.Module:
    """The transformers model without any block, holding the checkpoint's client-side weights (embeddings, final
    norm, LM head). Built on the meta device: initialising weights that are then overwritten took ~0.9 s for
    SmolLM2's embeddings and LM head."""
    config = checkpoint.config
    empty = copy.deepcopy(config)
    empty.num_hidden_layers = 0
    if getattr(empty, "layer_types", None) is not None:
        empty.layer_types = []
    with torch.device("meta"), local_torch_dtype(dtype):
        lm = cls(empty)
    tensors = checkpoint.load(lambda k: k.startswith(family.client_prefixes), dtype)
    missing, unexpected = lm.load_state_dict(tensors, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.startswith("lm_head."))]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _initialise_unsaved_buffers(lm)
    return lm


def _initialise_unsaved_buffers(lm: nn.Module) -> None:
    """Buffers that checkpoints do not hold (Gemma 2's embedding scale) are still on the meta device after loading:
    real ones, set by the model's own initialisation, as transformers' loading does (it skips tensors marked loaded)."""
    for param in lm.parameters():
        param._is_hf_initialized = True
    for name, buffer in list(lm.named_buffers()):
        if buffer.is_meta:
            owner_name, _, attribute = name.rpartition(".")
            owner = lm.get_submodule(owner_name)
            owner._buffers[attribute] = torch.empty_like(buffer, device="cpu")
            lm._init_weights(owner)


class DistributedCausalLMMixin(DistributedModelForCausalLM):
    """Adds inference sessions and session-aware generation to a transformers causal LM class."""

    _active_session: InferenceSession | None = None
    _beam_session: InferenceSession | None = None  # the open session whose caches a beam search left reordered

    @property
    def remote_layers(self) -> RemoteSequential:
        return self.get_decoder().layers

    def get_decoder(self):
        return getattr(self, self.base_model_prefix)

    def set_codecs(self, inference: str | None = None, activations: str | None = None, gradients: str | None = None,
                   delta: str | None = None, *, replies: dict[str, str] | None = None) -> None:
        """Choose how hidden states travel, by role (see client.requests.Codecs); roles left as None keep their codec.
        `replies` chooses another codec for what servers send back, by role (e.g. {"gradients": "int8_outlier"}); an
        empty string there means the same as the role's."""
        from swarm import compression

        roles = {"inference": inference, "activations": activations, "gradients": gradients, "delta": delta}
        changes = {CODEC_FIELDS[role]: codec for role, codec in roles.items() if codec is not None}
        for role, codec in (replies or {}).items():
            if role not in ("inference", "activations", "gradients"):
                raise ValueError(f"replies names role {role!r}; roles: inference, activations, gradients")
            changes[CODEC_FIELDS[f"{role}_reply"]] = codec
        config = self.remote_layers.config.replace(**changes)
        config.check_codecs(compression.available())
        self.remote_layers.config = config

    def _freeze_local_weights(self) -> None:
        """As peft does: once an adapter or prompts are added, only they train (not embeddings or the LM head)."""
        layers = self.remote_layers
        keep = {id(p) for module in (layers.lora, layers.prompts) if module is not None for p in module.parameters()}
        for param in self.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)

    def add_prompt_tuning(self, num_virtual_tokens: int, deep: bool = False) -> RemotePrompts:
        """Trainable virtual tokens before every sequence (shallow), and with `deep` also at every block's input. The
        logits then start with the virtual tokens' positions, as with peft's prompt tuning; labels are padded to match.
        Returns the module holding the parameters (`shallow` [P, hidden], `deep` [blocks, P, hidden])."""
        if self.remote_layers.prompts is not None:
            raise RuntimeError("this model already has prompt tuning")
        self._freeze_local_weights()
        prompts = RemotePrompts(num_virtual_tokens, self.config.hidden_size, self.config.num_hidden_layers, deep,
                                init_from=self.get_input_embeddings().weight)
        self.remote_layers.prompts = prompts.to(self.dtype)
        return self.remote_layers.prompts

    def add_lora_adapter(self, lora_config) -> RemoteLora:
        """LoRA tensors (from a peft LoraConfig) for every remote block: ordinary parameters of this model, which the
        servers apply to each forward and backward request and keep nothing of."""
        if self.remote_layers.lora is not None:
            raise RuntimeError("this model already has a LoRA adapter")
        self._freeze_local_weights()
        lora = RemoteLora(self.get_decoder().family, self.config, lora_config, self.config.num_hidden_layers)
        self.remote_layers.lora = lora.to(self.dtype)
        return self.remote_layers.lora

    def load_lora_adapter(self, directory) -> RemoteLora:
        """Attach a saved peft LoRA adapter as this client's own (the servers need not host it)."""
        if self.remote_layers.lora is not None:
            raise RuntimeError("this model already has a LoRA adapter")
        lora = RemoteLora.from_pretrained(directory, self.get_decoder().family, self.config, self.config.num_hidden_layers)
        self.remote_layers.lora = lora.to(self.dtype)
        return self.remote_layers.lora

    def use_hosted_adapter(self, name: str | None) -> None:
        """Run with an adapter the servers host (`swarm server --adapters NAME=PATH`), on servers that announce it;
        None for the plain model."""
        if name is not None and self.remote_layers.lora is not None:
            raise RuntimeError("this model has its own LoRA adapter; remove it before using a hosted one")
        self.remote_layers.adapter = name

    def save_lora_adapter(self, directory) -> None:
        """Save the adapter in the peft format (adapter_config.json + adapter_model.safetensors)."""
        if self.remote_layers.lora is None:
            raise RuntimeError("this model has no LoRA adapter; call add_lora_adapter() first")
        self.remote_layers.lora.save_pretrained(directory, base_model_name_or_path=self.name_or_path)

    @contextlib.contextmanager
    def inference_session(self, max_length: int | None = None, batch_size: int | None = None,
                          forwarding: bool | str | None = None):
        """Open KV-cached streams through the swarm; `generate()` calls inside continue one another. `max_length` and
        `forwarding` default to the client config's."""
        if self._active_session is not None:
            raise RuntimeError("an inference session is already open on this model")
        prompts = self.remote_layers.prompts
        max_length = self.remote_layers.config.max_length if max_length is None else max_length
        virtual = prompts.num_virtual_tokens if prompts is not None else 0  # prompt tokens come on top of max_length
        session = self.remote_layers.inference_session(max_length + virtual, batch_size, forwarding)
        self._active_session = session
        try:
            with session:
                yield session
        finally:
            self._active_session = self._beam_session = None

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        config = generation_config_of(self.generation_config, kwargs)
        if reason := unsupported_generation(config, kwargs.get("assistant_model") is not None):
            raise ValueError(f"generate() of a distributed model cannot serve {reason}")
        if config.use_cache is False:  # every step runs the whole sequence again, as locally: no session, no cache
            if self._active_session is not None:
                raise ValueError("use_cache=False cannot run inside an inference session, which keeps a KV cache")
            return super().generate(inputs, *args, **kwargs)
        if self._active_session is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            prompt_length = prompt.shape[1] if prompt is not None else 1
            new = config.max_new_tokens
            max_length = config.max_length if new is None else prompt_length + new
            with self.inference_session(max_length=max_length):
                return self.generate(inputs, *args, **kwargs)

        session = self._active_session
        if session is self._beam_session:
            raise ValueError("this inference session ran a beam search: the servers' caches hold its last running beams, "
                             "not the sequences it returned, so generate() cannot continue it; open a new inference_session()")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        history, mask = session.token_ids, kwargs.pop("attention_mask", None)
        if history is not None:
            if input_ids is None:
                input_ids = history
            elif not (input_ids.shape[1] >= history.shape[1] and torch.equal(input_ids[:, : history.shape[1]], history)):
                # Only new tokens were given: they follow what the session already holds.
                mask = None if mask is None else torch.cat([torch.ones_like(history), mask], dim=1)
                input_ids = torch.cat([history, input_ids], dim=1)
            mask = torch.ones_like(input_ids) if mask is None else mask
        if mask is not None:
            kwargs["attention_mask"] = mask
        kwargs[CACHE_KWARG] = cache = RemoteSessionCache(session)
        kwargs.setdefault("use_cache", True)
        output = super().generate(input_ids, *args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # The servers hold all but the last sampled token; the next call feeds it first.
        session.token_ids = sequences
        if cache.reordered:
            session.token_ids, self._beam_session = None, session
        return output


_CLASSES: dict[str, type] = {}


def _distributed_class(family: ModelFamily) -> type:
    if family.name not in _CLASSES:
        base = family.causal_lm_class
        _CLASSES[family.name] = cls = type(f"Distributed{base.__name__}", (DistributedCausalLMMixin, base),
                                           {"forward": _forward_with_signature_of(base)})
        # pipeline("text-generation", model=...) warns about any class whose name this table lacks; a key of our own
        # (no config maps to it, so the Auto classes never build it) lists ours.
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(f"distributed-{family.name}", cls.__name__)
    return _CLASSES[family.name]


def _forward_with_signature_of(base: type):
    """`base.forward` with prompt tuning's label padding, showing base's own signature: Hugging Face Trainer passes a
    model only the batch keys that its forward's signature names (remove_unused_columns, on by default), so a generic
    `(*args, **kwargs)` signature would make it drop attention_mask and labels without a word."""
    signature = inspect.signature(base.forward)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        labels, prompts = bound.arguments.get("labels"), self.remote_layers.prompts
        if labels is not None and prompts is not None:  # the virtual tokens predict nothing, as in peft
            pad = labels.new_full((labels.shape[0], prompts.num_virtual_tokens), -100)
            bound.arguments["labels"] = torch.cat([pad, labels], dim=1)
        return base.forward(*bound.args, **bound.kwargs)

    forward.__signature__ = signature
    forward.__doc__ = base.forward.__doc__
    return forward
