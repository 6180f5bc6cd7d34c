"""The records of `swarm api` (client/api.py): its settings, declared once (defaults, flags, help), the OpenAI request
bodies it accepts (pydantic, so that a bad field is refused naming it) and the error body it answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swarm.options import option


@dataclass(frozen=True)
class ApiConfig:
    """How `swarm api` serves; `create_app(..., config=ApiConfig(...))` takes the same fields."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; give --api-key-file then)")
    port: int = option(8000, "port to listen on")
    api_key_file: str | None = option(None, "a file holding the key clients must send (Authorization: Bearer KEY); "
                                            "default: no key asked", metavar="FILE")
    adapter: tuple[str, ...] = option((), "a model name to serve with a LoRA adapter: NAME=DIR (a peft adapter folder, "
                                          "applied by this gateway) or NAME=HOSTED (an adapter the servers host)",
                                      metavar="NAME=DIR_OR_HOSTED")
    served_model_name: str | None = option(None, "the model's name in /v1/models and requests (default: the DHT "
                                                 "prefix, i.e. the model folder's name)")
    default_max_tokens: int = option(256, "tokens to generate when a request gives no max_tokens")
    # Each request holds a thread and a session on every server of its route while it generates.
    max_concurrent: int = option(32, "requests generating at once; later ones wait their turn")


def parse_adapters(specs: tuple[str, ...]) -> dict[str, str]:
    """{name: folder or hosted adapter name} from NAME=DIR_OR_HOSTED specs."""
    adapters = {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"--adapter {spec!r}: give NAME=DIR (a peft adapter folder) or NAME=HOSTED (an adapter "
                             "the servers host)")
        if name in adapters:
            raise ValueError(f"--adapter names {name!r} twice; give each adapter a name of its own")
        adapters[name.strip()] = target.strip()
    return adapters


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI's own SDKs add some over time."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens in chat requests
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is served (one choice per request), got {n}; send several requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"give one prompt (a string), got a list of {len(prompt)}")
            return prompt[0]
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not served; the completion holds the new text only")
        return echo


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        """Text, or OpenAI's list of content parts of type "text" (joined); images and audio are refused."""
        if isinstance(content, list):
            kinds = {part.get("type") for part in content} - {"text"}
            if kinds:
                raise ValueError(f"only text content parts are served, got {sorted(map(str, kinds))}")
            return "".join(str(part.get("text", "")) for part in content)
        return content or ""


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error as OpenAI sends it, which its clients turn into their typed exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
