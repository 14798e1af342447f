"""Who may do what (web.policy) and the door every request passes (web.door), without a server:
the door runs in front of a tiny echo app through httpx's ASGI transport."""

import asyncio
import base64
import json

import httpx
import pytest

from backends.base import GenerationParams, Message
from web.door import Door, Gate, SessionBook
from web.jsonsafe import json_depth
from web.policy import Access, Limits, Throttle, TooLarge


def test_the_owner_at_a_loopback_page_operates_and_nobody_else_does():
    assert Access().owner_mode and Access().is_operator(None)
    lan = Access.for_server([], [], [], host="0.0.0.0", share=False, space=False)
    assert not lan.owner_mode and not lan.is_operator(None)
    shared = Access.for_server([("alice", "a"), ("bob", "b")], ["alice"], [], "127.0.0.1", share=True, space=False)
    assert shared.is_operator("alice") and not shared.is_operator("bob") and not shared.is_operator(None)
    space = Access.for_server([], [], [], "0.0.0.0", share=False, space=True)
    assert space.public and not space.api_open and not space.is_operator(None)
    # Logins on loopback: still only the admins operate.
    assert not Access.for_server([("bob", "b")], [], [], "127.0.0.1", False, False).is_operator("bob")


def test_an_admin_must_be_a_login():
    with pytest.raises(ValueError, match="--admin carol: each admin must be a login"):
        Access.for_server([("alice", "a")], ["carol"], [], "127.0.0.1", False, False)


def test_credentials_are_checked_by_digest_and_name_who_is_calling():
    access = Access({"alice": "wonder"}, api_keys=("k1", "k2"))
    basic = "Basic " + base64.b64encode(b"alice:wonder").decode()
    assert access.identify(basic) == ("login:alice", "alice")
    assert access.identify("Basic " + base64.b64encode(b"alice:nope").decode()) == (None, "alice")
    assert access.identify("Bearer k2") == ("key:1", None)
    assert access.identify("Bearer k3") == (None, None)
    assert access.identify("Basic !!notbase64") == (None, None)
    assert access.identify("Digest whatever") == (None, None)
    assert not access.login_ok("mallory", "wonder") and access.login_ok("alice", "wonder")


def test_failed_guesses_slow_down_and_a_success_clears_them():
    now = [0.0]
    throttle = Throttle(free=3, base_s=1.0, max_s=8.0, clock=lambda: now[0])
    for _ in range(3):
        throttle.failed(["user:bob"])
    assert throttle.retry_after(["user:bob"]) <= 0  # three free tries
    throttle.failed(["user:bob"])
    assert throttle.retry_after(["user:bob"]) == 1.0
    throttle.failed(["user:bob"])
    throttle.failed(["user:bob"])
    assert throttle.retry_after(["user:bob", "addr:x"]) == 4.0  # doubling, the worst key counts
    for _ in range(10):
        throttle.failed(["user:bob"])
    assert throttle.retry_after(["user:bob"]) == 8.0  # capped
    throttle.succeeded(["user:bob"])
    assert throttle.retry_after(["user:bob"]) <= 0


def test_limits_name_the_flag_to_change():
    limits = Limits(message_chars=10, messages=3, max_new_tokens=100)
    with pytest.raises(TooLarge, match="4 messages.*at most 3 .*--max-messages"):
        limits.check_texts([("m", "")] * 4)
    with pytest.raises(TooLarge, match="Message 2 is 11 characters.*--max-message-chars"):
        limits.check_texts([("Message 1", "ok"), ("Message 2", "x" * 11)])
    with pytest.raises(TooLarge, match="max_new_tokens is 101.*--max-new-tokens"):
        limits.check_params(GenerationParams(max_new_tokens=101))


