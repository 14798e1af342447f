"""The transformers backend's engine room: the one inference thread that owns `generate`, the
job each reply becomes on it, the stopping criteria that watch a reply's switches, and seeded
sampling with a per-reply `torch.Generator`. Knows torch and transformers (imported lazily),
not prompts, templates or Gradio; backends/hf.py loads models and builds the jobs.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .base import BackendError, Cancel, GenerationParams, ParamError, Usage

log = logging.getLogger(__name__)
STOPPED = ("The transformers inference thread stopped (the model was unloaded, or the thread failed: see the "
           "server log); load the model again.")


@dataclass
class HFJob:
    """One reply on its way through the inference thread, and what comes back from it."""

    ids: list[int]
    params: GenerationParams
    usage: Usage
    session_id: str | None
    streamer: Any
    counter: "TokenCounter"
    failure: list[BaseException] = field(default_factory=list)
    images: tuple[Any, ...] = ()  # vision models: where each picture's tokens are in ids (hf_vision.Placed)
    context: Any = None  # the asking thread's contextvars (ZeroGPU reads the Gradio request there)


def read_text(reply: HFJob, engine: "InferenceThread", cancel: Cancel) -> Iterator[tuple[str, int]]:
    """The reply's text as the inference thread streams it; every wait is one `Cancel.POLL_S`."""
    while not reply.failure and not cancel.is_set():
        try:
            text = next(reply.streamer)
        except StopIteration:
            if engine.closing.is_set() and not cancel.is_set():
                raise BackendError(STOPPED) from None  # unloaded mid-reply: the text is cut short
            return
        except queue.Empty:
            if not engine.alive():
                raise BackendError(STOPPED) from None
            continue
        yield text, reply.counter.generated


SLICE_S = 0.5  # how long one reply holds the inference thread while another waits for it
PASSES = 3  # how many shorter replies may start before one that waits
FRESH_RUN = 2  # how many slices in a row new replies may take while started ones wait


class InferenceThread:
    """The one thread that runs the model. Replies arrive on a queue and share it a slice at a time.

    A reply is a generator (`run(reply)`) that does one slice of work per `next()`: a chunk of its
    prompt, or a stretch of tokens that ends after SLICE_S when another reply waits
    (`contended()`). Between slices the thread picks who goes next: a reply that has not started
    goes first, the shortest prompt first (a one-line question is read at the next slice, not
    after a pasted document) unless one has been passed PASSES times, but never more than
    FRESH_RUN in a row while a started one waits; started replies take turns, the one that ran
    longest ago first. So the started replies share at least one slice in FRESH_RUN + 1 and
    nothing starves. A reply stopped while it waited (cancelled, its reader gone, unloading) is
    closed there, never run on. A reply hands its own exceptions to
    its consumer; a BaseException (SystemExit) ends the thread, and consumers see `alive()` turn
    false instead of waiting for text that will never come."""

    def __init__(self) -> None:
        self.closing = threading.Event()  # unload: every reply's stopping criteria sees it
        self.idle = threading.Event()
        self.idle.set()
        self._queue: "queue.Queue[tuple[Callable[[HFJob], Iterator[None]], HFJob] | None]" = queue.Queue()
        self._turns: list[_Turn] = []  # replies on the thread now (started or not); only the thread touches it
        self._new_run = 0  # how many slices in a row went to replies that had not started
        self._thread = threading.Thread(target=self._loop, name="hf-inference", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[HFJob], Iterator[None]], reply: HFJob) -> None:
        self._queue.put((run, reply))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def contended(self) -> bool:
        """Whether a reply other than the one running waits for the thread (read between tokens)."""
        return len(self._turns) > 1 or not self._queue.empty()

    def stop(self) -> None:
        self.closing.set()
        self._queue.put(None)

    def close(self, timeout: float) -> bool:
        """Stop within a token and wait for it, up to `timeout`; whether the thread has ended."""
        self.stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        live = self._turns
        try:
            while True:
                if not live:
                    self.idle.set()
                if not self._take(live):
                    return
                self._drop_stopped(live)
                if live:
                    self.idle.clear()
                    self._step(live)
        finally:
            self.closing.set()  # unloading, or the thread failed: a reply cut short says so
            for turn in live:
                turn.close()

    def _step(self, live: list["_Turn"]) -> None:
        """Give the next reply in order one slice (its own frame: this loop holds no reply, and
        through it the model, while it waits)."""
        started = [t for t in live if t.work is not None]
        new = [t for t in live if t.work is None]
        if new and not (self._new_run >= FRESH_RUN and started):
            turn = min(new, key=lambda t: (t.passed < PASSES, len(t.reply.ids)))
            for other in new:
                other.passed += other is not turn
            self._new_run += 1
        else:
            turn, self._new_run = min(started, key=lambda t: t.ran), 0
        if not turn.step():
            live.remove(turn)

    @staticmethod
    def _drop_stopped(live: list["_Turn"]) -> None:
        for turn in [t for t in live if t.reply.counter.should_stop()]:
            live.remove(turn)
            turn.close()  # stopped while it waited: its reader sees the end at once

    def _take(self, live: list["_Turn"]) -> bool:
        """Move what has arrived into `live`, waiting for it only when nothing is live; False once
        the thread is told to stop."""
        try:
            while True:
                job = self._queue.get(block=not live)
                if job is None:
                    return False
                live.append(_Turn(*job))
        except queue.Empty:
            return True


