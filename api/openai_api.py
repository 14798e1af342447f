"""The OpenAI-compatible HTTP API, served on the same server as the page.

GET /v1/models, POST /v1/chat/completions and POST /v1/completions (a plain text prompt, read
without the chat template), streamed as server-sent events or whole, over the same `Reply` as
the page (chat/reply.py); `n` choices are that many Replies written side by side, and `logprobs`
travel with the text they make (Text events). Client-side `tools=` come back as `tool_calls`
with finish_reason "tool_calls" (the client runs them and sends `tool` messages); a preset's
server-side tools are run here when the client sends none. A reasoning model's thinking comes as
`reasoning_content` beside `content` (as vLLM and llama.cpp's server send it); a conversation
ending with an assistant message is continued. Errors use OpenAI's error shape and
status codes: 400 bad parameters (naming the field), 404 unknown model, 503 no model loaded or
the engine failed. Who may call it (401) and how big a body may be (413) is the door's
business (web/door.py), which also tells each route who the caller is: cached tokens are
reused only within one caller, whatever `user` says. A client that goes away, streamed or
not, cancels its reply, which stops the engine. Knows HTTP, not Gradio or engines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from backends.base import (BackendError, ContextOverflow, GenerationParams, ImageData, Message, ParamError, Usage,
                           valid_text)
from backends.manager import ModelManager
from chat.attachments import image_from_data_url
from chat.formats import ToolCall, ToolFormat, calls_from_openai
from chat.reply import Reply, Text, Thinking, tool_format
from chat.tools import Toolset
from web.policy import Limits

log = logging.getLogger(__name__)


class SamplingRequest(BaseModel):
    """What chat and text completions share. Fields beyond those named are refused with a 400 that
    names them (`refuse_unknown`), unless they change nothing here (HARMLESS): a client must never
    believe a setting was applied when it was not."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None  # engines with the "penalties" feature (llama.cpp)
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # not taken: empty or absent only
    repeat_penalty: float | None = None  # llama.cpp server's and Ollama's name for repetition_penalty


