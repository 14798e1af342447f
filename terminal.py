"""The terminal chat: `python app.py chat [--preset NAME]`, the same manager as the page.

Replies stream as they are generated; the loaded preset's tools run as they do in the page;
Ctrl-C stops a reply (the engine stops within a token), not the program; Ctrl-D or /quit
leaves. A stopped or failed reply keeps what it said, as in the page. Commands: /reset,
/system TEXT, /params key=value ..., /load PRESET, /save FILE, /help. Knows the manager, the
chat layer and presets, not Gradio or HTTP.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from backends.base import BackendError, GenerationParams, Message
from backends.manager import ModelManager
from chat.reply import Text
from chat.tools import Tool, Toolset, ToolStep, preset_toolset

HELP = """Commands:
  /reset               start a new conversation (keeps the system prompt)
  /system TEXT         set the system prompt (empty to clear)
  /params k=v ...      change sampling, e.g. /params temperature=0.2 max_new_tokens=256
  /params              show the current sampling settings
  /load PRESET         load another model preset
  /save FILE           save the conversation as OpenAI-format JSON
  /quit                leave (Ctrl-D works too); Ctrl-C stops a reply"""


class TerminalChat:
    def __init__(self, manager: ModelManager, presets: dict, out: TextIO = sys.stdout,
                 read: Callable[[str], str] = input, tools: dict[str, Tool] | None = None) -> None:
        self.manager, self.presets, self.out, self.read = manager, presets, out, read
        self.tools = tools or {}  # the tools folder's tools; the loaded preset switches some on
        self.history: list[Message] = []
        self.system = ""
        self.params = manager.default_params()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> None:
        info = self.manager.describe()
        self.say(f"Confab terminal chat — {info.get('name', 'no model loaded')}. /help for commands, Ctrl-D to quit.")
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return
            else:
                self.reply(line)

    def reply(self, text: str) -> None:
        self.history.append(Message("user", text))
        messages = ([Message("system", self.system)] if self.system else []) + self.history
        reply = self.manager.reply(messages, self.params, tools=self._toolset())
        self.say("bot> ", end="")
        try:
            for event in reply:
                if isinstance(event, Text):
                    self.say(event.text, end="")
                elif isinstance(event, ToolStep):
                    self.say(f"\n[{event.title} -> {event.output[:200]}]\nbot> ", end="")
        except KeyboardInterrupt:
            reply.cancel()  # the engine stops within one token
        self.history += reply.turn()  # what was said is kept, whatever ended the reply
        if reply.error is not None:
            self.say(f"\n[error] {reply.error}")
        elif reply.finish_reason == "cancelled":
            self.say(" [stopped]")
        else:
            self.say()

    def _toolset(self) -> Toolset | None:
        try:
            return preset_toolset(self.manager.spec, self.tools)
        except BackendError as e:
            self.say(f"[error] {e} Answering without tools.")
            return None

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        handlers: dict[str, Callable[[str], Any]] = {
            "/quit": lambda _: "quit", "/exit": lambda _: "quit", "/help": lambda _: self.say(HELP),
            "/reset": self.reset, "/system": self.set_system, "/params": self.set_params,
            "/load": self.load, "/save": self.save,
        }
        handler = handlers.get(name)
        if handler is None:
            self.say(f"Unknown command {name}. {HELP}")
            return None
        return handler(rest.strip())

    def reset(self, _: str) -> None:
        self.history.clear()
        self.say("[new conversation]")

    def set_system(self, text: str) -> None:
        self.system = text
        self.say(f"[system prompt {'set' if text else 'cleared'}]")

    def set_params(self, text: str) -> None:
        if not text:
            self.say(json.dumps(self.params.to_dict()))
            return
        changes: dict[str, Any] = {}
        try:
            for pair in shlex.split(text):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise BackendError(f"Write settings as key=value, got {pair!r}.")
                changes[key] = _value(value)
            self.params = GenerationParams.from_dict(changes, base=self.params)
        except (BackendError, ValueError) as e:
            self.say(f"[error] {e}")
            return
        self.say(f"[params] {', '.join(f'{k}={getattr(self.params, k)}' for k in changes)}")

    def load(self, key: str) -> None:
        if key not in self.presets:
            self.say(f"[error] Unknown preset {key!r}; known: {', '.join(self.presets)}.")
            return
        self.say(f"[loading {key} …]")
        try:
            info = self.manager.load(self.presets[key])
        except BackendError as e:
            self.say(f"[error] {e}")
            return
        self.params = self.manager.default_params()
        self.say(f"[loaded {info['name']} in {info['load_s']:.1f} s]")

    def save(self, path: str) -> None:
        if not path:
            self.say("[error] Name a file: /save chat.json")
            return
        messages = ([Message("system", self.system)] if self.system else []) + self.history
        try:
            Path(path).expanduser().write_text(json.dumps([m.to_dict() for m in messages], indent=2,
                                                          ensure_ascii=False), encoding="utf-8")
        except OSError as e:
            self.say(f"[error] Could not write {path}: {e.strerror}")
            return
        self.say(f"[saved {len(messages)} messages to {path}]")


def _value(text: str) -> Any:
    """key=value text -> a number, true/false, null, a JSON list, or the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
