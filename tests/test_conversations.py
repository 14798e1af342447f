"""Conversations as trees (chat/conversations.py), their checks when they come back from a
browser, a file or the database, the per-login store (web/store.py), and the page's handlers
over a named fake engine: versions kept, limits counted over every version."""

import json
import sqlite3
import time

import gradio as gr
import pytest

from chat import conversations as cv
from ui.chat import clean_history
from web.store import ConversationStore


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def chat_with_versions():
    """Hi -> (Hello | Hey), then an edit of the question: Bye -> Ciao."""
    conv = cv.new()
    cv.follow(conv, [user("Hi")])
    cv.add_reply(conv, [bot("Hello")])
    cv.follow(conv, [user("Hi")])
    cv.add_reply(conv, [bot("Hey")])
    cv.follow(conv, [user("Bye")])
    cv.add_reply(conv, [bot("Ciao")])
    return conv


def test_regenerate_and_edit_keep_every_version_and_switching_shows_each():
    conv = chat_with_versions()
    assert cv.messages(conv) == [user("Bye"), bot("Ciao")]
    assert conv["title"] == "Hi"  # from the first message, kept when it is edited
    first_turn = cv.path(conv)[0]
    assert cv.versions(conv, first_turn) == (2, 2) and len(cv.forks(conv)) == 1
    assert cv.switch(conv, first_turn, -1)
    assert cv.messages(conv) == [user("Hi"), bot("Hey")]  # the reply that version last showed
    reply = cv.path(conv)[-1]
    assert cv.versions(conv, reply) == (2, 2) and cv.switch(conv, reply, -1)
    assert cv.messages(conv) == [user("Hi"), bot("Hello")]
    assert not cv.switch(conv, cv.path(conv)[-1], -1)  # no version before the first
    assert cv.size(conv) == 5  # Hi, Hello, Hey, Bye, Ciao


def test_follow_reuses_matching_turns_and_branches_where_the_chat_differs():
    conv = cv.new()
    cv.follow(conv, [user("a"), bot("b"), user("c")])
    nodes = len(conv["nodes"])
    cv.follow(conv, [user("a"), bot("b"), user("c")])
    assert len(conv["nodes"]) == nodes  # the same chat: nothing new
    cv.follow(conv, [user("a"), bot("b2")])
    assert len(conv["nodes"]) == nodes + 1 and cv.messages(conv) == [user("a"), bot("b2")]
    # Tool steps and text after them are one assistant turn.
    step = {"role": "assistant", "content": "84", "metadata": {"title": "Tool: calc", "id": "call:{}"}}
    assert [r for r, _ in cv.turns([user("q"), bot("x"), step, bot("y"), user("z")])] == \
        ["user", "assistant", "user"]


def test_undo_removes_a_turn_with_everything_after_it():
    conv = chat_with_versions()
    cv.remove(conv, cv.path(conv)[0])
    assert cv.messages(conv) == [] and conv["end"] == cv.ROOT
    assert cv.size(conv) == 3  # the other version of the question, and its two replies, stay


def test_a_title_is_the_first_line_cut_at_a_word():
    assert cv.title_from("\n\n  Short question?\nmore") == "Short question?"
    long = "Please explain the difference between a process and a thread in operating systems today"
    title = cv.title_from(long)
    assert title.endswith("…") and len(title) <= cv.TITLE_CHARS + 1 and long.startswith(title[:-1])
    with pytest.raises(Exception, match="cannot be empty"):
        cv.rename(cv.new(), "   ")


