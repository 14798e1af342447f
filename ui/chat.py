"""Conversation plumbing between Gradio's chat format and the model layer. No Gradio imports.

Gradio's Chatbot holds messages as dicts whose content may be a list of parts; the model
layer wants `Message`s. A tool call shows in the chat as an assistant message whose metadata
title is the call (`Tool: calculator(expression='12*7')`), whose metadata id holds the call as
data (`call:{"id", "name", "arguments"}`, the one field Gradio keeps that the page does not show),
and whose content is the result; it goes back to the model as the call, written in the model's
own format, and a `tool` message. A reply that was stopped or failed part way keeps its text
with a visible mark (`mark`), which never goes back to the model. Export and import use the
OpenAI messages format: a JSON list of {"role", "content"}, calls as `tool_calls`.
"""

from __future__ import annotations

import json
from typing import Any

from backends.base import GenerationParams, Message, ParamError, Usage, valid_text
from chat.formats import Hermes, ToolCall, ToolFormat, calls_from_openai, parse_python_call
from chat.tools import STEP_PREFIX, ToolStep, transcript_messages
from web.policy import Limits

# The sampling controls, in the order the UI lists them and handlers receive them.
PARAM_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_new_tokens",
    "repetition_penalty",
    "do_sample",
    "seed",
    "stop",
)
RANDOM_SEED = -1  # what the seed box shows for "pick a new seed each time"
MARKS = {"cancelled": "\n\n*(stopped)*", "error": "\n\n*(failed)*"}  # after a reply that ended so
CALL_ID = "call:"  # a tool step's metadata id: this prefix, then the call as JSON
THINKING_ID = "thinking"  # a reasoning model's thinking: shown folded, never sent back to the model


def thinking_message(text: str, seconds: float | None, done: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"title": "Thinking", "id": THINKING_ID, "status": "done" if done else "pending"}
    if seconds is not None:
        meta["duration"] = round(seconds, 1)
    return {"role": "assistant", "content": text, "metadata": meta}


def is_thinking(m: dict[str, Any] | None) -> bool:
    return bool(m) and isinstance(m.get("metadata"), dict) and m["metadata"].get("id") == THINKING_ID


def mark(text: str, finish_reason: str | None) -> str:
    """A reply's text as the page shows it: marked when it was stopped or failed part way."""
    return text + MARKS.get(finish_reason or "", "")


def unmark(text: str) -> str:
    for suffix in MARKS.values():
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def flatten(content: Any) -> str:
    """Gradio content parts ([{'type': 'text', 'text': ...}]) or a string -> plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(flatten(part) for part in content)
    return str(content)


def text_input(value: Any, what: str) -> str:
    """A text box's raw value (events take raw payloads): text, or nothing."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParamError(f"{what} must be text, got {type(value).__name__}.")
    return valid_text(value)


def clean_history(history: Any) -> list[dict[str, Any]]:
    """Chatbot value -> [{'role', 'content'}] with plain text; tool steps keep their metadata,
    other titled steps (and anything malformed) are dropped."""
    out: list[dict[str, Any]] = []
    for item in history if isinstance(history, list) else []:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            continue
        meta = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
        call = step_call(meta) if item["role"] == "assistant" else None
        if item["role"] == "assistant" and meta.get("id") == THINKING_ID:
            duration = meta.get("duration")
            out.append(thinking_message(valid_text(flatten(item.get("content"))),
                                        duration if isinstance(duration, (int, float)) else None, True))
            continue
        if meta.get("title") and call is None:
            continue
        clean = {"role": item["role"], "content": valid_text(flatten(item.get("content")))}
        if call is not None:
            clean = {**step_message(ToolStep(call, clean["content"], True)), "content": clean["content"]}
            if isinstance(meta.get("duration"), (int, float)):
                clean["metadata"]["duration"] = meta["duration"]
        out.append(clean)
    return out


def step_message(step: ToolStep) -> dict[str, Any]:
    """A tool call and its result as one collapsible chat message, the call kept as data."""
    data = json.dumps(step.call.to_data(), ensure_ascii=False)
    return {"role": "assistant", "content": step.output,
            "metadata": {"title": step.title, "id": CALL_ID + data, "status": "done",
                         "duration": round(step.seconds, 3)}}