class _Turn:
    """A reply on the inference thread: its work (a generator, made at its first slice)."""

    def __init__(self, run: Callable[[HFJob], Iterator[None]], reply: HFJob) -> None:
        self.run, self.reply = run, reply
        self.work: Iterator[None] | None = None
        self.ran = 0.0  # when its last slice ended
        self.passed = 0  # how many times another new reply started before it

    def step(self) -> bool:
        """Run one slice; whether the reply has more to do."""
        if self.work is None:
            self.work = self.run(self.reply)
        try:
            next(self.work)
        except StopIteration:
            return False
        except Exception:  # noqa: BLE001 - a job hands its own errors to its reader; this is a bug
            log.exception("the transformers inference thread's job failed")
            self.reply.streamer.end()  # its reader must not wait for more
            return False
        self.ran = time.monotonic()
        return True

    def close(self) -> None:
        if self.work is None:
            self.reply.streamer.end()
            return
        try:
            self.work.close()  # its own clean-up ends its text and keeps its cache
        except Exception:  # noqa: BLE001 - keeping a cache failed; the reply has ended anyway
            log.exception("closing a transformers reply failed")
            self.reply.streamer.end()


class Resumable:
    """A reply's streamer across the slices of `generate` it is written in. Each slice starts by
    putting its input (the prompt and what is written so far: not new text) and ends with
    `end()`, which is not the reply's end; the reply's own streamer hears each token once, and
    its end only from the reply (`streamer.end()`)."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.slices = 0
        self.input_next = True

    def put(self, value: Any) -> None:
        if self.input_next:
            self.input_next = False
            if self.slices:
                return  # the streamer skips the first slice's input (the prompt) itself
        self.streamer.put(value)

    def end(self) -> None:
        self.slices += 1
        self.input_next = True


class SliceEnd:
    """A StoppingCriteria that ends a slice of `generate` after SLICE_S, but only while another
    reply waits for the thread (alone, a reply is written in one call)."""

    def __init__(self, engine: InferenceThread) -> None:
        self.engine = engine
        self.until = 0.0
        self.ended = False

    def start(self) -> None:
        self.until, self.ended = time.monotonic() + SLICE_S, False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.ended = time.monotonic() >= self.until and self.engine.contended()
        return torch.full((input_ids.shape[0],), self.ended, dtype=torch.bool)


def chunk_size(tokens: int, seconds: float) -> int:
    """The next prompt chunk's length: about SLICE_S at the cost per token just measured, in
    multiples of 64 from 256 to 4,096. A chunk's cost per token grows with the context read
    before it, and shorter chunks cost more per token: SmolLM2-135M on 2 cores, 3,000 tokens in,
    2.3 ms a token in chunks of 256-1,024, 2.8 in chunks of 128, 3.6 in chunks of 64."""
    per_token = max(seconds, 1e-6) / max(tokens, 1)
    return max(256, min(4096, int(SLICE_S / per_token) // 64 * 64))


class TokenCounter:
    """A StoppingCriteria that counts generated tokens and stops when any switch is set: the
    reply's Cancel, its consumer going away, or the model being unloaded."""

    def __init__(self, prompt_len: int, switches: tuple[Any, ...]) -> None:
        self.prompt_len = prompt_len
        self.switches = switches
        self.generated = 0
        self.sequence: Any = None  # the latest prompt + generated ids

    def should_stop(self) -> bool:
        return any(s.is_set() for s in self.switches)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.sequence = input_ids[0]
        self.generated = int(input_ids.shape[-1]) - self.prompt_len
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool)


