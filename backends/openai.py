"""Remote engines over the OpenAI-compatible API: lmdeploy api_server, vLLM, TGI, llama.cpp
server, Ollama — and servers Confab starts itself (`[server]` in a preset, or lmdeploy-server).

Streams /v1/chat/completions through the official `openai` client; closing the stream closes
the HTTP response, which is how these servers learn to abort. The server applies the chat
template, unless the preset names one (`chat_template`): then Confab renders the prompt and
uses /v1/completions. Thinking a server sends apart (`reasoning_content`) comes back inline
as `<think>…</think>`, as a local model writes it. Knows HTTP and the OpenAI wire format, not Gradio.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Iterator

from . import register
from .base import BackendError, Cancel, GenerationParams, Message, ModelSpec, ProgressFn, Usage
from .prompting import EngineTemplated
from .server import ManagedServer, free_port
from .templates import ChatTemplate, render_text, resolve, template_context

log = logging.getLogger(__name__)


def _import_client() -> Any:
    try:
        import openai
    except ImportError as e:
        raise BackendError("Remote engines need the openai package: pip install openai") from e
    return openai


@register("openai")
class OpenAIBackend(EngineTemplated):
    max_concurrent = 64  # the server schedules and batches; Confab just keeps the streams apart
    features = frozenset({"raw"})  # a raw prompt goes to the server's /v1/completions
    def __init__(self) -> None:
        self.client: Any = None
        self.spec: ModelSpec | None = None
        self.server: ManagedServer | None = None
        self.base_url = ""
        self.model_name = ""
        self.template: ChatTemplate | None = None  # set: render here, send to /v1/completions
        self.n_ctx = 0

    # ---- connecting ----------------------------------------------------------------------
    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        openai = _import_client()
        import httpx

        self.spec = spec
        self.template = resolve(spec.chat_template) if spec.chat_template else None
        self.base_url = (spec.base_url or "").rstrip("/")
        command = self.server_command(spec)
        if command:
            port = int(spec.server.get("port") or free_port())
            self.base_url = self.base_url or f"http://127.0.0.1:{port}/v1"
            host = str(spec.server.get("host") or "127.0.0.1")
            command = [str(c).format(port=port, model=spec.model, host=host) for c in command]
            self.server = ManagedServer(command, self.base_url, float(spec.server.get("ready_timeout", 600)))
            self.server.start(progress)
        if not self.base_url:
            raise BackendError(
                f"{spec.name}: a remote engine needs base_url, e.g. http://127.0.0.1:23333/v1 for lmdeploy "
                "api_server or http://127.0.0.1:8000/v1 for vLLM."
            )
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=spec.api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=httpx.Timeout(spec.timeout_s, connect=10.0),
            max_retries=0,
        )
        progress and progress(0.95, f"Asking {self.base_url} for its models")
        try:
            self.model_name, self.n_ctx = self._discover(spec)
        except BackendError:
            self.unload()
            raise

    def server_command(self, spec: ModelSpec) -> list[str] | None:
        return list(spec.server["command"]) if spec.server.get("command") else None

    def _discover(self, spec: ModelSpec) -> tuple[str, int]:
        """The served model's name (the first one when the preset says "auto") and context size."""
        with self._errors():
            models = list(self.client.models.list())
        names = [m.id for m in models]
        if not names:
            raise BackendError(f"The engine at {self.base_url} serves no model yet.")
        wanted = spec.model if spec.model not in ("", "auto") else names[0]
        if wanted not in names:
            raise BackendError(
                f"The engine at {self.base_url} does not serve {wanted!r}; it serves: {', '.join(names)}. "
                "Set model to one of these (or to \"auto\")."
            )
        card = next(m for m in models if m.id == wanted)
        n_ctx = spec.n_ctx or int((card.model_extra or {}).get("max_model_len") or 0)
        return wanted, n_ctx

    def unload(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---- replies -------------------------------------------------------------------------
    def _loaded(self) -> bool:
        return self.client is not None

    def _deltas(
        self, messages: list[Message], params: GenerationParams, usage: Usage, session_id: str | None,
        cancel: Cancel,
    ) -> Iterator[tuple[str, int]]:
        # No `user` field: session ids must stay secret (Gradio's queue is keyed by them), and the
        # server would gain nothing from them that Confab could vouch for.
        request = self._request(messages, params)
        chat = self.template is None and not params.raw
        with self._errors():
            if chat:
                stream = self.client.chat.completions.create(**request)
            else:
                request.pop("messages")
                request["prompt"] = messages[-1].content if params.raw else render_text(
                    self.template, messages, **template_context(thinking=params.thinking))
                request.get("extra_body", {}).pop("chat_template_kwargs", None)
                stream = self.client.completions.create(**request)
        n, finished, thinking = 0, False, False
        # A cancel closes the HTTP response from whichever thread sets it: the read blocked in this
        # one fails at once (and the server aborts the request), instead of waiting for a token.
        unhook = cancel.on_set(stream.close)
        try:
            with self._errors(cancel):
                for event in stream:
                    if event.usage:
                        # The server's cached-token count is left out: its prefix cache is shared by
                        # every user, so the count could tell one user about another's prompts.
                        usage.prompt_tokens = event.usage.prompt_tokens or 0
                        n = event.usage.completion_tokens or n
                    for choice in event.choices or ():
                        finished = finished or bool(choice.finish_reason)
                        if chat:
                            text, thinking = inline_reasoning(choice.delta, thinking)
                        else:
                            text = choice.text or ""
                        if text:
                            n += 1
                            yield text, n
            if cancel.is_set():
                return
            if not finished:
                raise BackendError(
                    "The model server ended the reply without finishing it; it probably failed. A conversation "
                    "longer than its context does this: clear or shorten the chat.",
                    detail=f"{self.base_url}: see the engine's log",
                )
            yield "", n  # the server's own count, from its usage report, when it sent one
        finally:
            unhook()
            stream.close()  # closing the HTTP response aborts the request on the server

    def _request(self, messages: list[Message], params: GenerationParams) -> dict[str, Any]:
        greedy = params.greedy
        extra: dict[str, Any] = {
            "top_k": 1 if greedy else params.top_k,
            "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty,  # lmdeploy, vLLM, TGI
            "repeat_penalty": params.repetition_penalty,  # llama.cpp server, Ollama
        }
        thinking = params.thinking
        if self.template is None and messages and messages[-1].role == "assistant":
            # Continue that message: vLLM needs telling; llama.cpp's server continues a final
            # assistant message by itself (ignoring these) but refuses to with thinking on. A
            # continued answer is past its thinking anyway. Other servers ignore unknown fields.
            extra.update(continue_final_message=True, add_generation_prompt=False)
            thinking = False
        if thinking is not None:  # vLLM, llama.cpp server, SGLang, lmdeploy: into the chat template
            extra["chat_template_kwargs"] = {"enable_thinking": thinking}
        return {
            "model": self.model_name,
            "messages": messages if self.template else [m.to_dict() for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": 1.0 if greedy else params.top_p,
            "seed": params.seed,
            "stop": list(params.stop) or None,
            "extra_body": extra,
        }

    def _errors(self, cancel: Cancel | None = None) -> "_OpenAIErrors":
        return _OpenAIErrors(self.base_url, self.model_name or (self.spec.model if self.spec else ""),
                             self.spec.timeout_s if self.spec else 0, cancel)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_name,
            "device": f"remote {self.base_url}" + (" (started by Confab)" if self.server else ""),
            "n_ctx": self.n_ctx,
        }


def inline_reasoning(delta: Any, thinking: bool) -> tuple[str, bool]:
    """A delta's text, with the thinking a server sends apart (`reasoning_content` from vLLM and
    llama.cpp's server, `reasoning` from newer vLLM) written back inline as `<think>…</think>`,
    so the chat layer reads every engine's thinking one way. Returns the text and whether a
    `<think>` is open after it."""
    thought = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None) or ""
    text = delta.content or ""
    out = ""
    if thought:
        out, thinking = ("" if thinking else "<think>") + thought, True
    if text and thinking:
        out, thinking = out + "</think>", False
    return out + text, thinking