def test_stored_data_is_checked_as_hostile():
    conv = chat_with_versions()
    back = cv.from_data(json.loads(json.dumps(conv)), clean_history, 1000)
    assert cv.messages(back) == cv.messages(conv) and cv.size(back) == 5
    # Cycles, unknown roles, bad messages, bad ids and wrong types are dropped, not crashes.
    bad = {"id": "../../x", "title": 5, "nodes": {
        "root": {"children": ["a", "b", "c", 7, None]},
        "a": {"role": "user", "messages": [user("x")], "children": ["a", "root", "d"]},
        "b": {"role": "hacker", "messages": [user("y")]},
        "c": {"role": "user", "messages": "not a list"},
        "d": {"role": "assistant", "messages": [user("wrong role inside")]},
    }, "end": "zz"}
    back = cv.from_data(bad, clean_history, 1000)
    assert cv.messages(back) == [user("x")] and back["title"] == cv.NEW_TITLE and back["id"] != "../../x"
    for junk in (None, 5, [], {"nodes": []}):
        with pytest.raises(Exception, match="not a dict with nodes"):
            cv.from_data(junk, clean_history, 10)
    # A budget of messages: what is past it is left out (the page refuses to grow past it).
    assert cv.size(cv.from_data(conv, clean_history, 3)) <= 3


def test_a_chain_of_thousands_of_turns_loads_without_recursion():
    history = [user(f"q{i}") if i % 2 == 0 else bot(f"a{i}") for i in range(5000)]
    conv = cv.from_history(history)
    back = cv.from_data(json.loads(json.dumps(conv)), clean_history, 10_000)
    assert len(cv.messages(back)) == 5000