class ChatRequest(SamplingRequest):
    messages: list[Any]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's; only enable_thinking is taken
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (llama.cpp: a grammar)
    logprobs: bool | None = None  # engines with the "logprobs" feature (llama.cpp)
    top_logprobs: int | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a plain text prompt, read as it is (no chat template)."""

    prompt: Any = None  # a string (or a list holding one string)
    max_tokens: int | None = 16  # OpenAI's default for text completions
    echo: bool = False  # the prompt comes back before the completion
    suffix: str | None = None  # not taken (fill-in-the-middle): absent only
    best_of: int | None = None  # 1 or absent only
    logprobs: int | None = None  # the likeliest alternatives per token (llama.cpp), as in OpenAI's legacy API


# Fields that change nothing in what Confab answers: taken without a word (OpenAI's bookkeeping
# and caching hints; `user` and `stream_options` are fields above).
HARMLESS = {"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction",
            # vLLM's way of asking for what Confab does by itself with a final assistant message
            # (backends/openai.py sends them, so one Confab can serve another)
            "continue_final_message", "add_generation_prompt"}


def refuse_unknown(req: SamplingRequest) -> None:
    """A 400 naming the first field Confab would otherwise ignore, or a value of one it cannot give."""
    extra = dict(req.model_extra or {})
    if extra.get("modalities") in (["text"], None):
        extra.pop("modalities", None)
    unknown = sorted(set(extra) - HARMLESS)
    if unknown:
        names = ", ".join(unknown)
        raise _bad(f"{names} {'is' if len(unknown) == 1 else 'are'} not supported by this server; remove "
                   f"{'it' if len(unknown) == 1 else 'them'} from the request.", unknown[0])
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _bad("suffix (fill in the middle) is not supported by this server; leave it out.", "suffix")
        if req.best_of not in (None, 1):
            raise _bad("Only best_of=1 is supported: ask again for another completion.", "best_of")
        if req.echo and req.logprobs is not None:  # lm-eval's loglikelihood asks this: it must not get zeros
            raise _bad("echo with logprobs would need the prompt's own log-probabilities, which this server does not "
                       "give; ask without echo (the completion's tokens get theirs).", "echo")
    elif req.top_logprobs is not None and not req.logprobs:
        raise _bad("top_logprobs needs logprobs: true.", "top_logprobs")
    if req.logit_bias:
        raise _bad("logit_bias is not supported by this server; leave it out.", "logit_bias")


def json_schema_of(response_format: dict[str, Any] | None) -> str:
    """response_format as the JSON schema (text) the reply must follow; "" for free text."""
    if not response_format:
        return ""
    kind = response_format.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad('response_format json_schema must be {"type": "json_schema", "json_schema": {"name": ..., '
                       '"schema": {...}}}.', "response_format.json_schema")
        return json.dumps(schema)
    raise _bad(f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}.',
               "response_format.type")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


def _content(value: Any, index: int, limits: Limits) -> tuple[str, list[ImageData]]:
    """A message's content: its text, and its pictures (image_url parts holding data URLs)."""
    where = f"messages[{index}].content"
    if isinstance(value, str):
        return value, []
    if value is None:
        return "", []
    if not isinstance(value, list):
        raise _bad(f"{where} must be a string or a list of content parts, got {type(value).__name__}.", where)
    texts, images = [], []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise _bad(f"{where}[{j}] must be an object such as {{\"type\": \"text\", \"text\": \"...\"}}.",
                       f"{where}[{j}]")
        kind = part.get("type")
        if kind == "image_url":
            images.append(_image(part.get("image_url"), f"{where}[{j}].image_url", limits))
            continue
        if kind != "text":
            raise _bad(f"{where}[{j}] is of type {kind!r}; parts are \"text\" or \"image_url\".", f"{where}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}].text must be a string.", f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts), images


def _image(value: Any, where: str, limits: Limits) -> ImageData:
    """An image_url part's picture: a data URL only (the server never fetches a URL it is given)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise _bad(f'{where} must be {{"url": "data:image/png;base64,..."}}.', where)
    try:
        return image_from_data_url(url, limits)
    except ParamError as e:
        raise _bad(f"{where}: {e}", where) from e


def _readable(manager: ModelManager, messages: list[Message]) -> None:
    """A text-only model given pictures: a 400 now, before anything streams."""
    if any(m.images for m in messages):
        try:
            manager.check_images(messages)
        except ParamError as e:
            raise _bad(str(e), "messages") from e
        except BackendError:  # unloaded meanwhile: the reply itself says so
            pass


def _count_images(raw: list[Any], limits: Limits) -> None:
    """Pictures in the request, counted before any is decoded."""
    n = sum(1 for item in raw if isinstance(item, dict) and isinstance(item.get("content"), list)
            for part in item["content"] if isinstance(part, dict) and part.get("type") == "image_url")
    if n > limits.images:
        raise _bad(f"The messages hold {n} images; this server takes at most {limits.images} (--max-images).",
                   "messages")


def to_messages(raw: list[Any], limits: Limits, fmt: ToolFormat | None = None) -> list[Message]:
    """OpenAI messages -> Messages. An assistant message's `tool_calls` are written as the model
    writes calls (`fmt`), so it sees its earlier calls as it made them."""
    if not raw:
        raise _bad("messages must hold at least one message.", "messages")
    _count_images(raw, limits)
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = item.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        content, images = _content(item.get("content"), i, limits)
        if role == "assistant" and item.get("tool_calls") and fmt is not None:
            calls = _tool_calls(item["tool_calls"], i)
            content = f"{content}\n{fmt.write(calls)}" if content.strip() else fmt.write(calls)
        try:
            out.append(Message(role, content, images=tuple(images)))
        except ParamError as e:
            raise _bad(f"messages[{i}]: {e}", f"messages[{i}].content" if images else f"messages[{i}].role") from e
    if out[-1].role == "system":  # an assistant message last is continued (as llama.cpp's server does)
        raise _bad("The last message is from the system; it must be the user's (or a tool's) for the model to "
                   "answer it, or the assistant's for the model to continue it.", f"messages[{len(out) - 1}].role")
    try:
        limits.check_texts([(f"messages[{i}]", m.content) for i, m in enumerate(out)])
    except ParamError as e:
        raise _bad(str(e), "messages") from e
    return out


def _tool_calls(raw: Any, index: int) -> list[ToolCall]:
    where = f"messages[{index}].tool_calls"
    calls = calls_from_openai(raw)
    if calls is None:
        raise _bad(f'{where} must be a list of {{"id", "type": "function", "function": {{"name", "arguments"}}}}, '
                   "arguments being a JSON object (as text).", where)
    return calls


def client_tools(req: "ChatRequest", limits: Limits) -> list[dict[str, Any]] | None:
    """The client's `tools=`, checked, narrowed by `tool_choice` ("none" sends none). They go into
    the prompt, so they are held to the same size limit as a message."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return None
    try:
        limits.check_text("tools", json.dumps(req.tools, ensure_ascii=False))
    except ParamError as e:
        raise _bad(str(e), "tools") from e
    for j, t in enumerate(req.tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f'tools[{j}] must be {{"type": "function", "function": {{"name", "description", "parameters"}}}}.',
                       f"tools[{j}]")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        chosen = [t for t in req.tools if t["function"]["name"] == name]
        if not chosen:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
        return chosen
    if choice not in (None, "auto", "required"):
        raise _bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                   f'{{"name": ...}}}}, got {choice!r}.', "tool_choice")
    return req.tools


