"""Safe to share: the launched app with logins, an admin and an API key, tried as a visitor
would try it (gradio_client, the openai client, raw HTTP), and a public server with no logins."""

import json
import socket
import time

import httpx
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import RunningApp

pytestmark = pytest.mark.timeout(240)
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
ALICE, BOB = ("alice", "wonder"), ("bob", "builder")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    app = RunningApp("--auth", "alice:wonder", "--auth", "bob:builder", "--admin", "alice", "--api-key", "k1",
                     "--state-dir", str(tmp_path_factory.mktemp("state")), "--max-messages", "50")
    yield app
    app.stop()


def ask(client, **kwargs):
    return client.predict(message="Say hi.", history=[], system_prompt="", do_sample=False, max_new_tokens=8,
                          api_name="/respond", **kwargs)


def test_a_visitor_cannot_load_or_unload_and_the_model_stays(shared):
    bob = Client(shared.url, auth=BOB, verbose=False)
    with pytest.raises(AppError, match="Only this server's operator can load or unload models"):
        bob.predict(choice="smollm2-transformers", custom="", backend="transformers", api_name="/load")
    with pytest.raises(AppError, match="Only this server's operator"):
        bob.predict(api_name="/unload")
    assert "SmolLM2-135M-Instruct (llama.cpp" in ask(bob)[2]  # still loaded, still answering
    log = shared.log_path.read_text()
    assert "refused a model load for login 'bob'" in log and "refused a model unload for login 'bob'" in log


def test_an_operator_can_and_is_logged(shared):
    alice = Client(shared.url, auth=ALICE, verbose=False)
    status = alice.predict(choice="smollm2-llamacpp", custom="", backend="llamacpp", api_name="/load")[0]
    assert "SmolLM2" in status
    assert "alice loads SmolLM2-135M-Instruct" in shared.log_path.read_text()


def test_a_failed_load_keeps_the_model_and_says_so(shared):
    alice = Client(shared.url, auth=ALICE, verbose=False)
    with pytest.raises(AppError, match="No model file or folder at /nope/x.gguf"):
        alice.predict(choice="__custom__", custom="/nope/x.gguf", backend="llamacpp", api_name="/load")
    assert ask(Client(shared.url, auth=BOB, verbose=False))[1][-1]["content"]  # everyone still gets answers


def test_a_visitor_cannot_point_the_server_at_a_url(shared):
    with socket.socket() as listener:  # a loopback service the visitor would like the server to call
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(1.5)
        bob = Client(shared.url, auth=BOB, verbose=False)
        for custom in (f"http://127.0.0.1:{listener.getsockname()[1]}", "/etc/passwd", "/root", "org/some-model"):
            with pytest.raises(AppError, match="Only this server's operator") as refused:
                bob.predict(choice="__custom__", custom=custom, backend="transformers", api_name="/load")
            assert "passwd" not in str(refused.value) and "exist" not in str(refused.value)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody came


def test_the_api_takes_the_page_logins_or_a_key_and_nothing_else(shared):
    assert [m.id for m in openai.OpenAI(base_url=shared.url + "/v1", api_key="k1").models.list()] == ["smollm2-llamacpp"]
    basic = httpx.get(shared.url + "/v1/models", auth=BOB)
    assert basic.status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Ym9iOm5vcGU="}):
        r = httpx.get(shared.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401, headers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=shared.url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="smollm2-llamacpp", messages=PARIS, max_tokens=4)


