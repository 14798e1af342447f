"""Engine-independent pieces of a reply: prompt encoding, fitting the context, stop words.

Backends hand in an `encode(text, special)` function and an iterator of text deltas; this
module turns them into token ids and `Chunk`s. It knows no engine and no UI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .base import (BackendError, Cancel, Chunk, Clock, ContextOverflow, GenerationParams, Job, Message, ModelSpec,
                   NotLoaded, ParamError, Prompt, Usage, Waiting)
from .templates import Segment, render_segments, render_text, template_context

Encode = Callable[[str, bool], list[int]]  # (text, parse control tokens?) -> ids


def encode_segments(segments: Iterable[Segment], encode: Encode) -> tuple[list[int], int]:
    """Template text may hold control tokens; message content never does.

    Returns the ids and how many of them come before the first message content: that opening
    is the template's own text, the same for every user, so it is the only part of a prompt
    an engine may share between conversations (see llamacpp_engine)."""
    ids: list[int] = []
    public: int | None = None
    for seg in segments:
        if seg.is_content and public is None:
            public = len(ids)
        ids.extend(encode(seg.text, not seg.is_content))
    return ids, len(ids) if public is None else public


def memoized(encode: Encode) -> Encode:
    """`encode` that tokenizes each distinct piece of text once (fitting a long chat renders it
    several times)."""
    seen: dict[tuple[str, bool], list[int]] = {}

    def cached(text: str, special: bool) -> list[int]:
        key = (text, special)
        if key not in seen:
            seen[key] = encode(text, special)
        return seen[key]

    return cached


def fit_context(
    render: Callable[[list[Message]], Prompt], messages: list[Message], params: GenerationParams, n_ctx: int
) -> tuple[Prompt, int]:
    """Render, dropping the oldest turns (never the system prompt or the last message) to fit.

    Returns the prompt and how many messages were left out. Raises a readable error when even
    the last message does not fit. The cut is found by bisection over the places a
    conversation may start (a whole user/assistant exchange is dropped at a time, so roles keep
    alternating): O(log n) renders, not one per dropped exchange. With a `memoized` encoder
    each message is tokenized once, so a long chat costs about one pass.
    """
    params.check_context(n_ctx)
    budget = n_ctx - params.max_new_tokens
    system = [m for m in messages[:1] if m.role == "system"]
    rest = messages[len(system) :]
    prompt = render(system + rest)
    if len(prompt.token_ids) <= budget:
        return prompt, 0
    starts = _cut_points(rest)
    lo, hi, best = 1, len(starts) - 1, None  # starts[hi] keeps only the last message
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = render(system + rest[starts[mid] :])
        if len(candidate.token_ids) <= budget:
            best, hi = (candidate, starts[mid]), mid - 1
        else:
            lo, prompt = mid + 1, candidate
    if best is not None:
        return best
    # Nothing fitted, so the last render tried was the shortest: the last message alone.
    raise ContextOverflow(
        f"The last message and the reply do not fit the model's context: the prompt is "
        f"{len(prompt.token_ids)} tokens, max_new_tokens is {params.max_new_tokens}, and the context "
        f"holds {n_ctx}. Shorten the message or the system prompt, lower max_new_tokens, or load the "
        f"model with a larger context."
    )


def _cut_points(rest: list[Message]) -> list[int]:
    """Where a fitted conversation may begin: 0, then after each dropped exchange (a user message
    and its reply together, else one message), down to the last message alone (an assistant
    message being continued keeps the user message it answers)."""
    last = 2 if len(rest) > 1 and rest[-1].role == "assistant" and rest[-2].role == "user" else 1
    starts, i = [0], 0
    while len(rest) - i > last:
        i += 2 if len(rest) - i > last + 1 and rest[i].role == "user" and rest[i + 1].role == "assistant" else 1
        starts.append(i)
    return starts


class StopMatcher:
    """Finds stop words in streamed text, holding back a tail that may be the start of one."""

    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buffer = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop word was reached)."""
        self.buffer += delta
        if not self.stop:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        keep = self._partial_tail()
        cut = len(self.buffer) - keep
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def _partial_tail(self) -> int:
        for n in range(min(self.hold, len(self.buffer)), 0, -1):
            tail = self.buffer[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def chunks_from_deltas(
    deltas: Iterator[tuple[str, int]],
    params: GenerationParams,
    usage: Usage,
    clock: Clock,
    stop: Iterable[str] = (),
    cancel: Cancel | None = None,
) -> Iterator[Chunk]:
    """Turn (text delta, tokens so far) pairs into Chunks; the last one carries the summary. A
    `Waiting` among them (an engine that keeps its own line) is passed on.

    The engine's own end-of-sequence ends `deltas`; a stop word or max_new_tokens ends it here;
    a `cancel` that is set ends it with finish_reason "cancelled" (the engine sees the same
    switch and returns within a step). `deltas` is closed here whatever happens.
    """
    matcher = StopMatcher(tuple(params.stop) + tuple(stop))
    finish, hit = "length", False
    logprobs: list[Any] = []  # of tokens whose text is held back (a stop word may be starting)
    try:
        for delta in deltas:
            if isinstance(delta, Waiting):  # the engine's own line: passed on as it is
                yield delta
                continue
            text, n_tokens, *info = delta  # info: the token's TokenLogprob, from engines that give it
            clock.mark_token()
            usage.completion_tokens = n_tokens
            if info and info[0] is not None:
                logprobs.append(info[0])
            out, hit = matcher.feed(text)
            if out:
                yield Chunk(out, logprobs=tuple(logprobs))
                logprobs.clear()
            if hit:
                finish = "stop"
                break
            if cancel is not None and cancel.is_set():
                break
        else:
            tail = matcher.flush()
            if tail:
                yield Chunk(tail, logprobs=tuple(logprobs))
                logprobs.clear()
            finish = "length" if usage.completion_tokens >= params.max_new_tokens else "stop"
        if cancel is not None and cancel.is_set() and not hit:
            finish = "cancelled"
        if hit:
            logprobs.clear()  # the stop word's own tokens: not in the text
    finally:
        close = getattr(deltas, "close", None)
        if close:
            close()
    yield Chunk("", finish_reason=finish, usage=clock.fill(usage), logprobs=tuple(logprobs))


class LocalEngine:
    """The reply loop shared by backends that render the prompt and decode token ids here.

    Subclasses provide `render(messages, tools, encode)`, `_generate(prompt, params, usage,
    session_id, cancel) -> Iterator[(delta, n)]` (which may fill usage.cached_tokens, and returns
    within 100 ms of `cancel` being set, never blocking without a timeout), `n_ctx`, and
    `_loaded()`. `prepare` fits and renders (no engine needed); `run` generates.
    """

    n_ctx: int = 0

    template: Any = None  # the ChatTemplate in use, set by load()
    takes_images = False  # a vision model reads the images of user messages
    features = frozenset({"raw"})  # GenerationParams.features() it honours

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template describes tools itself (renders a `tools=` list)."""
        return self.template is not None and re.search(r"\btools\b", self.template.source) is not None

    def prepare(
        self, messages: list[Message], params: GenerationParams, tools: list[dict[str, Any]] | None = None
    ) -> Job:
        self._require_loaded()
        refuse_images(self, messages)
        if params.raw:
            return Job(messages, params, self._raw_prompt(messages[-1].content, params))
        encode = memoized(self._encode)
        prompt, dropped = fit_context(lambda m: self.render(m, tools=tools, encode=encode, thinking=params.thinking),
                                      messages, params, self.n_ctx)
        return Job(messages, params, prompt, dropped)

    def _raw_prompt(self, text: str, params: GenerationParams) -> Prompt:
        """`text` as the whole prompt (no template; the model's BOS first if it wants one)."""
        params.check_context(self.n_ctx)
        prompt = self.plain(text)
        if len(prompt.token_ids) + params.max_new_tokens > self.n_ctx:
            raise ContextOverflow(f"The prompt is {len(prompt.token_ids):,} tokens and max_tokens is "
                                  f"{params.max_new_tokens:,}; together they must fit the model's context of "
                                  f"{self.n_ctx:,}. Shorten the prompt or lower max_tokens.")
        return prompt

    def plain(self, text: str) -> Prompt:  # pragma: no cover - each engine tokenizes its own way
        raise NotImplementedError

    def run(self, job: Job, session_id: str | None = None, cancel: Cancel | None = None) -> Iterator[Chunk]:
        """Generate a prepared reply. `session_id` names whose conversation this is: an engine
        reuses cached tokens only within it (and the template's opening across all)."""
        self._require_loaded()
        clock, cancel = Clock(), cancel or Cancel()
        usage = Usage(prompt_tokens=len(job.prompt.token_ids), dropped_messages=job.dropped)
        deltas = self._generate(job.prompt, job.params, usage, session_id, cancel)
        yield from chunks_from_deltas(deltas, job.params, usage, clock, stop=job.prompt.stop, cancel=cancel)

    def stream(
        self, messages: list[Message], params: GenerationParams, session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Iterator[Chunk]:
        yield from self.run(self.prepare(messages, params, tools), session_id)

    def _require_loaded(self) -> None:
        if not self._loaded():
            raise NotLoaded()

    def count_tokens(self, text: str) -> int:
        """`text`'s length in this model's tokens, as message content is encoded."""
        self._require_loaded()
        return len(self._encode(text, False))

    # Provided by the engine-specific subclass.
    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               encode: Encode | None = None, thinking: bool | None = None) -> Prompt:  # pragma: no cover
        raise NotImplementedError

    def _encode(self, text: str, special: bool) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _generate(
        self, prompt: Prompt, params: GenerationParams, usage: Usage, session_id: str | None, cancel: Cancel
    ) -> Iterator[tuple[str, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loaded(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


VISION_EXAMPLE = "SmolVLM-256M-Instruct (the smolvlm-256m-transformers preset)"


def refuse_images(backend: Any, messages: list[Message]) -> None:
    """A text-only model given an image says so in one line, before any engine work."""
    if getattr(backend, "takes_images", False) or not any(m.images for m in messages):
        return
    name = getattr(getattr(backend, "spec", None), "name", None) or "This model"
    raise ParamError(f"{name} reads text only; load a vision model such as {VISION_EXAMPLE} to send images.")


def engine_options(spec: ModelSpec, defaults: dict[str, Any]) -> dict[str, Any]:
    """A preset's [engine] table over a backend's defaults; unknown keys are refused by name."""
    unknown = sorted(set(spec.engine) - set(defaults))
    if unknown:
        raise BackendError(
            f"{spec.name}: unknown {spec.backend} engine setting {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(defaults)}."
        )
    return {**defaults, **spec.engine}


class EngineTemplated:
    """The reply loop shared by backends whose engine applies the chat template itself (a remote
    server, LMDeploy): nothing to tokenize here. Subclasses provide `_loaded()`, `n_ctx` and
    `_deltas(messages, params, usage, session_id, cancel) -> Iterator[(delta, n_tokens)]`, which
    ends within 100 ms of `cancel` being set (a remote stream is closed by a cancel hook)."""

    n_ctx: int = 0
    takes_tools = False  # tools are described in the system prompt (Toolset.prepare)
    takes_images = False  # images are not sent on to the engine (yet)
    template: Any = None  # a ChatTemplate when Confab renders the prompt for the engine

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               thinking: bool | None = None) -> Prompt:
        if self.template is not None:
            text = render_text(self.template, messages, **template_context(thinking=thinking))
            return Prompt(text, [], tuple(self.template.stop))
        # The engine owns the template: show what is sent.
        return Prompt("\n".join(f"[{m.role}] {m.content}" for m in messages), [])

    def prepare(
        self, messages: list[Message], params: GenerationParams, tools: list[dict[str, Any]] | None = None
    ) -> Job:
        if not self._loaded():
            raise NotLoaded()
        refuse_images(self, messages)
        if self.n_ctx:
            params.check_context(self.n_ctx)
        if self.template is None or params.raw:  # the server's template, or none (a raw prompt goes as it is)
            return Job(messages, params)
        # Confab renders the prompt, so its template's stop words apply, and the chat layer may read it.
        params = params.replace(stop=(*params.stop, *self.template.stop))
        return Job(messages, params, self.render(messages, thinking=params.thinking))

    def run(self, job: Job, session_id: str | None = None, cancel: Cancel | None = None) -> Iterator[Chunk]:
        if not self._loaded():
            raise NotLoaded()
        clock, usage, cancel = Clock(), Usage(), cancel or Cancel()
        yield from chunks_from_deltas(self._deltas(job.messages, job.params, usage, session_id, cancel), job.params,
                                      usage, clock, cancel=cancel)

    def stream(
        self, messages: list[Message], params: GenerationParams, session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Iterator[Chunk]:
        yield from self.run(self.prepare(messages, params, tools), session_id)

    def _loaded(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _deltas(
        self, messages: list[Message], params: GenerationParams, usage: Usage, session_id: str | None,
        cancel: Cancel,
    ) -> Iterator[tuple[str, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """An estimate (the tokenizer is the engine's, out of reach): about 4 characters a token."""
        return -(-len(text) // 4)


@dataclass(frozen=True)
class RenderedPrompt:
    """What an engine reads for a conversation, for a person to look at (the page's prompt view).

    `segments` are (text, is_template) pairs that join into the prompt: template text, whose
    control tokens the engine parses, apart from message text, which it reads as text. `tokens`
    is the prompt's length as the engine counts it (`exact`), else an estimate, or None. When the
    engine renders the prompt itself there are no segments: `messages` is what it is sent."""

    segments: list[tuple[str, bool]]
    tokens: int | None
    exact: bool
    n_ctx: int
    dropped: int = 0  # earlier messages left out to fit the context
    messages: list[dict[str, str]] | None = None
    marked: bool = True  # False: the engine's text whole, its template parts not told apart


def rendered_prompt(backend: Any, job: Job, tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
    """`job` (as `backend.prepare` fitted and rendered it) shown as its template's segments. They
    are rendered again from the fitted conversation with the same template and context as the
    engine's own `render`, and checked against the text the engine encoded."""
    n_ctx = int(getattr(backend, "n_ctx", 0) or 0)
    prompt = job.prompt
    if prompt is None:  # the engine applies the chat template itself
        return RenderedPrompt([], None, False, n_ctx, messages=[m.to_dict() for m in job.messages])
    tokens = len(prompt.token_ids) if prompt.token_ids else backend.count_tokens(prompt.text)
    template = getattr(backend, "template", None)
    if template is not None:
        system = job.messages[:1] if job.messages and job.messages[0].role == "system" else []
        fitted = system + job.messages[len(system) + job.dropped :]
        local = isinstance(backend, LocalEngine)  # LocalEngine.render takes tools; EngineTemplated's does not
        context = template_context(tools if local else None, job.params.thinking)
        segments = [(s.text, not s.is_content) for s in render_segments(template, fitted, **context)]
        if "".join(text for text, _ in segments) == prompt.text:
            return RenderedPrompt(segments, tokens, bool(prompt.token_ids), n_ctx, job.dropped)
    # An engine that does not say which part is its template (or a template that renders differently
    # each time, e.g. with the clock): its text whole, unmarked.
    return RenderedPrompt([(prompt.text, False)], tokens, bool(prompt.token_ids), n_ctx, job.dropped, marked=False)