def step_call(meta: dict[str, Any]) -> ToolCall | None:
    """The call a step message holds: its data in the metadata id (a title alone, from chats
    saved before calls were kept as data, is read back as a call too)."""
    ident = meta.get("id")
    if isinstance(ident, str) and ident.startswith(CALL_ID):
        try:
            return ToolCall.from_data(json.loads(ident[len(CALL_ID):]))
        except (json.JSONDecodeError, RecursionError):
            return None
    title = meta.get("title")
    if isinstance(title, str) and title.startswith(STEP_PREFIX):
        call = parse_python_call(title[len(STEP_PREFIX):])
        return None if call.error else call
    return None


def to_messages(history: list[dict[str, Any]], system_prompt: str | None,
                fmt: ToolFormat | None = None) -> list[Message]:
    """Chat history -> Messages. A run of tool steps becomes what the model wrote (the assistant
    text before them and the calls, in `fmt`, the model's own format) and then each result."""
    messages = [Message("system", system_prompt.strip())] if system_prompt and system_prompt.strip() else []
    for said, steps, m in _runs(history):
        if steps:
            messages += transcript_messages(said or "", steps, fmt)
        elif said is not None:
            messages.append(Message("assistant", said))
        if m is not None:
            messages.append(Message(m["role"], m["content"]))
    return messages


def _runs(history: list[dict[str, Any]]):
    """(assistant text, the tool steps after it, the next user message) for each stretch of a chat."""
    said: str | None = None
    steps: list[ToolStep] = []
    for m in [*history, None]:  # None flushes what is pending
        if is_thinking(m):
            continue  # the thinking is the model's own scratch: later turns do not see it
        call = step_call(m.get("metadata") or {}) if m and m["role"] == "assistant" else None
        if call is not None:
            steps.append(ToolStep(call, m["content"], True))
            continue
        if m is not None and m["role"] == "assistant":
            if steps or said is not None:
                yield said, steps, None
            said, steps = unmark(m["content"]), []
            continue
        yield said, steps, m
        said, steps = None, []


def history_from_messages(messages: list[Message], calls: dict[int, list[ToolCall]] | None = None) -> list[dict[str, Any]]:
    """The inverse of to_messages: calls (given as data by index, else read from Hermes text) and
    their results become steps."""
    history: list[dict[str, Any]] = []
    pending: list[ToolCall] = []
    for i, m in enumerate(messages):
        made = (calls or {}).get(i) or (Hermes().find(m.content, set()) if m.role == "assistant" else [])
        if m.role == "assistant" and made:
            said = Hermes().said(m.content)
            if said:
                history.append({"role": "assistant", "content": said})
            pending = list(made)
        elif m.role == "tool":
            call = pending.pop(0) if pending else None
            if call is None or call.error:
                raise ParamError("A tool message does not follow an assistant message that called a tool.")
            history.append(step_message(ToolStep(call, m.content, not m.content.startswith("Error:"))))
        elif m.role in ("user", "assistant"):
            history.append({"role": m.role, "content": m.content})
    return history


def params_from_ui(values: dict[str, Any], base: GenerationParams | None = None) -> GenerationParams:
    """Slider values -> GenerationParams. Empty fields keep the base value."""
    data = {k: v for k, v in values.items() if v is not None and v != ""}
    if data.get("seed") in (RANDOM_SEED, float(RANDOM_SEED), str(RANDOM_SEED)):
        data["seed"] = None
    if "stop" in data:
        data["stop"] = parse_stop_words(data["stop"])
    return GenerationParams.from_dict(data, base=base)


def parse_stop_words(text: Any) -> list[str]:
    """Comma-separated stop words; `\\n` stands for a newline, `\\,` for a comma."""
    if isinstance(text, (list, tuple)):
        return [str(s) for s in text]
    parts = str(text).replace("\\,", "\0").split(",")
    return [p.strip().replace("\0", ",").replace("\\n", "\n") for p in parts if p.strip()]


