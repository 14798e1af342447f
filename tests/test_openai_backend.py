"""The remote backend against a real OpenAI-compatible server on loopback: llama-cpp-python's
own server (`python -m llama_cpp.server`) on the embedded model — not a mock."""

import http.server
import json
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from backends import create
from backends.base import BackendError, GenerationParams, Message, ModelSpec
from backends.locate import embedded_gguf
from backends.server import ManagedServer, free_port

pytestmark = pytest.mark.timeout(180)
PARIS = [Message("user", "What is the capital of France? Answer in one sentence.")]
GREEDY = GenerationParams(do_sample=False, max_new_tokens=48)


def server_command(n_ctx=2048):
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--host", "127.0.0.1",
            "--port", "{port}", "--n_ctx", str(n_ctx)]


@pytest.fixture(scope="module")
def llama_server():
    port = free_port()
    server = ManagedServer([c.format(port=port) for c in server_command()], f"http://127.0.0.1:{port}/v1", 120)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def remote(llama_server):
    spec = ModelSpec(name="remote", backend="openai", model="auto", base_url=llama_server.base_url)
    backend = create(spec)
    backend.load(spec)
    yield backend
    backend.unload()


def collect(stream):
    chunks = list(stream)
    return "".join(c.text for c in chunks), chunks


def test_discovers_the_model_and_streams_a_reply(remote):
    assert remote.model_name.endswith(".gguf")
    text, chunks = collect(remote.stream(PARIS, GREEDY))
    assert "Paris" in text and len(chunks) > 3
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 3
    assert remote.describe()["device"].startswith("remote http://127.0.0.1")


def test_stop_words_and_max_tokens(remote):
    text, chunks = collect(remote.stream(PARIS, GREEDY.replace(stop=["Paris"])))
    assert "Paris" not in text and chunks[-1].finish_reason == "stop"
    _, chunks = collect(remote.stream(PARIS, GREEDY.replace(max_new_tokens=3)))
    assert chunks[-1].finish_reason == "length"


def test_closing_the_stream_frees_the_server(remote):
    stream = remote.stream([Message("user", "Write a very long story about a dragon.")],
                           GenerationParams(do_sample=False, max_new_tokens=1500, repetition_penalty=1.0))
    for _ in range(5):
        next(stream)
    stream.close()
    # 1500 tokens would keep the single-slot server busy for ~15 s; a closed request frees it.
    start = time.monotonic()
    text, _ = collect(remote.stream(PARIS, GREEDY))
    assert "Paris" in text and time.monotonic() - start < 8


def test_unknown_model_lists_what_is_served(llama_server):
    spec = ModelSpec(name="x", backend="openai", model="gpt-17", base_url=llama_server.base_url)
    with pytest.raises(BackendError, match="does not serve 'gpt-17'; it serves: .*gguf"):
        create(spec).load(spec)


def test_server_that_is_down_is_named():
    url = f"http://127.0.0.1:{free_port()}/v1"
    spec = ModelSpec(name="x", backend="openai", model="auto", base_url=url)
    with pytest.raises(BackendError, match="Cannot reach the model server") as caught:
        create(spec).load(spec)
    assert url not in str(caught.value)  # a visitor's message names no address...
    assert url in caught.value.for_operator()  # ...the operator's does


def test_reply_the_server_abandons_is_an_error_not_an_empty_answer(remote):
    # llama.cpp's server answers 200 and then ends the stream when the prompt overflows its context.
    with pytest.raises(BackendError, match="ended the reply without finishing.*context"):
        list(remote.stream([Message("user", "word " * 3000)], GREEDY))


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that serves a model list and refuses every completion with a 503."""

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "busy-model", "object": "model"}]})

    def do_POST(self):
        self._send(503, {"error": {"message": "model is still loading", "type": "unavailable"}})

    def log_message(self, *args):
        pass


def test_status_errors_show_the_servers_reason():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        spec = ModelSpec(name="x", backend="openai", model="auto", base_url=url)
        backend = create(spec)
        backend.load(spec)
        with pytest.raises(BackendError, match=r"refused the request \(503\)") as caught:
            list(backend.stream(PARIS, GREEDY))
        assert "model is still loading" not in str(caught.value)  # the upstream body is not for visitors
        assert "model is still loading" in caught.value.detail
    finally:
        server.shutdown()


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        spec = ModelSpec(name="x", backend="openai", model="m", base_url=url, timeout_s=1)
        start = time.monotonic()
        with pytest.raises(BackendError, match="did not answer within 1 s"):
            create(spec).load(spec)
        assert time.monotonic() - start < 10


def test_missing_base_url_says_what_to_set():
    spec = ModelSpec(name="x", backend="openai", model="auto")
    with pytest.raises(BackendError, match="needs base_url"):
        create(spec).load(spec)


def test_managed_server_starts_streams_and_stops_on_unload():
    spec = ModelSpec(name="managed", backend="openai", model="auto", server={"command": server_command(1024)})
    backend = create(spec)
    backend.load(spec)
    proc = backend.server.proc
    assert backend.server.running
    assert "Paris" in collect(backend.stream(PARIS, GREEDY))[0]
    backend.unload()
    assert proc.poll() is not None and not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"


def test_managed_server_that_fails_to_start_shows_its_output():
    spec = ModelSpec(name="broken", backend="openai", model="auto",
                     server={"command": [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"]})
    with pytest.raises(BackendError, match="(?s)exited with code 3.*no GPU here"):
        create(spec).load(spec)


def test_lmdeploy_server_without_lmdeploy_is_one_actionable_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    spec = ModelSpec(name="lm", backend="lmdeploy-server", model="internlm/internlm2_5-7b-chat")
    with pytest.raises(BackendError) as err:
        create(spec).load(spec)
    assert "pip install -r requirements-lmdeploy.txt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.timeout(240)
def test_app_killed_with_sigterm_leaves_no_engine_server(tmp_path):
    from conftest import RunningApp

    preset = tmp_path / "managed.toml"
    command = ", ".join(f'"{c}"' for c in server_command(1024))
    preset.write_text(f'backend = "openai"\nmodel = "auto"\n[server]\ncommand = [{command}]\n')
    (tmp_path / "sampling").mkdir()
    app = RunningApp("--presets-dir", str(tmp_path), "--preset", "managed", timeout=150)
    try:
        children = psutil.Process(app.proc.pid).children(recursive=True)
        servers = [c for c in children if "llama_cpp.server" in " ".join(c.cmdline())]
        assert servers, "the app should have started the engine server"
        app.proc.send_signal(signal.SIGTERM)
        app.proc.wait(30)
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"orphaned: {[p.pid for p in alive]}"
    finally:
        if app.proc.poll() is None:
            app.proc.kill()
        app.log.close()
