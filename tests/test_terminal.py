"""The terminal chat (`python app.py chat`), driven through a real pty with pexpect."""

import json
import os
import sys

import pexpect
import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def chat():
    child = pexpect.spawn(sys.executable, [str(ROOT / "app.py"), "chat"], cwd=str(ROOT), encoding="utf-8",
                          timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"})
    child.expect("you> ")
    yield child
    if child.isalive():
        child.sendline("/quit")
        child.expect(pexpect.EOF)


def test_streams_a_reply_and_keeps_the_conversation(chat, tmp_path):
    chat.sendline("/params do_sample=false max_new_tokens=48")
    chat.expect(r"\[params\] do_sample=False, max_new_tokens=48")
    chat.expect("you> ")
    chat.sendline("What is the capital of France? Answer in one sentence.")
    chat.expect("bot> ")
    chat.expect("you> ")
    assert "Paris" in chat.before
    chat.sendline("/system You are terse.")
    chat.expect(r"\[system prompt set\]")
    out = tmp_path / "chat.json"
    chat.sendline(f"/save {out}")
    chat.expect(r"\[saved 3 messages")
    saved = json.loads(out.read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant"] and "Paris" in saved[2]["content"]
    chat.sendline("/reset")
    chat.expect(r"\[new conversation\]")


def test_ctrl_c_stops_the_reply_not_the_program(chat):
    chat.sendline("/params do_sample=false max_new_tokens=3000 repetition_penalty=1.0")
    chat.expect("you> ")
    chat.sendline("Write a very long story about a dragon.")
    chat.expect("bot> ")
    chat.expect(r"\w+ \w+ \w+")  # some of the story has arrived
    chat.sendcontrol("c")
    chat.expect(r"\[stopped\]", timeout=10)
    chat.expect("you> ")
    chat.sendline("/params max_new_tokens=24")
    chat.expect("you> ")
    chat.sendline("Say hello.")
    chat.expect("bot> ")
    chat.expect("you> ", timeout=20)  # the engine was free: the next reply came at once
    assert chat.isalive()


def test_bad_commands_and_settings_are_explained(chat):
    chat.sendline("/params temperature=-2")
    chat.expect(r"\[error\] temperature must be 0 or more")
    chat.sendline("/load nope")
    chat.expect(r"\[error\] Unknown preset 'nope'")
    chat.sendline("/frobnicate")
    chat.expect("Unknown command /frobnicate")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
