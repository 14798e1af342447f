"""Gradio event handlers: plain (generator) functions over the manager, no layout.

Per-user state arrives as arguments (the chat, the system prompt, the sliders) and leaves as
return values; the only per-user thing kept here is each session's reply in flight (one at a
time), so that Stop, or any other action of that session, can cancel it directly. Every request is held to the server's limits here; the model panel's handlers,
which only operators may use, are in ui/models.py (a base of Handlers). `BackendError` becomes
`gr.Error` in `ui.errors.shown` and `_reply`; operators also see its detail.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr
from gradio import utils as gr_utils

from backends.base import BackendError, GenerationParams, Message, ModelSpec, ParamError, Waiting, valid_text
from backends.manager import ModelManager
from chat.attachments import FileText, check_images, kind, read_attachment, read_image, user_message
from chat.reply import Reply, Text, Thinking, tool_format
from chat.tools import Tool, Toolset, ToolStep, preset_toolset
from chat import conversations as cv
from web.policy import Access, Limits
from web.state import StateDir, default_state_dir
from web.store import AttachmentStore, ConversationStore

from .chat import (
    ATTACHED,
    MAX_ATTACHED,
    MAX_ATTACHED_CHAT,
    PARAM_FIELDS,
    attached_of,
    clean_history,
    export_json,
    flatten,
    for_page,
    mark,
    params_from_ui,
    step_call,
    step_message,
    thinking_message,
    text_input,
    to_messages,
    unmark,
)
from .conversations import SETTINGS, ConversationPanel, as_book, versions_menu
from .errors import checked, shown
from .models import ModelPanel
from .prompt_view import PromptView

log = logging.getLogger(__name__)
REPLY_OUTPUTS = 7  # input, chat, status, book, conversations, versions, continue
FRAME_S = 0.04  # shortest time between two streamed updates of the page (25 per second)
SETTLE_S = 2.0  # how long an action waits for the reply it stopped to hand back its chat
STOPPED_KEPT = 4  # Sends a Stop named before they began, remembered per session
STOPPED_SESSIONS = 10_000  # ... in this many sessions at most
STOP_WAIT_S = 0.25  # how long a Stop waits for a reply its Send has not begun (both are queued: ms apart)
CHECKPOINT_S = 2.0  # a reply is written to the server this often while it streams (a login's, or held for a browser)


class Handlers(ConversationPanel, ModelPanel, PromptView):
    def __init__(
        self,
        manager: ModelManager,
        presets: dict[str, ModelSpec],
        sampling_presets: dict[str, dict[str, Any]],
        tools: dict[str, Tool] | None = None,
        access: Access | None = None,
        limits: Limits | None = None,
        state: StateDir | None = None,
    ) -> None:
        self.manager = manager
        self.presets = presets
        self.sampling_presets = sampling_presets
        self.tools = tools or {}  # every tool in the tools folder; a preset switches some on
        self.access = access or Access()  # default: the machine's owner at a loopback page
        self.limits = limits or Limits()
        self.state = state or StateDir(default_state_dir())
        self.store = ConversationStore(self.state.path / "conversations.sqlite3")
        self.attachments = AttachmentStore(self.state.path / "attachments", self.state.browser_secret())
        self._page_files = {}  # attachment -> its copy in Gradio's cache (ConversationPanel.page_file)
        self._live: dict[str, _Live] = {}  # the reply streaming in each browser session
        self._live_lock = threading.Lock()
        # Per session, the last Sends a Stop named before they began (`stop`); a few are enough.
        self._stopped: dict[str, deque[str]] = {}
        # Sessions that began a reply (the last STOPPED_SESSIONS): a page load that reaches the server
        # after its first Send (restore's queue was busy) must not show the older chat over it.
        self._began: OrderedDict[str, None] = OrderedDict()

    def restore(self, saved: Any, book: Any = None, request: gr.Request = None):
        """Page load. If this page already began a reply (its load waited in the queue behind other
        pages' loads), the conversations kept before join the page's own, which win (its chat stays
        on screen as it is), and the browser's copy gets them all back. Outputs: a view, the
        settings, and the browser's copy."""
        if _owner(request) not in self._began or not isinstance(book, dict) or not isinstance(book.get("convs"), dict):
            return super().restore(saved, request)
        kept = self.open_book(saved, request)
        for conv_id, conv in kept["convs"].items():
            book["convs"].setdefault(conv_id, conv)
        if not book.get("key") and kept.get("key"):
            book["key"] = kept["key"]  # this browser's earlier attachments stay its own
        skip = gr.skip()
        return (book, skip, skip, self.listing(book), skip, skip, *(skip,) * len(SETTINGS), self.persist(book, request))

    def load_status(self, request: gr.Request = None):
        """The status line on page load, unless a reply of this page already wrote its own."""
        return gr.skip() if _owner(request) in self._began else self.status(request)

    # ---- replies -------------------------------------------------------------------------
    def respond(
        self,
        message: str | dict,
        history: list[dict],
        system_prompt: str,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        max_new_tokens: int,
        repetition_penalty: float,
        do_sample: bool,
        seed: int,
        stop: str,
        thinking: Any = None,
        use_tools: bool = True,
        book: Any = None,
        send_id: Any = "",
        request: gr.Request = None,
    ) -> Iterator[tuple]:
        """Send: show the user's message at once, then stream the reply. Outputs: REPLY_OUTPUTS.
        `message` is the message box's {"text", "files"} (or, from the API, text); `send_id` is
        the page's name for this Send, which a Stop pressed before it began names (see `stop`)."""
        values = (temperature, top_p, top_k, min_p, max_new_tokens, repetition_penalty, do_sample, seed, stop, thinking)
        text, files = _message(message)
        system_prompt = _text(system_prompt)
        if not text and not files:
            gr.Warning("Type a message first.")
            yield (gr.skip(),) * REPLY_OUTPUTS
            return
        params = self._params(dict(zip(PARAM_FIELDS, values)))
        said = {"role": "user", "content": text}
        history = self._settled(request, history)  # a reply still streaming is stopped first
        # Checked (counts and sizes) before any file is read; the files then join the message.
        history = self._checked(history, system_prompt, extra=[said], new_files=[name for _, name in files])
        if files:
            said[ATTACHED] = self._attach(files, params.max_new_tokens, self.owner_key(book, request))
        yield from self._reply(history, system_prompt, params, request, self._toolset(use_tools),
                               _Target(as_book(book), (*values, use_tools), _send_id(send_id)), clear_input=True)

    # Gradio fills annotated Request/EditData parameters only before a *args, hence their place.
    # `values` is the sampling controls in PARAM_FIELDS order, then the "Use tools" box.
    def regenerate(self, request: gr.Request, history: list[dict], system_prompt: str, book: Any, *values: Any):
        """Another reply to the last message, kept beside the earlier ones (‹ 2/2 ›)."""
        system_prompt = _text(system_prompt)
        history = self._checked(self._settled(request, history), system_prompt)
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            gr.Warning("There is no message to answer yet.")
            yield (gr.skip(),) * REPLY_OUTPUTS
            return
        params, toolset = self._controls(values)
        yield from self._reply(history, system_prompt, params, request, toolset, _target(book, values))

    def continue_reply(self, request: gr.Request, history: list[dict], system_prompt: str, book: Any,
                       *values: Any):
        """Continue: the reply cut off at max_new_tokens goes on in the same message (the engine
        reads the conversation so far from its cache, not from scratch)."""
        system_prompt = _text(system_prompt)
        history = self._checked(self._settled(request, history), system_prompt)
        if not history or history[-1]["role"] != "assistant" or step_call(history[-1].get("metadata") or {}):
            gr.Warning("There is no reply to continue.")
            yield (gr.skip(),) * REPLY_OUTPUTS
            return
        params, toolset = self._controls(values)
        yield from self._reply(history, system_prompt, params, request, toolset, _target(book, values),
                               continuing=True)

    def edit(self, request: gr.Request, edit: gr.EditData, history: list[dict], system_prompt: str, book: Any,
             *values: Any):
        """A user message was edited in place: a new version of it is answered; the old one and
        what followed it stay (the versions menu goes back to them)."""
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) and edit.index else edit.index
        self._settled(request, history)
        if not isinstance(history, list) or not isinstance(index, int) or not 0 <= index < len(history):
            raise gr.Error("That message is no longer in the chat; reload the page.", print_exception=False)
        system_prompt = _text(system_prompt)
        said = {"role": "user", "content": valid_text(flatten(edit.value))}
        files = attached_of(history[index]) if isinstance(history[index], dict) else []
        if files:
            said[ATTACHED] = files  # the text was edited; its files stay
        history = self._checked(history[:index], system_prompt, extra=[said])
        params, toolset = self._controls(values)
        yield from self._reply(history, system_prompt, params, request, toolset, _target(book, values))

    def _checked(self, history: Any, system_prompt: str, extra: list[dict] = (),
                 new_files: list[str] = ()) -> list[dict]:
        """The chat as plain messages, refused with a message when it is past the server's limits
        (the count is checked before any work is done on it). Attachments count too, repeats and
        `new_files` (names of files about to be attached) included: each is read for every reply."""
        raw = history if isinstance(history, list) else []
        try:
            self.limits.check_count(len(raw) + len(extra))
            chat = clean_history(raw) + list(extra)
            self.limits.check_text("The system prompt", system_prompt or "")
            for i, m in enumerate(chat, 1):
                self.limits.check_text(f"Message {i}", m["content"])
            named = [a["id"] for m in chat for a in m.get(ATTACHED) or ()] + list(new_files)
            if len(named) > MAX_ATTACHED_CHAT:
                raise ParamError(f"This conversation would hold {len(named)} attachments; one holds at most "
                                 f"{MAX_ATTACHED_CHAT}. Start a new chat for more.")
            pictures = sum(1 for n in named if kind(n) == "image")
            if pictures > self.limits.images:
                raise ParamError(f"This conversation would hold {pictures} pictures; this server takes at most "
                                 f"{self.limits.images} (--max-images). Start a new chat for more.")
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return chat

    def _attach(self, files: list, reserve: int, owner: str = "") -> list[dict[str, str]]:
        """The files of a message, read, checked and kept (AttachmentStore): text files and PDFs
        as the text the model reads, counted against its context less `reserve` for the reply;
        pictures only for a model that reads them. Refused with a message saying what was wrong."""
        if len(files) > MAX_ATTACHED:
            raise gr.Error(f"{len(files)} files at once; attach at most {MAX_ATTACHED} to one message.",
                           print_exception=False)
        kept = []
        try:
            for path, name in files:
                if kind(name) == "image":
                    image = read_image(path, name, self.limits)
                    self.manager.check_images([user_message("", images=[image])])
                    ident = self.attachments.put(image.data, image.mime.split("/", 1)[1], owner)
                else:
                    got = read_attachment(path, self.manager, self.limits, reserve, name)
                    ident = self.attachments.put(got.text.encode("utf-8"), "txt", owner)
                kept.append({"id": ident, "name": name})
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return kept

    def model_message(self, m: dict[str, Any]) -> Message:
        """A user message with attachments as the model reads it: the files' text, then what was
        typed; the pictures beside it. An attachment the store no longer has is named instead."""
        files, images = [], []
        for a in m.get(ATTACHED) or ():
            data = self.attachments.read(a["id"])
            if data is None:
                files.append(FileText(a["name"], f"[{a['name']}: no longer kept on this server]", 0))
            elif a["id"].endswith(".txt"):
                files.append(FileText(a["name"], data.decode("utf-8", "replace"), 0))
            else:
                images.append(read_image(data, a["name"], self.limits))
        return user_message(m["content"], files, images)

    def _controls(self, values: tuple) -> tuple[GenerationParams, Toolset]:
        n = len(PARAM_FIELDS)
        use_tools = bool(values[n]) if len(values) > n else True
        return self._params(dict(zip(PARAM_FIELDS, values[:n]))), self._toolset(use_tools)

    def _toolset(self, use_tools: bool) -> Toolset:
        """The loaded preset's tools, unless the user switched tools off."""
        if not use_tools:
            return Toolset()
        try:
            return self.preset_tools() or Toolset()
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e

    def preset_tools(self) -> Toolset | None:
        """The loaded preset's tools (the API runs them too, for clients that send none)."""
        return preset_toolset(self.manager.spec, self.tools)

    def tools_label(self) -> dict[str, Any]:
        """The "Use tools" box's label and state for the loaded preset's tools."""
        names = self.manager.spec.tools if self.manager.spec else ()
        if not names:
            return {"label": "Use tools (the loaded model has none)", "interactive": False}
        return {"label": f"Use tools: {', '.join(names)}", "interactive": True}

    def tools_box(self) -> gr.Checkbox:
        return gr.Checkbox(**self.tools_label())

    def _params(self, values: dict[str, Any]) -> GenerationParams:
        try:
            params = params_from_ui(values, base=self.defaults())
            self.limits.check_params(params)
        except BackendError as e:
            raise gr.Error(f"{e} Fix it in the Sampling panel.", print_exception=False) from e
        return params

    def _reply(self, history, system_prompt, params, request, toolset: Toolset, target: "_Target",
               clear_input=False, continuing=False) -> Iterator[tuple]:
        """Stream a reply into the chat, one per browser session: Stop (`stop`) cancels it, and so
        does any other action of the same session, which then goes on from the chat it left. The
        reply is a new version in the conversation's tree (or, continuing, the same one, longer)."""
        owner = _owner(request)
        try:
            messages = to_messages(history, system_prompt, tool_format(self.manager), self.model_message)
            check_images(messages, self.limits)  # --max-images in one conversation
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        conv = self.current(target.book, system_prompt)
        # Every version counts against --max-messages: a conversation must load back whole.
        checked(lambda: self.limits.check_count(cv.size(conv) + 2))
        conv["system"], conv["settings"] = system_prompt, dict(zip(SETTINGS, target.values))
        cv.follow(conv, history)
        if continuing:
            node, start = conv["end"], len(history) - len(conv["nodes"][conv["end"]]["messages"])
        else:
            node, start = cv.add_reply(conv), len(history)
        conv["nodes"][node].pop("finish", None)
        reply = self.manager.reply(messages, params, owner, tools=toolset)
        live = _Live(reply, list(history), conv, node, start, target.book, target.send)
        with self._live_lock:
            if owner is not None:
                # Two Sends at once (a double Enter): the older is stopped, never left untracked.
                older = self._live.get(owner)
                if older is not None:
                    older.reply.cancel()
                self._live[owner] = live
                self._began[owner] = None
                self._began.move_to_end(owner)
                if len(self._began) > STOPPED_SESSIONS:
                    self._began.popitem(last=False)
                if target.send and target.send in (stopped := self._stopped.get(owner, ())):
                    stopped.remove(target.send)
                    reply.cancel()  # its Stop came first (it waited in the queue): it ends at once, stopped
        try:
            yield from self._stream(live, target.book, request, clear_input, continuing)
        finally:
            reply.cancel()  # closed by Gradio (a closed tab): the engine stops too
            with self._live_lock:
                if owner is not None and self._live.get(owner) is live:
                    del self._live[owner]
            self._record(live, request)
            live.ended.set()

    def _stream(self, live: "_Live", book, request, clear_input, continuing) -> Iterator[tuple]:
        """Stream into a new assistant message (or the last one, continuing); each tool call
        becomes a collapsible step. Yields REPLY_OUTPUTS values."""
        reply, conv, shown_ = live.reply, live.conv, live.shown
        if continuing:  # the cut-off message grows (a crafted Continue of a stopped one loses its mark)
            message = shown_[-1] = {**shown_[-1], "content": unmark(shown_[-1]["content"])}
        else:
            message = {"role": "assistant", "content": ""}
            shown_.append(message)
        self.checkpoint(book, request, conv)  # the question is kept before the reply begins
        yield ("" if clear_input else gr.skip()), for_page(shown_, self.page_file), "Thinking…", book, self.listing(book), gr.skip(), \
            gr.update(visible=False)
        last_frame = last_save = time.monotonic()
        thought: dict | None = None  # the folded "Thinking" message, while the model thinks
        for event in reply:
            if thought is not None and not isinstance(event, (Thinking, Waiting)):
                thought.update(thinking_message(reply.reasoning, reply.thinking_s, True))
                thought = None
            if isinstance(event, Thinking):
                if thought is None:
                    thought = thinking_message("", None, False)
                    shown_.insert(shown_.index(message), thought)
                thought["content"] += event.text
                now = time.monotonic()
                if now - last_frame >= FRAME_S:
                    last_frame = now
                    yield gr.skip(), for_page(shown_, self.page_file), *(gr.skip(),) * 5
            elif isinstance(event, ToolStep):
                if not message["content"].strip():
                    shown_.remove(message)
                message = {"role": "assistant", "content": ""}
                shown_ += [step_message(event), message]
                yield gr.skip(), for_page(shown_, self.page_file), f"Used {event.call.name}…", *(gr.skip(),) * 4
            elif isinstance(event, Waiting):  # in line, or for the operator's model switch
                yield gr.skip(), gr.skip(), self.waiting_line(event), *(gr.skip(),) * 4
            elif isinstance(event, Text):
                message["content"] += event.text
                # At most one page update per frame: each update re-sends the chat and costs
                # the server CPU the engine needs (measured: 5% of decode speed on 2 cores).
                now = time.monotonic()
                if now - last_frame >= FRAME_S:
                    last_frame = now
                    yield gr.skip(), for_page(shown_, self.page_file), *(gr.skip(),) * 5
                if now - last_save >= CHECKPOINT_S:
                    last_save = now  # the reply is on the server even if the page or this process goes
                    cv.set_messages(conv, live.node, shown_[live.start:])
                    self.checkpoint(book, request, conv)
        if thought is not None:
            thought.update(thinking_message(reply.reasoning, reply.thinking_s, True))
        if not message["content"].strip():
            shown_.remove(message)  # no empty assistant message, whatever ended the reply
        else:
            message["content"] = mark(message["content"], reply.finish_reason, reply.usage)
        self._record(live, request)
        if live.superseded:
            # Another action of this session stopped the reply and shows its own chat: the last
            # output says only that this one stopped, or Gradio's closing message (which repeats
            # the last output) could land after that action's result and put the old chat back.
            yield gr.skip(), gr.skip(), self._ended_line(reply, request), *(gr.skip(),) * 4
            return
        cut = reply.finish_reason == "length"
        yield gr.skip(), self.screen(conv), self._ended_line(reply, request), book, self.listing(book), \
            versions_menu(conv), gr.update(visible=cut)
        if reply.error is not None:
            raise self._error(reply.error, request) from reply.error

    def _record(self, live: "_Live", request) -> None:
        """Write what the reply left into its conversation (once; a reply that left nothing leaves
        no empty version behind). A login's copy on the server is written here too."""
        if live.recorded:
            return
        live.recorded = True
        conv, said = live.conv, live.shown[live.start:]
        if live.node not in conv["nodes"]:
            return  # the conversation was cleared meanwhile
        if said:
            cv.set_messages(conv, live.node, said)
            if live.reply.finish_reason == "length":
                conv["nodes"][live.node]["finish"] = "length"
        elif conv["end"] == live.node:
            cv.remove(conv, live.node)
        self.checkpoint(live.book, request, conv)

    def _ended_line(self, reply: Reply, request) -> str:
        if reply.finish_reason == "cancelled":
            return self._status_line(request, reply.usage, note=reply.stop_reason or "stopped")
        if reply.finish_reason == "error":
            return self._status_line(request, note="the last reply failed")
        if reply.finish_reason == "length":
            return self._status_line(request, reply.usage, note="cut off at max_new_tokens")
        return self._status_line(request, reply.usage)

    def stop(self, send_id: Any = "", request: gr.Request = None) -> None:
        """Stop: cancel this session's reply, and wait (briefly) for it to hand back its chat, so
        the page gets the stopped reply before Gradio's own cancel, the backstop, is sent.

        A Stop pressed right after Enter can arrive before its reply has begun (the Send waits in
        Gradio's queue, behind other users on a busy server, for any time). The page names its
        last Send (`send_id`): a Send not yet begun is remembered as stopped, and ends, stopped,
        the moment it begins. Without a name (an API client), it waits a moment for the reply."""
        owner = _owner(request) or ""
        send = _send_id(send_id)
        with self._live_lock:
            live = self._live.get(owner)
            if send and (live is None or live.send != send):
                stopped = self._stopped.pop(owner, None) or deque(maxlen=STOPPED_KEPT)
                stopped.append(send)
                self._stopped[owner] = stopped  # the newest last: the oldest sessions' are let go
                if len(self._stopped) > STOPPED_SESSIONS:
                    del self._stopped[next(iter(self._stopped))]
        deadline = time.monotonic() + (0 if send else STOP_WAIT_S)
        while live is None and time.monotonic() < deadline:
            time.sleep(0.02)
            live = self._live.get(owner)
        if live is not None:
            live.reply.cancel()
            if not live.ended.wait(SETTLE_S):
                raise gr.Error("The reply did not stop in time, so it is being cut off.", print_exception=False)

    def _settled(self, request, history: Any) -> Any:
        """The chat to act on: if this session has a reply streaming, it is stopped and the chat
        it leaves (with its partial reply) is the one to go on from, not the page's older copy."""
        live = self._live.get(_owner(request) or "")
        if live is None:
            return history
        live.superseded = True
        live.reply.cancel()
        if not live.ended.wait(SETTLE_S):
            raise gr.Error("The last reply did not stop in time; press Stop and try again.", print_exception=False)
        return live.shown

    # ---- editing the conversation ---------------------------------------------------------
    # Outputs of undo and clear: input, chat, saved, book, list, versions, continue.
    @shown
    def undo(self, history: list[dict], system_prompt: str, book: Any = None, request: gr.Request = None):
        """Remove the last exchange (stopping it first if it streams) and put its message back in the input box."""
        system_prompt, book = _text(system_prompt), as_book(book)
        history = clean_history(self._settled(request, history))
        conv = self.current(book, system_prompt)
        cv.follow(conv, history)
        users = [nid for nid in cv.path(conv) if conv["nodes"][nid]["role"] == "user"]
        text = ""
        if users:
            text = conv["nodes"][users[-1]]["messages"][0]["content"]
            cv.remove(conv, users[-1])
        return text, self.screen(conv), self.persist(book, request, conv), book, self.listing(book), versions_menu(conv), \
            gr.update(visible=False)

    @shown
    def clear(self, system_prompt: str, book: Any = None, request: gr.Request = None):
        """Empty the chat on screen (its earlier versions too); other conversations stay."""
        self._settled(request, [])  # a reply still streaming stops first, so it cannot write the chat back
        book = as_book(book)
        conv = book["convs"].get(book.get("current"))
        if conv is not None:
            cv.clear(conv)
            conv["system"] = _text(system_prompt)
        return "", [], self.persist(book, request, conv), book, self.listing(book), versions_menu(conv or cv.new()), \
            gr.update(visible=False)

    @shown
    def save(self, system_prompt: str, book: Any = None, request: gr.Request = None):
        """The system prompt was changed: the conversation on screen keeps it."""
        book = as_book(book)
        conv = book["convs"].get(book.get("current"))
        if conv is None:
            return gr.skip(), book
        conv["system"] = _text(system_prompt)
        cv.touch(conv)
        return self.persist(book, request, conv), book

    def keep(self, book: Any, request: gr.Request = None):
        """After a reply: the browser's copy of the conversations (a login's are on the server)."""
        return self.persist(as_book(book), request)

    @shown
    def export_chat(self, history: list[dict], system_prompt: str) -> str:
        system_prompt = _text(system_prompt)
        name = f"confab-chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
        chat = self._checked(history, system_prompt)
        return str(self.state.export(name, export_json(chat, system_prompt, self.model_message)))

    @shown
    def import_chat(self, file: str | None, book: Any = None, request: gr.Request = None):
        """Import: a new conversation (or several, from an "export all"); nothing is overwritten."""
        return self.import_file(book, file, request)


