"""Attachments on the page, below the browser: the store that keeps them by content, what a page
sends back (hostile paths never opened), a message with files through the handlers to the model
as text and pictures, and kept in the conversation. The embedded model counts the tokens."""

import os

import gradio as gr
import pytest
from gradio import utils as gr_utils

from backends.base import Message
from chat import conversations as cv
from conftest import embedded_spec, loaded
from test_attachments import make_pdf
from test_vision import picture
from ui.chat import ATTACHED, clean_history, for_page, to_messages
from web.store import AttachmentStore

VALUES = [0.7, 0.9, 40, 0, 16, 1.0, False, -1, "", "default", True]


@pytest.fixture(scope="module")
def embedded():
    with loaded(embedded_spec()) as manager:
        yield manager


@pytest.fixture
def handlers(embedded, tmp_path):
    from ui.handlers import Handlers
    from web.state import StateDir

    return Handlers(embedded, {}, {}, state=StateDir(tmp_path / "state"))


def upload(name: str, data: bytes) -> dict:
    """A file as Gradio's upload route leaves it: in its upload folder, named as sent."""
    folder = os.path.join(gr_utils.get_upload_folder(), os.urandom(8).hex())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def test_the_store_keeps_by_content_and_looks_up_only_its_own_names(tmp_path):
    store = AttachmentStore(tmp_path / "a", budget_bytes=250)
    first = store.put(b"x" * 100, "txt")
    assert store.put(b"x" * 100, "txt") == first and len(os.listdir(tmp_path / "a")) == 1
    assert store.read(first) == b"x" * 100
    for hostile in ("../conversations.sqlite3", "/etc/passwd", first.upper(), first + "/..", ["x"], None,
                    "a" * 64 + ".exe"):
        assert store.path(hostile) is None
    second = store.put(b"y" * 100, "png")
    os.utime(store.folder / first, (1, 1))  # used long ago
    third = store.put(b"z" * 100, "png")  # past the budget: the file used longest ago goes
    assert store.read(first) is None and store.read(second) and store.read(third)
    with pytest.raises(ValueError):
        store.put(b"data", "exe")


def test_a_name_says_nothing_of_the_content_to_anyone_but_its_owner(tmp_path):
    import hashlib

    store = AttachmentStore(tmp_path / "a", secret="server-secret")
    alice = store.put(b"the quarterly numbers", "txt", owner="login:alice")
    assert store.put(b"the quarterly numbers", "txt", owner="login:alice") == alice  # kept once per owner
    bob = store.put(b"the quarterly numbers", "txt", owner="login:bob")
    assert bob != alice  # Bob, holding the same file, cannot tell that Alice has it
    assert hashlib.sha256(b"the quarterly numbers").hexdigest() not in alice
    other_server = AttachmentStore(tmp_path / "b", secret="another")
    assert other_server.put(b"the quarterly numbers", "txt", owner="login:alice") != alice


def test_a_browser_keeps_its_attachment_key_with_its_chats(handlers):
    from ui.conversations import browser_value, empty_book

    book = empty_book()
    key = handlers.owner_key(book, None)
    saved = browser_value(book)
    assert handlers.owner_key(handlers.open_book(saved, None), None) == key
    assert handlers.owner_key(handlers.open_book({**saved, "key": "../../x"}, None), None) != key


def test_what_a_page_sends_back_keeps_store_names_only():
    name = "ab" * 32 + ".png"
    page = {"role": "user", "content": [
        {"type": "file", "file": {"path": f"/tmp/gradio/xyz/{name}", "orig_name": "cat.png"}},
        {"type": "file", "file": {"path": "/etc/passwd", "orig_name": "passwd"}},
        {"type": "text", "text": "what is this?"}]}
    assert clean_history([page]) == [{"role": "user", "content": "what is this?",
                                      ATTACHED: [{"id": name, "name": "cat.png"}]}]
    stored = clean_history(clean_history([page]))  # the stored form reads back the same
    assert stored == clean_history([page])
    assert clean_history([{"role": "user", "content": "hi", ATTACHED: [{"id": "../x.png"}, "junk"]}]) == \
        [{"role": "user", "content": "hi"}]
    # Turns with the same text and other files are different turns.
    conv = cv.new()
    cv.follow(conv, stored)
    cv.follow(conv, [{"role": "user", "content": "what is this?"}])
    assert len(conv["nodes"]["root"]["children"]) == 2


def test_a_pdf_and_a_picture_go_to_the_model_and_stay_in_the_conversation(handlers):
    from ui.conversations import empty_book

    pdf = upload("report.pdf", make_pdf(["The secret word is tangerine."]))
    png = upload("dot.png", picture(2).data)
    book = empty_book()
    *_, last = handlers.respond({"text": "What is the secret word?", "files": [pdf]}, [], "", *VALUES, book)
    chat = clean_history(last[1])
    said = chat[0]
    assert said["content"] == "What is the secret word?" and said[ATTACHED][0]["name"] == "report.pdf"
    message = handlers.model_message(said)
    assert message.content.startswith('<file name="report.pdf">\nThe secret word is tangerine.\n</file>')
    assert message.content.endswith("What is the secret word?")
    shown = last[1][0]["content"]  # the page gets the file (from the store) before the text
    assert shown[0]["file"]["orig_name"] == "report.pdf" and shown[-1] == "What is the secret word?"
    assert os.path.basename(shown[0]["file"]["path"]) == said[ATTACHED][0]["id"]  # named as the store names it
    conv = book["convs"][book["current"]]
    assert cv.messages(conv)[0][ATTACHED] == said[ATTACHED]

    # A text-only model refuses a picture in one line, before anything is added.
    with pytest.raises(gr.Error, match="reads text only"):
        list(handlers.respond({"text": "and this?", "files": [png]}, chat, "", *VALUES, book))
    assert cv.size(conv) == len(chat)


