"""The conversations side of the page: the list, new / switch / rename / delete / search, the
versions of a turn, and where conversations are kept.

Each session holds its conversations in a `book` (server-side session state): {"current": id,
"convs": {id: conversation}} (chat/conversations.py). Anonymous people keep the book in their
browser (localStorage through gr.BrowserState, written when a chat changes); logins keep it on
the server in SQLite (web/store.py), so it follows them to any browser. What comes back from a
browser or a file is checked like any input. A base of Handlers; knows Gradio, not engines.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import processing_utils
from gradio import utils as gr_utils

from backends.base import ParamError
from chat import conversations as cv
from web.policy import Limits
from web.store import AttachmentStore, ConversationStore

from .chat import PARAM_FIELDS, clean_history, for_page, import_json
from .errors import checked, shown

log = logging.getLogger(__name__)
SETTINGS = (*PARAM_FIELDS, "use_tools")  # what each conversation remembers of the controls
BROWSER_VERSION = 2
# A browser keeps ~5 million characters per site (localStorage), and the saved value is encrypted
# and base64-encoded (x1.4): past this many bytes of JSON a person is warned, before it fails.
BROWSER_BYTES = 3_000_000
PAGE_FILES = 10_000  # attachments whose page copy is remembered (ui: Gradio's cache path)
OPTION_PREV, OPTION_NEXT, OPTION_COUNT = "version:prev", "version:next", "version:count"
VIEW = 6  # the outputs of `view`: book, chat, system prompt, list, versions, continue
UNCHANGED = (gr.skip(),) * (VIEW + 1)  # a view and the browser's copy, none of them changed


def empty_book() -> dict[str, Any]:
    return {"current": None, "convs": {}}


def login(request: gr.Request | None) -> str | None:
    """The login whose conversations live on the server (None: they live in the browser)."""
    return getattr(request, "username", None) or None


class ConversationPanel:
    limits: Limits
    store: ConversationStore
    attachments: AttachmentStore
    _page_files: dict[str, tuple[str, bool]]

    # ---- the book ---------------------------------------------------------------------------
    def current(self, book: dict[str, Any], system: str = "", settings: dict | None = None) -> dict[str, Any]:
        """The conversation on screen, made when there is none (the first message of a session)."""
        conv = book["convs"].get(book.get("current"))
        if conv is None:
            checked(lambda: self.limits.check_conversations(len(book["convs"]) + 1))
            conv = cv.new(system, settings)
            book["convs"][conv["id"]] = conv
            book["current"] = conv["id"]
        return conv

    def persist(self, book: dict[str, Any], request: gr.Request | None, conv: dict[str, Any] | None = None) -> Any:
        """Keep a change: a login's conversation is written to the server now (the browser gets
        nothing); anyone else's book goes back to their browser (the returned value)."""
        if login(request) is None:
            value = browser_value(book)
            self._release(book, {c["id"]: c["updated"] for c in book["convs"].values()})
            size = len(json.dumps(value, ensure_ascii=False).encode())
            if size > BROWSER_BYTES:
                gr.Warning(f"This browser keeps {size / 1e6:.1f} MB of chats for this page, near what a browser "
                           f"allows a site (~{BROWSER_BYTES / 1e6:.0f} MB here): export and delete old chats, or the "
                           "newest changes may not survive a reload.")
            return value
        if conv is not None:
            self.save_for_login(request, conv)
        return gr.skip()

    def checkpoint(self, book: Any, request: gr.Request | None, conv: dict[str, Any]) -> None:
        """A reply's chat as it streams, kept on the server: a login's where it lives, a browser's
        held until that browser has it (ConversationStore.hold), so a reload, a closed tab or a
        restart in the middle of a reply loses nothing."""
        if login(request) is not None:
            self.save_for_login(request, conv)
            return
        key = browser_key(book)
        if key is None or not cv.size(conv):
            return
        try:
            self.store.hold(key, conv)
        except Exception:  # noqa: BLE001 - a full disk must not end the reply; the browser still gets it after
            log.exception("could not hold a browser's conversation")

    def _release(self, book: dict[str, Any], copies: dict[str, float]) -> None:
        key = browser_key(book)
        if key is not None:
            try:
                self.store.release(key, copies)
            except Exception:  # noqa: BLE001 - what stays held is offered again, never lost
                log.exception("could not release a browser's held conversations")

    def save_for_login(self, request: gr.Request | None, conv: dict[str, Any]) -> None:
        """A login's conversation, written to the server (an empty one waits for its first message)."""
        user = login(request)
        if user is None or not cv.size(conv):
            return
        try:
            self.store.save(user, conv)
        except Exception:  # noqa: BLE001 - a full disk must not end the reply; the log says why
            log.exception("could not save a conversation of %s", user)
            gr.Warning("This conversation could not be saved on the server; export it to keep it.")

    def open_book(self, saved: Any, request: gr.Request | None) -> dict[str, Any]:
        """A page's conversations: from the server for a login, else from its browser (checked)."""
        user = login(request)
        raw = self.store.load(user) if user is not None else _browser_convs(saved)
        book = empty_book()
        for data in raw[: self.limits.conversations]:
            try:
                conv = cv.from_data(data, clean_history, self.limits.messages)
            except ParamError:
                continue
            book["convs"][conv["id"]] = conv
        current = saved.get("current") if isinstance(saved, dict) and user is None else None
        if user is None:
            # This browser's key (its attachments and held chats are its own across reloads); a
            # browser without one gets one now, so what is held for it later can come back.
            book["key"] = browser_key(saved) or secrets.token_hex(16)
            for conv in self._held(book):
                current = conv["id"] if current not in book["convs"] else current
                book["convs"][conv["id"]] = conv
        first = cv.newest_first(book["convs"].values())
        book["current"] = current if current in book["convs"] else (first[0]["id"] if first else None)
        return book

    def _held(self, book: dict[str, Any]) -> list[dict[str, Any]]:
        """What the server holds for this browser that is newer than the browser's own copy (a
        reply it did not see end: the page was reloaded or closed, or the server restarted)."""
        try:
            raw = self.store.held(book["key"])
        except Exception:  # noqa: BLE001 - the browser's own copy still loads
            log.exception("could not read a browser's held conversations")
            return []
        out = []
        for data in raw:
            try:
                conv = cv.from_data(data, clean_history, self.limits.messages)
            except ParamError:
                continue
            mine = book["convs"].get(conv["id"])
            if mine is None and len(book["convs"]) + len(out) >= self.limits.conversations:
                continue
            if mine is None or conv["updated"] > mine["updated"]:
                out.append(conv)
        return out

    @staticmethod
    def owner_key(book: Any, request: gr.Request | None) -> str:
        """Whose attachments these are (web.store.AttachmentStore names them by it): a login, or
        the browser's own random key, kept with its conversations (encrypted, never shown)."""
        user = login(request)
        if user is not None:
            return f"login:{user}"
        if not isinstance(book, dict):
            return secrets.token_hex(16)  # an API call without a page: its files are its own
        if browser_key(book) is None:
            book["key"] = secrets.token_hex(16)
        return "browser:" + book["key"]

    # ---- what the page shows ----------------------------------------------------------------
    def view(self, book: dict[str, Any], query: str = "") -> tuple:
        """(book, chat, system prompt, list, versions, continue) for the conversation on screen."""
        conv = book["convs"].get(book.get("current"))
        if conv is None:
            return book, [], "", self.listing(book, query), gr.update(choices=[], value=None, visible=False), \
                gr.update(visible=False)
        return book, self.screen(conv), conv["system"], self.listing(book, query), versions_menu(conv), \
            gr.update(visible=_cut_off(conv))

    def screen(self, conv: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat of `conv` as the page shows it (on_screen, with its attachments' files)."""
        return for_page(on_screen(conv), self.page_file)

    def page_file(self, ident: str) -> tuple[str, bool]:
        """The file the page shows for an attachment, and whether it is still kept: a copy in
        Gradio's cache, made once. (Gradio copies any other path into its cache on every update,
        hashing the whole file: for a chat with pictures, 25 times a second while a reply streams.)"""
        cached = self._page_files.get(ident)
        if cached is not None and os.path.exists(cached[0]):
            return cached
        path = self.attachments.path(ident)
        kept = path is not None
        copy_ = processing_utils.save_file_to_cache(path if kept else self.attachments.gone(ident),
                                                    gr_utils.get_upload_folder())
        if len(self._page_files) >= PAGE_FILES:
            self._page_files.clear()
        self._page_files[ident] = (copy_, kept)
        return copy_, kept

    def listing(self, book: dict[str, Any], query: str = "") -> Any:
        query = (query or "").strip().lower()
        convs = [c for c in cv.newest_first(book["convs"].values()) if query in c["title"].lower()]
        shown_ids = {c["id"] for c in convs}
        value = book.get("current") if book.get("current") in shown_ids else None
        return gr.update(choices=[(c["title"], c["id"]) for c in convs], value=value)

    def settings_of(self, book: dict[str, Any]) -> list[Any]:
        """The controls as the conversation on screen left them (unchanged where it set none)."""
        conv = book["convs"].get(book.get("current"))
        saved = conv["settings"] if conv else {}
        return [saved[k] if k in saved else gr.skip() for k in SETTINGS]

    # ---- events -------------------------------------------------------------------------------
    def restore(self, saved: Any, request: gr.Request = None):
        """Page load: the conversations this browser or login kept, then the browser's copy (a new
        one only when the browser lacks something: its key, or a chat the server held for it)."""
        book = self.open_book(saved, request)
        copies = _copies(saved)
        stale = login(request) is None and (browser_key(saved) != book["key"] or any(
            copies.get(conv_id) != conv["updated"] for conv_id, conv in book["convs"].items()))
        return (*self.view(book), *self.settings_of(book), self.persist(book, request) if stale else gr.skip())

    # Every event below takes raw values from the page (a crafted request can send anything): ids
    # are looked up only when they are text, and errors come back as messages (`shown`).
    @shown
    def new_chat(self, book: Any, request: gr.Request = None):
        self._settled(request, [])
        book = as_book(book)
        conv = book["convs"].get(book.get("current"))
        if conv is not None and not cv.size(conv):
            return (*self.view(book), gr.skip())  # already on an empty chat
        checked(lambda: self.limits.check_conversations(len(book["convs"]) + 1))
        conv = cv.new(conv["system"] if conv else "", conv["settings"] if conv else None)
        book["convs"][conv["id"]] = conv
        book["current"] = conv["id"]
        return (*self.view(book), self.persist(book, request))

    @shown
    def switch_chat(self, book: Any, conv_id: Any, query: Any = "", request: gr.Request = None):
        book = as_book(book)
        if not isinstance(conv_id, str) or conv_id not in book["convs"] or conv_id == book.get("current"):
            return (*UNCHANGED[:VIEW], *(gr.skip(),) * len(SETTINGS), gr.skip())
        self._settled(request, [])  # a reply streaming into the old chat stops first
        book["current"] = conv_id
        return (*self.view(book, _query(query)), *self.settings_of(book), self.persist(book, request))

    @shown
    def rename_chat(self, book: Any, title: Any, query: Any = "", request: gr.Request = None):
        book = as_book(book)
        conv = book["convs"].get(book.get("current"))
        if conv is None:
            raise gr.Error("There is no chat to rename yet: send a message first.", print_exception=False)
        cv.rename(conv, title if isinstance(title, str) else "")
        return book, self.listing(book, _query(query)), self.persist(book, request, conv)

    @shown
    def delete_chat(self, book: Any, query: Any = "", request: gr.Request = None):
        self._settled(request, [])
        book = as_book(book)
        conv = book["convs"].pop(book.get("current"), None)
        if conv is None:
            return UNCHANGED
        if login(request) is not None:
            self.store.delete(login(request), conv["id"])
        else:
            self._release(book, {conv["id"]: math.inf})
        rest = cv.newest_first(book["convs"].values())
        book["current"] = rest[0]["id"] if rest else None
        gr.Info(f"Deleted “{conv['title']}”.")
        return (*self.view(book, _query(query)), self.persist(book, request))

    @shown
    def search(self, book: Any, query: Any):
        return self.listing(as_book(book), _query(query))

    @shown
    def pick_version(self, book: Any, choice: Any, request: gr.Request = None):
        """The versions menu: show another version of a turn (and what followed it)."""
        conv = as_book(book)["convs"].get(as_book(book).get("current"))
        if conv is None or not isinstance(choice, str) or choice not in conv["nodes"] or choice == cv.ROOT:
            return UNCHANGED
        self._settled(request, [])
        cv.show(conv, choice)
        return (*self.view(book), self.persist(book, request, conv))

    @shown
    def step_version(self, book: Any, data: gr.SelectData, request: gr.Request = None):
        """‹ › under the last reply: its previous or next version."""
        conv = as_book(book)["convs"].get(as_book(book).get("current"))
        value = getattr(data, "value", None)
        step = {OPTION_PREV: -1, OPTION_NEXT: 1}.get(value) if isinstance(value, str) else None
        if conv is None or step is None or conv["end"] == cv.ROOT:
            return UNCHANGED
        self._settled(request, [])
        if not cv.switch(conv, cv.path(conv)[-1], step):
            return UNCHANGED
        return (*self.view(book), self.persist(book, request, conv))

    # ---- files --------------------------------------------------------------------------------
    @shown
    def export_all(self, book: Any) -> str:
        convs = cv.newest_first(book["convs"].values()) if isinstance(book, dict) else []
        if not convs:
            raise gr.Error("There are no conversations to export yet.", print_exception=False)
        data = {"confab": BROWSER_VERSION, "conversations": convs}
        name = f"confab-chats-{time.strftime('%Y%m%d-%H%M%S')}.json"
        return str(self.state.export(name, json.dumps(data, ensure_ascii=False, indent=1)))

    def import_file(self, book: Any, file: str | None, request: gr.Request = None):
        """A file of messages (one chat) or of conversations (an "export all") becomes new
        conversations beside the others; nothing is overwritten."""
        self._settled(request, [])
        if not file:
            raise gr.Error("Choose a .json file to import.", print_exception=False)
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise gr.Error(f"Could not read that file ({e}). Import a UTF-8 .json file.", print_exception=False) from e
        book = as_book(book)
        convs = self._read_import(text)
        self.limits.check_conversations(len(book["convs"]) + len(convs))
        for conv in convs:
            book["convs"][conv["id"]] = conv
            cv.touch(conv)
            self.persist(book, request, conv)
        book["current"] = convs[-1]["id"]
        gr.Info(f"Imported {len(convs)} conversation{'s' if len(convs) != 1 else ''}.")
        return (*self.view(book), *self.settings_of(book), self.persist(book, request))

    def _read_import(self, text: str) -> list[dict[str, Any]]:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("conversations"), list):
            convs = []
            for item in data["conversations"][: self.limits.conversations]:
                conv = cv.from_data(item, clean_history, self.limits.messages)
                conv["id"] = cv.new()["id"]  # an import is a copy: never the id of one kept here
                convs.append(conv)
            if not convs:
                raise ParamError("The file's conversations list is empty.")
            return convs
        history, system = import_json(text, self.limits)  # says what is wrong with a bad file
        return [cv.from_history(history, system)]


def on_screen(conv: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat on screen, the last reply carrying ‹ n/m › when it has other versions."""
    chat = cv.messages(conv)
    path = cv.path(conv)
    if chat and path and conv["nodes"][path[-1]]["role"] == "assistant":
        n, of = cv.versions(conv, path[-1])
        if of > 1:
            chat[-1] = {**chat[-1], "options": [
                {"value": OPTION_PREV, "label": "‹"}, {"value": OPTION_COUNT, "label": f"{n} / {of}"},
                {"value": OPTION_NEXT, "label": "›"}]}
    return chat


def versions_menu(conv: dict[str, Any]) -> Any:
    """Every version of every turn on screen that has others, to go to one of them."""
    choices = []
    for nid, index, _n, of in cv.forks(conv):
        parent = conv["nodes"][conv["nodes"][nid]["parent"]]
        for i, sibling in enumerate(parent["children"], 1):
            node = conv["nodes"][sibling]
            who = "your message" if node["role"] == "user" else "reply"
            text = " ".join(str(node["messages"][-1].get("content") or "").split())[:40]
            choices.append((f"Message {index + 1} ({who}), version {i} of {of}: {text}", sibling))
    on_path = set(cv.path(conv))
    value = next((v for _, v in choices if v in on_path), None)
    return gr.update(choices=choices, value=value, visible=bool(choices))


def _cut_off(conv: dict[str, Any]) -> bool:
    path = cv.path(conv)
    return bool(path) and conv["nodes"][path[-1]].get("finish") == "length"


def as_book(book: Any) -> dict[str, Any]:
    """A session's book, or a new one (an API client's first call has none)."""
    if isinstance(book, dict) and isinstance(book.get("convs"), dict):
        return book
    return empty_book()


def browser_value(book: dict[str, Any]) -> dict[str, Any]:
    """What the browser keeps: a copy, not the live conversations (Gradio diffs a streamed output
    against the value it last sent, so a value changed in place afterwards would look unchanged)."""
    return copy.deepcopy({"v": BROWSER_VERSION, "current": book.get("current"), "key": book.get("key"),
                          "conversations": cv.newest_first(book["convs"].values())})


def browser_key(value: Any) -> str | None:
    """A browser's own random key (kept with its conversations, encrypted, never shown), if `value`
    (a book, or what a browser sent) holds a well-formed one."""
    key = value.get("key") if isinstance(value, dict) else None
    return key if isinstance(key, str) and re.fullmatch(r"[0-9a-f]{32}", key) else None


def _copies(saved: Any) -> dict[str, Any]:
    """{id: updated} of the conversations a browser sent (unchecked: only compared)."""
    return {c.get("id"): c.get("updated") for c in _browser_convs(saved) if isinstance(c, dict)}


def _browser_convs(saved: Any) -> list[Any]:
    """The conversations a browser kept; a chat saved before there were many becomes one."""
    if not isinstance(saved, dict):
        return []
    if isinstance(saved.get("conversations"), list):
        return saved["conversations"]
    history = clean_history(saved.get("messages"))
    if not history:
        return []
    system = saved.get("system") if isinstance(saved.get("system"), str) else ""
    return [cv.from_history(history, system)]


def _query(value: Any) -> str:
    return value if isinstance(value, str) else ""
