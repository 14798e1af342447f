"""Tool calling: tools from plain Python functions, the model's calls parsed and run safely,
and the reply loop that runs them and lets the model go on.

A tool is a function with type hints and a docstring; pydantic gives its JSON schema and
checks the model's arguments. A call is read as JSON (`<tool_call>{"name", "arguments"}
</tool_call>`, the Hermes/Qwen format, or a bare `{"name", "parameters"}` reply, Llama 3.1's)
or as a Python-style call in backticks (`` `TIME()` ``, NanoLLM's), each argument read by
`ast.literal_eval`: model text is never executed. Knows the manager, not Gradio or HTTP.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .base import BackendError, Chunk, GenerationParams, Message
from .prompting import StopMatcher

log = logging.getLogger(__name__)

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
STEP_PREFIX = "Tool: "  # how a call is titled in a chat transcript (the UI's collapsible step)
_TAGGED = re.compile(re.escape(CALL_START) + r"(.*?)(?:" + re.escape(CALL_END) + r"|\Z)", re.S)
_BACKTICKED = re.compile(r"`([A-Za-z_]\w*\(.*?\))`", re.S)


# ---- tools -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str
    arguments: type[BaseModel]  # validates a call's arguments; forbids unknown ones
    enabled: bool = True

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, docs: str | None = None,
                      enabled: bool = True) -> "Tool":
        name = name or fn.__name__
        summary, arg_docs = _parse_docstring(docs if docs is not None else inspect.getdoc(fn) or "")
        fields: dict[str, Any] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {name}: *args and **kwargs cannot be described to a model; name each argument")
            kind = Any if p.annotation is inspect.Parameter.empty else p.annotation
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (kind, Field(default, description=arg_docs.get(p.name)))
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        return cls(name, fn, summary, model, enabled)

    def schema(self) -> dict[str, Any]:
        """The OpenAI / Hugging Face `tools=` form."""
        params = self.arguments.model_json_schema()
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": params}}

    def signature(self) -> str:
        parts = []
        for name, f in self.arguments.model_fields.items():
            kind = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            parts.append(f"{name}: {kind}" + ("" if f.is_required() else f" = {f.default!r}"))
        return f"{self.name}({', '.join(parts)})"

    def doc(self) -> str:
        lines = [f"- {self.signature()}: {self.description or 'no description'}"]
        for name, f in self.arguments.model_fields.items():
            if f.description:
                lines.append(f"    {name}: {f.description}")
        return "\n".join(lines)

    def invoke(self, arguments: dict[str, Any], positional: tuple[Any, ...] = ()) -> Any:
        """Validate, then call. Raises ValueError with a readable message for bad arguments."""
        names = list(self.arguments.model_fields)
        if len(positional) > len(names):
            raise ValueError(f"{self.name} takes {len(names)} arguments, got {len(positional)}. Use {self.signature()}.")
        merged = {**dict(zip(names, positional)), **arguments}
        try:
            checked = self.arguments.model_validate(merged)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"Invalid arguments for {self.name} ({problems}). Call it as {self.signature()}.") from None
        return self.fn(**{k: getattr(checked, k) for k in names})


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary (text before `Args:`) and each argument's text from a Google-style docstring."""
    parts = re.split(r"^\s*(?:Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    summary, rest = parts[0], parts[1] if len(parts) > 1 else ""
    args: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        if re.match(r"^\s*(Returns|Raises|Yields|Examples?):", line):
            break
        match = re.match(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    return " ".join(summary.split()), args


def tool(func: Callable | None = None, *, name: str | None = None, docs: str | None = None, enabled: bool = True):
    """Mark a function as a tool (`@tool` or `@tool(name=..., docs=..., enabled=...)`).

    The function is returned unchanged, with its `Tool` on `__tool__`; `Toolset.decorated()`
    and a tools folder find it there."""

    def mark(fn: Callable) -> Callable:
        fn.__tool__ = Tool.from_function(fn, name=name, docs=docs, enabled=enabled)
        _DECORATED[fn.__tool__.name] = fn.__tool__
        return fn

    return mark(func) if func is not None else mark


_DECORATED: dict[str, Tool] = {}  # definitions (like a registry of classes), not per-user state


def load_tools_dir(folder: str | Path) -> dict[str, Tool]:
    """Every `@tool` function in the folder's *.py files (files starting with _ are skipped)."""
    folder = Path(folder)
    found: dict[str, Tool] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"confab_tools.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a broken tool file is the user's to fix; say which
            raise BackendError(f"Could not load the tool file {path}: {type(e).__name__}: {e}") from e
        for value in vars(module).values():
            t = getattr(value, "__tool__", None)
            if isinstance(t, Tool) and getattr(value, "__module__", None) == module.__name__:
                if t.name in found:
                    raise BackendError(f"Two tools are named {t.name!r} in {folder}; rename one.")
                found[t.name] = t
    return found


# ---- calls -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    positional: tuple[Any, ...] = ()
    error: str | None = None  # the call could not be read; this says why

    def signature(self) -> str:
        args = [repr(a) for a in self.positional] + [f"{k}={v!r}" for k, v in self.arguments.items()]
        return f"{self.name}({', '.join(args)})"

    def to_text(self) -> str:
        """The call as the model writes it in the default format."""
        return f'{CALL_START}\n{json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)}\n{CALL_END}'


@dataclass(frozen=True)
class ToolStep:
    """One call the model made, and what came back."""

    call: ToolCall
    output: str
    ok: bool
    seconds: float = 0.0

    @property
    def title(self) -> str:
        return STEP_PREFIX + self.call.signature()


def parse_json_call(body: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("?", error=f"The tool call is not valid JSON ({e.msg} at character {e.pos}).")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("?", error='A tool call must be a JSON object with "name" and "arguments".')
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(data["name"], error=f"The arguments are not valid JSON ({e.msg}).")
    if not isinstance(args, dict):
        return ToolCall(data["name"], error='"arguments" must be a JSON object of argument names to values.')
    return ToolCall(data["name"], args)


def parse_python_call(text: str) -> ToolCall:
    """`name(1, key="v")` -> ToolCall. Only literals are accepted as arguments."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        return ToolCall("?", error=f"The call {text!r} is not a readable function call ({e.msg}).")
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return ToolCall("?", error=f"{text!r} is not a call of a tool by name.")
    try:
        positional = tuple(ast.literal_eval(a) for a in node.args)
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**arguments")
        keywords = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ToolCall(node.func.id, error="Tool arguments must be plain values (text, numbers, lists, true/false).")
    return ToolCall(node.func.id, keywords, positional)


def call_from_title(title: str) -> ToolCall | None:
    """A transcript step's title (`Tool: name(args)`) back to its call."""
    if not title.startswith(STEP_PREFIX):
        return None
    call = parse_python_call(title[len(STEP_PREFIX):])
    return None if call.error else call


# ---- a set of tools for one reply ---------------------------------------------------------
class Toolset:
    """The tools one conversation may use: their docs and schemas, finding calls, running them."""

    def __init__(self, tools: Iterable[Tool | Callable] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else getattr(t, "__tool__", None) or Tool.from_function(t)
            if t.enabled:
                self.tools[t.name] = t

    @classmethod
    def decorated(cls, names: Iterable[str] | None = None) -> "Toolset":
        """Every function marked `@tool` so far (or those named)."""
        if names is None:
            return cls(_DECORATED.values())
        return cls(pick(_DECORATED, names, "decorated tools"))

    def __bool__(self) -> bool:
        return bool(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def generate_docs(self, prologue: bool = True) -> str:
        """What the model is told when its chat template does not take `tools=`."""
        docs = "\n".join(t.doc() for t in self.tools.values())
        if not prologue:
            return docs
        return (
            "You can call these tools. To call one, reply with only:\n"
            f'{CALL_START}\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n{CALL_END}\n'
            "The result comes back in the next message; then answer the user with it.\n\n"
            f"Tools:\n{docs}"
        )

    def find_calls(self, text: str) -> list[ToolCall]:
        """The calls in a reply: tagged JSON, else a reply that is only a JSON call, else `name(...)`."""
        tagged = [parse_json_call(body.strip()) for body in _TAGGED.findall(text)]
        if tagged:
            return tagged
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            call = parse_json_call(stripped)
            if not call.error and call.name in self.tools:
                return [call]
        calls = []
        for src in _BACKTICKED.findall(text):
            call = parse_python_call(src)
            if call.name in self.tools:
                calls.append(call)
        return calls

    def run(self, call: ToolCall) -> ToolStep:
        """Run one call. Unknown tools, bad arguments and the tool's own errors come back as text
        the model can read, never as an exception."""
        start = time.perf_counter()
        if call.error:
            return ToolStep(call, f"Error: {call.error}", False)
        t = self.tools.get(call.name)
        if t is None:
            known = ", ".join(self.tools) or "none"
            return ToolStep(call, f"Error: there is no tool named {call.name!r}. The tools are: {known}.", False)
        try:
            result = t.invoke(call.arguments, call.positional)
        except ValueError as e:
            return ToolStep(call, f"Error: {e}", False, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a failing tool is reported to the model, not raised
            log.warning("tool %s failed: %s", call.name, e, exc_info=True)
            return ToolStep(call, f"Error: {call.name} failed: {type(e).__name__}: {e}", False,
                            time.perf_counter() - start)
        output = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        return ToolStep(call, output, True, time.perf_counter() - start)

    def prepare(self, messages: list[Message], takes_tools: bool) -> list[Message]:
        """Tell the model about the tools through its system prompt, unless its template takes
        `tools=` itself."""
        if takes_tools or not self.tools:
            return list(messages)
        docs = self.generate_docs()
        if messages and messages[0].role == "system":
            return [Message("system", f"{messages[0].content}\n\n{docs}"), *messages[1:]]
        return [Message("system", docs), *messages]


def pick(available: dict[str, Tool], names: Iterable[str], where: str) -> list[Tool]:
    names = list(names)
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(
            f"Unknown tool {', '.join(map(repr, missing))}; the {where} are: {', '.join(available) or 'none'}."
        )
    return [available[n] for n in names]


# ---- the reply loop ----------------------------------------------------------------------
class _CallFilter:
    """Keeps calls out of the text a person sees: everything from `<tool_call>` on, and a reply
    that starts with `{` until it is known not to be a bare JSON call."""

    def __init__(self) -> None:
        self.matcher = StopMatcher((CALL_START,))
        self.in_call = False
        self.head = ""  # the reply's start, held until it shows whether it is JSON
        self.json_like: bool | None = None

    def feed(self, delta: str) -> str:
        if self.json_like is not False:  # still deciding, or holding a JSON-looking reply
            self.head += delta
            if self.json_like is None and self.head.strip():
                self.json_like = self.head.lstrip().startswith("{")
            if self.json_like is not False:
                return ""
            delta, self.head = self.head, ""
        if self.in_call:
            return ""
        out, self.in_call = self.matcher.feed(delta)
        return out

    def finish(self, was_call: bool) -> str:
        if self.json_like:
            return "" if was_call else self.head
        return "" if self.in_call else self.matcher.flush()


def stream_with_tools(
    stream: Callable[..., Iterator[Chunk]],
    messages: list[Message],
    params: GenerationParams,
    toolset: Toolset,
    takes_tools: bool = False,
    max_rounds: int = 5,
) -> Iterator[Chunk | ToolStep]:
    """Stream a reply, running the tools the model calls and letting it go on with the results.

    `stream(messages, params, tools=...)` is `ModelManager.stream` with the session bound.
    Yields text `Chunk`s (calls filtered out), a `ToolStep` per call, and a last Chunk with
    finish_reason and usage. Closing the iterator stops the engine as usual.
    """
    if not toolset:
        yield from stream(messages, params)
        return
    messages = toolset.prepare(messages, takes_tools)
    kwargs = {"tools": toolset.schemas()} if takes_tools else {}
    # A call ends the round: the model must not go on to imagine the tool's answer.
    round_params = params.replace(stop=(*params.stop, CALL_END))
    for round_no in range(max_rounds + 1):
        text, last, shown = "", None, _CallFilter()
        for chunk in stream(messages, round_params, **kwargs):
            if chunk.waiting is not None:
                yield chunk
                continue
            text += chunk.text
            visible = shown.feed(chunk.text)
            if visible:
                yield Chunk(visible)
            if chunk.finish_reason is not None:
                last = chunk
        calls = toolset.find_calls(text)
        tail = shown.finish(bool(calls))
        if tail:
            yield Chunk(tail)
        if not calls or last is None or last.finish_reason == "length":
            yield Chunk("", finish_reason=last.finish_reason if last else "stop", usage=last.usage if last else None)
            return
        if round_no == max_rounds:
            yield Chunk(f"\n\n(Stopped: the model asked for more than {max_rounds} rounds of tool calls.)",
                        finish_reason="stop", usage=last.usage)
            return
        said = text.split(CALL_START)[0].strip() if CALL_START in text else ""
        steps = [toolset.run(call) for call in calls]
        yield from steps
        messages = [*messages, *transcript_messages(said, steps)]


def transcript_messages(said: str, steps: list[ToolStep]) -> list[Message]:
    """What the model sees of a round of calls: its message (text and calls), then each result."""
    calls = "\n".join(s.call.to_text() for s in steps)
    content = f"{said}\n{calls}" if said else calls
    return [Message("assistant", content), *(Message("tool", s.output) for s in steps)]