def test_text_that_utf8_cannot_hold_is_repaired_in_every_message():
    assert Message("user", "a\ud800b").content == "a\ufffdb"
    assert Message("user", "\ud83d\ude00").content == "\U0001F600"  # a whole pair is one character


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[["}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert json_depth(b"[" * 500 + b"]" * 500) == 500


def test_a_session_belongs_to_whoever_opened_it():
    book = SessionBook(max_sessions=2)
    assert book.claim("s1", "alice") and not book.claim("s1", "bob")
    book.add_event("s1", "e1")
    assert book.started("s1", "e1", "alice") and not book.started("s1", "e1", "bob")
    assert not book.started("s1", "e2", "alice")
    assert book.foreign("s1", "bob") and not book.foreign("unknown", "bob")
    book.claim("s2", "bob"), book.claim("s3", "bob")
    assert not book.foreign("s1", "bob")  # bounded: the oldest session was forgotten


# ---- the door in front of an echo app ------------------------------------------------------
async def _echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    data = json.dumps({"path": scope["path"], "body": body.decode("utf-8", "replace"),
                       "identity": scope.get("state", {}).get("confab_identity")}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


def call(gate, method, path, base_url="http://127.0.0.1:7860", **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=Door(_echo, gate), client=("203.0.113.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_the_door_refuses_big_deep_and_closed_before_any_route_runs():
    gate = Gate(Access(), Limits(body_bytes=1000))
    big = call(gate, "POST", "/v1/chat/completions", content=b"x" * 1001)
    assert big.status_code == 413 and "--max-body" in big.json()["error"]["message"]
    deep = call(gate, "POST", "/gradio_api/queue/join", content=b"[" * 100 + b"]" * 100,
                headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nests deeper" in deep.json()["detail"]
    for path in ("/openapi.json", "/docs", "/gradio_api/stream/abc", "/monitoring", "/gradio_api/run-history/records",
                 "/gradio_api/call/respond/abc", "/gradio_api/run/predict", "/gradio_api/api/respond"):
        assert call(gate, "GET", path).status_code == 404, path


def test_lone_surrogates_are_replaced_before_a_route_sees_them():
    gate = Gate(Access(), Limits())
    r = call(gate, "POST", "/v1/chat/completions", content=b'{"text": "a\\ud800b \\ud83d\\ude00"}',
             headers={"content-type": "application/json"})
    assert json.loads(r.json()["body"]) == {"text": "a\ufffdb \U0001F600"}


def test_the_api_takes_a_key_or_a_login_and_names_the_caller():
    gate = Gate(Access({"alice": "wonder"}, api_keys=("k1",)), Limits())
    assert call(gate, "GET", "/v1/models").status_code == 401
    assert call(gate, "GET", "/v1/models", headers={"Authorization": "Bearer k1"}).json()["identity"] == "key:0"
    ok = call(gate, "GET", "/v1/models", auth=("alice", "wonder"))
    assert ok.json()["identity"] == "login:alice"
    wrong = call(gate, "GET", "/v1/models", auth=("alice", "nope"))
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_api_key"
    assert call(gate, "GET", "/gradio_api/info").status_code == 401  # the page's routes need the login too


def test_a_public_server_without_a_key_closes_its_api_and_says_how_to_open_it():
    gate = Gate(Access(exposed=True, public=True), Limits())
    r = call(gate, "GET", "/v1/models")
    assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]
    open_gate = Gate(Access(), Limits())  # loopback, no logins: open, and the caller is its address
    assert call(open_gate, "GET", "/v1/models").json()["identity"] == "addr:203.0.113.7"


def test_api_guessing_is_slowed_too():
    gate = Gate(Access(api_keys=("k1",)), Limits(), throttle=Throttle(free=2))
    codes = [call(gate, "GET", "/v1/models", headers={"Authorization": f"Bearer guess{i}"}).status_code
             for i in range(4)]
    assert codes[:3] == [401, 401, 401] and codes[3] == 429


def test_other_websites_and_rebound_names_are_refused():
    owner = Gate(Access(), Limits())
    assert call(owner, "GET", "/v1/models", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    cross = call(owner, "POST", "/gradio_api/queue/join", json={}, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403 and "Cross-site" in cross.json()["detail"]
    rebound = call(owner, "GET", "/config", base_url="http://evil.example:7860")
    assert rebound.status_code == 403 and "localhost only" in rebound.json()["detail"]
    # A public server answers to its own name; behind a proxy, the forwarded one.
    public = Gate(Access(exposed=True, public=True), Limits())
    assert call(public, "GET", "/config", base_url="https://x.hf.space").status_code == 200
    proxied = call(public, "POST", "/gradio_api/queue/join", json={}, base_url="http://10.0.0.5:7860",
                   headers={"Origin": "https://x.hf.space", "X-Forwarded-Host": "x.hf.space"})
    assert proxied.status_code == 200


def test_a_session_is_named_once():
    gate = Gate(Access(), Limits())
    r = call(gate, "GET", "/gradio_api/queue/data?session_hash=mine&session_hash=yours")
    assert r.status_code == 400


def test_a_locked_login_name_is_not_even_tried():
    gate = Gate(Access({"alice": "wonder"}), Limits(), throttle=Throttle(free=2))
    assert [gate.check_login("alice", f"guess{i}") for i in range(3)] == [False, False, False]
    assert not gate.check_login("alice", "wonder")  # right, but locked: no oracle for a guesser
    assert gate.throttle.retry_after(["user:alice"]) > 0


def test_quiet_time_forgives_and_a_flood_of_names_cannot_unlock():
    now = [0.0]
    throttle = Throttle(free=1, forget_s=60, max_keys=3, clock=lambda: now[0])
    throttle.failed(["user:alice"]), throttle.failed(["user:alice"])
    assert throttle.retry_after(["user:alice"]) == 1.0
    for i in range(10):  # new names, each failing once: the lock on alice stays
        throttle.failed([f"user:x{i}"])
    assert throttle.retry_after(["user:alice"]) > 0
    now[0] = 120.0
    throttle.failed(["user:alice"])  # a failure after a quiet minute counts as the first
    assert throttle.retry_after(["user:alice"]) <= 0


def test_a_cancel_must_name_an_event_its_caller_started():
    gate = Gate(Access(), Limits())
    gate.sessions.claim("s1", "")
    gate.sessions.add_event("s1", "e1")
    body = {"session_hash": "s1", "fn_index": 0}
    assert call(gate, "POST", "/gradio_api/cancel", json={**body, "event_id": "guess"}).status_code == 403
    assert call(gate, "POST", "/gradio_api/cancel", json={**body, "event_id": "e1"}).status_code == 200


# ---- the state folder ----------------------------------------------------------------------
def test_the_browser_secret_is_made_once_and_kept(tmp_path, monkeypatch):
    import os
    import stat

    from web.state import StateDir

    monkeypatch.delenv("CONFAB_SECRET", raising=False)
    first = StateDir(tmp_path / "state").browser_secret()
    assert len(first) >= 32 and StateDir(tmp_path / "state").browser_secret() == first  # a restart reads it back
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "browser-secret").st_mode) == 0o600
    monkeypatch.setenv("CONFAB_SECRET", "from-the-environment")
    assert StateDir(tmp_path / "state").browser_secret() == "from-the-environment"


def test_exports_do_not_pile_up(tmp_path):
    import os
    import subprocess
    import sys

    from web.state import EXPORT_KEEP_S, StateDir

    state = StateDir(tmp_path / "state")
    old = state.export("old.json", "[]")
    stale = old.stat().st_mtime - EXPORT_KEEP_S - 1
    os.utime(old.parent, (stale, stale))
    new = state.export("new.json", "[]")
    assert new.exists() and not old.exists() and len(list(state.exports.iterdir())) == 1
    # The folder goes when the process ends.
    script = f"from web.state import StateDir; print(StateDir({str(tmp_path / 'state')!r}).export('x.json', '[]'))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert not os.path.exists(out.stdout.strip())