def format_stop_words(stop: tuple[str, ...] | list[str]) -> str:
    return ", ".join(s.replace(",", "\\,").replace("\n", "\\n") for s in stop)


def ui_values(params: GenerationParams) -> list[Any]:
    """GenerationParams -> slider values, in PARAM_FIELDS order."""
    data = params.to_dict()
    data["seed"] = RANDOM_SEED if params.seed is None else params.seed
    data["stop"] = format_stop_words(params.stop)
    return [data[k] for k in PARAM_FIELDS]


def export_json(history: list[dict], system_prompt: str | None) -> str:
    """OpenAI messages: tool calls as `tool_calls` data, results as `tool` messages with their call's id."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt.strip()}] \
        if system_prompt and system_prompt.strip() else []
    for said, steps, m in _runs(clean_history(history)):
        if steps:
            out.append({"role": "assistant", "content": said or "", "tool_calls": [
                {"id": s.call.id, "type": "function",
                 "function": {"name": s.call.name, "arguments": json.dumps(s.call.arguments, ensure_ascii=False)}}
                for s in steps]})
            out += [{"role": "tool", "tool_call_id": s.call.id, "content": s.output} for s in steps]
        elif said is not None:
            out.append({"role": "assistant", "content": said})
        if m is not None:
            out.append({"role": m["role"], "content": m["content"]})
    return json.dumps(out, ensure_ascii=False, indent=2)


def import_json(text: str, limits: Limits | None = None) -> tuple[list[dict[str, str]], str]:
    """OpenAI messages JSON (a list, or {"messages": [...]}) -> (chat history, system prompt).
    The file is held to the server's limits before anything is built from it."""
    hint = 'Expected a JSON list of {"role": "user" | "assistant" | "system", "content": "..."}.'
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ParamError(f"The file is not valid JSON ({type(e).__name__}: {e}). {hint}") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise ParamError(f"The file holds a {type(data).__name__}, not a list of messages. {hint}")
    limits = limits or Limits()
    limits.check_count(len(data))
    system, messages, calls = "", [], {}
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ParamError(f"Message {i} has no role or no content. {hint}")
        role, content = item["role"], flatten(item["content"])
        limits.check_text(f"Message {i}", content)
        if role == "system":
            system = content
        elif role in ("user", "assistant", "tool"):
            if role == "assistant" and item.get("tool_calls"):
                calls[len(messages)] = _calls_from_data(item["tool_calls"], i)
            messages.append(Message(role, content))
        else:
            raise ParamError(f"Message {i} has role {role!r}; only system, user, assistant and tool can be imported.")
    return history_from_messages(messages, calls), system


def _calls_from_data(raw: Any, index: int) -> list[ToolCall]:
    calls = calls_from_openai(raw)
    if calls is None:
        raise ParamError(f"Message {index} has tool_calls that are not a list of "
                         '{"id", "type": "function", "function": {"name", "arguments"}}.')
    return calls


def format_status(info: dict[str, Any], usage: Usage | None = None, note: str = "") -> str:
    """One line: model, backend, device, context used, and the speed of the last reply."""
    if not info.get("loaded"):
        return "No model loaded — choose one and press **Load**." + (f" {note}" if note else "")
    parts = [f"**{info['name']}**", info["backend"], str(info.get("device", "?"))]
    n_ctx = info.get("n_ctx") or 0
    if usage is not None:
        used = usage.prompt_tokens + usage.completion_tokens
        parts.append(f"context {used:,} / {n_ctx:,}")
        if usage.cached_tokens:
            parts.append(f"{usage.cached_tokens:,} cached")
        if usage.ttft_s is not None:
            parts.append(f"first token {usage.ttft_s * 1000:.0f} ms")
        if usage.tokens_per_s:
            parts.append(f"{usage.tokens_per_s:.1f} tok/s")
        if usage.dropped_messages:
            parts.append(f"{usage.dropped_messages} oldest messages left out to fit the context")
    else:
        parts.append(f"context {n_ctx:,}")
    line = " · ".join(parts)
    return f"{line} — {note}" if note else line
