"""The model panel: a load's stages on the operator's progress bar from the first moment (real
loads of the embedded model, a tiny transformers model and a hub download served here), what
everyone else is told while the model switches (a named fake engine whose load waits), a typed
.gguf going to llama.cpp, and engines that cannot run on this machine marked in the lists."""

import contextvars
import hashlib
import http.server
import io
import sys
import threading
from types import SimpleNamespace

import gradio as gr
import pytest

import backends
import backends.lmdeploy as lmdeploy_backend
from backends.base import BackendError, GenerationParams, Message, ModelSpec, Waiting
from backends.hub import _tqdm_for
from backends.locate import embedded_gguf, locate
from backends.manager import ModelManager
from conftest import embedded_spec, hf_spec, loaded, make_hub_cache
from fakes import FakeEngineBackend
from ui.models import custom_spec, page_progress

FAKE = ModelSpec(name="fake", backend="fake-engine", model="x")
SLOW = ModelSpec(name="Slow Model 7B", backend="fake-slow-load-panel", model="x")
GATE = threading.Event()  # the slow fake's load waits for this
STARTED = threading.Event()


class SlowLoad(FakeEngineBackend):
    """A named fake engine whose load takes until the test says (GATE)."""

    def load(self, spec, progress=None):
        STARTED.set()
        progress and progress(0.2, "Loading weights for Slow Model 7B")
        GATE.wait(10)
        super().load(spec, progress)


if "fake-slow-load-panel" not in backends.names():
    backends.register("fake-slow-load-panel")(SlowLoad)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, fraction, text):
        self.calls.append((fraction, text))

    @property
    def texts(self):
        return [t for _, t in self.calls]


# ---- 1. a load's stages, for the operator ------------------------------------------------------
def test_a_real_load_of_the_embedded_model_reports_every_stage_from_the_first_moment():
    manager, seen = ModelManager(), Recorder()
    manager.load(embedded_spec(), progress=seen)
    try:
        assert seen.calls[0] == (0.0, "Resolving embedded…")  # before anything slow
        assert "Loading SmolLM2-135M-Instruct.Q4_1.gguf" in seen.texts
        assert seen.calls[-1] == (1.0, "Loaded embedded")
        again = Recorder()
        manager.load(embedded_spec(), progress=again)  # a swap says what it unloads
        assert again.texts[:2] == ["Resolving embedded…", "Unloading embedded…"]
    finally:
        manager.unload()


def test_a_transformers_load_reports_tokenizer_and_weights(tiny_model_dir):
    seen = Recorder()
    manager = ModelManager()
    manager.load(hf_spec(tiny_model_dir), progress=seen)
    manager.unload()
    stages = [t for t in seen.texts if not t.startswith("Loading checkpoint")]
    assert stages == ["Resolving tiny…", "Loading tokenizer for tiny", "Loading weights for tiny", "Loaded tiny"]


def test_a_load_from_the_local_hub_cache_says_where_it_fetches_from(offline_hub):
    gguf = embedded_gguf()
    make_hub_cache(offline_hub, "confab/smol-GGUF", {gguf.name: gguf})
    spec = ModelSpec(name="smol", backend="llamacpp", model=f"confab/smol-GGUF/{gguf.name}", n_ctx=512)
    seen = Recorder()
    with loaded(embedded_spec()) as manager:
        manager.load(spec, progress=seen)
    assert seen.texts[:3] == ["Resolving smol…", "Unloading embedded…",
                              f"Fetching confab/smol-GGUF/{gguf.name} from the Hugging Face hub"]
    assert seen.calls[-1] == (1.0, "Loaded smol")