def test_the_store_keeps_each_logins_conversations_apart(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    alice, bob = chat_with_versions(), cv.from_history([user("bob's")])
    store.save("alice", alice)
    store.save("bob", bob)
    assert [c["id"] for c in store.load("alice")] == [alice["id"]] and store.count("bob") == 1
    cv.rename(alice, "Renamed")
    store.save("alice", alice)  # an update, not a second row
    assert [c["title"] for c in store.load("alice")] == ["Renamed"]
    store.delete("bob", alice["id"])  # another login's id deletes nothing
    assert store.count("alice") == 1
    with sqlite3.connect(tmp_path / "c.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("UPDATE conversations SET data = '{broken' WHERE owner = 'bob'")
    assert store.load("bob") == []  # a row no one can read is skipped


def test_the_store_holds_a_browsers_chats_apart_bounded_and_until_the_browser_has_them(tmp_path, monkeypatch):
    import web.store as store_module

    store = ConversationStore(tmp_path / "c.sqlite3")
    mine, theirs = "a" * 32, "b" * 32
    conv = cv.from_history([user("held")])
    store.hold(mine, conv)
    assert [c["id"] for c in store.held(mine)] == [conv["id"]] and store.held(theirs) == []
    with sqlite3.connect(tmp_path / "c.sqlite3") as db:  # the browser's key itself is not stored
        assert mine not in json.dumps(db.execute("SELECT * FROM pending").fetchall())
    # A copy the browser has, as new or newer, releases it; an older copy does not.
    store.release(mine, {conv["id"]: conv["updated"] - 1})
    assert len(store.held(mine)) == 1
    store.release(theirs, {conv["id"]: float("inf")})  # another browser releases nothing of mine
    assert len(store.held(mine)) == 1
    store.release(mine, {conv["id"]: conv["updated"]})
    assert store.held(mine) == []
    # Bounded: per browser, in bytes in all (the oldest go first), and in time.
    for i in range(store_module.HOLD_PER_BROWSER + 3):
        c = cv.from_history([user(f"chat {i}")])
        c["updated"] = 1000.0 + i + time.time()
        store.hold(mine, c)
    assert [c["title"] for c in store.held(mine)][-1] == "chat 3" and len(store.held(mine)) == store_module.HOLD_PER_BROWSER
    big = cv.from_history([user("x" * 4000)])
    big["updated"] = time.time() + 5000
    monkeypatch.setattr(store_module, "HOLD_BYTES", len(json.dumps(big)) + 100)  # room for it alone
    store.hold(theirs, big)
    assert store.held(mine) == [] and len(store.held(theirs)) == 1  # the newest stays
    old = cv.from_history([user("old")])
    old["updated"] = time.time() - store_module.HOLD_S - 60
    store.hold(mine, old)
    assert store.held(mine) == []


# ---- the page's handlers, over a named fake engine -------------------------------------------
@pytest.fixture
def handlers(fake, tmp_path):
    from ui.handlers import Handlers
    from web.policy import Limits
    from web.state import StateDir

    return Handlers(fake, {}, {}, limits=Limits(messages=6, conversations=2), state=StateDir(tmp_path))


VALUES = [0.7, 0.9, 40, 0, 64, 1.0, False, -1, "", "default", True]


def test_regenerate_keeps_the_earlier_reply_and_every_version_counts_against_the_limit(handlers):
    from ui.conversations import empty_book

    book = empty_book()
    *_, last = handlers.respond("Hi", [], "", *VALUES, book)
    chat = clean_history(last[1])
    *_, again = handlers.regenerate(None, chat, "", book, *VALUES)
    assert [o["label"] for o in again[1][-1]["options"]] == ["‹", "2 / 2", "›"]
    conv = book["convs"][book["current"]]
    assert cv.size(conv) == 5  # Hi, its thinking and answer, the second thinking and answer
    with pytest.raises(gr.Error, match="--max-messages"):
        list(handlers.regenerate(None, clean_history(again[1]), "", book, *VALUES))
    assert cv.size(conv) == 5  # refused before anything was added


def test_conversations_past_the_limit_are_refused_and_imports_never_overwrite(handlers, tmp_path):
    from ui.conversations import empty_book

    book = empty_book()
    list(handlers.respond("Hi", [], "", *VALUES, book))
    handlers.new_chat(book)
    list(handlers.respond("Second", [], "", *VALUES, book))
    with pytest.raises(gr.Error, match="--max-conversations"):
        handlers.new_chat(book)
    path = tmp_path / "one.json"
    path.write_text(json.dumps([user("imported"), bot("yes")]))
    with pytest.raises(gr.Error, match="--max-conversations"):
        handlers.import_chat(str(path), book)
    assert len(book["convs"]) == 2


def test_a_browser_book_near_what_a_browser_keeps_warns_before_it_fails(handlers):
    from ui.conversations import BROWSER_BYTES, empty_book

    book = empty_book()
    conv = handlers.current(book)
    cv.follow(conv, [user("x" * (BROWSER_BYTES // 2)), bot("y" * (BROWSER_BYTES // 2 + 10))])
    with pytest.warns(UserWarning, match="export and delete old chats"):
        saved = handlers.persist(book, None)
    assert saved["conversations"][0]["id"] == conv["id"]  # still kept: a warning, never a loss


def test_a_stop_that_reaches_the_server_before_its_send_stops_it_when_it_begins(handlers):
    """A Send can wait in Gradio's queue (a busy server) while its Stop, which never waits, is
    already handled: the page names each Send, and a named Send a Stop came for ends at once."""
    from types import SimpleNamespace

    from ui.conversations import empty_book

    page = SimpleNamespace(username=None, session_hash="page-1")
    book = empty_book()
    start = time.monotonic()
    handlers.stop("send-a", request=page)  # nothing of this session runs yet
    assert time.monotonic() - start < 0.1  # a named Stop does not wait for it
    *_, last = handlers.respond("Hi", [], "", *VALUES, book, "send-a", request=page)
    assert "stopped" in last[2]
    assert [m["role"] for m in clean_history(last[1])] == ["user"]  # the question stays; no reply
    # The next Send is another name: answered in full, and so is a Regenerate named anew.
    *_, last = handlers.respond("Hi again", clean_history(last[1]), "", *VALUES, book, "send-b", request=page)
    assert "stopped" not in last[2] and clean_history(last[1])[-1]["role"] == "assistant"
    # A Stop for a Regenerate not yet begun stops it the same way; other sessions are untouched.
    handlers.stop("send-c", request=page)
    *_, other = handlers.respond("Hi", [], "", *VALUES, empty_book(), "send-c",
                                 request=SimpleNamespace(username=None, session_hash="page-2"))
    assert "stopped" not in other[2]
    *_, last = handlers.regenerate(page, clean_history(last[1]), "", book, *VALUES, "send-c")
    assert "stopped" in last[2]


def test_a_page_load_that_comes_after_the_pages_first_send_does_not_bring_an_older_chat_back(handlers):
    """The load event (restore) and a Send are queued apart: on a busy server the Send can run
    first. The late load then leaves the chat on screen as it is, joins the chats kept before to
    the page's (whose copy in the browser the reply had written without them), and a fresh page
    gets them all."""
    from types import SimpleNamespace

    from ui.conversations import browser_value, empty_book

    earlier = empty_book()
    list(handlers.respond("An older chat", [], "", *VALUES, earlier, "send-0",
                          request=SimpleNamespace(username=None, session_hash="page-0")))
    before = browser_value(earlier)  # what the browser kept from an earlier visit
    page = SimpleNamespace(username=None, session_hash="page-late")
    book = empty_book()  # the page's book before its load ran
    *_, last = handlers.respond("Hi", [], "", *VALUES, book, "send-1", request=page)
    current = book["current"]
    out = handlers.restore(before, book, request=page)
    assert out[1] == gr.skip() and out[2] == gr.skip()  # the chat on screen stays as the reply left it
    assert out[0] is book and book["current"] == current and len(book["convs"]) == 2  # the older chat joined it
    assert len(out[-1]["conversations"]) == 2  # and the browser's copy has both again
    assert handlers.load_status(request=page) == gr.skip()  # the reply's own status line stays
    other = handlers.restore(out[-1], None, request=SimpleNamespace(username=None, session_hash="page-2"))
    assert other[-1] == gr.skip() and len(other[0]["convs"]) == 2  # a fresh page gets both back


def test_a_browsers_reply_survives_a_reload_a_closed_tab_and_a_restart_in_its_middle(handlers, fake, tmp_path,
                                                                                  monkeypatch):
    """A person without a login keeps chats in the browser, which gets its copy when a reply ends.
    Meanwhile the server holds the chat (the question first, then the reply every CHECKPOINT_S),
    so a page loaded in the middle of the reply, or after the tab closed or the server restarted,
    gets it back; once the browser has a copy, nothing of it stays held."""
    from types import SimpleNamespace

    import ui.handlers as handlers_module
    from ui.conversations import browser_key
    from ui.handlers import Handlers
    from web.policy import Limits
    from web.state import StateDir

    monkeypatch.setattr(handlers_module, "CHECKPOINT_S", 0.0)
    fake._backend.step_delay = 0.05
    page = SimpleNamespace(username=None, session_hash="page-a")
    out = handlers.restore(None, None, request=page)  # a first visit: the browser gets its key at once
    book, saved = out[0], out[-1]
    key = browser_key(saved)
    assert key and book["key"] == key and saved["conversations"] == []
    assert handlers.restore(saved, None, request=page)[-1] == gr.skip()  # nothing to write next time

    def reload(saved, handlers=handlers):
        out = handlers.restore(saved, None, request=SimpleNamespace(username=None, session_hash="page-b"))
        return out[0], out[1], out[-1]

    reply = handlers.respond("Hi", [], "", *VALUES, book, "send-1", request=page)
    next(reply)  # the reply has begun: its question is held
    other, chat, copy = reload(saved)
    assert [m["content"] for m in clean_history(chat)][:1] == ["Hi"] and browser_key(copy) == key
    for out in reply:  # until some of the answer streamed
        if out[1] != gr.skip() and clean_history(out[1])[-1]["content"]:
            break
    reply.close()  # the tab is closed (or reloaded) before the reply ends
    assert store_held(handlers, key)  # still held: the browser has no copy of the reply yet
    restarted = Handlers(fake, {}, {}, limits=Limits(messages=6, conversations=2), state=StateDir(tmp_path))
    other, chat, copy = reload(saved, restarted)  # a new process, the same state folder
    said = clean_history(chat)
    assert said[0]["content"] == "Hi" and said[-1]["role"] == "assistant" and said[-1]["content"]
    assert [c["id"] for c in copy["conversations"]] == [book["current"]]
    assert store_held(handlers, key) == []  # the page's load sent the browser its copy
    # Another browser's key gets nothing of it; a forged key is replaced, not trusted.
    assert reload({"key": "c" * 32})[0]["convs"] == {}
    assert browser_key(reload({"key": "../" + key})[2]) not in (None, key)


def store_held(handlers, key):
    return handlers.store.held(key)
