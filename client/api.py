"""`swarm api`'s HTTP side: an OpenAI-compatible gateway (/v1/models, /v1/completions, /v1/chat/completions, /health)
over one distributed model. Each request generates in a thread of its own through its own inference session
(client.api_generation), so the event loop only moves text; a client that goes away mid-request cancels it, which
closes its sessions on the servers."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from client.api_generation import GenerationJob, Outcome, Sampling
from client.api_schema import ApiConfig, ChatRequest, CompletionRequest, error_body, parse_adapters, usage
from client.requests import Additions
from client.routing import NoRouteError
from swarm.errors import RemoteError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def error_of(exc: BaseException) -> ApiError:
    """What a failed generation tells the HTTP client: the swarm's state as 503, a bad request as 400."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoRouteError):
        return ApiError(503, f"the swarm cannot serve the model now: {exc}", "service_unavailable", None, "blocks_uncovered")
    if isinstance(exc, RemoteError):
        if exc.server_full or exc.server_gone:
            return ApiError(503, f"the swarm cannot serve this request now: {exc}", "service_unavailable", None, exc.code)
        return ApiError(502, f"a server refused the request: {exc}", "server_error", None, exc.code)
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc))
    logger.warning("generation failed", exc_info=exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


def _read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"--api-key-file {path} is empty; write the key clients must send into it")
    return key.encode()


class Gateway:
    """What the routes share: the model, its tokenizer, the names it serves (the model and each adapter) and the
    bound on requests generating at once."""

    def __init__(self, model, tokenizer, config: ApiConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.layers = model.remote_layers
        self.name = config.served_model_name or self.layers.connection.prefix
        self.key = _read_key(config.api_key_file)
        self.adapters = {name: self._adapter(target) for name, target in parse_adapters(config.adapter).items()}
        if self.name in self.adapters:
            raise ValueError(f"--adapter {self.name}=... takes the model's own name; name the adapter otherwise")
        self.slots = asyncio.Semaphore(config.max_concurrent)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.jobs: set[GenerationJob] = set()  # generating now (tests and logs look at it)

    def _adapter(self, target: str):
        """A peft folder becomes this gateway's own LoRA (the servers need not host it); anything else names one the
        servers host."""
        if Path(target).is_dir():
            from client.lora import RemoteLora

            family, config = self.model.get_decoder().family, self.model.config
            return RemoteLora.from_pretrained(target, family, config, config.num_hidden_layers).to(self.model.dtype)
        return target

    def additions(self, model_name: str) -> Additions:
        if model_name != self.name and model_name not in self.adapters:
            raise ApiError(404, f"the model {model_name!r} is not served here; served: {self.model_names()}",
                           param="model", code="model_not_found")
        adapter = self.adapters.get(model_name)
        lora, hosted = (None, adapter) if isinstance(adapter, str) else (adapter, "")
        return Additions(self.layers.codecs, lora, hosted or "", None, self.layers.start)

    def model_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def sampling(self, body, prompt_length: int) -> Sampling:
        room = self.model.config.max_position_embeddings - prompt_length
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_length} tokens; the model takes "
                                f"{self.model.config.max_position_embeddings} in all", param="prompt")
        asked = body.max_tokens or body.max_completion_tokens
        if asked is not None and asked > room:
            raise ApiError(400, f"max_tokens={asked} does not fit: the prompt is {prompt_length} tokens and the model "
                                f"takes {self.model.config.max_position_embeddings} in all", param="max_tokens")
        max_tokens = asked if asked is not None else min(self.config.default_max_tokens, room)
        return Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stops)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def uncovered(self) -> list[tuple[int, int]]:
        """Runs of blocks that no online server holds (a DHT read: call it off the event loop)."""
        from client.cli_status import coverage_ranges

        servers = self.layers.connection.servers()
        return [(start, end) for start, end, count in coverage_ranges(self.layers.connection.num_blocks, servers) if not count]


class Run:
    """One request's generation as a stream of events on the event loop: ("text", str), ("end", Outcome) or
    ("error", exception), put there by the job's thread."""

    def __init__(self, gateway: Gateway, job: GenerationJob):
        self.gateway, self.job = gateway, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def start(self) -> None:
        threading.Thread(target=self._work, name="swarm-api-generation", daemon=True).start()

    def _put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _work(self) -> None:
        try:
            self.gateway.jobs.add(self.job)
            outcome = self.job.run(lambda text: self._put("text", text))
            self._put("end", outcome)
        except BaseException as exc:  # noqa: BLE001 - reported to the HTTP client
            self._put("error", exc)
        finally:
            self.gateway.jobs.discard(self.job)
            self.loop.call_soon_threadsafe(self.gateway.slots.release)

    async def watch(self, request: Request) -> None:
        """Cancel the job if the HTTP client goes away (while the answer is not streaming yet)."""
        while not self.job.cancelled.is_set():
            if await request.is_disconnected():
                logger.info("client went away; stopping its generation")
                self.job.cancel()
                return
            await asyncio.sleep(0.2)


