"""FakeEngineBackend: a named fake for testing the layers above a backend (manager, UI).

It streams the words of a canned reply, one per step, and records when it was stopped.
It is never used to test an engine."""

from __future__ import annotations

import threading
import time

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


class FakeLlama:
    """A named fake of llama.cpp under the batching engine (backends/llamacpp_engine.py): it keeps
    each sequence's cells like a unified KV cache and records every batch, so tests can check the
    engine's scheduling (what goes in which step, who is admitted when) exactly. A step costs
    `row_s` seconds a token. It computes nothing: it is never used to test llama.cpp itself."""

    NO_KV_SLOT = 1
    TAG = 100_000

    def __init__(self, cells: int, row_s: float = 0.0) -> None:
        self.cells, self.row_s = cells, row_s
        self.kv: dict[int, int] = {}  # sequence -> cells it holds
        # each decode: (sequence, tokens, tag) in batch order; a token's tag is token // TAG, and the
        # tokens a reply writes carry its prompt's last tag, so tests can tell whose rows are whose
        self.steps: list[list[tuple[int, int, int]]] = []
        self.n_vocab = 100
        self.lock = threading.Lock()

    # the Lib and Model sides
    def context(self, model, *, cells, n_batch, sequences, threads, flash_attention=True):
        self.n_batch, self.flash_attention = n_batch, flash_attention
        return self

    def is_eog(self, token: int) -> bool:
        return False

    def piece(self, token: int) -> bytes:
        return b"x "

    # the Context side
    def batch(self):
        return _FakeBatch(self.n_batch)

    def sampler(self):
        return _FakeSampler(self.TAG)

    def decode(self, batch) -> int:
        rows = batch.rows_added
        added: dict[int, int] = {}
        for seq, _ in rows:
            added[seq] = added.get(seq, 0) + 1
        with self.lock:
            if sum(self.kv.values()) + len(rows) > self.cells:
                return self.NO_KV_SLOT
            for seq, n in added.items():
                self.kv[seq] = self.kv.get(seq, 0) + n
            shape: list[tuple[int, int, int]] = []
            for seq, token in rows:
                if shape and shape[-1][0] == seq:
                    shape[-1] = (seq, shape[-1][1] + 1, shape[-1][2])
                else:
                    shape.append((seq, 1, token // self.TAG))
            self.steps.append(shape)
        time.sleep(self.row_s * len(rows))
        return 0

    def forget(self, seq: int, start: int = 0) -> None:
        with self.lock:
            self.kv[seq] = min(self.kv.get(seq, 0), start)

    def share(self, src: int, dst: int, n: int) -> None:
        with self.lock:
            self.kv[dst] = n

    def close(self) -> None:
        pass


class _FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.rows_added = capacity, []

    def __len__(self) -> int:
        return len(self.rows_added)

    def reset(self) -> None:
        self.rows_added = []

    def add(self, seq: int, tokens, first_pos: int, logits_last: bool) -> int:
        assert len(self.rows_added) + len(tokens) <= self.capacity, "batch overflow"
        self.rows_added += [(seq, t) for t in tokens]
        return len(self.rows_added) - 1

    def rows(self):
        return iter(self.rows_added)

    def close(self) -> None:
        pass


class _FakeSampler:
    def __init__(self, tag: int) -> None:
        self.tag, self.token = tag, 7

    def chain(self, *, seen=(), **_):
        if seen:
            self.token = seen[-1] // self.tag * self.tag + self.tag - 1  # the prompt's tag
        return self

    def sample(self, ctx, row: int) -> int:
        return self.token

    def close(self) -> None:
        pass
