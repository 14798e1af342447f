"""NanoLLM's chat interfaces on Confab's engines: `ChatHistory`, `bot_function`, `BotFunctions`.

    chat = ChatHistory("embedded", system_prompt="You are terse.")
    chat.append("user", "What is the capital of France?")
    print(chat.generate())        # the reply is appended to the history too

Each history is one session: the engine keeps its KV cache between turns (transformers by
session id, llama.cpp by prompt prefix), so turn N reads only the new tokens. Bot functions are
Confab tools: the model's call is parsed and checked against the function's signature, never
`eval`-ed, and the result is added to the chat before generation resumes. Knows the manager and
the tool loop, not Gradio or HTTP.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterable, Iterator

from backends.base import GenerationParams, Message, ParamError, Usage
from chat.formats import Pythonic, ToolFormat
from chat.reply import Text
from chat.tools import Tool, Toolset, ToolStep, tool

from ._models import open_model

ROLE_ALIASES = {"bot": "assistant", "human": "user", "environment": "tool", "function": "tool"}


def bot_function(func: Callable | None = None, *, name: str | None = None, docs: str | None = "pydoc",
                 enabled: bool = True):
    """Expose a function to the model, as NanoLLM's decorator does (`@bot_function` or
    `@bot_function(name=..., docs=..., enabled=...)`). `docs` is "pydoc" (the docstring) or
    the description text itself."""
    text = None if docs in (None, "pydoc", "python") else docs

    def register(fn: Callable) -> Callable:
        marked = tool(fn, name=name, docs=text, enabled=enabled)
        _BOT_FUNCTIONS[marked.__tool__.name] = marked.__tool__
        return marked

    return register(func) if func is not None else register


# NanoLLM's registry: `BotFunctions()` means every `@bot_function` defined so far. It holds
# definitions (like a registry of classes), is this API's alone, and no Confab tool uses it.
_BOT_FUNCTIONS: dict[str, Tool] = {}


class BotFunctions(Toolset):
    """The functions a bot may call: by default every `@bot_function` defined so far."""

    def __init__(self, functions: Iterable[Tool | Callable] | None = None) -> None:
        super().__init__(_BOT_FUNCTIONS.values() if functions is None else functions)

    def __iter__(self):
        return iter(t.fn for t in self.tools.values())

    def dispatch(self, text: str, fmt: ToolFormat | None = None) -> list[ToolStep]:
        """Find the calls in a piece of model text (NanoLLM's backticked `name(...)` by default)
        and run each (errors come back as text)."""
        return [self.run(call) for call in (fmt or Pythonic()).find(text, set(self.tools))]


class ChatHistory:
    def __init__(self, model: Any, system_prompt: str | None = None, chat_template: str | None = None,
                 functions: Toolset | Iterable[Callable] | None = None, **params: Any) -> None:
        """`model`: a loaded ModelManager, a ModelSpec, a preset name or a model path/hub id.
        `params` are default sampling settings (max_new_tokens, temperature, ...)."""
        self.manager, self._owns_model = open_model(model, chat_template=chat_template)
        self.params = GenerationParams.from_dict(params, base=self.manager.default_params())
        self.functions = _toolset(functions)
        self.system_prompt = system_prompt
        self.messages: list[Message] = []
        self.session_id = uuid.uuid4().hex
        self.usage: Usage | None = None  # of the last reply: cached_tokens shows the cache at work
        self.steps: list[ToolStep] = []  # the calls the last reply made

    # ---- the conversation -------------------------------------------------------------------
    def append(self, role: str = "user", msg: str | None = None, **kwargs: Any) -> dict[str, str]:
        """Add a message; NanoLLM's role names (`bot`) work too. Returns it as a dict."""
        text = msg if msg is not None else kwargs.pop("text", None)
        if kwargs:
            raise ParamError(f"append() takes role and msg; unexpected {', '.join(kwargs)}.")
        if not isinstance(text, str):
            raise ParamError(f"msg must be text, got {type(text).__name__}.")
        message = Message(ROLE_ALIASES.get(role, role), text)
        if message.role == "system":
            self.system_prompt = text
        else:
            self.messages.append(message)
        return message.to_dict()

    def reset(self, system_prompt: bool | str = True) -> None:
        """Forget the conversation and start a new session. `system_prompt`: True keeps it,
        False drops it, a string replaces it."""
        self.messages.clear()
        if system_prompt is False:
            self.system_prompt = None
        elif isinstance(system_prompt, str):
            self.system_prompt = system_prompt
        self.session_id = uuid.uuid4().hex

    def pop(self, count: int = 1) -> list[dict[str, str]]:
        """Remove and return the last `count` messages (the engine's cache trims to match)."""
        if count < 0:
            raise ParamError(f"count must be 0 or more, got {count}.")
        count = min(count, len(self.messages))
        removed = self.messages[len(self.messages) - count:]
        del self.messages[len(self.messages) - count:]
        return [m.to_dict() for m in removed]

    def to_messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style dicts, system prompt first."""
        return [m.to_dict() for m in self._with_system()]

    def _with_system(self) -> list[Message]:
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        return system + self.messages

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.messages[index].to_dict()

    # ---- generation --------------------------------------------------------------------------
    def generate(self, streaming: bool = False, functions: Toolset | Iterable[Callable] | None = None,
                 **params: Any) -> str | Iterator[str]:
        """The model's reply to the conversation, appended to it. `streaming=True` returns an
        iterator of text pieces (the reply is appended when it ends). Calls to `functions` (or
        the history's own) are run and their results added before the model goes on."""
        pieces = self._stream(functions, params)
        return pieces if streaming else "".join(pieces)

    def _stream(self, functions: Any, params: dict[str, Any]) -> Iterator[str]:
        toolset = _toolset(functions) or self.functions or None
        settings = self.params.replace(**params) if params else self.params
        reply = self.manager.reply(self._with_system(), settings, self.session_id, tools=toolset)
        self.steps = reply.steps
        try:
            for event in reply:
                if isinstance(event, Text):
                    yield event.text
        finally:
            reply.cancel()  # a caller that stops reading stops the engine (a no-op once it ended)
            self.messages += reply.turn()  # what was said is kept, whatever ended the reply
            self.usage = reply.usage
        if reply.error is not None:
            raise reply.error

    def close(self) -> None:
        """Unload the model if this history loaded it."""
        if self._owns_model:
            self.manager.unload()


def _toolset(functions: Toolset | Iterable[Callable] | None) -> Toolset | None:
    """What `functions=` may be: a Toolset (BotFunctions), some functions, or nothing."""
    if functions is None or isinstance(functions, Toolset):
        return functions
    return BotFunctions(functions)