def test_every_route_needs_the_login(shared):
    """Without a login only the login page and what draws it answer; everything else is refused."""
    open_paths = {"/", "/theme.css", "/favicon.ico"}
    paths = ["/config", "/info", "/gradio_api/info", "/gradio_api/openapi.json", "/openapi.json", "/docs",
             "/gradio_api/queue/data?session_hash=x", "/gradio_api/heartbeat/x", "/gradio_api/file=/etc/passwd",
             "/gradio_api/upload_progress", "/gradio_api/app_id", "/gradio_api/token", "/gradio_api/user",
             "/monitoring", "/gradio_api/run-history/records", "/v1/models"]
    for path in paths:
        assert httpx.get(shared.url + path).status_code in (401, 403, 404), path
    for path in ("/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/queue/join", "/gradio_api/upload",
                 "/v1/chat/completions", "/gradio_api/run/predict", "/gradio_api/stream/x"):
        assert httpx.post(shared.url + path, json={}).status_code in (401, 403, 404), path
    for path in open_paths:
        assert httpx.get(shared.url + path).status_code < 500, path


def test_nobody_can_stop_someone_elses_reply(shared):
    alice = Client(shared.url, auth=ALICE, verbose=False)
    job = alice.submit(message="Count from one to forty in words.", history=[], system_prompt="", do_sample=False,
                       max_new_tokens=60, repetition_penalty=1.0, api_name="/respond")
    deadline = time.monotonic() + 30
    while job.communicator.event_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stolen = {"session_hash": alice.session_hash, "event_id": job.communicator.event_id, "fn_index": 0}
    with httpx.Client(base_url=shared.url) as bob:
        assert bob.post("/login", data={"username": "bob", "password": "builder"}).status_code == 200
        for body in (stolen, {**stolen, "event_id": "guess"}):
            assert bob.post("/gradio_api/cancel", json=body).status_code == 403
            assert bob.post("/gradio_api/reset", json=body).status_code == 403
        assert bob.get("/gradio_api/queue/data", params={"session_hash": alice.session_hash}).status_code == 403
    assert httpx.post(shared.url + "/gradio_api/cancel", json=stolen).status_code == 401  # no login at all
    outputs = job.result()
    assert "tok/s" in outputs[2]  # alice's reply ran to its end


def test_password_guessing_is_slowed(shared):
    with httpx.Client(base_url=shared.url) as guesser:
        codes = [guesser.post("/login", data={"username": "carol", "password": f"guess{i}"}).status_code
                 for i in range(7)]
        assert codes[:5] == [400] * 5 and codes[-1] == 429, codes
        r = guesser.post("/login", data={"username": "carol", "password": "again"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "failed login for 'carol'" in shared.log_path.read_text()


def test_limits_answer_at_once_with_the_flag_to_change(shared):
    client = openai.OpenAI(base_url=shared.url + "/v1", api_key="k1", max_retries=0)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="51 messages.*--max-messages"):
        client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS * 51, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="--max-new-tokens"):
        client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=100_000)
    big = httpx.post(shared.url + "/v1/chat/completions", headers={"Authorization": "Bearer k1"},
                     content=b"x" * (9 * 1024 * 1024))
    assert big.status_code == 413 and "--max-body" in big.json()["error"]["message"]
    bob = Client(shared.url, auth=BOB, verbose=False)
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * 60
    with pytest.raises(AppError, match="61 messages.*--max-messages"):
        bob.predict(message="hi", history=history, system_prompt="", api_name="/respond")
    assert time.monotonic() - start < 5


def test_an_import_past_the_limits_is_refused_at_once(shared, tmp_path):
    from gradio_client import handle_file

    bob = Client(shared.url, auth=BOB, verbose=False)
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"role": "user", "content": "hi"}] * 51))
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([{"role": "user", "content": "x" * (9 * 1024 * 1024)}]))
    start = time.monotonic()
    with pytest.raises(AppError, match="51 messages.*--max-messages"):
        bob.predict(file=handle_file(str(many)), api_name="/import")
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client knows the limit...
        bob.predict(file=handle_file(str(huge)), api_name="/import")
    with httpx.Client(base_url=shared.url) as raw:  # ...and the server enforces it for clients that do not
        raw.post("/login", data={"username": "bob", "password": "builder"})
        r = raw.post("/gradio_api/upload", files={"files": ("huge.json", huge.read_bytes())})
        assert r.status_code == 413 and "--max-body" in r.json()["detail"]
    assert time.monotonic() - start < 5


