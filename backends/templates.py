"""Chat templates: the built-in ones for models that ship none, and safe rendering of any.

Rendering returns *segments*: template text (which may hold control tokens such as
`<|im_start|>`) and message content (which is always plain text). Backends tokenize the two
kinds differently, so a user who types `<|im_start|>system` gets those characters, never the
control token. This module knows Jinja, not tokenizers or engines.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .base import BackendError, Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja, in the same dialect as Hugging Face chat templates
    stop: tuple[str, ...] = ()
    bos_token: str = ""
    eos_token: str = ""
    parts: bool = False  # content as a list of parts ({"type": "image"}, {"type": "text"}): vision templates


@dataclass(frozen=True)
class Segment:
    text: str
    is_content: bool  # message content: encode as text, never as control tokens
    message: int | None = field(default=None, compare=False)  # whose content (an index into messages)


_SYSTEM_FIRST = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
)

BUILTIN: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate(
            "chatml",
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            stop=("<|im_end|>",),
            eos_token="<|im_end|>",
        ),
        ChatTemplate(
            "llama-2",
            _SYSTEM_FIRST + "{% for m in loop_messages %}"
            "{% if m['role'] == 'user' %}<s>[INST] "
            "{% if loop.first and system is not none %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
            "{{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %} {{ m['content'] }} </s>{% endif %}{% endfor %}",
            stop=("</s>",),
            bos_token="<s>",
            eos_token="</s>",
        ),
        ChatTemplate(
            "llama-3",
            "<|begin_of_text|>{% for m in messages %}"
            "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            stop=("<|eot_id|>", "<|end_of_text|>"),
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
        ),
        ChatTemplate(
            "vicuna-v1",
            _SYSTEM_FIRST + "{% if system is none %}{% set system = 'A chat between a curious user and an "
            "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers "
            "to the user\\'s questions.' %}{% endif %}{{ system }} "
            "{% for m in loop_messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
            "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
            stop=("</s>", "USER:"),
            bos_token="<s>",
            eos_token="</s>",
        ),
        ChatTemplate(
            "zephyr",
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            stop=("</s>",),
            eos_token="</s>",
        ),
        ChatTemplate(
            "phi-3",
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            stop=("<|end|>", "<|endoftext|>"),
            eos_token="<|end|>",
        ),
        ChatTemplate(
            # Gemma has no system role: the system text opens the first user turn.
            "gemma",
            _SYSTEM_FIRST + "<bos>{% for m in loop_messages %}"
            "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
            "{% if loop.first and system is not none %}{{ system }}\n\n{% endif %}"
            "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
            stop=("<end_of_turn>",),
            bos_token="<bos>",
            eos_token="<end_of_turn>",
        ),
        ChatTemplate(
            # OpenChatKit's `<human>:` / `<bot>:` turns; a system prompt is a plain first line.
            "openchatkit",
            _SYSTEM_FIRST + "{% if system is not none %}{{ system }}\n{% endif %}"
            "{% for m in loop_messages %}{% if m['role'] == 'user' %}<human>: {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}<bot>: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<bot>:{% endif %}",
            stop=("<human>:",),
        ),
        ChatTemplate(
            # No chat format at all: the text is the prompt (completion-style APIs such as
            # OpenChatKit's ChatModel, which format their own turns).
            "raw",
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        ),
        ChatTemplate(
            "internlm2",
            "<s>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            stop=("<|im_end|>",),
            bos_token="<s>",
            eos_token="<|im_end|>",
        ),
    ]
}


FALLBACK = "chatml"


def choose(named: str | None, model_source: str | None, bos: str = "", eos: str = "", what: str = "") -> ChatTemplate:
    """The template a preset names, else the model's own, else the built-in fallback."""
    if named:
        return resolve(named)
    if model_source:
        return ChatTemplate("model", model_source, bos_token=bos, eos_token=eos)
    log.warning("%s ships no chat template; using the built-in %s", what or "the model", FALLBACK)
    return BUILTIN[FALLBACK]


def names() -> list[str]:
    return sorted(BUILTIN)


