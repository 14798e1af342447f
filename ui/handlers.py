"""Gradio event handlers: plain (generator) functions over the manager, no layout.

Per-user state arrives as arguments (the chat, the system prompt, the sliders) and leaves as
return values; nothing per user is kept here. `BackendError` becomes `gr.Error` in `_shown`,
the one place that does it.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from backends import names as backend_names
from backends.base import BackendError, GenerationParams, ModelSpec, Usage
from backends.hub import cached_models
from backends.locate import guess_backend
from backends.manager import ModelManager
from backends.tools import Tool, Toolset, ToolStep, pick, stream_with_tools

from .chat import (
    PARAM_FIELDS,
    clean_history,
    export_json,
    flatten,
    format_status,
    import_json,
    params_from_ui,
    step_message,
    to_messages,
    ui_values,
)

log = logging.getLogger(__name__)
CUSTOM = "__custom__"
FRAME_S = 0.04  # shortest time between two streamed updates of the page (25 per second)


def _shown(fn: Callable) -> Callable:
    """Turn errors into messages in the page; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not look like a crash to the user
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The server is still running.") from e

    return wrapper


def _saved(history: list[dict], system: str) -> dict[str, Any]:
    return {"messages": clean_history(history), "system": system or ""}


class Handlers:
    def __init__(
        self,
        manager: ModelManager,
        presets: dict[str, ModelSpec],
        sampling_presets: dict[str, dict[str, Any]],
        tools: dict[str, Tool] | None = None,
    ) -> None:
        self.manager = manager
        self.presets = presets
        self.sampling_presets = sampling_presets
        self.tools = tools or {}  # every tool in the tools folder; a preset switches some on

    # ---- replies -------------------------------------------------------------------------
    def respond(
        self,
        message: str,
        history: list[dict],
        system_prompt: str,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        max_new_tokens: int,
        repetition_penalty: float,
        do_sample: bool,
        seed: int,
        stop: str,
        use_tools: bool = True,
        request: gr.Request = None,
    ) -> Iterator[tuple]:
        """Send: show the user's message at once, then stream the reply. Outputs: input, chat, status, saved."""
        values = dict(zip(PARAM_FIELDS, (temperature, top_p, top_k, min_p, max_new_tokens,
                                         repetition_penalty, do_sample, seed, stop)))
        text = (message or "").strip()
        if not text:
            gr.Warning("Type a message first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        params = self._params(values)
        history = clean_history(history) + [{"role": "user", "content": text}]
        yield from self._reply(history, system_prompt, params, _session(request), self._toolset(use_tools),
                               clear_input=True)

    # Gradio fills annotated Request/EditData parameters only before a *args, hence their place.
    # `values` is the sampling controls in PARAM_FIELDS order, then the "Use tools" box.
    def regenerate(self, request: gr.Request, history: list[dict], system_prompt: str, *values: Any):
        history = clean_history(history)
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            gr.Warning("There is no message to answer yet.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        params, toolset = self._controls(values)
        yield from self._reply(history, system_prompt, params, _session(request), toolset)

    def edit(self, request: gr.Request, edit: gr.EditData, history: list[dict], system_prompt: str, *values: Any):
        """A user message was edited in place: drop what followed it and answer again."""
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        history = clean_history(history[:index]) + [{"role": "user", "content": flatten(edit.value)}]
        params, toolset = self._controls(values)
        yield from self._reply(history, system_prompt, params, _session(request), toolset)

    def _controls(self, values: tuple) -> tuple[GenerationParams, Toolset]:
        n = len(PARAM_FIELDS)
        use_tools = bool(values[n]) if len(values) > n else True
        return self._params(dict(zip(PARAM_FIELDS, values[:n]))), self._toolset(use_tools)

    def _toolset(self, use_tools: bool) -> Toolset:
        """The loaded preset's tools, unless the user switched tools off."""
        spec = self.manager.spec
        if not use_tools or spec is None or not spec.tools:
            return Toolset()
        try:
            return Toolset(pick(self.tools, spec.tools, "tools in the tools folder"))
        except BackendError as e:
            raise gr.Error(f"{spec.name}: {e}", print_exception=False) from e

    def tools_label(self) -> dict[str, Any]:
        """The "Use tools" box's label and state for the loaded preset's tools."""
        names = self.manager.spec.tools if self.manager.spec else ()
        if not names:
            return {"label": "Use tools (the loaded model has none)", "interactive": False}
        return {"label": f"Use tools: {', '.join(names)}", "interactive": True}

    def tools_box(self) -> gr.Checkbox:
        return gr.Checkbox(**self.tools_label())

    def _params(self, values: dict[str, Any]) -> GenerationParams:
        try:
            return params_from_ui(values, base=self.manager.default_params())
        except BackendError as e:
            raise gr.Error(f"{e} Fix it in the Sampling panel.", print_exception=False) from e

    def _reply(self, history, system_prompt, params, session, toolset: Toolset, clear_input=False) -> Iterator[tuple]:
        """Stream into a new assistant message; each tool call becomes a collapsible step.
        Yields (input, chat, status, saved)."""
        reply = {"role": "assistant", "content": ""}
        shown = history + [reply]
        saved = _saved(history, system_prompt)
        yield ("" if clear_input else gr.skip()), shown, "Thinking…", saved
        usage: Usage | None = None
        last_frame = 0.0
        stream = functools.partial(self.manager.stream, session_id=session)
        events = stream_with_tools(stream, to_messages(history, system_prompt), params, toolset,
                                   takes_tools=self.manager.takes_tools())
        try:
            for chunk in events:
                if isinstance(chunk, ToolStep):
                    if not reply["content"].strip():
                        shown.remove(reply)
                    reply = {"role": "assistant", "content": ""}
                    shown += [step_message(chunk), reply]
                    yield gr.skip(), shown, f"Used {chunk.call.name}…", gr.skip()
                    continue
                if chunk.waiting is not None:
                    ahead = "1 reply" if chunk.waiting == 1 else f"{chunk.waiting} replies"
                    yield gr.skip(), gr.skip(), f"Waiting for the model: {ahead} ahead of yours…", gr.skip()
                if chunk.text:
                    reply["content"] += chunk.text
                    # At most one page update per frame: each update re-sends the chat and costs
                    # the server CPU the engine needs (measured: 5% of decode speed on 2 cores).
                    now = time.monotonic()
                    if now - last_frame >= FRAME_S:
                        last_frame = now
                        yield gr.skip(), shown, gr.skip(), gr.skip()
                if chunk.usage is not None:
                    usage = chunk.usage
        except BackendError as e:
            keep = [m for m in shown if m is not reply or reply["content"]]
            yield gr.skip(), keep, format_status(self.manager.describe(), note="the last reply failed"), _saved(
                keep, system_prompt
            )
            raise gr.Error(str(e), print_exception=False) from e
        finally:
            events.close()
        if not reply["content"] and len(shown) > len(history) + 1:
            shown.remove(reply)  # the reply ended with a tool step and no text after it
        status = format_status(self.manager.describe(), usage)
        yield gr.skip(), shown, status, _saved(shown, system_prompt)

    # ---- editing the conversation ---------------------------------------------------------
    @staticmethod
    def undo(history: list[dict], system_prompt: str):
        """Remove the last exchange and put its message back in the input box."""
        history = clean_history(history)
        while history and history[-1]["role"] == "assistant":
            history.pop()
        text = history.pop()["content"] if history else ""
        return text, history, _saved(history, system_prompt)

    @staticmethod
    def clear(system_prompt: str):
        return "", [], _saved([], system_prompt)

    @staticmethod
    def restore(saved: dict | None):
        saved = saved or {}
        messages = saved.get("messages") if isinstance(saved.get("messages"), list) else []
        return clean_history(messages), saved.get("system", "") if isinstance(saved.get("system"), str) else ""

    @staticmethod
    def save(history: list[dict], system_prompt: str):
        return _saved(history, system_prompt)

    @staticmethod
    @_shown
    def export_chat(history: list[dict], system_prompt: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(tempfile.mkdtemp(prefix="confab-"))
        path = folder / f"confab-chat-{stamp}.json"
        path.write_text(export_json(history, system_prompt), encoding="utf-8")
        return str(path)

    @staticmethod
    @_shown
    def import_chat(file: str | None):
        if not file:
            raise gr.Error("Choose a .json file to import.")
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise gr.Error(f"Could not read that file ({e}). Import a UTF-8 .json file.") from e
        history, system = import_json(text)
        gr.Info(f"Imported {len(history)} messages.")
        return history, system, _saved(history, system)

    # ---- models and settings --------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(spec.name, key) for key, spec in self.presets.items()] + [("Custom (path or hub id below)", CUSTOM)]

    def spec_for(self, choice: str, custom: str, backend: str) -> ModelSpec:
        if custom and custom.strip():
            return custom_spec(custom.strip(), backend)
        if choice in self.presets:
            return self.presets[choice]
        raise BackendError("Choose a preset, or type a hub id, folder or .gguf path in the box below it.")

    def load_model(self, choice: str, custom: str, backend: str, progress=gr.Progress(track_tqdm=True)):
        """Load: outputs status, then the sampling controls reset to the preset's defaults."""
        try:
            spec = self.spec_for(choice, custom, backend)
            info = self.manager.load(spec, progress=lambda f, d: progress(f, desc=d))
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        gr.Info(f"Loaded {spec.name} in {info.get('load_s', 0):.1f} s.")
        return [format_status(info), *ui_values(spec.default_params), self.tools_box()]

    @_shown
    def unload_model(self) -> str:
        self.manager.unload()
        return format_status(self.manager.describe(), note="model unloaded")

    def status(self) -> str:
        return format_status(self.manager.describe())

    def apply_sampling_preset(self, name: str) -> list[Any]:
        overlay = self.sampling_presets.get(name, {})
        return ui_values(GenerationParams.from_dict(overlay, base=self.manager.default_params()))

    @staticmethod
    def backend_names() -> list[str]:
        return backend_names()

    @staticmethod
    def cached_models() -> gr.Dropdown:
        return gr.Dropdown(choices=cached_models())

    @staticmethod
    def pick_cached(repo: str | None, backend: str):
        """A downloaded model was picked: put it in the model box with a backend that loads it."""
        if not repo:
            return gr.skip(), gr.skip()
        return repo, "llamacpp" if repo.lower().endswith(".gguf") else backend


def custom_spec(text: str, backend: str | None) -> ModelSpec:
    """What the model box holds -> a ModelSpec. A URL means a remote OpenAI-compatible server."""
    if text.startswith(("http://", "https://")):
        url = text.rstrip("/")
        return ModelSpec(name=url, backend="openai", model="auto",
                         base_url=url if url.endswith("/v1") else url + "/v1")
    if backend in ("openai", None, ""):
        backend = guess_backend(text)
    return ModelSpec(name=Path(text).name or text, backend=backend, model=text)


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)
