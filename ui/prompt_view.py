"""The prompt view: the exact prompt the model reads for the chat on screen, and its length.

Template text (the model's own format; the engine parses its control tokens) is marked apart
from message text (read as text: a `<|im_end|>` typed in a message is characters, never a
control token). Every piece of text is escaped on its way into the page: messages are hostile
input. Knows Gradio and the manager's `render_prompt`, nothing of engines.
"""

from __future__ import annotations

import html
import json
from typing import Any

import gradio as gr

from backends.prompting import RenderedPrompt
from chat.reply import tool_format

from .chat import text_input, to_messages
from .errors import shown

SERVER_RENDERS = "The server renders the prompt; Confab sends it the messages."
# Scoped to the output component (gr.HTML's css_template). Marked parts keep dark text on amber in
# both themes (about 12:1), and an underline besides the colour.
CSS = """
.pv-count { font-weight: 600; margin: 0 0 0.3em; }
.pv-note, .pv-legend { font-size: 0.9em; margin: 0 0 0.4em; opacity: 0.9; }
.pv-prompt { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
  font-size: 0.85em; line-height: 1.45; max-height: 60vh; overflow: auto; margin: 0; padding: 0.6em;
  border: 1px solid var(--border-color-primary, #ccc); border-radius: 6px; }
.pv-t { background: #fde68a; color: #1f2937; border-bottom: 2px solid #b45309; border-radius: 2px; }
"""


class PromptView:
    """A base of `Handlers` (ui/handlers.py): its `_checked`, `_controls`, `model_message` and `manager`
    are used."""

    @shown
    def prompt_view(self, request: gr.Request, history: Any, system_prompt: Any, *values: Any) -> str:
        """Show: the prompt a reply to the chat on screen would read, with the page's system prompt,
        sampling settings and tools (`values`: PARAM_FIELDS, then "Use tools"). Anyone may look: it
        holds only this person's conversation and the server's template."""
        system_prompt = text_input(system_prompt, "The system prompt")
        chat = self._checked(history, system_prompt)
        params, toolset = self._controls(values)
        # Attached files as a reply reads them (Handlers.model_message: their text and pictures).
        messages = to_messages(chat, system_prompt, tool_format(self.manager), self.model_message)
        # The tools described as a reply describes them (in the template, or in the system prompt).
        messages, params, schemas = self.manager.reply(messages, params, tools=toolset).engine_input()
        view = self.manager.render_prompt(messages, params, schemas)
        continuing = bool(messages) and messages[-1].role == "assistant"
        return prompt_html(view, continuing)


def prompt_html(view: RenderedPrompt, continuing: bool = False) -> str:
    """The view as HTML: the count, a legend, then the prompt (or, when the server renders it, the
    messages as JSON). All text is escaped."""
    parts = [f'<p class="pv-count">{_esc(count_line(view))}</p>']
    if view.dropped:
        earlier = "1 earlier message is" if view.dropped == 1 else f"{view.dropped} earlier messages are"
        parts.append(f'<p class="pv-note">{earlier} left out, to fit the context with room for the reply.</p>')
    if view.messages is not None:
        sent = json.dumps(view.messages, ensure_ascii=False, indent=2)
        parts += [f'<p class="pv-note">{_esc(SERVER_RENDERS)}</p>', f'<pre class="pv-prompt">{_esc(sent)}</pre>']
        return "".join(parts)
    if continuing:
        parts.append('<p class="pv-note">The chat ends with the model\'s reply, so this is the prompt Continue '
                     "sends; your next message is read after the reply and its end of turn.</p>")
    if view.marked:
        parts.append('<p class="pv-legend"><span class="pv-t">Marked</span>: the chat template, whose control '
                     "tokens the model reads as control tokens. Unmarked: message text, read as text whatever it "
                     "holds.</p>")
    else:
        parts.append('<p class="pv-note">This engine does not tell its template apart from the messages here.</p>')
    body = "".join(f'<span class="pv-t">{_esc(text)}</span>' if is_template else _esc(text)
                   for text, is_template in view.segments)
    parts.append(f'<pre class="pv-prompt" aria-label="The prompt">{body}</pre>')
    return "".join(parts)


def count_line(view: RenderedPrompt) -> str:
    """"312 tokens of 8,192" (as the engine counts them), or an estimate, or what the server knows."""
    of = f" of {view.n_ctx:,}" if view.n_ctx else ""
    if view.tokens is None:
        return f"The server counts the tokens; the context holds {view.n_ctx:,}." if view.n_ctx else \
            "The server counts the tokens."
    if not view.exact:
        return f"About {view.tokens:,} tokens{of} (an estimate: the tokenizer is the server's)"
    return f"{view.tokens:,} tokens{of}"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