class _OpenAIErrors:
    """Turns the openai client's exceptions into messages a person can act on."""

    def __init__(self, url: str, model: str, timeout: float, cancel: Cancel | None = None) -> None:
        self.url, self.model, self.timeout, self.cancel = url, model, timeout, cancel

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, (BackendError, GeneratorExit)):
            return False
        if self.cancel is not None and self.cancel.is_set() and isinstance(error, Exception):
            return True  # the read failed because the cancel closed the response: a stop, not an error
        openai = _import_client()
        # Most specific first: AuthenticationError and NotFoundError are APIStatusErrors too. What a
        # person chatting sees names no address and no upstream body; the operator gets both.
        url = self.url
        status = getattr(error, "status_code", "?")
        advice = [
            (openai.APITimeoutError, f"The model server did not answer within {self.timeout:.0f} s. It may be busy "
                                     "or stuck; try again.", f"{url}; raise timeout_s in the preset to wait longer"),
            (openai.APIConnectionError, "Cannot reach the model server. Try again in a moment.",
             f"{url}: is the server running, and is the address right?"),
            (openai.AuthenticationError, "The model server refused Confab's API key (401).",
             f"{url}: set api_key in the preset or OPENAI_API_KEY"),
            (openai.NotFoundError, f"The model server answered 404 for model {self.model!r}.",
             f"{url}: the model name or the URL is wrong (the URL usually ends in /v1)"),
            (openai.APIStatusError, f"The model server refused the request ({status}).", f"{url}: {_detail(error)}"),
        ]
        for kind, text, detail in advice:
            if isinstance(error, kind):
                log.warning("remote engine error: %s (%s)", text, detail)
                raise BackendError(text, detail=detail) from error
        return False


