"""The model panel's handlers, and who may use them: load, unload, the status line, what a
visitor sees instead, the watch that tells every page of a model switch. Load and unload are
for operators (web.policy.Access), checked here on the server whatever the page shows.

A base of `ui.handlers.Handlers`, which provides `manager`, `presets`, `sampling_presets`,
`access`, `limits` and `tools_box`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from backends import names as backend_names
from backends.base import BackendError, GenerationParams, ModelSpec, Usage
from backends.hub import cached_models
from backends.locate import guess_backend

from .chat import format_status, ui_values

log = logging.getLogger(__name__)
CUSTOM = "__custom__"
OPERATORS_ONLY = ("Only this server's operator can load or unload models. You can chat with the model that is "
                  "loaded; its name is in the status line.")


class ModelPanel:
    def defaults(self) -> GenerationParams:
        """The loaded model's sampling defaults, within the server's limits."""
        return self.limits.clamp(self.manager.default_params())

    # ---- who is asking --------------------------------------------------------------------
    def is_operator(self, request: gr.Request | None) -> bool:
        return self.access.is_operator(getattr(request, "username", None))

    def _operator(self, request: gr.Request | None, action: str) -> str:
        """The operator's name for the log; a visitor gets a refusal, whatever their page shows."""
        user = getattr(request, "username", None)
        if not self.is_operator(request):
            log.warning("refused %s for %s", action, f"login {user!r}" if user else "a visitor")
            raise gr.Error(OPERATORS_ONLY, print_exception=False)
        return user or "the owner (loopback)"

    def _error(self, error: BackendError, request: gr.Request | None) -> gr.Error:
        """The message a person sees: operators also get the detail (an upstream server's words)."""
        if error.detail:
            log.warning("%s (%s)", error, error.detail)
        text = error.for_operator() if self.is_operator(request) else str(error)
        return gr.Error(text, print_exception=False)

    # ---- models and settings --------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(spec.name, key) for key, spec in self.presets.items()] + [("Custom (path or hub id below)", CUSTOM)]

    def spec_for(self, choice: str, custom: str, backend: str) -> ModelSpec:
        if custom and custom.strip():
            return custom_spec(custom.strip(), backend)
        if choice in self.presets:
            return self.presets[choice]
        raise BackendError("Choose a preset, or type a hub id, folder or .gguf path in the box below it.")

    def load_model(self, choice: str, custom: str, backend: str, request: gr.Request,
                   progress=gr.Progress(track_tqdm=True)):
        """Load (operators only): outputs status, then the sampling controls reset to the preset's defaults.
        A failed load keeps (or loads again) the model there was, and says so."""
        who = self._operator(request, "a model load")
        try:
            spec = self.spec_for(choice, custom, backend)
            log.info("%s loads %s (%s: %s)", who, spec.name, spec.backend, spec.base_url or spec.model)
            info = self.manager.load(spec, progress=lambda f, d: progress(f, desc=d))
        except BackendError as e:
            raise self._error(e, request) from e
        gr.Info(f"Loaded {spec.name} in {info.get('load_s', 0):.1f} s.")
        return [self._status_line(request), *ui_values(self.defaults()), self.tools_box()]

    def unload_model(self, request: gr.Request) -> str:
        who = self._operator(request, "a model unload")
        log.info("%s unloads %s", who, self.manager.spec.name if self.manager.spec else "nothing")
        self.manager.unload()
        return self._status_line(request, note="model unloaded")

    def status(self, request: gr.Request) -> str:
        return self._status_line(request)

    def _status_line(self, request: gr.Request | None, usage: Usage | None = None, note: str = "") -> str:
        info = self.manager.describe()
        if not self.is_operator(request) and str(info.get("device", "")).startswith("remote"):
            # Its address (which may carry a key) is the operator's business: visitors see the name
            # of the model it serves.
            info.update(device="remote server", name=info.get("model") or "remote model")
        return format_status(info, usage, note)

    def watch(self, seen: int | None, request: gr.Request):
        """Every few seconds: if the model changed (another user's load), refresh the status line
        and the tools box. Outputs: the version seen, status, tools box."""
        version = self.manager.version
        if version == seen:
            return gr.skip(), gr.skip(), gr.skip()
        return version, self._status_line(request), self.tools_box()

    def model_panel(self, request: gr.Request):
        """The model panel as this person may use it: operators get the controls; visitors a note
        in their place (the server refuses their loads anyway). Outputs: preset, model box,
        downloaded models, backend, load, unload, note."""
        if self.is_operator(request):
            return (*[gr.skip()] * 6, gr.Markdown(visible=False))
        note = "The model is chosen by this server's operator; its name is in the status line below the chat."
        return (*[gr.update(visible=False)] * 6, gr.Markdown(note, visible=True))

    def apply_sampling_preset(self, name: str) -> list[Any]:
        overlay = self.sampling_presets.get(name, {})
        return ui_values(GenerationParams.from_dict(overlay, base=self.defaults()))

    @staticmethod
    def backend_names() -> list[str]:
        return backend_names()

    def cached_models(self, request: gr.Request) -> gr.Dropdown:
        """What is in the Hugging Face cache, for operators (visitors see nothing of the disk)."""
        return gr.Dropdown(choices=cached_models() if self.is_operator(request) else [])

    def pick_cached(self, repo: str | None, backend: str, request: gr.Request):
        """A downloaded model was picked: put it in the model box with a backend that loads it."""
        if not repo or not self.is_operator(request):
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


