"""Tools a model may call: plain Python functions described to it, and its calls run safely.

A tool is a function with type hints and a docstring; pydantic gives its JSON schema and
checks the model's arguments. A `Toolset` is the tools one conversation may use (there is no
process-wide registry: a tools folder, a preset or a caller builds each one); it runs a call on
a thread of its own with a time limit, and stops waiting at once when the reply is cancelled.
How a model writes its calls is chat/formats.py's business; the loop that runs them is
chat/reply.py's. Knows neither engines nor Gradio nor HTTP.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from backends.base import BackendError, Cancel, Message

from .formats import Hermes, ToolCall, ToolFormat

log = logging.getLogger(__name__)

STEP_PREFIX = "Tool: "  # how a call is titled in a chat transcript (the UI's collapsible step)
TOOL_TIMEOUT_S = 30.0  # a tool that takes longer is abandoned and the model is told so


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

    def named(self, arguments: dict[str, Any], positional: tuple[Any, ...] = ()) -> dict[str, Any]:
        """Positional values given their names, so a call is stored (and shown) whole."""
        names = list(self.arguments.model_fields)
        if len(positional) > len(names):
            raise ValueError(f"{self.name} takes {len(names)} arguments, got {len(positional)}. Use {self.signature()}.")
        return {**dict(zip(names, positional)), **arguments}

    def invoke(self, arguments: dict[str, Any], positional: tuple[Any, ...] = ()) -> Any:
        """Validate, then call. Raises ValueError with a readable message for bad arguments."""
        names = list(self.arguments.model_fields)
        merged = self.named(arguments, positional)
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

    The function is returned unchanged, with its `Tool` on `__tool__`, where a `Toolset` given
    the function and a tools folder find it."""

    def mark(fn: Callable) -> Callable:
        fn.__tool__ = Tool.from_function(fn, name=name, docs=docs, enabled=enabled)
        return fn

    return mark(func) if func is not None else mark


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


# ---- steps -------------------------------------------------------------------------------
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


def transcript_messages(said: str, steps: list[ToolStep], fmt: ToolFormat | None = None) -> list[Message]:
    """What the model sees of a round of calls: its message (text and calls, in its own format),
    then each result."""
    calls = (fmt or Hermes()).write([s.call for s in steps])
    content = f"{said}\n{calls}" if said else calls
    return [Message("assistant", content), *(Message("tool", s.output) for s in steps)]