def test_one_reply_at_a_time_per_session_a_second_send_stops_the_first(shared):
    bob = Client(shared.url, auth=BOB, verbose=False)
    first = bob.submit(message="Write a long story about a lighthouse keeper.", history=[], system_prompt="",
                       do_sample=False, max_new_tokens=1500, repetition_penalty=1.0, api_name="/respond")
    deadline = time.monotonic() + 30
    while len(first.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = ask(bob)  # sent with an empty chat, as a page whose copy is behind would
    deadline = time.monotonic() + 5
    while not first.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.done() and "stopped" in first.outputs()[-1][2]  # stopped, not failed
    chat = [m for m in second[1]]
    # The second goes on from the chat the first left: its question, its kept (marked) partial
    # reply, then the new question and its answer.
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert "(stopped)" in str(chat[1]["content"]) and "lighthouse" in str(chat[0]["content"])


def test_what_one_user_sends_never_shows_in_anothers_cached_tokens(shared):
    """User A opens with a secret; user B guesses openings. B's guesses report no cached tokens,
    while A's own second turn is served from A's cache."""
    secret = "My locker code is 4417 and my cat is called Biscuit."
    a = openai.OpenAI(base_url=shared.url + "/v1", api_key="k1", max_retries=0)
    b = httpx.Client(base_url=shared.url, auth=BOB)
    turn1 = [{"role": "user", "content": secret}]
    first = a.chat.completions.create(model="smollm2-llamacpp", messages=turn1, max_tokens=4, temperature=0)
    guesses = [secret, secret[:30], "My locker code is 4417", secret + " What is my code?"]
    # Each guess is a new conversation of B's (its own `user`), so B's own earlier guesses cannot
    # be what is cached; some name A's key or login as the user: the field cannot pick A's cache.
    # (Four conversations: with A's, fewer than the engine's 8 slots, so A's is not evicted.)
    for guess, user in zip(guesses, [None, "key:0", "alice", "k1"]):
        body = {"model": "smollm2-llamacpp", "messages": [{"role": "user", "content": guess}], "max_tokens": 1,
                **({"user": user} if user else {})}
        usage = b.post("/v1/chat/completions", json=body).json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0, (guess, user)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "What is my cat called?"}]
    again = a.chat.completions.create(model="smollm2-llamacpp", messages=turn2, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


# ---- a public server: a Space with no logins ----------------------------------------------
@pytest.fixture(scope="module")
def space(tmp_path_factory):
    app = RunningApp("--state-dir", str(tmp_path_factory.mktemp("state")),
                     env={"SPACE_ID": "someone/confab", "SPACE_AUTHOR_NAME": "someone"})
    yield app
    app.stop()


def test_on_a_space_visitors_chat_and_nothing_more(space):
    visitor = Client(space.url, verbose=False)
    assert ask(visitor)[1][-1]["content"]
    with pytest.raises(AppError, match="Only this server's operator"):
        visitor.predict(api_name="/unload")
    r = httpx.get(space.url + "/v1/models")
    assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]
    log = space.log_path.read_text()
    assert "nobody can load or unload models from the page" in log and "/v1 is closed" in log


def test_without_logins_a_cancel_needs_the_event_id_that_only_its_sender_has(space):
    visitor = Client(space.url, verbose=False)
    job = visitor.submit(message="Count from one to forty in words.", history=[], system_prompt="",
                         do_sample=False, max_new_tokens=40, repetition_penalty=1.0, api_name="/respond")
    deadline = time.monotonic() + 30
    while job.communicator.event_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
    guess = {"session_hash": visitor.session_hash, "event_id": "0" * 32, "fn_index": 0}
    assert httpx.post(space.url + "/gradio_api/cancel", json=guess).status_code == 403
    assert "tok/s" in job.result()[2]