def create_app(model, tokenizer, config: ApiConfig | None = None) -> FastAPI:
    """The gateway's ASGI app over `model` (a DistributedModelForCausalLM) and its tokenizer; serve it with uvicorn."""
    gateway = Gateway(model, tokenizer, config or ApiConfig())
    app = FastAPI(title="swarm api", summary="OpenAI-compatible generation through a swarm")
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = first["msg"].removeprefix("Value error, ")
        return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param,
                                       code=first.get("type")), status_code=400)

    def authorized(request: Request) -> None:
        if gateway.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), gateway.key):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY with the key of "
                                "--api-key-file", "authentication_error", None, "invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        uncovered = await asyncio.to_thread(gateway.uncovered)
        if uncovered:
            runs = [f"{start}:{end}" for start, end in uncovered]
            body = error_body(f"no online server holds blocks {', '.join(runs)} of {gateway.layers.connection.prefix!r} "
                              f"(block {uncovered[0][0]} first); start a server for them", "service_unavailable",
                              None, "blocks_uncovered")
            return JSONResponse({**body, "status": "unavailable", "uncovered": runs}, status_code=503)
        return JSONResponse({"status": "ok", "model": gateway.name, "blocks": gateway.layers.connection.num_blocks})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "swarm"}
                                           for name in gateway.model_names()]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        ids = tokenizer(body.prompt, add_special_tokens=True).input_ids  # as `swarm generate` without --chat
        return await _respond(gateway, request, body, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except ValueError as exc:  # no chat template, or one that refuses these roles
            raise ApiError(400, f"the chat template cannot format these messages: {exc}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids  # as `swarm generate --chat`
        return await _respond(gateway, request, body, ids, chat=True)

    return app


async def _respond(gateway: Gateway, request: Request, body, prompt_ids: list[int], chat: bool):
    """One code path for both endpoints, streamed or not: start the generation, wait for its first event (so that a
    swarm that cannot serve is a 503, not a broken stream), then answer."""
    job = GenerationJob(gateway.model, gateway.additions(body.model), prompt_ids, gateway.sampling(body, len(prompt_ids)),
                        gateway.eos_ids, gateway.decode)
    await gateway.slots.acquire()
    run = Run(gateway, job)
    run.start()
    watcher = asyncio.ensure_future(run.watch(request))
    try:
        first = await run.events.get()
        if first[0] == "error":
            raise error_of(first[1])
        if body.stream:
            return StreamingResponse(_sse(run, body, first, len(prompt_ids), chat), media_type="text/event-stream")
        text, event = [], first
        while event[0] == "text":
            text.append(event[1])
            event = await run.events.get()
        if event[0] == "error":
            raise error_of(event[1])
        return _whole(body, "".join(text), event[1], len(prompt_ids), chat)
    except BaseException:
        job.cancel()  # nobody will read what it generates (a no-op once it ended)
        raise
    finally:
        watcher.cancel()


def _whole(body, text: str, outcome: Outcome | None, prompt_tokens: int, chat: bool) -> dict:
    if outcome is None:  # cancelled: the client is gone, nobody reads this
        raise ApiError(499, "the client went away", "cancelled")
    choice = {"index": 0, "logprobs": None, "finish_reason": outcome.finish_reason}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": _id(chat), "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": [choice], "usage": usage(prompt_tokens, outcome.completion_tokens)}


async def _sse(run: Run, body, first: tuple, prompt_tokens: int, chat: bool):
    """Server-sent events: chunks of text (the role first, for chat), finish_reason with the last one, a usage chunk
    if asked, then [DONE]. The generator is closed when the client goes away, which cancels the job."""
    head = {"id": _id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body.model}
    extra = {"usage": None} if body.include_usage else {}

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role else
                               {"content": text} if text is not None else {})
        else:
            choice["text"] = text or ""
        return _event({**head, "choices": [choice], **extra})

    try:
        if chat:
            yield chunk(None, role=True)
        held, event = None, first  # the last text is held back to carry finish_reason
        while event[0] == "text":
            if held is not None:
                yield chunk(held)
            held, event = event[1], await run.events.get()
        if event[0] == "error":
            if held is not None:
                yield chunk(held)
            yield _event(error_of(event[1]).body)
        else:
            outcome: Outcome = event[1]
            yield chunk(held if held is not None else "", outcome.finish_reason)
            if body.include_usage:
                yield _event({**head, "choices": [], "usage": usage(prompt_tokens, outcome.completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        run.job.cancel()  # a no-op when it finished; otherwise the client is gone


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
