"""How a model writes tool calls, one format per model, and how a call is read back.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (Qwen, Hermes, SmolLM's and most ChatML tool templates). Confab's default.
- `llama3`: the reply is the call, a JSON object `{"name": ..., "parameters": {...}}` (several
  separated by `;`), optionally after `<|python_tag|>` (Llama 3.1 / 3.3).
- `pythonic`: `[get_time(zone="UTC"), add(a=1, b=2)]` (Llama 3.2 / 4), or NanoLLM's
  backticked `` `get_time("UTC")` ``; arguments are read with `ast.literal_eval`, never run.

A model's format comes from its preset (`tool_format`) or, failing that, from its chat template
(`detect`); it is never guessed from the reply. Every format reads parallel calls in one round.
Knows text, not engines, Gradio or HTTP.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from backends.base import TOOL_FORMATS as FORMATS
from backends.prompting import StopMatcher


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    positional: tuple[Any, ...] = ()  # pythonic calls may pass values by position until the tool names them
    error: str | None = None  # the call could not be read; this says why
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}", compare=False)

    def signature(self) -> str:
        args = [repr(a) for a in self.positional] + [f"{k}={v!r}" for k, v in self.arguments.items()]
        return f"{self.name}({', '.join(args)})"

    def to_data(self) -> dict[str, Any]:
        """The call as data (for a chat message's metadata, an export, the API's `tool_calls`)."""
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_data(cls, data: Any) -> "ToolCall | None":
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        args = data.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return cls(data["name"], args, id=str(data.get("id") or f"call_{uuid.uuid4().hex[:24]}"))


def calls_from_openai(raw: Any) -> list[ToolCall] | None:
    """OpenAI `tool_calls` ([{"id", "type": "function", "function": {"name", "arguments"}}]) as
    calls, or None when it is not that shape (each caller says so in its own words)."""
    items = raw if isinstance(raw, list) else []
    calls = [ToolCall.from_data({"id": c.get("id"), **c["function"]}) if isinstance(c, dict)
             and isinstance(c.get("function"), dict) else None for c in items]
    return calls if calls and None not in calls else None


# ---- reading calls -------------------------------------------------------------------------
def parse_json_call(body: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("?", error=f"The tool call is not valid JSON ({e.msg} at character {e.pos}).")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("?", error='A tool call must be a JSON object with "name" and "arguments".')
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(data["name"], error=f"The arguments are not valid JSON ({e.msg}).")
    if not isinstance(args, dict):
        return ToolCall(data["name"], error='"arguments" must be a JSON object of argument names to values.')
    return ToolCall(data["name"], args)


def parse_python_call(node: ast.expr | str) -> ToolCall:
    """`name(1, key="v")` -> ToolCall. Only literals are accepted as arguments."""
    if isinstance(node, str):
        try:
            node = ast.parse(node.strip(), mode="eval").body
        except SyntaxError as e:
            return ToolCall("?", error=f"The call is not a readable function call ({e.msg}).")
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return ToolCall("?", error="That is not a call of a tool by name.")
    try:
        positional = tuple(ast.literal_eval(a) for a in node.args)
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**arguments")
        keywords = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ToolCall(node.func.id, error="Tool arguments must be plain values (text, numbers, lists, true/false).")
    return ToolCall(node.func.id, keywords, positional)


class CallFilter:
    """Keeps calls out of the text a person sees: everything from a format's call marker on, and
    a reply that opens like a call (`{`, `[`) until it is known not to be one."""

    def __init__(self, markers: tuple[str, ...], openers: tuple[str, ...]) -> None:
        self.matcher = StopMatcher(markers) if markers else None
        self.openers = openers
        self.in_call = False
        self.head = ""  # the reply's start, held until it shows whether it is a call
        self.held: bool | None = None if openers else False

    def feed(self, delta: str) -> str:
        if self.held is not False:
            self.head += delta
            if self.held is None and self.head.strip():
                self.held = self.head.lstrip().startswith(self.openers)
            if self.held is not False:
                return ""
            delta, self.head = self.head, ""
        if self.in_call or self.matcher is None:
            return "" if self.in_call else delta
        out, self.in_call = self.matcher.feed(delta)
        return out

    def finish(self, was_call: bool) -> str:
        if self.held:
            return "" if was_call else self.head
        if self.in_call or self.matcher is None:
            return ""
        return self.matcher.flush()


# ---- the formats ---------------------------------------------------------------------------
class ToolFormat:
    name = ""
    markers: tuple[str, ...] = ()  # where calls begin inside a reply
    openers: tuple[str, ...] = ()  # a reply that starts so may be nothing but calls
    stop: tuple[str, ...] = ()  # the model has begun to imagine a tool's answer: end the round

    def find(self, text: str, known: set[str]) -> list[ToolCall]:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, calls: list[ToolCall]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def said(self, text: str) -> str:
        """What the model said before its calls."""
        cut = min([i for i in (text.find(m) for m in self.markers) if i >= 0] or [len(text)])
        said = text[:cut].strip()
        return "" if said.startswith(self.openers) and self.openers else said

    def how_to(self) -> str:
        """How to call, for a system prompt (templates that take `tools=` say it themselves)."""
        return ("To call a tool, reply with only:\n" + self.write([ToolCall("<tool name>", {"<argument>": "<value>"})])
                + "\nSeveral calls may follow one another. The results come back in the next message; then "
                  "answer the user with them.")

    def filter(self) -> CallFilter:
        return CallFilter(self.markers, self.openers)


class Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    stop = ("<tool_response>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)

    def find(self, text: str, known: set[str]) -> list[ToolCall]:
        return [parse_json_call(body.strip()) for body in self._BLOCK.findall(text)]

    def write(self, calls: list[ToolCall]) -> str:
        return "\n".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}"
                         "\n</tool_call>" for c in calls)


class Llama3(ToolFormat):
    name = "llama3"
    markers = ("<|python_tag|>",)
    openers = ("{",)

    def find(self, text: str, known: set[str]) -> list[ToolCall]:
        body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
        body = body.strip()
        if not body.startswith("{"):
            return []
        calls = [parse_json_call(part.strip()) for part in _split_json_objects(body)]
        # A reply that is JSON but names no tool is an answer in JSON, not a call.
        return calls if any(c.name in known or c.error for c in calls) else []

    def write(self, calls: list[ToolCall]) -> str:
        return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False) for c in calls)


class Pythonic(ToolFormat):
    name = "pythonic"
    openers = ("[",)
    _BACKTICKED = re.compile(r"`([A-Za-z_]\w*\(.*?\))`", re.S)

    def find(self, text: str, known: set[str]) -> list[ToolCall]:
        stripped = text.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                node = ast.parse(stripped, mode="eval").body
            except SyntaxError:
                node = None
            if isinstance(node, ast.List) and node.elts and all(isinstance(e, ast.Call) for e in node.elts):
                return [parse_python_call(e) for e in node.elts]
        calls = [parse_python_call(src) for src in self._BACKTICKED.findall(text)]
        return [c for c in calls if c.name in known]

    def write(self, calls: list[ToolCall]) -> str:
        return "[" + ", ".join(c.signature() for c in calls) + "]"


_BY_NAME: dict[str, type[ToolFormat]] = {"hermes": Hermes, "llama3": Llama3, "pythonic": Pythonic}


def get(name: str) -> ToolFormat:
    if name not in _BY_NAME:
        raise ValueError(f"Unknown tool format {name!r}; use one of {', '.join(FORMATS)}.")
    return _BY_NAME[name]()


def detect(template_source: str | None) -> ToolFormat:
    """The format a chat template teaches its model; Hermes when it says nothing."""
    source = template_source or ""
    if "<|python_tag|>" in source or '"parameters": ' in source and "ipython" in source:
        return Llama3()
    if re.search(r"\[func_name1\(|\[\w+\(\w+=", source):
        return Pythonic()
    return Hermes()


def _split_json_objects(body: str) -> list[str]:
    """`{...}; {...}` or one object per line -> each object's text (a trailing cut-off one too)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(body):
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
        if i >= len(body):
            break
        try:
            _, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            parts.append(body[i:])
            break
        parts.append(body[i:end])
        i = end
    return parts
