"""One reply: the contract every caller uses (the page, the API, the terminal, the Python APIs).

    reply = manager.reply(messages, params, session, tools=toolset)
    for event in reply:          # Text | Thinking | Waiting | ToolStep
        ...
    reply.cancel()               # from any thread: effective within 100 ms wherever it is
    reply.text, reply.usage, reply.finish_reason   # stop | length | cancelled | error | tool_calls
    reply.reasoning, reply.thinking_s              # a reasoning model's thinking, and how long it took

A reply runs rounds: the model answers; if it called tools, each call runs (with a time limit)
and the model goes on with the results. Calls to `client_tools` (the API's `tools=`) are not run:
the reply ends with finish_reason "tool_calls" and `.calls`. Usage is summed over rounds.

A reasoning model's `<think>…</think>` (or a `</think>` closing what its prompt opened) comes as
`Thinking` events and `.reasoning`, never in `.text`, the tool calls read, or `turn()`. A
conversation that ends with the assistant's message is *continued* (`.continued`): `.text` is
the new text only, and `turn()` starts with the whole message, which replaces the last one.

Failures do not raise out of the loop: they end it with finish_reason "error" and `.error` (a
`BackendError` with a message a person can act on), so every caller handles them in one place.
`turn()` is the one rule for what a reply leaves in a conversation, whatever ended it: each
round of tool calls with its results, then the text said after them, kept even when the reply
was stopped or failed part way (the caller marks it as such), and no empty assistant message.
Knows the manager's `stream`, not Gradio or HTTP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

from backends.base import BackendError, Cancel, Chunk, GenerationParams, Message, TokenLogprob, Usage, Waiting

from . import formats
from .formats import CallFilter, ToolCall, ToolFormat
from .thinking import ThinkSplitter, Verbatim, opens_thinking
from .tools import Toolset, ToolStep, tools_prompt, transcript_messages, with_system_note

log = logging.getLogger(__name__)
MAX_ROUNDS = 5  # rounds of tool calls in one reply before the model is stopped


@dataclass(frozen=True)
class Text:
    """A piece of the reply's visible text (tool calls are never in it), and the tokens' log-
    probabilities behind it when they were asked for (those since the last Text)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Thinking:
    """A piece of the model's thinking (a reasoning model's `<think>` block), apart from the answer."""

    text: str


