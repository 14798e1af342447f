"""Conversation plumbing between Gradio's chat format and the model layer. No Gradio imports.

Gradio's Chatbot holds messages as dicts whose content may be a list of parts; the model
layer wants `Message`s. Export and import use the OpenAI messages format: a JSON list of
{"role", "content"}.
"""

from __future__ import annotations

import json
from typing import Any

from backends.base import GenerationParams, Message, ParamError, Usage

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


def clean_history(history: list[dict] | None) -> list[dict[str, str]]:
    """Chatbot value -> [{'role', 'content'}] with plain text, dropping tool/thought steps."""
    out = []
    for item in history or []:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            continue
        if (item.get("metadata") or {}).get("title"):
            continue
        out.append({"role": item["role"], "content": flatten(item.get("content"))})
    return out


def to_messages(history: list[dict[str, str]], system_prompt: str | None) -> list[Message]:
    messages = [Message("system", system_prompt.strip())] if system_prompt and system_prompt.strip() else []
    messages += [Message(m["role"], m["content"]) for m in history]
    return messages


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
    messages = [m.to_dict() for m in to_messages(clean_history(history), system_prompt)]
    return json.dumps(messages, ensure_ascii=False, indent=2)


def import_json(text: str) -> tuple[list[dict[str, str]], str]:
    """OpenAI messages JSON (a list, or {"messages": [...]}) -> (chat history, system prompt)."""
    hint = 'Expected a JSON list of {"role": "user" | "assistant" | "system", "content": "..."}.'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParamError(f"The file is not valid JSON ({e}). {hint}") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise ParamError(f"The file holds a {type(data).__name__}, not a list of messages. {hint}")
    system, history = "", []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ParamError(f"Message {i} has no role or no content. {hint}")
        role, content = item["role"], flatten(item["content"])
        if role == "system":
            system = content
        elif role in ("user", "assistant"):
            history.append({"role": role, "content": content})
        else:
            raise ParamError(f"Message {i} has role {role!r}; only system, user and assistant can be imported.")
    return history, system


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
