"""The one loaded model: loading, switching and unloading, and admitting replies to it.

Everything above (UI, API, terminal, the Python APIs) asks `ModelManager.reply` for a `Reply`
(chat/reply.py), which calls `stream` once per round; nothing else talks to a backend. As many
replies go to the engine at once as it takes (`backend.max_concurrent`: 4 per slot for llama.cpp,
whose engine keeps its own line by KV room, `[engine] replies` for transformers, which share its one
thread a slice at a time; capped by --concurrency);
the rest wait in a line, the shortest prompt first (for at most LINE_AGE_S), and are told their
place. A conversation is fitted to the context before it takes its place, so a long chat never holds an engine slot while it is measured. Every wait
here wakes when the reply's `Cancel` is set. A load gives the replies in flight a grace period,
stops the rest (telling them why), then swaps the model; a load that fails puts the previous
model back. Replies that wait for a load are told so (`Waiting.loading`), not a place in line;
the one loading hears each stage through its ProgressFn. Knows nothing of Gradio or HTTP, nor
who asked: callers check that.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from . import create
from .base import (BackendError, Backend, Cancel, Chunk, GenerationParams, Job, Message, ModelSpec, NotLoaded,
                   ParamError, ProgressFn, Prompt, Usage, Waiting)
from .prompting import RenderedPrompt, refuse_images, rendered_prompt

log = logging.getLogger(__name__)


def _silent(fraction: float, text: str) -> None:
    """A ProgressFn for callers that do not ask."""


class ModelManager:
    def __init__(self, max_concurrent: int | None = None, swap_grace_s: float = 5.0) -> None:
        self.limit = max_concurrent  # --concurrency: at most this many replies at once
        self.swap_grace_s = swap_grace_s  # --swap-grace: how long a load lets replies in flight finish
        self._swap = threading.Lock()  # one load or unload at a time
        self._cond = threading.Condition()  # guards the fields below
        self._active: set[Cancel] = set()  # replies streaming now, by their stop switch
        self._preparing = 0  # replies being fitted and tokenized (they use the model too)
        # tickets of replies waiting, in the order they came: (prompt tokens, when it came) each
        self._line: dict[object, tuple[int, float]] = {}
        self._swapping = False
        self._switch: tuple[str, float] | None = None  # while swapping: (the model being loaded, "" = none; since)
        self._backend: Backend | None = None
        self.spec: ModelSpec | None = None
        self.load_seconds: float | None = None
        self.version = 0  # goes up whenever the loaded model changes, so pages can notice

    # ---- model lifecycle -----------------------------------------------------------------
    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Swap in `spec`. If it fails, the model that was loaded is loaded again and the error
        says so: a failed load never leaves the server without a model.

        `progress` hears every stage from the first moment: resolving, waiting for replies in
        flight, unloading, then the backend's own (downloading with bytes, loading weights, ...)."""
        say = progress or _silent
        say(0.0, f"Resolving {spec.name}…")
        backend = create(spec)  # unknown backend names fail here, before anything is unloaded
        check = getattr(backend, "check", None)
        if check is not None:
            check(spec)  # a missing file, a malformed name or an engine that cannot run here fails here too
        with self._swap, self._exclusive(public_name(spec), say):
            previous = self.spec
            if previous is not None:
                say(0.0, f"Unloading {previous.name}…")
            self._unload_locked()
            try:
                self._load_locked(backend, spec, progress)
            except BackendError as e:
                _discard(backend)  # what it loaded before failing, before the old model needs the memory
                if previous is None:
                    raise
                raise self._restore(previous, e, say) from e
        return self.describe()

    def _load_locked(self, backend: Backend, spec: ModelSpec, progress: ProgressFn | None) -> None:
        start = time.perf_counter()
        try:
            backend.load(spec, progress)
        except BackendError:
            raise
        except ImportError as e:
            raise BackendError(f"{spec.backend} needs a package that is not installed: {e}") from e
        except Exception as e:  # noqa: BLE001 - a load failure must not take the server down
            log.exception("loading %s failed", spec.name)
            raise BackendError(f"Could not load {spec.name}: {type(e).__name__}: {e}") from e
        self.load_seconds = time.perf_counter() - start
        self._backend, self.spec = backend, spec
        self.version += 1
        log.info("loaded %s with %s in %.2f s", spec.name, spec.backend, self.load_seconds)

    def _restore(self, previous: ModelSpec, error: BackendError, say: ProgressFn | None = None) -> BackendError:
        log.warning("loading failed (%s); loading %s again", error, previous.name)
        say and say(0.0, f"Loading failed; loading {previous.name} again…")
        backend = create(previous)
        try:
            self._load_locked(backend, previous, say)
        except BackendError as again:
            _discard(backend)
            return BackendError(f"{error} Loading {previous.name} again failed too ({again}); no model is loaded.")
        return BackendError(f"{error} {previous.name} is still loaded.")

    def unload(self) -> None:
        with self._swap, self._exclusive(""):
            self._unload_locked()

    @property
    def switching(self) -> tuple[str, float] | None:
        """While a load or unload is under way: (the name of the model being loaded, "" for an
        unload; seconds since it began); else None. Pages show it to everyone (it never holds an
        address)."""
        switch = self._switch
        return (switch[0], time.monotonic() - switch[1]) if switch else None

    @contextmanager
    def _exclusive(self, target: str, say: ProgressFn = _silent) -> Iterator[None]:
        """Hold new replies back (telling them `target` is being loaded); give those in flight
        `swap_grace_s` to end, then stop them, saying why (a load must not wait for a long
        reply, nor its user wonder what happened)."""
        with self._cond:
            self._swapping, self._switch = True, (target, time.monotonic())
            busy = len(self._active) + self._preparing
        try:
            if busy:
                say(0.0, f"Waiting up to {self.swap_grace_s:g} s for {busy} {'reply' if busy == 1 else 'replies'} "
                         "in progress to finish…")
            with self._cond:
                idle = lambda: not self._active and self._preparing == 0  # noqa: E731
                if not self._cond.wait_for(idle, self.swap_grace_s):
                    # Each cancel's hook releases its reply under this same (reentrant) condition.
                    for cancel in list(self._active):
                        cancel.set("The server's operator changed the model, so this reply was stopped. "
                                   "Send your message again.")
                    self._cond.wait_for(idle)
            yield
        finally:
            with self._cond:
                self._swapping, self._switch = False, None
                self._cond.notify_all()

    def _unload_locked(self) -> None:
        if self._backend is not None:
            log.info("unloading %s", self.spec.name if self.spec else "?")
            backend, self._backend, self.spec = self._backend, None, None
            self.version += 1
            backend.unload()

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def describe(self) -> dict[str, Any]:
        backend = self._backend
        if backend is None:
            return {"loaded": False}
        return {"loaded": True, "name": self.spec.name, "load_s": self.load_seconds, **backend.describe()}

    # ---- replies -------------------------------------------------------------------------
    def _require(self) -> Backend:
        if self._backend is None:
            raise NotLoaded()
        return self._backend

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               thinking: bool | None = None) -> Prompt:
        """The prompt for the next reply (a conversation ending with the assistant's message: its
        continuation); `thinking` as `GenerationParams.thinking`."""
        extra = {"thinking": thinking} if thinking is not None else {}
        return self._require().render(messages, **({"tools": tools} if tools else {}), **extra)

    def render_prompt(self, messages: list[Message], params: GenerationParams,
                      tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        """Exactly what the engine would read for this conversation (the page's prompt view): fitted
        to the context and rendered as a reply to it would be (one ending with the assistant's
        message: its continuation), template text apart from message text, with its length as the
        engine counts it. Like a reply, it waits for a load under way and holds a load back."""
        backend, job = self._prepared(messages, params, tools, Cancel())  # never None: nothing sets this cancel
        return rendered_prompt(backend, job, tools)

    def template_source(self) -> str | None:
        """The loaded model's chat template text (the chat layer reads its tool-call format there)."""
        template = getattr(self._backend, "template", None)
        return getattr(template, "source", None)

    def takes_tools(self) -> bool:
        """Whether the loaded model's chat template describes tools itself (`tools=`)."""
        return bool(getattr(self._backend, "takes_tools", False))

    def takes_images(self) -> bool:
        """Whether the loaded model reads images (a vision model on an engine that takes them)."""
        return bool(getattr(self._backend, "takes_images", False))

    def check_images(self, messages: list[Message]) -> None:
        """A ParamError in one line if the conversation holds images the loaded model cannot read
        (the API asks before it answers; every reply is checked again when it is prepared)."""
        refuse_images(self._require(), messages)

    def check_params(self, params: GenerationParams) -> None:
        """A ParamError if the loaded engine cannot honour a setting (the API asks before it
        answers, so the client gets a 400 rather than an error inside a stream)."""
        refuse_unsupported(self._require(), params)

    def count_tokens(self, text: str) -> int:
        """`text`'s length in the loaded model's tokens (an estimate for remote engines), e.g. for
        an attached file (chat/attachments.py)."""
        count = getattr(self._require(), "count_tokens", None)
        return count(text) if count else -(-len(text) // 4)  # an engine that cannot say: ~4 characters a token

    @property
    def n_ctx(self) -> int:
        """The loaded model's context in tokens (0 when none is loaded or the engine does not say)."""
        return int(getattr(self._backend, "n_ctx", 0) or 0)

    def default_params(self) -> GenerationParams:
        return self.spec.default_params if self.spec else GenerationParams()

    def capacity(self) -> int:
        engine = int(getattr(self._backend, "max_concurrent", 1) or 1)
        return max(1, min(engine, self.limit or engine))

    def reply(self, messages: list[Message], params: GenerationParams, session: str | None = None,
              tools: Any = None, client_tools: list[dict[str, Any]] | None = None) -> Any:
        """A `Reply` (chat/reply.py): iterate it for events, read `.text`, `.usage` and
        `.finish_reason`, `.cancel()` it from any thread. `tools` is a Toolset the reply may run;
        calls to `client_tools` (OpenAI schemas) are handed back instead.
        (The Reply lives in the chat layer above; the manager is only the handle callers hold.)"""
        from chat.reply import Reply

        return Reply(self, messages, params, session, tools, client_tools)

    def stream(
        self, messages: list[Message], params: GenerationParams, session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None, cancel: Cancel | None = None,
    ) -> Iterator[Chunk | Waiting]:
        """Stream one round of a reply: `Waiting(ahead)` while it waits in line, then text Chunks,
        the first with the prompt it continues (when the backend rendered one), the last with
        finish_reason and usage. A conversation that ends with the assistant's message continues
        that message. Most callers want `reply()`, which runs tools too.

        `session_id` names whose conversation this is (a page session, a login, an API key):
        engines reuse cached tokens only within it. `cancel` stops the reply wherever it is (a
        load it waits for, the line, prefill or decode) within 100 ms: it ends with
        finish_reason "cancelled" and, if it never reached the engine, never does.
        """
        if not messages or messages[-1].role == "system":
            raise ParamError("There is nothing to answer: the conversation must end with a user message (or an "
                             "assistant message to continue).")
        cancel = cancel or Cancel()
        ticket, admitted = object(), False
        # A cancel gives back this reply's place (in line or in the engine) at once, from the
        # cancelling thread: a reader that stops reading must not hold the engine until it is
        # garbage collected.
        unhook = cancel.on_set(lambda: self._release(ticket, cancel))
        try:
            yield from self._while_switching(cancel)  # says so, rather than waiting without a word
            prepared = self._prepared(messages, params, tools, cancel)  # before the line: it holds no slot
            with self._cond:
                job = prepared[1] if prepared else None  # a remote engine's job has no prompt (the server renders it)
                self._line[ticket] = (len(job.prompt.token_ids) if job and job.prompt else 0, time.monotonic())
            shown = None
            while prepared is not None and not cancel.is_set():
                with self._cond:
                    if ticket not in self._line:
                        break  # cancelled between the check above and here
                    admitted = self._try_admit(ticket, cancel)
                    ahead = len(self._active) + self._order().index(ticket) - self.capacity() + 1 if not admitted else 0
                    # A load under way holds the line back: that is what this reply waits for then.
                    event = None if admitted else self._switch_waiting() or Waiting(max(ahead, 1))
                    key = event and (event.ahead, event.loading, int(event.waited_s))
                    if not admitted and key == shown:
                        self._cond.wait(0.5)  # woken by a reply ending, a load ending, or this cancel
                        continue
                if admitted:
                    break
                shown = key
                yield event
            if not admitted:
                yield Chunk("", finish_reason="cancelled", usage=Usage())
                return
            backend, job = prepared
            if self._backend is not backend:  # the model changed while this reply waited
                prepared = self._prepared(messages, params, tools, cancel)
                if prepared is None:  # cancelled while the next load was under way
                    yield Chunk("", finish_reason="cancelled", usage=Usage())
                    return
                backend, job = prepared
            yield from _with_prompt(backend.run(job, session_id, cancel), job.prompt)
        finally:
            unhook()
            self._release(ticket, cancel)

    def _switch_waiting(self) -> Waiting | None:
        """What a reply waiting now is told, while a load or unload is under way (under `_cond`)."""
        switch = self._switch
        if not self._swapping or switch is None:
            return None
        return Waiting(0, loading=switch[0], waited_s=time.monotonic() - switch[1])

    def _while_switching(self, cancel: Cancel) -> Iterator[Waiting]:
        """While a load or unload is under way: a Waiting that says so, at once and then every second."""
        while True:
            with self._cond:
                event = None if cancel.is_set() else self._switch_waiting()
            if event is None:
                return
            yield event
            with self._cond:  # woken by the load ending or this reply's cancel
                self._cond.wait_for(lambda: not self._swapping or cancel.is_set(), 1.0)

    def _release(self, ticket: object, cancel: Cancel) -> None:
        with self._cond:
            self._active.discard(cancel)
            self._line.pop(ticket, None)
            self._cond.notify_all()

    def _prepared(self, messages: list[Message], params: GenerationParams, tools: list[dict[str, Any]] | None,
                  cancel: Cancel) -> tuple[Backend, Job] | None:
        """The backend and the conversation fitted and rendered for it, or None if cancelled while
        a load was under way. A load or unload waits for this (it tokenizes with the model)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._swapping or cancel.is_set())
            if cancel.is_set():
                return None
            backend = self._require()
            self._preparing += 1
        try:
            refuse_unsupported(backend, params)
            return backend, backend.prepare(messages, params, tools)
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def _order(self) -> list[object]:
        """The line in the order replies are let in (under `_cond`): the shortest prompt first, so
        a one-line question is not kept behind a pasted document that came a moment before it;
        but a reply that has waited LINE_AGE_S goes before any that came after it, so a long one
        is passed only so long."""
        now, overdue, rest = time.monotonic(), [], []
        for ticket, (_, came) in self._line.items():  # in the order they came
            (overdue if now - came > LINE_AGE_S else rest).append(ticket)
        return overdue + sorted(rest, key=lambda t: self._line[t][0])

    def _try_admit(self, ticket: object, cancel: Cancel) -> bool:
        if self._swapping or self._order()[0] is not ticket or len(self._active) >= self.capacity() or cancel.is_set():
            return False
        del self._line[ticket]
        self._active.add(cancel)
        return True


LINE_AGE_S = 30.0  # how long a reply waiting in the manager's line may be passed by shorter prompts

FEATURES = {  # what each is called, and which engines have it
    "penalties": ("presence_penalty and frequency_penalty", "the llama.cpp engine has them"),
    "json_schema": ("JSON output (response_format)", "the llama.cpp and transformers engines have it"),
    "logprobs": ("logprobs", "the llama.cpp engine has them"),
    "raw": ("A plain text prompt (/v1/completions)", "the llama.cpp, transformers and remote OpenAI engines have it"),
}


def refuse_unsupported(backend: Backend, params: GenerationParams) -> None:
    """A setting the loaded engine cannot honour is refused, never silently ignored."""
    missing = sorted(params.features() - set(getattr(backend, "features", ())))
    if missing:
        names = " and ".join(FEATURES[m][0] for m in missing)
        raise ParamError(f"{names[0].upper()}{names[1:]} is not available with the {getattr(backend, 'name', '?')} "
                         f"engine here; {'; '.join(FEATURES[m][1] for m in missing)}.")


def _with_prompt(chunks: Iterator[Chunk], prompt: Prompt | None) -> Iterator[Chunk]:
    """The engine's chunks, the first carrying the prompt (the chat layer reads the reply by it: a
    prompt may open a `<think>` that only the reply closes)."""
    try:
        for chunk in chunks:
            if isinstance(chunk, Waiting):  # in the engine's own line (llama.cpp waits for KV room)
                yield chunk
                continue
            yield dataclasses.replace(chunk, prompt=prompt) if prompt is not None else chunk
            prompt = None
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()  # at once, not when garbage collected: the engine's `finally` stops the reply


def public_name(spec: ModelSpec) -> str:
    """The model's name as every user may see it: a name that is an address (a typed URL, which may
    carry a key) is not shown."""
    return "a remote model" if "://" in spec.name else spec.name


def _discard(backend: Backend) -> None:
    try:
        backend.unload()
    except Exception:  # noqa: BLE001 - a half-loaded backend may not unload cleanly; it is dropped anyway
        log.debug("unloading a failed backend raised", exc_info=True)