# ---- a set of tools for one reply ---------------------------------------------------------
class Toolset:
    """The tools one conversation may use: their docs and schemas, and running their calls."""

    def __init__(self, tools: Iterable[Tool | Callable] = (), timeout_s: float = TOOL_TIMEOUT_S) -> None:
        self.tools: dict[str, Tool] = {}
        self.timeout_s = timeout_s
        for t in tools:
            t = t if isinstance(t, Tool) else getattr(t, "__tool__", None) or Tool.from_function(t)
            if t.enabled:
                self.tools[t.name] = t

    def __bool__(self) -> bool:
        return bool(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def generate_docs(self, prologue: bool = True, fmt: ToolFormat | None = None) -> str:
        """What the model is told when its chat template does not take `tools=`."""
        if not prologue:
            return "\n".join(t.doc() for t in self.tools.values())
        return tools_prompt(self, None, fmt or Hermes())

    def run(self, call: ToolCall, cancel: Cancel | None = None) -> ToolStep:
        """Run one call on a thread of its own. Unknown tools, bad arguments, the tool's own
        errors and a tool past its time limit come back as text the model can read, never as an
        exception; a cancelled reply stops waiting at once (the tool's thread is left to end)."""
        start = time.perf_counter()
        if call.error:
            return ToolStep(call, f"Error: {call.error}", False)
        t = self.tools.get(call.name)
        if t is None:
            known = ", ".join(self.tools) or "none"
            return ToolStep(call, f"Error: there is no tool named {call.name!r}. The tools are: {known}.", False)
        try:
            call = replace(call, arguments=t.named(call.arguments, call.positional), positional=())
        except ValueError as e:
            return ToolStep(call, f"Error: {e}", False)
        done, result = threading.Event(), {}

        def work() -> None:
            try:
                result["value"] = t.invoke(call.arguments)
            except Exception as e:  # noqa: BLE001 - a failing tool is reported to the model, not raised
                result["error"] = e
            finally:
                done.set()

        threading.Thread(target=work, name=f"tool-{t.name}", daemon=True).start()
        deadline = start + self.timeout_s
        while not done.wait(Cancel.POLL_S):
            if cancel is not None and cancel.is_set():
                return ToolStep(call, "Error: the reply was stopped before the tool finished.", False,
                                time.perf_counter() - start)
            if time.perf_counter() > deadline:
                return ToolStep(call, f"Error: {t.name} took longer than {self.timeout_s:g} s and was abandoned.",
                                False, time.perf_counter() - start)
        return _step(call, result, time.perf_counter() - start)

    def prepare(self, messages: list[Message], takes_tools: bool, fmt: ToolFormat | None = None) -> list[Message]:
        """Tell the model about the tools through its system prompt, unless its template takes
        `tools=` itself."""
        if takes_tools or not self.tools:
            return list(messages)
        return with_system_note(messages, self.generate_docs(fmt=fmt))


def with_system_note(messages: list[Message], note: str) -> list[Message]:
    """`note` after the system prompt (or as one, when there is none)."""
    if messages and messages[0].role == "system":
        return [Message("system", f"{messages[0].content}\n\n{note}"), *messages[1:]]
    return [Message("system", note), *messages]


def tools_prompt(toolset: Toolset | None, schemas: list[dict[str, Any]] | None, fmt: ToolFormat) -> str:
    """The system prompt's part about tools: how to call (in the model's format), then each tool,
    from a Toolset's functions or from OpenAI-style schemas a client sent."""
    lines = [t.doc() for t in toolset.tools.values()] if toolset else []
    lines += [_schema_doc(s) for s in schemas or ()]
    return f"You can call these tools. {fmt.how_to()}\n\nTools:\n" + "\n".join(lines)


def _schema_doc(schema: dict[str, Any]) -> str:
    fn = schema.get("function") if isinstance(schema.get("function"), dict) else {}
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required = set(params.get("required") or ())
    args = ", ".join(f"{name}: {p.get('type', 'any') if isinstance(p, dict) else 'any'}"
                     + ("" if name in required else " = optional") for name, p in props.items())
    lines = [f"- {fn.get('name', '?')}({args}): {fn.get('description') or 'no description'}"]
    lines += [f"    {name}: {p['description']}" for name, p in props.items() if isinstance(p, dict) and p.get("description")]
    return "\n".join(lines)


def _step(call: ToolCall, result: dict[str, Any], seconds: float) -> ToolStep:
    error = result.get("error")
    if isinstance(error, ValueError):
        return ToolStep(call, f"Error: {error}", False, seconds)
    if error is not None:
        log.warning("tool %s failed: %s", call.name, error, exc_info=error)
        return ToolStep(call, f"Error: {call.name} failed: {type(error).__name__}: {error}", False, seconds)
    value = result.get("value")
    output = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return ToolStep(call, output, True, seconds)


def preset_toolset(spec: Any, available: dict[str, Tool]) -> "Toolset | None":
    """The tools a loaded preset switches on (None when it names none); a name the tools folder
    lacks is a BackendError that names the preset."""
    if spec is None or not spec.tools:
        return None
    try:
        return Toolset(pick(available, spec.tools, "tools in the tools folder"))
    except BackendError as e:
        raise BackendError(f"{spec.name}: {e}") from e


def pick(available: dict[str, Tool], names: Iterable[str], where: str) -> list[Tool]:
    names = list(names)
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(
            f"Unknown tool {', '.join(map(repr, missing))}; the {where} are: {', '.join(available) or 'none'}."
        )
    return [available[n] for n in names]
