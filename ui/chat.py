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
import posixpath
import re
from typing import Any, Callable

from backends.base import GenerationParams, Message, ParamError, Usage, valid_text
from chat.formats import Hermes, ToolCall, ToolFormat, calls_from_openai, parse_python_call
from chat.tools import STEP_PREFIX, ToolStep, transcript_messages
from web.policy import Limits
from web.store import AttachmentStore

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
    "thinking",
)
# The Thinking switch: templates that take `enable_thinking` (Qwen3, SmolLM3, ...) think or not.
THINKING_CHOICES = {"default": None, "on": True, "off": False}
RANDOM_SEED = -1  # what the seed box shows for "pick a new seed each time"
MARKS = {"cancelled": "\n\n*(stopped)*", "error": "\n\n*(failed)*"}  # after a reply that ended so
STATS_OPEN = "\n\n<sub>"  # a reply's numbers, the last line of its text on the page
STATS = re.compile(re.escape(STATS_OPEN) + r"[\d,]+ tokens(?: · [^<\n]*)?</sub>\Z")
CALL_ID = "call:"  # a tool step's metadata id: this prefix, then the call as JSON
THINKING_ID = "thinking"  # a reasoning model's thinking: shown folded, never sent back to the model
ATTACHED = "attached"  # a user message's attachments: [{"id": AttachmentStore name, "name": as uploaded}]
MAX_ATTACHED = 32  # attachments one message may name (each was held to the limits when it was attached)
MAX_ATTACHED_CHAT = 64  # and one conversation, counted with repeats (each is read for every reply)
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
        "bmp": "image/bmp", "txt": "text/plain"}


def thinking_message(text: str, seconds: float | None, done: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"title": "Thinking", "id": THINKING_ID, "status": "done" if done else "pending"}
    if seconds is not None:
        meta["duration"] = round(seconds, 1)
    return {"role": "assistant", "content": text, "metadata": meta}


def is_thinking(m: dict[str, Any] | None) -> bool:
    return bool(m) and isinstance(m.get("metadata"), dict) and m["metadata"].get("id") == THINKING_ID


def mark(text: str, finish_reason: str | None, usage: Usage | None = None) -> str:
    """A reply's text as the page shows it: marked when it was stopped or failed part way, and
    ending with its own numbers (tokens, first token, speed) in small print. Both are the page's:
    `unmark` takes them off before the text goes back to a model or into an export."""
    return text + MARKS.get(finish_reason or "", "") + (reply_stats(usage) if usage else "")


def reply_stats(usage: Usage) -> str:
    parts = [f"{usage.completion_tokens:,} tokens"]
    if usage.ttft_s is not None:
        parts.append(f"first token {usage.ttft_s * 1000:,.0f} ms")
    if usage.tokens_per_s:
        parts.append(f"{usage.tokens_per_s:.1f} tok/s")
    return f"{STATS_OPEN}{' · '.join(parts)}</sub>"


def unmark(text: str) -> str:
    text = STATS.sub("", text)
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
        files = attached_of(item) if item["role"] == "user" else []
        if files:
            clean[ATTACHED] = files
        if call is not None:
            clean = {**step_message(ToolStep(call, clean["content"], True)), "content": clean["content"]}
            if isinstance(meta.get("duration"), (int, float)):
                clean["metadata"]["duration"] = meta["duration"]
        out.append(clean)
    return out


def attached_of(item: dict[str, Any]) -> list[dict[str, str]]:
    """A user message's attachments, as stored ({"attached": [...]}) or as the page sends them
    back (file parts of its content, whose paths are Gradio's copies named as the store names
    them). Only names of the store's exact shape are kept: a path from a page is never opened."""
    found: list[tuple[Any, Any]] = []
    if isinstance(item.get(ATTACHED), list):
        found += [(a.get("id"), a.get("name")) for a in item[ATTACHED] if isinstance(a, dict)]
    content = item.get("content")
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, dict):
            continue
        file = part.get("file") if part.get("type") == "file" else part if "path" in part else None
        if isinstance(file, dict) and isinstance(file.get("path"), str):
            found.append((posixpath.basename(file["path"].replace("\\", "/")), file.get("orig_name")))
    out: dict[str, dict[str, str]] = {}  # each attachment once
    for ident, name in found:
        if isinstance(ident, str) and AttachmentStore.NAME.fullmatch(ident) and ident not in out:
            label = name if isinstance(name, str) and name.strip() else ident
            out[ident] = {"id": ident, "name": valid_text(label)[:200]}
            if len(out) == MAX_ATTACHED:
                break
    return list(out.values())