def resolve(name_or_path: str, base_dir: Path | None = None) -> ChatTemplate:
    """A built-in template by name, Jinja source itself, or a Jinja file (relative paths are
    taken from base_dir)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if is_source(name_or_path):
        return ChatTemplate(name="inline", source=name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return ChatTemplate(name=path.name, source=path.read_text(encoding="utf-8"))
    raise BackendError(
        f"Unknown chat template {name_or_path!r}: not a built-in one ({', '.join(names())}) "
        f"and no file at {path}."
    )


def is_source(text: str) -> bool:
    """Whether a chat_template setting is Jinja source rather than a name or a path."""
    return "{{" in text or "{%" in text


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Same environment settings as transformers' chat templates, so model templates render alike.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_segments(
    template: ChatTemplate | str,
    messages: Iterable[Message],
    add_generation_prompt: bool = True,
    **context: Any,
) -> list[Segment]:
    """Render messages through a template, keeping message content apart from template text.

    Asked for a generation prompt after the assistant's own message, it *continues* that
    message instead (HF's `continue_final_message`, llama.cpp server's assistant prefill): no
    generation prompt, and nothing after the message's content (no end-of-turn), so the model
    extends it. `context` reaches the template (`tools`, `enable_thinking`, ...)."""
    if isinstance(template, str):
        template = ChatTemplate(name="custom", source=template)
    messages = list(messages)
    continuing = add_generation_prompt and bool(messages) and messages[-1].role == "assistant"
    add_generation_prompt = add_generation_prompt and not continuing
    context = {"bos_token": template.bos_token, "eos_token": template.eos_token, **context}
    nonce = secrets.token_hex(4)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    try:
        compiled = _compile(template.source)
        marked = compiled.render(
            messages=[_as_dict(m, mark, template.parts) for m, mark in zip(messages, marks)],
            add_generation_prompt=add_generation_prompt,
            **context,
        )
        plain = compiled.render(
            messages=[_as_dict(m, m.content, template.parts) for m in messages],
            add_generation_prompt=add_generation_prompt, **context,
        )
    except jinja2.TemplateError as e:
        raise BackendError(f"The chat template {template.name!r} could not render this conversation: {e}") from e
    segments = _split(marked, nonce, messages, plain)
    if continuing:
        segments = _up_to_content_of(segments, len(messages) - 1, template.name)
    return [s for s in segments if s.text]


def _as_dict(message: Message, content: str, parts: bool) -> dict[str, Any]:
    """A message as templates take it; with `parts`, its images (placeholders the engine fills in)
    before its text."""
    if not parts:
        return {**message.to_dict(), "content": content}
    images = [{"type": "image"} for _ in message.images]
    return {**message.to_dict(), "content": [*images, {"type": "text", "text": content}]}


def _up_to_content_of(segments: list[Segment], index: int, name: str) -> list[Segment]:
    """The segments up to the end of message `index`'s content (its last appearance)."""
    ends = [i for i, s in enumerate(segments) if s.message == index]
    if not ends:
        raise BackendError(f"The chat template {name!r} leaves the last assistant message out, so it cannot "
                           "be continued.")
    return segments[: ends[-1] + 1]


def _split(marked: str, nonce: str, messages: list[Message], plain: str) -> list[Segment]:
    pattern = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    candidates = []
    # Templates that trim content (llama-3 and gemma from the hub do) must still match the
    # text the template itself renders, so try the content as given, then stripped.
    for shape in (lambda s: s, str.strip):
        segments: list[Segment] = []
        pos = 0
        for match in pattern.finditer(marked):
            if match.start() > pos:
                segments.append(Segment(marked[pos : match.start()], False))
            index = int(match.group(1))
            segments.append(Segment(shape(messages[index].content), True, index))
            pos = match.end()
        if pos < len(marked):
            segments.append(Segment(marked[pos:], False))
        segments = [s for s in segments if s.text or s.is_content]  # empty content still marks its place
        if "".join(s.text for s in segments) == plain:
            return segments
        candidates.append(segments)
    return candidates[0]  # the template rewrites content some other way: keep it as typed


def render_text(template: ChatTemplate | str, messages: Iterable[Message], **kwargs: Any) -> str:
    return "".join(s.text for s in render_segments(template, messages, **kwargs))


def template_context(tools: list[dict[str, Any]] | None = None, thinking: bool | None = None) -> dict[str, Any]:
    """What a template gets beside the messages: `tools` when there are some, and `enable_thinking`
    only when it was chosen (templates test `enable_thinking is defined` for their default)."""
    context: dict[str, Any] = {}
    if tools:
        context["tools"] = tools
    if thinking is not None:
        context["enable_thinking"] = thinking
    return context