class Reply:
    def __init__(self, manager: Any, messages: list[Message], params: GenerationParams, session: str | None = None,
                 tools: Toolset | None = None, client_tools: list[dict[str, Any]] | None = None,
                 max_rounds: int = MAX_ROUNDS) -> None:
        self.manager, self.messages, self.params, self.session = manager, list(messages), params, session
        self.tools = tools if tools else None
        self.client_tools = client_tools or None
        self.max_rounds = max_rounds
        self.format: ToolFormat = tool_format(manager)
        self.text = ""  # all the visible text so far
        self.logprobs: list[TokenLogprob] = []  # every generated token's, when params.logprobs asked
        self._logprobs_due: list[TokenLogprob] = []  # those not yet given with a Text event
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.error: BackendError | None = None
        self.steps: list[ToolStep] = []  # calls run, in order
        self.calls: list[ToolCall] = []  # calls for the client to run (finish_reason "tool_calls")
        self._rounds: list[tuple[str, list[ToolStep]]] = []  # (what was said, the calls run after it)
        self.continued = bool(self.messages) and self.messages[-1].role == "assistant"
        self._tail = self.messages[-1].content if self.continued else ""  # the visible text since the last calls
        self.reasoning = ""  # the thinking so far, all rounds
        self._thought_s = 0.0  # thinking time of the rounds before this one
        self._thinking: tuple[float, float] | None = None  # this round's first and latest thinking
        self._cancel = Cancel()
        self._events: Iterator[Any] | None = None

    # ---- reading and stopping ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Text | Thinking | Waiting | ToolStep]:
        if self._events is None:
            self._events = self._run()
        return self._events

    def cancel(self, reason: str = "") -> None:
        """Stop the reply, from any thread; `reason` is for when someone other than its reader
        stops it (a model being loaded), and becomes `stop_reason`."""
        self._cancel.set(reason)

    @property
    def stop_reason(self) -> str:
        return self._cancel.reason

    def wait(self) -> "Reply":
        """Read the reply to its end; returns itself (for `.text`, `.usage`, ...)."""
        for _ in self:
            pass
        return self

    def result(self) -> str:
        """Read the reply to its end and return its text; a failure raises its `BackendError`
        (the Python APIs' way; the page and the API read `.error` instead)."""
        self.wait()
        if self.error is not None:
            raise self.error
        return self.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def thinking_s(self) -> float:
        """Seconds the model spent thinking (first to last piece of each round's thinking)."""
        first, latest = self._thinking or (0.0, 0.0)
        return self._thought_s + latest - first

    def turn(self) -> list[Message]:
        """What this reply adds to the conversation (see the module docstring); when `.continued`,
        its first message is the continued one, whole, to put in place of the last."""
        out: list[Message] = []
        for said, steps in self._rounds:
            out += transcript_messages(said, steps, self.format)
        if self.calls:
            said = self._tail.strip()
            out.append(Message("assistant", f"{said}\n{self.format.write(self.calls)}" if said else
                               self.format.write(self.calls)))
        elif self._tail.strip():
            out.append(Message("assistant", self._tail.strip()))
        return out

    # ---- the rounds --------------------------------------------------------------------------
    def _run(self) -> Iterator[Text | Waiting | ToolStep]:
        try:
            yield from self._rounds_loop()
        except BackendError as e:
            self.error, self.finish_reason = e, "error"
        finally:
            if self.finish_reason is None:  # closed part way by its reader: stop the engine too
                self._cancel.set()
                self.finish_reason = "cancelled"

    def _rounds_loop(self) -> Iterator[Text | Thinking | Waiting | ToolStep]:
        messages, params, schemas = self.engine_input()
        known = set(self.tools.tools if self.tools else ()) | {t["function"]["name"] for t in self.client_tools or ()
                                                                if isinstance(t.get("function"), dict)}
        for round_no in range(self.max_rounds + 1):
            # A continued message is read whole for calls, and replaced whole by its round's transcript.
            continuing = round_no == 0 and self.continued
            shown = self.format.filter() if known else None
            said, last = yield from self._round(messages, params, schemas, shown)
            raw = messages[-1].content + said if continuing else said
            calls = self.format.find(raw, known) if known else []
            tail = shown.finish(bool(calls)) if shown else ""
            if tail:
                yield self._say(tail)
            self._count(last)
            finish = last.finish_reason if last else "stop"
            if not calls or finish != "stop":
                self.finish_reason = finish
                return
            if self.client_tools and not (self.tools and all(c.name in self.tools.tools for c in calls)):
                # Only calls the client can run go back to it; a reply with none is just text.
                self.calls = [c for c in calls if not c.error and not c.positional and c.name in known]
                self.finish_reason = "tool_calls" if self.calls else "stop"
                return
            if round_no == self.max_rounds:
                yield self._say(f"\n\n(Stopped: the model asked for more than {self.max_rounds} rounds of tool calls.)")
                self.finish_reason = "stop"
                return
            steps = yield from self._call(calls)
            self._rounds.append((self.format.said(raw), steps))
            self._tail = ""
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
                return
            before = messages[:-1] if continuing else messages
            messages = [*before, *transcript_messages(self.format.said(raw), steps, self.format)]

    def _round(self, messages: list[Message], params: GenerationParams, schemas: list[dict[str, Any]] | None,
               shown: CallFilter | None) -> Iterator[Text | Thinking | Waiting]:
        """One round from the engine as events; returns (the answer's raw text, calls and all, for
        the tool parser; the last chunk). Thinking goes to `Thinking` events only."""
        split, said, last = Verbatim() if params.raw else ThinkSplitter(), "", None
        for item in self.manager.stream(messages, params, self.session, tools=schemas, cancel=self._cancel):
            if isinstance(item, Waiting):
                yield item
                continue
            if item.prompt is not None and not params.raw:
                split = ThinkSplitter(opens_thinking(item.prompt.text))
            if item.finish_reason is not None:
                last = item
            self._logprobs_due.extend(item.logprobs)
            said += yield from self._show(*split.feed(item.text), shown)
        said += yield from self._show(*split.finish(), shown)
        if self._thinking is not None:
            self._thought_s, self._thinking = self.thinking_s, None
        return said, last

    def _show(self, thought: str, answer: str, shown: CallFilter | None) -> Iterator[Text | Thinking]:
        """The events for a piece of thinking and a piece of answer; returns the answer."""
        if thought:
            yield self._think(thought)
        visible = shown.feed(answer) if shown and answer else answer
        if visible:
            yield self._say(visible)
        return answer

    def engine_input(self) -> tuple[list[Message], GenerationParams, list[dict[str, Any]] | None]:
        """The conversation, parameters and `tools=` for the engine, with the tools described (the prompt
        view shows exactly this)."""
        if not self.tools and not self.client_tools:
            return self.messages, self.params, None
        schemas = [*(self.tools.schemas() if self.tools else []), *(self.client_tools or [])]
        params = self.params.replace(stop=(*self.params.stop, *self.format.stop))
        if self.manager.takes_tools():
            return self.messages, params, schemas
        return with_system_note(self.messages, tools_prompt(self.tools, self.client_tools, self.format)), params, None

    def _call(self, calls: list[ToolCall]) -> Iterator[ToolStep]:
        steps = []
        for call in calls:
            step = self.tools.run(call, self._cancel)
            steps.append(step)
            self.steps.append(step)
            yield step
            if self._cancel.is_set():
                break
        return steps

    def _say(self, text: str) -> Text:
        self.text += text
        self._tail += text
        due, self._logprobs_due = tuple(self._logprobs_due), []
        self.logprobs.extend(due)
        return Text(text, due)

    def _think(self, text: str) -> Thinking:
        now = time.perf_counter()
        self._thinking = (self._thinking[0] if self._thinking else now, now)
        self.reasoning += text
        self._logprobs_due.clear()  # the thinking's tokens: not the answer's (OpenAI leaves them out too)
        return Thinking(text)

    def _count(self, last: Chunk | None) -> None:
        usage = last.usage if last is not None else None
        if usage is None:
            return
        u = self.usage
        first = u.prompt_tokens == 0 and u.completion_tokens == 0
        u.prompt_tokens += usage.prompt_tokens
        u.completion_tokens += usage.completion_tokens
        u.cached_tokens += usage.cached_tokens
        u.total_s += usage.total_s
        u.dropped_messages = max(u.dropped_messages, usage.dropped_messages)
        if first:
            u.ttft_s = usage.ttft_s


def tool_format(manager: Any) -> ToolFormat:
    """The loaded model's tool-call format: its preset's `tool_format`, else what its template teaches."""
    spec = getattr(manager, "spec", None)
    if spec is not None and getattr(spec, "tool_format", None):
        return formats.get(spec.tool_format)
    return formats.detect(manager.template_source() if hasattr(manager, "template_source") else None)
