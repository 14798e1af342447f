"""The OpenAI-compatible HTTP API, served on the same server as the page.

GET /v1/models and POST /v1/chat/completions (streamed as server-sent events, or whole), over
the same `ModelManager.stream` as the UI. Errors use OpenAI's error shape and status codes:
400 bad parameters, 401 bad API key, 404 unknown model, 503 no model loaded. A client that goes
away closes the reply's generator, which stops the engine. Knows HTTP, not Gradio or engines.
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


class ChatRequest(BaseModel):
    # OpenAI clients send many optional fields; the ones Confab has no use for are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str = ""
    messages: list[dict[str, Any]]
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
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if value is None:
        return ""
    raise ApiError(400, f"messages[{index}].content must be a string or a list of parts.", "invalid_request_error",
                   f"messages[{index}].content")


def to_messages(raw: list[dict[str, Any]]) -> list[Message]:
    if not raw:
        raise ApiError(400, "messages must hold at least one message.", "invalid_request_error", "messages")
    out = []
    for i, item in enumerate(raw):
        role = item.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        try:
            out.append(Message(role, _content(item.get("content"), i)))
        except ParamError as e:
            raise ApiError(400, f"messages[{i}]: {e}", "invalid_request_error", f"messages[{i}].role") from e
    return out


def to_params(req: ChatRequest, base: GenerationParams) -> GenerationParams:
    if req.n != 1:
        raise ApiError(400, "Only n=1 is supported: ask again for another answer.", "invalid_request_error", "n")
    if (req.model_extra or {}).get("tools"):
        # Answering as if the tools were not there would look like a model that ignores them.
        raise ApiError(400, "This API does not take client-side tools (tools=) yet. Leave tools out, or switch on "
                       "server-side tools in the model's preset (tools = [...]) and use the page.",
                       "invalid_request_error", "tools")
    changes: dict[str, Any] = {
        "max_new_tokens": req.max_completion_tokens or req.max_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty, "seed": req.seed, "stop": req.stop,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0  # OpenAI's temperature 0 means greedy
    try:
        return GenerationParams.from_dict(changes, base=base)
    except ParamError as e:
        raise ApiError(400, str(e), "invalid_request_error") from e


def build_router(manager: ModelManager, model_id: Any, api_key: str | None = None) -> APIRouter:
    """`model_id()` names the loaded model (its preset key) for /v1/models and the `model` field."""
    router = APIRouter(prefix="/v1")

    def check(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' (the --api-key value).",
                           "invalid_api_key")

    def loaded_id(asked: str | None) -> str:
        if not manager.loaded:
            raise ApiError(503, "No model is loaded: load one in the page (or start with --preset).", "server_error")
        name = model_id()
        if asked and asked not in (name, manager.spec.name, "default"):
            raise ApiError(404, f"The model {asked!r} is not loaded here; the loaded model is {name!r}.",
                           "invalid_request_error", "model")
        return name

    @router.get("/models")
    def models(request: Request) -> Any:
        try:
            check(request)
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
            check(request)
            try:
                req = ChatRequest.model_validate(await request.json())
            except (ValidationError, ValueError) as e:
                raise ApiError(400, f"The request body is not a valid chat completion request: {e}",
                               "invalid_request_error") from e
            name = loaded_id(req.model)
            messages, params = to_messages(req.messages), to_params(req, manager.default_params())
        except ApiError as e:
            return e.response()
        reply = Reply(manager, name, messages, params, req.user)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.events(include_usage), media_type="text/event-stream")
        try:
            return await run_in_threadpool(reply.whole)
        except ApiError as e:
            return e.response()

    return router


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
    if isinstance(error, NotLoaded):
        return ApiError(503, str(error), "server_error")
    if isinstance(error, ContextOverflow):
        return ApiError(400, str(error), "invalid_request_error", "messages")
    return ApiError(500, str(error), "server_error")