class _Hub(http.server.BaseHTTPRequestHandler):
    """Enough of the Hugging Face hub for hf_hub_download: HEAD for the metadata, GET for the bytes."""

    files: dict = {}

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        data = self.files.get(self.path.split("/resolve/main/")[-1])
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "b" * 40)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A hub served here (nothing leaves the machine), with an empty cache in tmp_path."""
    import huggingface_hub.constants as hub

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", url)
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    yield _Hub.files
    server.shutdown()
    _Hub.files.clear()


def test_a_hub_download_shows_its_bytes_then_loads(local_hub):
    gguf = embedded_gguf()
    local_hub[gguf.name] = gguf.read_bytes()
    mb = f"{len(local_hub[gguf.name]) / 1e6:.1f} MB"
    spec = ModelSpec(name="smol", backend="llamacpp", model=f"confab/smol-GGUF/{gguf.name}", n_ctx=512)
    seen = Recorder()
    manager = ModelManager()
    manager.load(spec, progress=seen)
    try:
        label = f"confab/smol-GGUF/{gguf.name}"
        downloads = [(f, t) for f, t in seen.calls if t.startswith(f"Downloading {label}: ")]
        assert downloads and downloads[-1] == (1.0, f"Downloading {label}: {mb} / {mb}")
        order = [t.split(":")[0] for t in seen.texts]
        assert order.index("Resolving smol…") < order.index(f"Fetching {label} from the Hugging Face hub") \
            < order.index(f"Downloading {label}") < order.index(f"Loading {gguf.name}") < order.index("Loaded smol")
    finally:
        manager.unload()


def test_snapshot_byte_bars_report_bytes_and_the_files_bar_keeps_quiet():
    """snapshot_download's bars as huggingface_hub 2.4 makes them, updated from worker threads."""
    seen = Recorder()
    cls = _tqdm_for(seen, "org/model")
    files = cls(total=2, desc="Fetching 2 files", file=io.StringIO())
    got = cls(total=3_000_000_000, unit="B", unit_scale=True, desc="Reconstructing", file=io.StringIO())
    net = cls(total=10, unit="B", desc="Downloading bytes", file=io.StringIO())  # a guessed total: not shown
    workers = [threading.Thread(target=lambda: (got.update(1_500_000_000), net.update(5))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    files.update(2)
    assert seen.calls[-1] == (1.0, "Downloading org/model: 3.00 GB / 3.00 GB")
    assert all(t.startswith("Downloading org/model: ") for t in seen.texts)
    for bar in (files, got, net):
        bar.close()


def test_page_progress_reaches_the_page_from_a_download_thread():
    """Gradio finds the page's event in context variables, which hub worker threads lack."""
    event = contextvars.ContextVar("event")
    event.set("the operator's load")
    seen = []
    report = page_progress(lambda fraction, desc: seen.append((event.get(None), fraction, desc)))
    report(0.0, "Resolving x…")
    worker = threading.Thread(target=report, args=(0.5, "Downloading x: 1.0 MB / 2.0 MB"))
    worker.start()
    worker.join()
    assert seen == [("the operator's load", 0.0, "Resolving x…"),
                    ("the operator's load", 0.5, "Downloading x: 1.0 MB / 2.0 MB")]


def test_a_swap_waits_for_replies_in_flight_and_says_so():
    manager = ModelManager(swap_grace_s=0.2)
    manager.load(FAKE)
    stream = manager.stream([Message("user", "hi")], GenerationParams())
    next(stream)
    seen = Recorder()
    manager.load(FAKE, progress=seen)  # stops the reply after 0.2 s
    assert seen.texts[:3] == ["Resolving fake…", "Waiting up to 0.2 s for 1 reply in progress to finish…",
                              "Unloading fake…"]
    stream.close()


def test_the_load_handler_shows_stages_on_the_page_progress(fake):
    from ui.handlers import Handlers

    calls = []
    handlers = Handlers(fake, {}, {})
    handlers.load_model("__custom__", "embedded", "transformers", None,
                        progress=lambda fraction, desc=None: calls.append((fraction, desc)))
    try:
        assert calls[0] == (0.0, "Resolving embedded…") and calls[-1] == (1.0, "Loaded embedded")
        assert fake.spec.backend == "llamacpp"  # "embedded" is a GGUF: llama.cpp loads it
    finally:
        fake.unload()


# ---- 2. what everyone else sees while the model switches ---------------------------------------
@pytest.fixture
def slow_switch():
    """The fake engine loaded, then a load of SLOW under way in a thread until GATE is set."""
    GATE.clear()
    STARTED.clear()
    manager = ModelManager(swap_grace_s=0.5)
    manager.load(FAKE)
    errors = []
    loader = threading.Thread(target=lambda: _catch(errors, manager.load, SLOW))
    yield manager, loader
    GATE.set()
    loader.join(10)
    assert not errors
    manager.unload()


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the fixture
        errors.append(e)


def test_a_reply_sent_during_a_load_is_told_the_model_is_switching(slow_switch):
    manager, loader = slow_switch
    loader.start()
    assert STARTED.wait(5)
    stream = manager.stream([Message("user", "hi")], GenerationParams(max_new_tokens=2))
    first = next(stream)
    assert isinstance(first, Waiting) and first.loading == "Slow Model 7B" and first.ahead == 0
    second = next(stream)  # a second later: the time so far has grown
    assert second.loading == "Slow Model 7B" and second.waited_s >= first.waited_s + 0.9
    GATE.set()
    rest = list(stream)
    assert "".join(c.text for c in rest if not isinstance(c, Waiting)) == "one two"
    assert manager.spec == SLOW


def test_a_reply_in_line_when_a_load_begins_is_told_so(slow_switch):
    manager, loader = slow_switch
    first = manager.stream([Message("user", "a")], GenerationParams())
    next(first)
    second = manager.stream([Message("user", "b")], GenerationParams(max_new_tokens=1))
    assert next(second).ahead == 1  # in line behind the first: the true place
    loader.start()
    waiting = next(second)
    assert waiting.loading == "Slow Model 7B"  # now it waits for the switch, not for "1 reply"
    first.close()
    assert STARTED.wait(5)
    GATE.set()
    assert [c.text for c in second if not isinstance(c, Waiting)][0] == "one"


def test_a_waiting_reply_is_cancelled_at_once_during_a_load(slow_switch):
    import time

    manager, loader = slow_switch
    loader.start()
    assert STARTED.wait(5)
    reply = manager.reply([Message("user", "hi")], GenerationParams())
    events = iter(reply)
    assert isinstance(next(events), Waiting)
    start = time.monotonic()
    threading.Timer(0.1, reply.cancel).start()
    list(events)
    assert reply.finish_reason == "cancelled" and time.monotonic() - start < 0.5


def test_the_page_says_the_operator_is_switching_and_the_watch_too(slow_switch, tmp_path):
    from ui.conversations import empty_book
    from ui.handlers import Handlers
    from web.state import StateDir

    manager, loader = slow_switch
    handlers = Handlers(manager, {}, {}, state=StateDir(tmp_path))
    version = manager.version
    loader.start()
    assert STARTED.wait(5)
    outputs = handlers.respond("Hi", [], "", 0.7, 0.9, 40, 0, 2, 1.0, False, -1, "", True, empty_book())
    status = ""
    for out in outputs:
        status = out[2] if isinstance(out[2], str) else status
        if "switching" in status:
            break
    assert status.startswith("The operator is switching the model to Slow Model 7B; your message will be "
                             "answered when it is loaded (") and status.endswith(" s so far)…")
    seen, line, _ = handlers.watch(version, None)  # another page's status line, at the next tick
    assert line.startswith("The operator is switching the model to Slow Model 7B; replies wait")
    assert handlers.watch(seen, None) == (gr.skip(),) * 3 or "s so far" in handlers.watch(seen, None)[1]
    GATE.set()
    *_, last = outputs
    assert last[1][-1]["content"].startswith("one two")
    after, line, _ = handlers.watch(seen, None)
    assert after == manager.version and line.startswith("**Slow Model 7B**")


def test_an_address_is_never_shown_as_the_model_being_loaded():
    from backends.manager import public_name

    assert public_name(custom_spec("http://10.0.0.5:8000/v1?key=secret", None)) == "a remote model"
    assert public_name(SLOW) == "Slow Model 7B"


# ---- 3. a typed .gguf goes to llama.cpp -------------------------------------------------------
@pytest.mark.parametrize("text, radio, backend", [
    ("~/models/x.Q4_K_M.gguf", "transformers", "llamacpp"),
    ("/models/X.GGUF", "lmdeploy", "llamacpp"),
    ("org/x-GGUF/x.Q4_K_M.gguf", "transformers", "llamacpp"),
    ("org/x-GGUF@main/sub/x.gguf", "openai", "llamacpp"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "transformers", "transformers"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "lmdeploy", "lmdeploy"),  # the backend choice still counts otherwise
    ("embedded", "openai", "llamacpp"),
])
def test_a_gguf_loads_with_llamacpp_whatever_the_backend_choice(text, radio, backend):
    spec = custom_spec(text, radio)
    assert spec.backend == backend and spec.model == text


def test_a_hub_gguf_keeps_its_repo_and_file():
    where = locate(custom_spec("org/x-GGUF/x.Q4_K_M.gguf", "transformers").model)
    assert (where.path, where.gguf_file, where.local) == ("org/x-GGUF", "x.Q4_K_M.gguf", False)


def test_a_typed_gguf_path_really_loads_with_llamacpp(fake):
    from ui.handlers import Handlers

    path = str(embedded_gguf())
    Handlers(fake, {}, {}).load_model("__custom__", path, "transformers", None, progress=lambda *a, **k: None)
    try:
        assert fake.spec.backend == "llamacpp" and fake.describe()["backend"] == "llamacpp"
    finally:
        fake.unload()


def test_picking_a_downloaded_gguf_leaves_the_backend_choice(fake):
    from ui.handlers import Handlers

    box, backend = Handlers(fake, {}, {}).pick_cached("org/x-GGUF/x.gguf", "transformers", None)
    assert box == "org/x-GGUF/x.gguf" and backend == gr.skip()


# ---- 4. engines that cannot run here ------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    """A machine where nothing says CUDA is there (as on this one): no NVIDIA driver, torch unasked."""
    lmdeploy_backend.unavailable.cache_clear()
    monkeypatch.setattr(lmdeploy_backend, "NVIDIA_SIGNS", (str(tmp_path / "no-driver"),))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    yield
    lmdeploy_backend.unavailable.cache_clear()


def test_the_backend_list_marks_engines_that_need_cuda(no_cuda, fake):
    from ui.handlers import Handlers

    choices = dict((value, label) for label, value in Handlers(fake, {}, {}).backend_choices())
    assert choices["lmdeploy"] == "lmdeploy (needs an NVIDIA GPU with CUDA)"
    assert choices["lmdeploy-server"] == "lmdeploy-server (needs an NVIDIA GPU with CUDA)"
    for name in ("transformers", "llamacpp", "openai"):
        assert choices[name] == name


def test_the_preset_list_marks_presets_whose_engine_cannot_run_here(no_cuda, fake):
    from presets import load_model_presets
    from ui.handlers import Handlers

    presets = load_model_presets()
    labels = dict((value, label) for label, value in Handlers(fake, presets, {}).model_choices())
    assert labels["internlm2_5-7b-chat-lmdeploy"] == \
        f"{presets['internlm2_5-7b-chat-lmdeploy'].name} — needs an NVIDIA GPU with CUDA"
    assert labels["smollm2-llamacpp"] == presets["smollm2-llamacpp"].name
    assert labels["remote-openai"] == presets["remote-openai"].name


def test_the_check_imports_no_engine_and_asks_torch_when_it_is_there(no_cuda, monkeypatch):
    assert backends.unavailable("lmdeploy") == "needs an NVIDIA GPU with CUDA"
    assert "torch" not in sys.modules
    lmdeploy_backend.unavailable.cache_clear()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True)))
    monkeypatch.setattr(lmdeploy_backend.importlib.util, "find_spec", lambda name: None)
    assert backends.unavailable("lmdeploy") == "not installed: pip install -r requirements-lmdeploy.txt"


def test_loading_lmdeploy_here_anyway_is_one_line_and_keeps_the_model():
    from presets import load_model_presets

    spec = load_model_presets()["internlm2_5-7b-chat-lmdeploy"]
    with loaded(FAKE) as manager:
        version = manager.version
        with pytest.raises(BackendError) as err:
            manager.load(spec)
        assert manager.spec == FAKE and manager.version == version  # refused before anything was unloaded
    message = str(err.value)
    assert "\n" not in message and ("GPU" in message or "not installed" in message)