def _bad(message: str, param: str | None = None) -> "ApiError":
    return ApiError(400, message, "invalid_request_error", param)


def to_params(req: SamplingRequest, base: GenerationParams, limits: Limits) -> GenerationParams:
    if not 1 <= req.n <= MAX_N:
        raise _bad(f"n must be from 1 to {MAX_N} (the choices are written at once, beside other people's "
                   "replies); ask again for more.", "n")
    refuse_unknown(req)
    chat = req if isinstance(req, ChatRequest) else ChatRequest(messages=[])  # a completion has none of its fields
    changes: dict[str, Any] = {
        "max_new_tokens": chat.max_completion_tokens if chat.max_completion_tokens is not None else req.max_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty,
        "seed": req.seed, "stop": req.stop, "thinking": enable_thinking(chat.chat_template_kwargs),
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "json_schema": json_schema_of(chat.response_format) or None, "raw": isinstance(req, CompletionRequest) or None,
        "logprobs": req.logprobs if isinstance(req, CompletionRequest) else (
            (req.top_logprobs or 0) if req.logprobs else None),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0  # OpenAI's temperature 0 means greedy
    try:
        params = GenerationParams.from_dict(changes, base=base)
        limits.check_params(params)
    except ParamError as e:
        raise _bad(*_named(str(e), req)) from e
    return params


def _named(message: str, req: SamplingRequest) -> tuple[str, str | None]:
    """A sampling error as the client sent it: the setting's API name in the message and as
    `param` (GenerationParams says max_new_tokens where the request said max_tokens)."""
    field = message.split(" ", 1)[0]
    if field not in GENERATION_FIELDS:
        return message, None
    chat = isinstance(req, ChatRequest)
    api = {"max_new_tokens": "max_completion_tokens" if chat and req.max_completion_tokens is not None
           else "max_tokens", "logprobs": "top_logprobs" if chat else "logprobs",
           "json_schema": "response_format"}.get(field, field)
    return api + message[len(field):], api


GENERATION_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationParams))


MAX_N = 4  # choices one request may ask for: each takes an engine slot