def _detail(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)
        return str(body.get("detail") or body.get("message") or inner)
    return str(getattr(error, "message", error))


@register("lmdeploy-server")
class LMDeployServerBackend(OpenAIBackend):
    """Starts `lmdeploy serve api_server` for the preset's model, then talks to it over HTTP."""

    def server_command(self, spec: ModelSpec) -> list[str] | None:
        if spec.server.get("command"):
            return list(spec.server["command"])
        if shutil.which("lmdeploy") is None:
            raise BackendError(
                "LMDeploy is not installed here: on a machine with an NVIDIA GPU, run "
                "pip install -r requirements-lmdeploy.txt (see the README's LMDeploy section)."
            )
        return lmdeploy_server_command(spec)


# lmdeploy api_server flags for the preset's [engine] keys that have one.
_SERVER_FLAGS = {
    "tp": "--tp", "cache_max_entry_count": "--cache-max-entry-count", "quant_policy": "--quant-policy",
    "model_format": "--model-format", "max_batch_size": "--max-batch-size", "dtype": "--dtype",
    "device_type": "--device",
}


def lmdeploy_server_command(spec: ModelSpec) -> list[str]:
    engine = dict(spec.engine)
    cmd = ["lmdeploy", "serve", "api_server", spec.model, "--server-name", "{host}", "--server-port", "{port}",
           "--backend", str(engine.pop("backend", "turbomind"))]
    if spec.n_ctx:
        cmd += ["--session-len", str(spec.n_ctx)]
    if engine.pop("enable_prefix_caching", True):
        cmd.append("--enable-prefix-caching")
    for key, value in engine.items():
        if key not in _SERVER_FLAGS:
            raise BackendError(
                f"{spec.name}: engine setting {key!r} has no lmdeploy api_server flag here; "
                f"known: backend, enable_prefix_caching, {', '.join(_SERVER_FLAGS)}."
            )
        cmd += [_SERVER_FLAGS[key], str(value)]
    if spec.trust_remote_code:
        cmd.append("--trust-remote-code")
    if spec.api_key:
        cmd += ["--api-keys", spec.api_key]
    return cmd