@dataclass
class _Target:
    """Where a reply goes: the session's book, and the controls it was asked with (SETTINGS order)."""

    book: dict[str, Any]
    values: tuple
    send: str = ""  # the page's name for the Send, Regenerate, Edit or Continue that asked (see `stop`)


@dataclass
class _Live:
    """A session's reply in flight, and the chat it is writing (final once `ended` is set)."""

    reply: Reply
    shown: list[dict]  # the history it answers, then with its reply as it streams
    conv: dict[str, Any]  # the conversation it belongs to
    node: str  # its turn in that conversation's tree
    start: int  # where its messages begin in `shown`
    book: Any  # the session's conversations (a browser's held chats are keyed by its own key there)
    send: str = ""  # the page's name for the action that asked for it
    recorded: bool = False
    superseded: bool = False  # stopped by another action of the session, which shows the chat itself
    ended: threading.Event = field(default_factory=threading.Event)


def _send_id(value: Any) -> str:
    """The page's name for a Send (a short random string its script makes); anything else is none."""
    return value if isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() else ""


def _target(book: Any, values: tuple) -> "_Target":
    """Regenerate, Continue and Edit take the controls (SETTINGS order), then the page's send id."""
    n = len(SETTINGS)
    return _Target(as_book(book), tuple(values[:n]), _send_id(values[n]) if len(values) > n else "")