def each_choice(params: GenerationParams, n: int) -> list[GenerationParams]:
    """The settings of each of `n` choices: with a seed, choice i samples with seed + i (the
    same seed would give n copies of one answer; greedy ones are the same anyway)."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [params.replace(seed=(params.seed + i) % 2**63) for i in range(n)]


def enable_thinking(kwargs: dict[str, Any] | None) -> bool | None:
    """`chat_template_kwargs.enable_thinking`: the one template setting taken here."""
    if not kwargs:
        return None
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise _bad(f"chat_template_kwargs {', '.join(map(repr, unknown))} are not taken here; only enable_thinking "
                   "is.", "chat_template_kwargs")
    value = kwargs.get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise _bad(f"chat_template_kwargs.enable_thinking must be true or false, got {value!r}.",
                   "chat_template_kwargs.enable_thinking")
    return value


def build_router(manager: ModelManager, model_id: Any, limits: Limits | None = None,
                 server_tools: Callable[[], Toolset | None] = lambda: None) -> APIRouter:
    """`model_id()` names the loaded model (its preset key) for /v1/models and the `model` field;
    `server_tools()` is the loaded preset's own tools, run here for clients that send none."""
    router = APIRouter(prefix="/v1")
    limits = limits or Limits()

    def loaded_id(asked: str | None) -> str:
        if not manager.loaded:
            raise ApiError(503, "No model is loaded: load one in the page (or start with --preset).", "server_error")
        name = model_id()
        if asked and asked not in (name, manager.spec.name, "default"):
            raise ApiError(404, f"The model {asked!r} is not loaded here; the loaded model is {name!r}.",
                           "invalid_request_error", "model")
        return name

    def model_card() -> dict[str, Any]:
        info = manager.describe()
        return {"id": loaded_id(None), "object": "model", "created": 0, "owned_by": "confab",
                "backend": info.get("backend"), "max_model_len": info.get("n_ctx")}

    @router.get("/models")
    def models() -> Any:
        try:
            return {"object": "list", "data": [model_card()] if manager.loaded else []}
        except ApiError as e:
            return e.response()

    @router.get("/models/{model:path}")
    def model(model: str) -> Any:
        """One model (OpenAI's retrieve): the loaded one, by its id or name, else a 404."""
        try:
            loaded_id(model or "?")
            return model_card()
        except ApiError as e:
            return e.response()

    @router.post("/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            req = await _read(request)
            name = loaded_id(req.model)
            # On a worker thread: pictures are decoded to be checked, which must not hold the event loop.
            messages = await anyio.to_thread.run_sync(to_messages, req.messages, limits, tool_format(manager))
            _readable(manager, messages)
            params = checked_params(req)
            tools = client_tools(req, limits)
        except ApiError as e:
            return e.response()
        # The preset's own tools run for clients that send none; "none" means none at all.
        own = None if tools or req.tool_choice == "none" else server_tools()
        replies = [manager.reply(messages, p, owner(request, req.user), tools=own, client_tools=tools)
                   for p in each_choice(params, req.n)]
        return await _answer(request, req, Completion(replies, name))

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        """A plain text prompt, continued as it is (what lm-eval and lagent's client send)."""
        try:
            req = await _read(request, CompletionRequest)
            name = loaded_id(req.model)
            text = prompt_text(req.prompt, limits)
            params = checked_params(req)
            await anyio.to_thread.run_sync(fits, text, params)  # it tokenizes: not on the event loop
        except ApiError as e:
            return e.response()
        replies = [manager.reply([Message("user", text)], p, owner(request, req.user))
                   for p in each_choice(params, req.n)]
        return await _answer(request, req, TextCompletion(replies, name, text if req.echo else ""))

    def fits(text: str, params: GenerationParams) -> None:
        """A raw prompt and its reply must fit the context: a 400 now, not an error inside a stream."""
        n_ctx = manager.n_ctx
        if not n_ctx:
            return
        try:
            tokens = manager.count_tokens(text)
        except BackendError:  # unloaded meanwhile: the reply itself says so
            return
        if tokens + params.max_new_tokens > n_ctx:
            raise _bad(f"The prompt is about {tokens:,} tokens and max_tokens is {params.max_new_tokens:,}; together "
                       f"they must fit the model's context of {n_ctx:,}. Shorten the prompt or lower max_tokens.",
                       "prompt")

    def checked_params(req: SamplingRequest) -> GenerationParams:
        params = to_params(req, limits.clamp(manager.default_params()), limits)
        # The choices are written side by side, and one request may take at most half of the
        # engine's places: the rest are for other people (transformers shares 4 a slice at a time).
        if req.n > 1 and manager.capacity() < 2 * req.n:
            raise _bad(f"n={req.n} needs {req.n} replies side by side; the {manager.describe().get('backend')} engine "
                       f"here answers {manager.capacity()} at a time, and one request may take at most half of them. "
                       "Ask with a smaller n, or ask again.", "n")
        try:
            manager.check_params(params)  # a setting this engine lacks: a 400 now, not an error mid-stream
        except ParamError as e:
            raise _bad(str(e)) from e
        except BackendError:  # unloaded meanwhile: the reply itself says so
            pass
        return params

    return router


async def _answer(request: Request, req: SamplingRequest, completion: "Completion") -> Any:
    """Streamed as server-sent events, or whole."""
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(completion.events(include_usage), media_type="text/event-stream")
    try:
        return await _unless_gone(request, completion)
    except ApiError as e:
        return e.response()


def prompt_text(prompt: Any, limits: Limits) -> str:
    """A completion's prompt: text, or a list holding one text."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string (one prompt per request; token ids are not taken: send the text).",
                   "prompt")
    if not prompt:
        raise _bad("prompt is empty: give the text to continue.", "prompt")
    prompt = valid_text(prompt)
    try:
        limits.check_text("prompt", prompt)
    except ParamError as e:
        raise _bad(str(e), "prompt") from e
    return prompt


async def _unless_gone(request: Request, completion: "Completion") -> dict[str, Any]:
    """The whole completion, cancelled if the client goes away before it is ready."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        completion.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await anyio.to_thread.run_sync(completion.whole, abandon_on_cancel=True)
    finally:
        watcher.cancel()
        completion.cancel()  # a no-op once they ended; stops them if this task was cancelled


async def _read(request: Request, kind: type[SamplingRequest] = ChatRequest) -> Any:
    try:
        data = await request.json()
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad(f"The request body is not valid JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(data, dict):
        raise _bad(f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        problems = [(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise _bad("Invalid request: " + "; ".join(f"{loc}: {msg}" for loc, msg in problems[:5]),
                   problems[0][0] if problems else None) from e


def owner(request: Request, user: str | None) -> str:
    """Whose cache a request may reuse: the caller the door identified (an API key, a login, or
    the client's address when the API is open); `user` only separates conversations within it."""
    identity = getattr(request.state, "confab_identity", None) or "local"
    return f"api|{identity}|{user or ''}"


_END = object()  # a reply's events are over
# Threads that read streamed replies for the event loop (Completion._merged): one per choice being
# streamed. Past this many, a stream waits for a free one before its first token; the replies
# behind it in the engine's line wait anyway, and the page's own threads are never taken.
STREAM_THREADS = 64


class DaemonPool:
    """At most `size` daemon threads running submitted calls, the rest waiting their turn.
    (concurrent.futures' and anyio's workers are not daemons: Python's exit waits for them, so a
    stream still being read would hold a stopped server open until its reply ended.)"""

    def __init__(self, size: int, name: str) -> None:
        self.size, self.name = size, name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # threads started; threads waiting with no job claimed for them; jobs waiting for a thread
        self._threads = self._free = self._queued = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._free:
                self._free -= 1  # claimed: that thread takes this job
            elif self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
            else:
                self._queued += 1  # the next thread to finish takes it
        self._jobs.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure is its own; the thread serves the next
                log.exception("%s job failed", self.name)
            with self._lock:
                if self._queued:
                    self._queued -= 1
                else:
                    self._free += 1


PUMPS = DaemonPool(STREAM_THREADS, "api-stream")


class Completion:
    """One chat completion over its `Reply`s (one per choice, `n`): streamed as SSE events or
    collected whole."""

    _object, _chunk_kind = "chat.completion", "chat.completion.chunk"

    def __init__(self, replies: list[Reply], model: str) -> None:
        self.replies, self.model = replies, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.with_logprobs = replies[0].params.logprobs is not None

    def cancel(self) -> None:
        for reply in self.replies:
            reply.cancel()

    @staticmethod
    def _ended(reply: Reply) -> Reply:
        """The ended reply, or the API error it ended with."""
        if reply.error is not None:
            raise _status_for(reply.error)
        if reply.stop_reason:  # stopped by the server (a model swap), not by this client: not a whole answer
            raise ApiError(503, reply.stop_reason, "server_error")
        return reply

    def _all_ended(self) -> list[Reply]:
        """Every choice read to its end, at the same time (a reply runs only while it is read)."""
        if len(self.replies) == 1:
            return [self._ended(self.replies[0].wait())]
        with concurrent.futures.ThreadPoolExecutor(len(self.replies)) as pool:
            try:
                return [self._ended(r) for r in pool.map(Reply.wait, self.replies)]
            except ApiError:
                self.cancel()  # one choice failed: the others stop now rather than write for nobody
                raise

    def whole(self) -> dict[str, Any]:
        replies = self._all_ended()
        return {"id": self.id, "object": self._object, "created": self.created, "model": self.model,
                "choices": [self._choice(i, r) for i, r in enumerate(replies)], "usage": _usage_of(replies)}

    def _choice(self, index: int, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.reasoning:  # as vLLM and llama.cpp's server give it: beside the answer, never in it
            message["reasoning_content"] = reply.reasoning
        if reply.calls:
            message.update(content=reply.text or None, tool_calls=[_call_json(c) for c in reply.calls])
        return {"index": index, "message": message, "finish_reason": _finish(reply.finish_reason),
                "logprobs": self._logprobs(index, reply.logprobs)}

    def _logprobs(self, index: int, tokens: Any) -> dict[str, Any] | None:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        if not self.with_logprobs:
            return None
        return {"content": [{**_token(t.token, t.logprob),
                             "top_logprobs": [_token(b, lp) for b, lp in t.top]} for t in tokens]}

    def _opening(self, index: int) -> list[str]:
        return [self._event({"role": "assistant", "content": ""}, index=index)]

    def _piece(self, event: Any, index: int) -> str | None:
        if isinstance(event, Text):
            return self._event({"content": event.text}, index=index, logprobs=self._logprobs(index, event.logprobs))
        if isinstance(event, Thinking):
            return self._event({"reasoning_content": event.text}, index=index)
        return None

    def _ending(self, reply: Reply, index: int) -> list[str]:
        calls = [self._event({"tool_calls": [{"index": i, **_call_json(c)} for i, c in enumerate(reply.calls)]},
                             index=index)]
        return [*(calls if reply.calls else []), self._event({}, finish=_finish(reply.finish_reason), index=index)]

    def _event(self, delta: Any, finish: str | None = None, index: int = 0, logprobs: Any = None) -> str:
        return _sse({"id": self.id, "object": self._chunk_kind, "created": self.created, "model": self.model,
                     "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    async def _merged(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice, event) as the replies give them, and (choice, _END) when one is over. A reply
        blocks between tokens, so each is read by a pump thread that hands its events to the
        event loop. (One `to_thread` call per token cost the loop ~0.4 ms of CPU a token, which
        on a 2-core machine is taken from the decoding threads.) A client that goes away closes
        this generator, and `events` cancels the replies, which ends their pumps within 100 ms."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def hand_over(item: tuple[int, Any]) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop has closed (the server is stopping): nobody reads
                pass

        def pump(index: int, reply: Reply) -> None:
            try:
                for event in reply:
                    hand_over((index, event))
            except Exception as e:  # noqa: BLE001 - a bug below: raised on the loop, as a direct read would
                hand_over((index, e))
            else:
                hand_over((index, _END))

        for index, reply in enumerate(self.replies):
            PUMPS.submit(pump, index, reply)
        left = len(self.replies)
        while left:
            item = await out.get()
            if isinstance(item[1], Exception):
                raise item[1]
            left -= item[1] is _END
            yield item

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            for index in range(len(self.replies)):
                for opening in self._opening(index):
                    yield opening
            async for index, event in self._merged():
                if event is not _END:
                    piece = self._piece(event, index)
                    if piece is not None:
                        yield piece
                    continue
                try:
                    reply = self._ended(self.replies[index])
                except ApiError as error:  # the stream ends here; `finally` stops the other choices
                    yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.status}})
                    break
                for ending in self._ending(reply, index):
                    yield ending
            else:
                if include_usage:
                    yield _sse({"id": self.id, "object": self._chunk_kind, "created": self.created,
                                "model": self.model, "choices": [], "usage": _usage_of(self.replies)})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a no-op once they ended; stops the engine for a client that went away


class TextCompletion(Completion):
    """One text completion (POST /v1/completions): the model's text as it came, after the prompt
    when `echo` is given."""

    _object = _chunk_kind = "text_completion"

    def __init__(self, replies: list[Reply], model: str, echo: str = "") -> None:
        super().__init__(replies, model)
        self.id, self.echo = f"cmpl-{uuid.uuid4().hex}", echo
        self._offsets = [len(echo)] * len(replies)  # where each choice's next token starts in its text

    def _choice(self, index: int, reply: Reply) -> dict[str, Any]:
        return {"index": index, "text": self.echo + reply.text, "logprobs": self._logprobs(index, reply.logprobs),
                "finish_reason": _finish(reply.finish_reason)}

    def _logprobs(self, index: int, tokens: Any) -> dict[str, Any] | None:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs and text_offset, in lists."""
        if not self.with_logprobs:
            return None
        texts = [_text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{_text(b): lp for b, lp in t.top} for t in tokens], "text_offset": offsets}

    def _opening(self, index: int) -> list[str]:
        return [self._event(self.echo, index=index)] if self.echo else []

    def _piece(self, event: Any, index: int) -> str | None:
        if not isinstance(event, Text):
            return None
        return self._event(event.text, index=index, logprobs=self._logprobs(index, event.logprobs))

    def _ending(self, reply: Reply, index: int) -> list[str]:
        return [self._event("", finish=_finish(reply.finish_reason), index=index)]

    def _event(self, text: Any, finish: str | None = None, index: int = 0, logprobs: Any = None) -> str:
        return _sse({"id": self.id, "object": self._chunk_kind, "created": self.created, "model": self.model,
                     "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")  # part of a character shows as U+FFFD; `bytes` has it whole


def _token(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(token), "logprob": logprob, "bytes": list(token)}


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish(reason: str | None) -> str:
    return reason if reason in ("length", "tool_calls") else "stop"


def _usage_of(replies: list[Reply]) -> dict[str, Any]:
    """One request's usage: its prompt once (every choice reads the same), every choice's tokens."""
    first = replies[0].usage or Usage()
    return _usage(Usage(prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                        completion_tokens=sum((r.usage or Usage()).completion_tokens for r in replies)))


def _usage(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _status_for(error: BackendError) -> ApiError:
    if isinstance(error, ParamError):
        return ApiError(400, str(error), "invalid_request_error")
    if isinstance(error, ContextOverflow):
        return ApiError(400, str(error), "invalid_request_error", "messages")
    # No model, a full cache, an engine or upstream server that failed: the server's trouble, not the
    # request's, and worth a retry. The message is the public one; the detail went to the log.
    return ApiError(503, str(error), "server_error")
