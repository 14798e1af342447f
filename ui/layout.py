"""The Gradio Blocks page: components with stable element ids, and the events that wire them.

Behaviour lives in `ui.handlers`; this module only places components and connects events.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from backends.base import GenerationParams
from chat.attachments import IMAGE_SUFFIXES, TEXT_SUFFIXES

from .chat import PARAM_FIELDS, ui_values
from .conversations import browser_value, empty_book
from .handlers import Handlers
from .models import CUSTOM
from .prompt_view import CSS as PROMPT_CSS

CSS = """
#status { min-height: 1.5em; font-size: 0.9em; opacity: 0.9; }
#chatbot { flex-grow: 1; }
footer { display: none !important; }
/* Text on buttons at least 4.5:1 (white on Gradio's orange is 2.8:1), light and dark. */
:root, .dark {
  --button-primary-background-fill: #c2410c; --button-primary-background-fill-hover: #9a3412;
  --button-primary-text-color: #ffffff; --button-primary-text-color-hover: #ffffff;
  --button-cancel-background-fill: #b91c1c; --button-cancel-background-fill-hover: #991b1b;
  --button-cancel-text-color: #ffffff; --button-cancel-text-color-hover: #ffffff;
}
/* A focus ring that shows where the keyboard is. */
button:focus-visible, textarea:focus-visible, input:focus-visible, select:focus-visible,
[role="radio"]:focus-visible, label:focus-within {
  outline: 3px solid #2563eb !important; outline-offset: 2px;
}
#input-row { flex-wrap: nowrap !important; align-items: flex-end; }
#input-row > * { min-width: 0 !important; }
#conversations .wrap { flex-direction: column; align-items: stretch; }
#conversations label { width: 100%; }
/* A phone: the chat leaves room for the input, Send/Stop and the status line in the first screen. */
@media (max-width: 640px) {
  #chatbot { height: calc(100dvh - 300px) !important; min-height: 200px; }
  #send, #stop { min-width: 56px !important; padding-left: 8px; padding-right: 8px; }
  #actions { gap: 4px; }
  #actions button { min-width: 0 !important; flex: 1 1 auto; }
}
"""
# Esc stops a reply; ArrowUp in an empty message box edits the last message you sent; the
# status line is announced to screen readers. Runs once when the page loads.
JS = """
() => {
  const status = () => document.querySelector('#status');
  const mark = () => { const s = status(); if (s && !s.getAttribute('aria-live')) {
    s.setAttribute('aria-live', 'polite'); s.setAttribute('role', 'status'); } };
  // The message box's paperclip gets a stable id and a name a screen reader says.
  const clip = () => { const b = document.querySelector('#chat-input button.upload-button, #chat-input [data-testid="upload-button"]');
    if (b && b.id !== 'attach') { b.id = 'attach'; b.setAttribute('aria-label', 'Attach files or pictures'); } };
  const watch = () => { mark(); clip(); };
  watch(); new MutationObserver(watch).observe(document.body, {childList: true, subtree: true});
  // On a phone the conversations list starts closed: the chat and its input come first.
  if (window.innerWidth < 700) {
    const close = () => { const t = document.querySelector('#sidebar button[aria-label="Toggle Sidebar"]');
      if (!t) return setTimeout(close, 100);
      if (document.querySelector('#sidebar.open, .sidebar.open')) t.click(); };
    close();
  }
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { const stop = document.querySelector('#stop'); if (stop) stop.click(); }
    if (e.key === 'ArrowUp' && e.target.closest && e.target.closest('#chat-input') && !e.target.value) {
      const edits = document.querySelectorAll('#chatbot [data-testid="user"] ~ * button[aria-label="Edit"],'
        + ' #chatbot button[aria-label="Edit"]');
      if (edits.length) { e.preventDefault(); edits[edits.length - 1].click(); }
    }
  });
}
"""
# Math only where it is meant: "$5 and $10" stays text; $$…$$, \\(…\\) and \\[…\\] render.
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
STORAGE_KEY = "confab-chat"
FILE_TYPES = [".pdf", *sorted(TEXT_SUFFIXES), *sorted(IMAGE_SUFFIXES)]
EXAMPLES = [
    {"text": "Explain what a context window is, in two sentences."},
    {"text": "Write a haiku about a quiet server room."},
    {"text": "Give me three names for a cat who likes to code."},
]


MODEL_WATCH_S = 5  # how often a page asks whether another user switched the model


def build(handlers: Handlers, current_preset: str | None, concurrency: int = 1, secret: str | None = None) -> gr.Blocks:
    """`secret` encrypts the chats each browser keeps; a stable one keeps chats across restarts."""
    defaults = handlers.defaults()
    limits = handlers.limits
    # Gradio's own copies of uploads and exports are removed after an hour, checked hourly.
    with gr.Blocks(title="Confab", fill_height=True, delete_cache=(3600, 3600)) as demo:
        saved = gr.BrowserState(browser_value(empty_book()), storage_key=STORAGE_KEY, secret=secret)
        book = gr.State(empty_book())  # this session's conversations (server side; see ui/conversations.py)
        seen_version = gr.State(handlers.manager.version)
        side = _sidebar()
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chat = _chat_column(limits.message_chars)
            with gr.Column(scale=1, min_width=280):
                model = _model_panel(handlers, current_preset)
                system = gr.Textbox(
                    label="System prompt", elem_id="system-prompt", lines=3, max_length=limits.message_chars,
                    placeholder="Optional instructions for the assistant",
                )
                # Tools come from the loaded preset; the box lets a user turn them off.
                use_tools = gr.Checkbox(value=True, elem_id="use-tools", **handlers.tools_label())
                thinking = gr.Radio(
                    choices=[("Model's default", "default"), ("On", "on"), ("Off", "off")],
                    value=dict(zip(PARAM_FIELDS, ui_values(defaults)))["thinking"], label="Thinking",
                    info="For models whose template switches reasoning (enable_thinking)", elem_id="thinking")
                sampling_preset, sliders = _sampling_panel(handlers, defaults)
                sliders.append(thinking)  # PARAM_FIELDS order: the switch is the last of them
        _wire(demo, handlers, chat, model, system, sampling_preset, [*sliders, use_tools], saved, concurrency,
              side, book)
        _wire_conversations(handlers, chat, side, system, [*sliders, use_tools], saved, book)
        # The prompt a reply would read: the chat, its system prompt, the sampling controls and tools.
        chat["prompt_show"].click(handlers.prompt_view, [chat["chatbot"], system, *sliders, use_tools],
                                  chat["prompt_out"], api_visibility="private", preprocess=False)
        timer = gr.Timer(MODEL_WATCH_S)
        timer.tick(handlers.watch, seen_version, [seen_version, chat["status"], use_tools], api_visibility="private",
                   show_progress="hidden", concurrency_limit=None)
    return demo


def _sidebar() -> dict[str, Any]:
    s: dict[str, Any] = {}
    with gr.Sidebar(label="Conversations", open=True, elem_id="sidebar"):
        s["new"] = gr.Button("New chat", elem_id="new-chat", variant="primary", size="sm")
        s["search"] = gr.Textbox(show_label=False, placeholder="Search titles", elem_id="search-chats", max_length=200)
        s["list"] = gr.Radio(choices=[], value=None, show_label=False, elem_id="conversations",
                             label="Conversations")
        with gr.Accordion("This chat", open=False, elem_id="chat-menu"):
            s["title"] = gr.Textbox(label="Title", placeholder="A new title", elem_id="chat-title", max_length=120)
            s["rename"] = gr.Button("Rename", elem_id="rename-chat", size="sm")
            s["delete"] = gr.Button("Delete…", elem_id="delete-chat", size="sm")
            s["confirm"] = gr.Button("Delete it for good", elem_id="delete-confirm", variant="stop", size="sm",
                                     visible=False)
            s["export_all"] = gr.Button("Export all chats", elem_id="export-all", size="sm")
    return s


def _chat_column(max_chars: int) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["chatbot"] = gr.Chatbot(
        elem_id="chatbot", label="Chat", height="65vh", editable="user",
        buttons=["copy", "copy_all"], latex_delimiters=LATEX, examples=EXAMPLES,
        placeholder="Ask anything. Replies stream from the model loaded on the right.",
    )
    c["versions"] = gr.Dropdown(choices=[], value=None, label="Other versions in this chat", elem_id="versions",
                                visible=False)
    with gr.Row(elem_id="input-row"):
        # Text, files and pictures (the paperclip, id `attach`): read and checked by the server
        # when the message is sent (ui.handlers._attach), whatever the page let through.
        c["input"] = gr.MultimodalTextbox(
            elem_id="chat-input", show_label=False, scale=8, lines=1, max_lines=8, autofocus=True,
            file_count="multiple", file_types=FILE_TYPES, sources=["upload"], submit_btn=False,
            max_plain_text_length=max_chars,
            placeholder="Message — Enter sends, Shift+Enter for a new line, Esc stops; attach files or pictures",
        )
        # The Gradio API's /respond takes a plain text message, as before the box took files.
        c["api_message"] = gr.Textbox(visible="hidden", max_length=max_chars, label="message")
        # The page's name for its last Send (made by NAME_SEND), which its Stop names (STOP_JS).
        c["send_id"] = gr.Textbox("", visible="hidden", max_length=64, label="send_id")
        c["send"] = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=64)
        c["stop"] = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=64)
    c["status"] = gr.Markdown(elem_id="status")
    with gr.Row(elem_id="actions"):
        c["continue"] = gr.Button("Continue", elem_id="continue", size="sm", visible=False)
        c["regenerate"] = gr.Button("Regenerate", elem_id="regenerate", size="sm")
        c["undo"] = gr.Button("Undo", elem_id="undo", size="sm")
        c["clear"] = gr.Button("Clear", elem_id="clear", size="sm")
        c["export"] = gr.Button("Export JSON", elem_id="export", size="sm")
        c["import"] = gr.UploadButton("Import JSON", elem_id="import", size="sm", file_types=[".json"])
    c["export_file"] = gr.File(label="Exported chat", visible=False, elem_id="export-file")
    c.update(_prompt_panel())
    return c


def _prompt_panel() -> dict[str, Any]:
    """The prompt the model reads for the chat on screen, on demand (ui/prompt_view.py)."""
    p: dict[str, Any] = {}
    with gr.Accordion("Prompt the model reads", open=False, elem_id="prompt-view"):
        p["prompt_show"] = gr.Button("Show", elem_id="prompt-view-show", size="sm")
        p["prompt_out"] = gr.HTML(elem_id="prompt-view-output", css_template=PROMPT_CSS, js_on_load=None)
    return p


def _model_panel(handlers: Handlers, current_preset: str | None) -> dict[str, Any]:
    m: dict[str, Any] = {}
    with gr.Accordion("Model", open=True):
        m["model"] = gr.Dropdown(
            choices=handlers.model_choices(), value=current_preset or CUSTOM, label="Preset", elem_id="model",
        )
        m["custom"] = gr.Textbox(
            label="…or a hub id, local folder, .gguf path or server URL", elem_id="model-path",
            placeholder="Qwen/Qwen2.5-0.5B-Instruct@main · org/x-GGUF/x.Q4_K_M.gguf · ~/models/x.gguf · "
            "http://127.0.0.1:23333/v1",
        )
        m["cached"] = gr.Dropdown(
            choices=[], value=None, label="Downloaded models (Hugging Face cache)", elem_id="cached-models",
        )
        m["backend"] = gr.Radio(
            choices=handlers.backend_choices(), value="transformers", label="Backend for a custom model",
            elem_id="backend",
        )
        with gr.Row():
            m["load"] = gr.Button("Load", elem_id="load", variant="primary", size="sm")
            m["unload"] = gr.Button("Unload", elem_id="unload", size="sm")
        m["note"] = gr.Markdown(visible=False, elem_id="model-note")  # what visitors see instead
    return m


def _sampling_panel(handlers: Handlers, defaults: GenerationParams) -> tuple[gr.Dropdown, list]:
    values = dict(zip(PARAM_FIELDS, ui_values(defaults)))
    with gr.Accordion("Sampling", open=False):
        preset = gr.Dropdown(
            choices=sorted(handlers.sampling_presets), value=None, label="Sampling preset",
            elem_id="sampling-preset",
        )
        sliders = [
            gr.Slider(0, 2, value=values["temperature"], step=0.05, label="Temperature", elem_id="temperature"),
            gr.Slider(0.01, 1, value=values["top_p"], step=0.01, label="Top p", elem_id="top-p"),
            gr.Slider(0, 200, value=values["top_k"], step=1, label="Top k (0 = off)", elem_id="top-k"),
            gr.Slider(0, 0.5, value=values["min_p"], step=0.01, label="Min p (0 = off)", elem_id="min-p"),
            gr.Slider(1, handlers.limits.max_new_tokens, value=min(values["max_new_tokens"], handlers.limits.max_new_tokens),
                      step=1, label="Max new tokens", elem_id="max-new-tokens"),
            gr.Slider(0.8, 1.5, value=values["repetition_penalty"], step=0.01, label="Repetition penalty",
                      elem_id="repetition-penalty"),
            gr.Checkbox(value=values["do_sample"], label="Sampling (off = greedy)", elem_id="do-sample"),
            gr.Number(value=values["seed"], precision=0, label="Seed (-1 = random)", elem_id="seed"),
            gr.Textbox(value=values["stop"], label="Stop words (comma-separated, \\n for newline)",
                       elem_id="stop-words"),
        ]
    return preset, sliders


def _wire(demo, handlers: Handlers, c, m, system, sampling_preset, controls, saved, concurrency: int,
          side=None, book=None) -> None:
    """`controls` is the sampling sliders (PARAM_FIELDS order) and then the "Use tools" box."""
    h = handlers
    sliders, use_tools = controls[:-1], controls[-1]
    view = [c["chatbot"], side["list"], c["versions"], c["continue"]]
    # The browser's copy is written after each reply by its own event: a streamed output is sent as
    # diffs, which Gradio's BrowserState did not keep (measured: the second chat was lost on reload).
    reply_out = [c["input"], c["chatbot"], c["status"], book, *view[1:]]
    # "multiple": a second Send while a reply streams reaches the server, which says why it waits,
    # instead of being dropped by the page without a word.
    # preprocess=False: handlers take the raw chat and controls and check them themselves, with
    # messages that say what is wrong (Gradio's own check of a malformed chat has none, and it
    # validates every message of a long chat one by one).
    raw = dict(preprocess=False)
    reply_opts = dict(concurrency_limit=concurrency, concurrency_id="reply", show_progress="minimal",
                      trigger_mode="multiple", **raw)
    send_args = dict(fn=h.respond, inputs=[c["input"], c["chatbot"], system, *controls, book, c["send_id"]],
                     outputs=reply_out)
    named = dict(js=NAME_SEND)  # each page action that starts a reply names it, for a Stop before it begins
    replies = [
        c["input"].submit(**send_args, api_name="send_enter", api_visibility="private", **named, **reply_opts),
        c["send"].click(**send_args, api_name="send_button", api_visibility="private", **named, **reply_opts),
        c["api_message"].submit(**{**send_args, "inputs": [c["api_message"], *send_args["inputs"][1:-1]]},
                                api_name="respond", **reply_opts),
    ]
    again = [c["chatbot"], system, book, *controls, c["send_id"]]
    regen_args = dict(fn=h.regenerate, inputs=again, outputs=reply_out, **named)
    replies += [
        c["regenerate"].click(**regen_args, api_name="regenerate", **reply_opts),
        c["chatbot"].retry(**regen_args, api_visibility="private", **reply_opts),
        c["chatbot"].edit(h.edit, again, reply_out, api_visibility="private", **named, **reply_opts),
        c["continue"].click(h.continue_reply, again, reply_out, api_name="continue", **named, **reply_opts),
    ]
    for event in replies:
        event.then(h.keep, [book], saved, api_visibility="private", show_progress="hidden")
    # Stop cancels the session's reply on the server, which ends it as stopped (no error) and
    # hands back the chat. Gradio's own cancel is only the backstop, for a reply that did not end
    # in time (stop() then fails): sent every time, it raced the stopped reply's last update.
    c["stop"].click(h.stop, c["send_id"], None, js=STOP_JS, api_visibility="private", concurrency_limit=None,
                    concurrency_id="stop").failure(None, cancels=replies, api_visibility="private")
    edit_out = [c["input"], c["chatbot"], saved, book, *view[1:]]
    undo_args = dict(fn=h.undo, inputs=[c["chatbot"], system, book], outputs=edit_out, **raw)
    c["undo"].click(**undo_args, api_name="undo")
    c["chatbot"].undo(**undo_args, api_visibility="private")
    c["clear"].click(h.clear, [system, book], edit_out, api_name="clear", **raw)
    c["chatbot"].clear(h.clear, [system, book], edit_out, api_visibility="private", **raw)
    c["chatbot"].example_select(_example_text, None, c["input"], api_visibility="private")
    system.blur(h.save, [system, book], [saved, book], api_visibility="private", **raw)
    c["export"].click(h.export_chat, [c["chatbot"], system], c["export_file"], api_name="export", **raw).then(
        lambda: gr.File(visible=True), None, c["export_file"], api_visibility="private"
    )
    settings = [*sliders, use_tools]
    c["import"].upload(h.import_chat, [c["import"], book], [book, *view[:1], system, *view[1:], *settings, saved],
                       api_name="import")
    model_opts = dict(concurrency_limit=1, concurrency_id="model")
    # The status line is refreshed after a load either way: a failed load may have put the old model back.
    m["load"].click(h.load_model, [m["model"], m["custom"], m["backend"]], [c["status"], *controls],
                    api_name="load", show_progress_on=c["status"], **model_opts
                    ).then(h.status, None, c["status"], api_visibility="private")
    m["unload"].click(h.unload_model, None, c["status"], api_name="unload", **model_opts)
    m["model"].change(lambda choice: "" if choice != CUSTOM else gr.skip(), m["model"], m["custom"],
                      api_visibility="private")
    m["cached"].focus(h.cached_models, None, m["cached"], api_visibility="private")
    m["cached"].select(h.pick_cached, [m["cached"], m["backend"]], [m["custom"], m["backend"]],
                       api_visibility="private")
    sampling_preset.change(h.apply_sampling_preset, sampling_preset, sliders, api_visibility="private")
    panel = [m["model"], m["custom"], m["cached"], m["backend"], m["load"], m["unload"], m["note"]]
    demo.load(h.restore, [saved, book], [book, c["chatbot"], system, *view[1:], *settings, saved],
              api_visibility="private").then(
        h.load_status, None, c["status"], api_visibility="private"
    ).then(h.model_panel, None, panel, api_visibility="private").then(
        h.cached_models, None, m["cached"], api_visibility="private"
    ).then(h.tools_box, None, use_tools, api_visibility="private")


# A Send, Regenerate, Edit or Continue gets a random name in the page (its last input, `send_id`);
# Stop sends the last one, so a Stop that reaches the server before its reply has begun still
# stops it (ui.handlers.Handlers.stop). Not secret: it only names a session's own actions.
NAME_SEND = """(...values) => {
    window.confabSend = Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
    values[values.length - 1] = window.confabSend;
    return values;
}"""
STOP_JS = "() => [window.confabSend || '']"


def _example_text(data: gr.SelectData) -> str:
    """An example prompt clicked on an empty chat goes into the message box, to send or change."""
    value = data.value if isinstance(data.value, dict) else {}
    return str(value.get("text", ""))


def _wire_conversations(h: Handlers, c, side, system, settings, saved, book) -> None:
    """The sidebar: new, switch, search, rename, delete, export all; and the versions of a turn."""
    view = [book, c["chatbot"], system, side["list"], c["versions"], c["continue"]]
    private = dict(api_visibility="private")
    side["new"].click(h.new_chat, [book], [*view, saved], **private)
    side["list"].input(h.switch_chat, [book, side["list"], side["search"]], [*view, *settings, saved], **private)
    side["search"].change(h.search, [book, side["search"]], side["list"], show_progress="hidden", **private)
    side["rename"].click(h.rename_chat, [book, side["title"], side["search"]], [book, side["list"], saved], **private)
    side["delete"].click(lambda: gr.update(visible=True), None, side["confirm"], **private)
    side["confirm"].click(h.delete_chat, [book, side["search"]], [*view, saved], **private).then(
        lambda: gr.update(visible=False), None, side["confirm"], **private)
    side["export_all"].click(h.export_all, [book], c["export_file"], **private).then(
        lambda: gr.File(visible=True), None, c["export_file"], **private)
    c["versions"].input(h.pick_version, [book, c["versions"]], [*view, saved], **private)
    c["chatbot"].option_select(h.step_version, [book], [*view, saved], **private)