def for_page(history: list[dict[str, Any]], path_of: Callable[[str], tuple[str, bool]]) -> list[dict[str, Any]]:
    """The chat as the page shows it: a message's attachments become file parts before its text
    (the picture itself, or a text file's chip). `path_of(id)` gives the file to show and whether
    the attachment is still kept (one that is not shows as a note of the same name)."""
    return [_page_message(m, path_of) if m.get(ATTACHED) else m for m in history]


def _page_message(m: dict[str, Any], path_of: Callable[[str], tuple[str, bool]]) -> dict[str, Any]:
    parts: list[Any] = []
    for a in m[ATTACHED]:
        path, kept = path_of(a["id"])
        mime = MIME.get(a["id"].rsplit(".", 1)[-1]) if kept else "text/plain"
        parts.append({"type": "file", "alt_text": a["name"] if kept else f"{a['name']} (no longer kept here)",
                      "file": {"path": path, "orig_name": a["name"], "mime_type": mime}})
    if m["content"]:
        parts.append(m["content"])
    return {**{k: v for k, v in m.items() if k != ATTACHED}, "content": parts}


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
                fmt: ToolFormat | None = None, user: Callable[[dict[str, Any]], Message] | None = None) -> list[Message]:
    """Chat history -> Messages. A run of tool steps becomes what the model wrote (the assistant
    text before them and the calls, in `fmt`, the model's own format) and then each result.
    `user` makes a user message with attachments (their text and pictures) into a Message."""
    messages = [Message("system", system_prompt.strip())] if system_prompt and system_prompt.strip() else []
    for said, steps, m in _runs(history):
        if steps:
            messages += transcript_messages(said or "", steps, fmt)
        elif said is not None:
            messages.append(Message("assistant", said))
        if m is not None:
            messages.append(user(m) if user is not None and m.get(ATTACHED) else Message(m["role"], m["content"]))
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


def history_from_messages(messages: list[Message], calls: dict[int, list[ToolCall]] | None = None,
                          thinking: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """The inverse of to_messages: calls (given as data by index, else read from Hermes text) and
    their results become steps; an assistant message's reasoning (by index) its Thinking message."""
    history: list[dict[str, Any]] = []
    pending: list[ToolCall] = []
    for i, m in enumerate(messages):
        if (thinking or {}).get(i):
            history.append(thinking_message(thinking[i], None, True))
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
    if isinstance(data.get("thinking"), str):
        if data["thinking"] not in THINKING_CHOICES:
            raise ParamError(f"Thinking must be one of {', '.join(THINKING_CHOICES)}, got {data['thinking']!r}.")
        data["thinking"] = THINKING_CHOICES[data["thinking"]]
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
    data["thinking"] = next(k for k, v in THINKING_CHOICES.items() if v is params.thinking)
    return [data[k] for k in PARAM_FIELDS]


def export_json(history: list[dict], system_prompt: str | None,
                user: Callable[[dict[str, Any]], Message] | None = None) -> str:
    """OpenAI messages: tool calls as `tool_calls` data, results as `tool` messages with their call's id.
    Attached files are written as the text the model read, pictures as image_url data URLs."""
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
        if m is not None and user is not None and m.get(ATTACHED):
            said = user(m)
            out.append({"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": i.data_url()}} for i in said.images),
                {"type": "text", "text": said.content}]})
        elif m is not None:
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
    system, messages, calls, thinking = "", [], {}, {}
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
            reasoning = item.get("reasoning_content")  # as vLLM and llama.cpp's server write it
            if role == "assistant" and isinstance(reasoning, str) and reasoning.strip():
                limits.check_text(f"Message {i}'s reasoning", reasoning)
                thinking[len(messages)] = valid_text(reasoning)
            messages.append(Message(role, content))
        else:
            raise ParamError(f"Message {i} has role {role!r}; only system, user, assistant and tool can be imported.")
    return history_from_messages(messages, calls, thinking), system


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