class SeededSampler:
    """A logits processor that samples with the reply's own `torch.Generator` and leaves only the
    chosen token, so greedy selection takes it. `generate` (transformers 5.23) draws from the
    global RNG and takes no generator; reseeding that would change every other reply's sampling.
    It runs after the built-in processors (the repetition penalty), as custom ones do."""

    def __init__(self, params: GenerationParams, transformers: Any) -> None:
        warpers = []  # the order generate() uses for do_sample=True
        if params.temperature != 1.0:
            warpers.append(transformers.TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            warpers.append(transformers.TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(params.top_p))
        if params.min_p:
            warpers.append(transformers.MinPLogitsWarper(params.min_p))
        self.warpers = transformers.LogitsProcessorList(warpers)
        self.seed = params.seed32
        self.generator: Any = None  # made on the device the scores are on, at the first step

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)  # one token per row
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def sampling_kwargs(params: GenerationParams, transformers: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
    }
    if params.greedy or params.seed is not None:
        # Explicit neutral values keep generate() from warning about the model's own defaults.
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if not params.greedy:  # seeded: sample in our own processor, then pick its token greedily
            kwargs["logits_processor"] = transformers.LogitsProcessorList([SeededSampler(params, transformers)])
    else:
        kwargs.update(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or None,
            min_p=params.min_p or None,
        )
    return kwargs


class JsonGuide:
    """A logits processor that lets through only tokens that keep the reply valid JSON for a
    schema (llguidance's matcher over the model's vocabulary; compact JSON, no free whitespace, so
    a small model cannot wander in blanks). One per reply: it follows that reply's tokens.

    Chosen by measurement (README, "Structured output"): on SmolLM2-135M, 2 cores, a nested
    schema with an enum: llguidance 28.6 tok/s against 28.9 free (0.8 ms to compile the schema,
    0.33 s once per model for the vocabulary); xgrammar was as fast but needs triton (~1 GB);
    lm-format-enforcer 0.11 does not import with transformers 5."""

    def __init__(self, tokenizer: Any, grammar: str, prompt_len: int) -> None:
        import llguidance
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask

        self.np, self.prompt_len = np, prompt_len
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.mask = allocate_token_bitmask(1, tokenizer.vocab_size)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        from llguidance.numpy import fill_next_token_bitmask

        if input_ids.shape[1] > self.prompt_len:  # the token generate chose last
            self.matcher.consume_token(int(input_ids[0, -1]))
        fill_next_token_bitmask(self.matcher, self.mask)
        allowed = self.np.unpackbits(self.mask.view(self.np.uint8), bitorder="little")[: scores.shape[1]]
        scores[:, ~torch.from_numpy(allowed.astype(bool))] = float("-inf")
        return scores


@functools.lru_cache(maxsize=64)
def json_grammar(schema: str) -> str:
    """llguidance's grammar for a JSON schema (text); a ParamError that says why if it cannot be."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as e:
        raise ParamError(f"The JSON schema could not be read: {e}.") from e
    if failed:
        raise ParamError(f"This JSON schema cannot be followed: {messages[0] if messages else 'not valid'}"[:400]
                         + ". Use standard JSON schema keywords (type, properties, required, items, enum, ...).")
    return grammar
