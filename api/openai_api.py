"""The OpenAI-compatible HTTP API, served on the same server as the page.

GET /v1/models and POST /v1/chat/completions (streamed as server-sent events, or whole), over
the same `ModelManager.stream` as the UI. Errors use OpenAI's error shape and status codes:
400 bad parameters (naming the field), 404 unknown model, 503 no model loaded or the engine
failed. Who may call it (401) and how big a body may be (413) is the door's business
(web/door.py), which also tells each route who the caller is: cached tokens are reused only
within one caller, whatever `user` says. A client that goes away closes the reply's generator,
which stops the engine. Knows HTTP, not Gradio or engines.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Iterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from backends.base import BackendError, Chunk, ContextOverflow, GenerationParams, Message, NotLoaded, ParamError, Usage
from backends.manager import ModelManager
from web.policy import Limits


class ChatRequest(BaseModel):
    # OpenAI clients send many optional fields; the ones Confab has no use for are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str = ""
    messages: list[Any]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


def _content(value: Any, index: int) -> str:
    where = f"messages[{index}].content"
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if not isinstance(value, list):
        raise _bad(f"{where} must be a string or a list of content parts, got {type(value).__name__}.", where)
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise _bad(f"{where}[{j}] must be an object such as {{\"type\": \"text\", \"text\": \"...\"}}.",
                       f"{where}[{j}]")
        kind = part.get("type")
        if kind != "text":
            raise _bad(f"{where}[{j}] is of type {kind!r}; this model takes text parts only.", f"{where}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}].text must be a string.", f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def to_messages(raw: list[Any], limits: Limits) -> list[Message]:
    if not raw:
        raise _bad("messages must hold at least one message.", "messages")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = item.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        try:
            out.append(Message(role, _content(item.get("content"), i)))
        except ParamError as e:
            raise _bad(f"messages[{i}]: {e}", f"messages[{i}].role") from e
    if out[-1].role not in ("user", "tool"):
        raise _bad(f"The last message is from the {out[-1].role}; it must be the user's (or a tool's) for the model "
                   "to answer it.", f"messages[{len(out) - 1}].role")
    try:
        limits.check_texts([(f"messages[{i}]", m.content) for i, m in enumerate(out)])
    except ParamError as e:
        raise _bad(str(e), "messages") from e
    return out


def _bad(message: str, param: str | None = None) -> "ApiError":
    return ApiError(400, message, "invalid_request_error", param)


def to_params(req: ChatRequest, base: GenerationParams, limits: Limits) -> GenerationParams:
    if req.n != 1:
        raise _bad("Only n=1 is supported: ask again for another answer.", "n")
    if (req.model_extra or {}).get("tools"):
        # Answering as if the tools were not there would look like a model that ignores them.
        raise _bad("This API does not take client-side tools (tools=) yet. Leave tools out, or switch on "
                   "server-side tools in the model's preset (tools = [...]) and use the page.", "tools")
    changes: dict[str, Any] = {
        "max_new_tokens": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty, "seed": req.seed, "stop": req.stop,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0  # OpenAI's temperature 0 means greedy
    try:
        params = GenerationParams.from_dict(changes, base=base)
        limits.check_params(params)
    except ParamError as e:
        raise _bad(str(e)) from e
    return params


def build_router(manager: ModelManager, model_id: Any, limits: Limits | None = None) -> APIRouter:
    """`model_id()` names the loaded model (its preset key) for /v1/models and the `model` field."""
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

    @router.get("/models")
    def models() -> Any:
        try:
            if not manager.loaded:
                return {"object": "list", "data": []}
            info = manager.describe()
            return {"object": "list", "data": [{
                "id": loaded_id(None), "object": "model", "created": 0, "owned_by": "confab",
                "backend": info.get("backend"), "max_model_len": info.get("n_ctx"),
            }]}
        except ApiError as e:
            return e.response()

    @router.post("/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            req = await _read(request)
            name = loaded_id(req.model)
            messages, params = to_messages(req.messages, limits), to_params(req, limits.clamp(manager.default_params()), limits)
        except ApiError as e:
            return e.response()
        reply = Reply(manager, name, messages, params, owner(request, req.user))
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.events(include_usage), media_type="text/event-stream")
        try:
            return await run_in_threadpool(reply.whole)
        except ApiError as e:
            return e.response()

    return router


async def _read(request: Request) -> ChatRequest:
    try:
        data = await request.json()
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad(f"The request body is not valid JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(data, dict):
        raise _bad(f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        problems = [(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise _bad("Invalid request: " + "; ".join(f"{loc}: {msg}" for loc, msg in problems[:5]),
                   problems[0][0] if problems else None) from e


def owner(request: Request, user: str | None) -> str:
    """Whose cache a request may reuse: the caller the door identified (an API key, a login, or
    the client's address when the API is open); `user` only separates conversations within it."""
    identity = getattr(request.state, "confab_identity", None) or "local"
    return f"api|{identity}|{user or ''}"


class Reply:
    """One chat completion: streamed as SSE events or collected whole."""

    def __init__(self, manager: ModelManager, model: str, messages: list[Message], params: GenerationParams,
                 session: str | None) -> None:
        self.manager, self.model, self.messages, self.params, self.session = manager, model, messages, params, session
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _chunks(self) -> Iterator[Chunk]:
        return (c for c in self.manager.stream(self.messages, self.params, self.session) if c.waiting is None)

    def whole(self) -> dict[str, Any]:
        text, last = [], Chunk()
        try:
            for chunk in self._chunks():
                text.append(chunk.text)
                last = chunk
        except BackendError as e:
            raise _status_for(e) from e
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": _finish(last.finish_reason)}],
            "usage": _usage(last.usage),
        }

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        stream = self._chunks()
        done = object()
        try:
            yield self._event({"role": "assistant", "content": ""})
            while True:
                # The engine's iterator blocks between tokens: pull it in a worker thread.
                chunk = await run_in_threadpool(next, stream, done)
                if chunk is done:
                    break
                if chunk.text:
                    yield self._event({"content": chunk.text})
                if chunk.finish_reason:
                    yield self._event({}, finish=_finish(chunk.finish_reason))
                    if include_usage:
                        yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.model, "choices": [], "usage": _usage(chunk.usage)})
            yield "data: [DONE]\n\n"
        except BackendError as e:
            error = _status_for(e)
            yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.status}})
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away ends up here too, in a cancelled task: shield the clean-up so
            # it runs, and stop the engine. (The worker thread's next() has returned by now: anyio
            # waits for a thread call to finish before the cancellation takes effect.)
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(stream.close)

    def _event(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


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