def test_pictures_become_image_data_for_a_vision_model(handlers):
    name = handlers.attachments.put(picture(5).data, "png")
    message = handlers.model_message({"role": "user", "content": "what?", ATTACHED: [{"id": name, "name": "p.png"}]})
    assert message.content == "what?" and message.images[0].width == 40
    gone = handlers.model_message({"role": "user", "content": "hm", ATTACHED: [{"id": "cd" * 32 + ".png",
                                                                             "name": "old.png"}]})
    assert "old.png: no longer kept" in gone.content and not gone.images
    chat = [{"role": "user", "content": "what?", ATTACHED: [{"id": name, "name": "p.png"}]}]
    assert to_messages(chat, None, user=handlers.model_message)[0].images
    assert to_messages(chat, None) == [Message("user", "what?")]  # without a reader: text only
    page = for_page(chat, handlers.page_file)
    assert page[0]["content"][0]["file"]["mime_type"] == "image/png"
    # The page gets a copy in Gradio's cache, made once (not re-hashed on every streamed frame).
    assert page[0]["content"][0]["file"]["path"].startswith(gr_utils.get_upload_folder())
    assert for_page(chat, handlers.page_file)[0]["content"][0]["file"]["path"] == page[0]["content"][0]["file"]["path"]


def test_an_attachment_no_longer_kept_shows_as_a_note_and_the_chat_reads_back_the_same(handlers):
    gone = "ef" * 32 + ".png"
    chat = [{"role": "user", "content": "look", ATTACHED: [{"id": gone, "name": "old.png"}]},
            {"role": "assistant", "content": "ok"}]
    page = for_page(chat, handlers.page_file)
    part = page[0]["content"][0]
    assert part["file"]["mime_type"] == "text/plain" and "no longer kept" in part["alt_text"]
    back = clean_history(page)
    assert back == chat  # same id, same text: the conversation's tree does not branch on it
    conv = cv.new()
    cv.follow(conv, chat)
    cv.follow(conv, back)
    assert len(conv["nodes"]) == 3


@pytest.mark.parametrize("files, words", [
    ([{"path": "/etc/passwd", "orig_name": "passwd.txt"}], "not uploaded to this page"),
    ([{"path": 7}], "not uploaded to this page"),
    ([{"path": "/tmp/a\x00b"}], "not uploaded to this page"),
    ([{"path": "/tmp/" + "x" * 5000}], "not uploaded to this page"),
    ("x", "must be a list"),
])
def test_files_from_outside_the_upload_folder_are_refused(handlers, files, words):
    from ui.conversations import empty_book

    with pytest.raises(gr.Error, match=words):
        list(handlers.respond({"text": "read it", "files": files}, [], "", *VALUES, empty_book()))


def test_a_file_of_an_unread_kind_and_too_many_files_are_refused_with_what_works(handlers):
    from ui.conversations import empty_book

    with pytest.raises(gr.Error, match="Confab reads text files"):
        list(handlers.respond({"text": "run it", "files": [upload("tool.exe", b"MZ")]}, [], "", *VALUES,
                              empty_book()))
    many = [upload(f"n{i}.txt", b"hi") for i in range(40)]
    with pytest.raises(gr.Error, match="attach at most 32"):
        list(handlers.respond({"text": "read them", "files": many}, [], "", *VALUES, empty_book()))


def test_a_forged_chat_that_names_one_file_many_times_is_refused_before_anything_is_read(handlers):
    from ui.conversations import empty_book

    name = handlers.attachments.put(b"hello " * 1000, "txt")
    part = {"type": "file", "file": {"path": f"/tmp/gradio/x/{name}", "orig_name": "a.txt"}}
    # 32 references in one message are one attachment; across messages each counts.
    one = clean_history([{"role": "user", "content": [part] * 32 + ["hi"]}])
    assert len(one[0][ATTACHED]) == 1
    forged = [{"role": "user", "content": [part, f"q{i}"]} for i in range(100)]
    forged = [m for q in forged for m in (q, {"role": "assistant", "content": "a"})]
    with pytest.raises(gr.Error, match="would hold 100 attachments; one holds at most 64"):
        list(handlers.respond("and?", forged, "", *VALUES, empty_book()))
    pictures = [{"role": "user", "content": [{"type": "file", "file": {"path": "/x/" + "ab" * 32 + ".png"}}, "?"]}] * 17
    with pytest.raises(gr.Error, match="17 pictures; this server takes at most 16"):
        handlers._checked(pictures, "")


def test_a_long_file_name_keeps_its_suffix(handlers):
    from ui.conversations import empty_book

    f = {**upload("notes.txt", b"some notes"), "orig_name": "n" * 300 + ".txt"}  # as a browser names it
    *_, last = handlers.respond({"text": "read", "files": [f]}, [], "", *VALUES, empty_book())
    name = clean_history(last[1])[0][ATTACHED][0]["name"]
    assert len(name) == 200 and name.endswith(".txt")
