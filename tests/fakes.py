"""FakeEngineBackend: a named fake for testing the layers above a backend (manager, UI).

It streams the words of a canned reply, one per step, and records when it was stopped.
It is never used to test an engine."""

from __future__ import annotations

import threading

from backends import register
from backends.base import BackendError, Cancel, Clock, GenerationParams, Job, Message, Prompt, Usage
from backends.prompting import chunks_from_deltas, fit_context


@register("fake-engine")
class FakeEngineBackend:
    reply = "one two three four five six seven eight nine ten"

    def __init__(self) -> None:
        self.spec = None
        self.n_ctx = 4096
        self.steps = 0
        self.closed = threading.Event()
        self.step_delay = 0.0

    def load(self, spec, progress=None):
        if spec.model == "fail":
            raise BackendError("fake load failure")
        self.spec = spec
        progress and progress(1.0, "loaded")

    def render(self, messages: list[Message]) -> Prompt:
        text = "".join(f"{m.role}:{m.content}\n" for m in messages)
        return Prompt(text, [ord(c) % 50 for c in text.split()[0]] * len(text.split()))

    def prepare(self, messages, params: GenerationParams, tools=None) -> Job:
        prompt, dropped = fit_context(self.render, messages, params, self.n_ctx)
        return Job(messages, params, prompt, dropped)

    def run(self, job: Job, session_id=None, cancel: Cancel | None = None):
        clock, cancel = Clock(), cancel or Cancel()
        usage = Usage(prompt_tokens=len(job.prompt.token_ids), dropped_messages=job.dropped)
        yield from chunks_from_deltas(self._deltas(job.params, cancel), job.params, usage, clock, cancel=cancel)

    def stream(self, messages, params: GenerationParams, session_id=None):
        yield from self.run(self.prepare(messages, params), session_id)

    def _deltas(self, params, cancel: Cancel):
        try:
            for i, word in enumerate(self.reply.split()[: params.max_new_tokens], 1):
                if cancel.wait(self.step_delay) if self.step_delay else cancel.is_set():
                    return
                self.steps += 1
                yield (" " if i > 1 else "") + word, i
        finally:
            self.closed.set()

    def unload(self):
        self.spec = None

    def describe(self):
        return {"backend": self.name, "model": self.spec.name if self.spec else None, "device": "none",
                "n_ctx": self.n_ctx}


@register("fake-script-engine")
class FakeScriptBackend(FakeEngineBackend):
    """A fake engine that streams `script` in pieces of `piece` characters (so tags and calls fall
    across deltas), and whose prompt ends with `prompt_tail` (a `<think>` opened by the template,
    as DeepSeek-R1's and Qwen3-Thinking's do). It records the conversations it was given."""

    script = "<think>\nThe user greets me.\n</think>\n\nHello there!"
    piece = 3
    prompt_tail = ""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[Message]] = []

    def render(self, messages: list[Message]) -> Prompt:
        prompt = super().render(messages)
        return Prompt(prompt.text + self.prompt_tail, prompt.token_ids)

    def prepare(self, messages, params: GenerationParams, tools=None) -> Job:
        self.seen.append(list(messages))
        return super().prepare(messages, params, tools)

    def _deltas(self, params, cancel: Cancel):
        try:
            pieces = [self.script[i : i + self.piece] for i in range(0, len(self.script), self.piece)]
            for n, text in enumerate(pieces[: params.max_new_tokens], 1):
                if cancel.wait(self.step_delay) if self.step_delay else cancel.is_set():
                    return
                self.steps += 1
                yield text, n
        finally:
            self.closed.set()