def _text(value: Any, what: str = "The system prompt") -> str:
    """A text box's raw value as text (events take raw payloads), or a message saying it is not."""
    try:
        return text_input(value, what)
    except BackendError as e:
        raise gr.Error(str(e), print_exception=False) from e


def _message(value: Any) -> tuple[str, list[tuple[str, str]]]:
    """The message box's raw value: its text, and the (path, name) of each file uploaded with it.
    Gradio accepts only files in its upload folder here; that is checked again, as a path from a
    page is hostile input."""
    if not isinstance(value, dict):
        return _text(value, "The message").strip(), []
    text = _text(value.get("text"), "The message").strip()
    raw = value.get("files") or []
    if not isinstance(raw, list):
        raise gr.Error("The message's files must be a list.", print_exception=False)
    uploads = Path(gr_utils.get_upload_folder()).resolve()
    files = []
    for f in raw[: MAX_ATTACHED + 1]:
        path = f.get("path") if isinstance(f, dict) else None
        try:
            where = Path(path).resolve() if isinstance(path, str) and path else None
            uploaded = where is not None and where.is_relative_to(uploads) and where.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            uploaded = False
        if not uploaded:
            raise gr.Error("An attached file was not uploaded to this page; attach it again.", print_exception=False)
        name = f.get("orig_name") if isinstance(f.get("orig_name"), str) and f["orig_name"].strip() else where.name
        files.append((str(where), _short_name(valid_text(Path(name).name))))
    return text, files


def _short_name(name: str, most: int = 200) -> str:
    """A file name of at most `most` characters that keeps its suffix (which says how it is read)."""
    if len(name) <= most:
        return name
    stem, dot, suffix = name.rpartition(".")
    suffix = suffix[:20] if dot else ""
    return (stem if dot else name)[: most - len(suffix) - 1] + (f".{suffix}" if suffix else "")


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def _owner(request: gr.Request | None) -> str | None:
    """Whose conversation a reply belongs to, for the engine's cache: the page session (its hash
    is known only to its browser), within the login if there is one."""
    user = getattr(request, "username", None)
    session = _session(request)
    if session is None:
        return f"login:{user}" if user else None
    # The session too, not the login alone: several people may share one login.
    return f"login:{user}|session:{session}" if user else f"session:{session}"
