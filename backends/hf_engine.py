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


class InferenceThread:
    """The one thread that runs `generate`: replies arrive on a queue and run one at a time.

    A reply stopped while it waited is skipped, never run. A reply hands its own exceptions to
    its consumer; a BaseException (SystemExit) ends the thread, and consumers see `alive()` turn
    false instead of waiting for text that will never come."""

    def __init__(self) -> None:
        self.closing = threading.Event()  # unload: every reply's stopping criteria sees it
        self.idle = threading.Event()
        self.idle.set()
        self._queue: "queue.Queue[tuple[Callable[[HFJob], None], HFJob] | None]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="hf-inference", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[HFJob], None], reply: HFJob) -> None:
        self._queue.put((run, reply))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.closing.set()
        self._queue.put(None)

    def close(self, timeout: float) -> bool:
        """Stop within a token and wait for it, up to `timeout`; whether the thread has ended."""
        self.stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            run, reply = job
            if reply.counter.should_stop():  # cancelled, its consumer gone, or unloading
                reply.streamer.end()  # its consumer, if still reading, sees the end at once
            else:
                self.idle.clear()
                try:
                    run(reply)
                except Exception:  # noqa: BLE001 - keeping a cache failed after the reply was streamed
                    log.exception("the transformers inference thread's job failed")
                finally:
                    self.idle.set()
            del job, run, reply  # hold no reply (and through it the model) while waiting


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
