"""The model panel's handlers, and who may use them: load (with its stages on a progress bar),
unload, the status line, what a visitor sees instead, the watch that tells every page of a model
switch, and what a reply waiting for one is told. Load and unload are for operators
(web.policy.Access), checked here on the server whatever the page shows. Engines that cannot run
on this machine are marked in the lists (`backends.unavailable`).

A base of `ui.handlers.Handlers`, which provides `manager`, `presets`, `sampling_presets`,
`access`, `limits` and `tools_box`.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from backends import names as backend_names, unavailable
from backends.base import BackendError, GenerationParams, ModelSpec, ProgressFn, Usage, Waiting
from backends.hub import cached_models
from backends.locate import EMBEDDED, guess_backend

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
        """(label, key) for the preset list; a preset whose engine cannot run here says why."""
        return [(_marked(spec.name, spec.backend, "{} — {}"), key) for key, spec in self.presets.items()] + \
            [("Custom (path or hub id below)", CUSTOM)]

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
            info = self.manager.load(spec, progress=page_progress(progress))
        except BackendError as e:
            raise self._error(e, request) from e
        gr.Info(f"Loaded {spec.name} with {spec.backend} in {info.get('load_s', 0):.1f} s.")
        return [self._status_line(request), *ui_values(self.defaults()), self.tools_box()]

    def unload_model(self, request: gr.Request) -> str:
        who = self._operator(request, "a model unload")
        log.info("%s unloads %s", who, self.manager.spec.name if self.manager.spec else "nothing")
        self.manager.unload()
        return self._status_line(request, note="model unloaded")

    def status(self, request: gr.Request) -> str:
        return self._status_line(request)

    def _status_line(self, request: gr.Request | None, usage: Usage | None = None, note: str = "") -> str:
        switching = self.manager.switching
        if switching is not None:  # between models, there is no model to describe: say what happens
            return switch_text(*switching) + (f" — {note}" if note else "")
        info = self.manager.describe()
        if not self.is_operator(request) and str(info.get("device", "")).startswith("remote"):
            # Its address (which may carry a key) is the operator's business: visitors see the name
            # of the model it serves.
            info.update(device="remote server", name=info.get("model") or "remote model")
        return format_status(info, usage, note)

    def watch(self, seen: int | str | None, request: gr.Request):
        """Every few seconds: while another user switches the model, say so (and for how long);
        once the model changed, refresh the status line and the tools box. Outputs: what was seen
        (the model's version, or a text while it switches), status, tools box."""
        switching = self.manager.switching
        if switching is not None:
            text = switch_text(*switching)
            return (gr.skip(),) * 3 if text == seen else (text, text, gr.skip())
        version = self.manager.version
        if version == seen:
            return gr.skip(), gr.skip(), gr.skip()
        return version, self._status_line(request), self.tools_box()

    @staticmethod
    def waiting_line(event: Waiting) -> str:
        """The status line of a reply that waits: for the operator's model switch, or in line."""
        if event.loading is not None:
            return switch_text(event.loading, event.waited_s, waiting=True)
        ahead = "1 reply" if event.ahead == 1 else f"{event.ahead} replies"
        return f"Waiting for the model: {ahead} ahead of yours…"

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

    @staticmethod
    def backend_choices() -> list[tuple[str, str]]:
        """(label, name) for the backend list; one that cannot run here says why."""
        return [(_marked(name, name), name) for name in backend_names()]

    def cached_models(self, request: gr.Request) -> gr.Dropdown:
        """What is in the Hugging Face cache, for operators (visitors see nothing of the disk)."""
        return gr.Dropdown(choices=cached_models() if self.is_operator(request) else [])

    def pick_cached(self, repo: str | None, backend: str, request: gr.Request):
        """A downloaded model was picked: put it in the model box (a .gguf goes to llama.cpp
        whatever the backend choice says: see `custom_spec`). Outputs: model box, backend."""
        if not repo or not self.is_operator(request):
            return gr.skip(), gr.skip()
        return repo, gr.skip()


def custom_spec(text: str, backend: str | None) -> ModelSpec:
    """What the model box holds -> a ModelSpec. A URL means a remote OpenAI-compatible server; a
    .gguf file (a path, or a hub repo's file: org/x-GGUF/x.Q4_K_M.gguf, or "embedded") goes to
    llama.cpp whatever the backend choice says: transformers would de-quantize it (a preset can
    still ask for that), and LMDeploy cannot read it."""
    if text.startswith(("http://", "https://")):
        url = text.rstrip("/")
        return ModelSpec(name=url, backend="openai", model="auto",
                         base_url=url if url.endswith("/v1") else url + "/v1")
    if backend in ("openai", None, "") or text == EMBEDDED or text.lower().endswith(".gguf"):
        backend = guess_backend(text)
    return ModelSpec(name=Path(text).name or text, backend=backend, model=text)


def switch_text(loading: str, seconds: float, waiting: bool = False) -> str:
    """What everyone is told while the operator switches the model (`loading` "" is an unload)."""
    if not loading:
        return "The operator is unloading the model…"
    then = "your message will be answered when it is loaded" if waiting else "replies wait until it is loaded"
    return f"The operator is switching the model to {loading}; {then} ({seconds:.0f} s so far)…"


def _marked(label: str, backend: str, form: str = "{} ({})") -> str:
    """`label`, with why its engine cannot run here, if it cannot: "lmdeploy (needs an NVIDIA GPU with CUDA)"."""
    try:
        reason = unavailable(backend)
    except BackendError:  # an unknown backend: loading it says so
        return label
    return form.format(label, reason) if reason else label


def page_progress(progress: Any) -> ProgressFn:
    """A ProgressFn onto the page's `gr.Progress`, callable from any thread. Gradio finds the page
    through context variables, which the threads huggingface_hub downloads in do not have: they
    call it in a copy of this handler's context (a copy each time: one context cannot be entered
    by two threads at once)."""
    context, home = contextvars.copy_context(), threading.get_ident()

    def report(fraction: float, text: str) -> None:
        if threading.get_ident() == home:
            progress(fraction, desc=text)
        else:
            context.copy().run(progress, fraction, desc=text)

    return report


