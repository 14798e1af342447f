"""Shared fixtures: a tiny transformers model built in the run, the embedded llama.cpp model,
and a launched Confab app on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARTIFACTS = ROOT / "tests" / "artifacts"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "hello there, how are you today? i am fine, thank you.",
    "large language models predict the next token in a sequence of text.",
] * 20


def build_tiny_model(folder: Path) -> Path:
    """A ~100k-parameter Llama with a trained BPE tokenizer and a ChatML template, saved to folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A zero row gives the end token logit 0 while the others spread around it, so greedy
        # decoding of this random model runs to max_new_tokens instead of stopping by chance.
        model.lm_head.weight[fast.eos_token_id] = 0
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llama_backend():
    from backends import create
    from presets import load_model_presets

    spec = load_model_presets()["smollm2-llamacpp"]
    backend = create(spec)
    backend.load(spec)
    yield backend
    backend.unload()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    def __init__(self, *args: str, timeout: float = 90, env: dict | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"app-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
               "CONFAB_STATE_DIR": tempfile.mkdtemp(prefix="confab-state-"), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/gradio_api/info", timeout=2).status_code in (200, 401, 403):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"app did not start in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv where `pip install -e .` put Confab (as the README says). It
    sees this machine's packages (--system-site-packages; --no-deps: no rebuild of llama-cpp-python;
    pip fetches only setuptools to build with), so what it checks is Confab's own packaging: the `confab` command and
    `import confab` from any directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           "-e", str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=venv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return python


@pytest.fixture(scope="session")
def app():
    """The real app on the embedded model."""
    running = RunningApp("--concurrency", "1")  # one reply at a time: cancel tests prove the engine was freed
    yield running
    running.stop()


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> Path:
    """Lay files out as huggingface_hub's cache does (blobs + snapshot symlinks + refs/main)."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face hub whose local cache lives in tmp_path."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def page(app):
    """A real browser (Debian's chromium through Playwright) on the launched app's page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(app.url, wait_until="domcontentloaded")
        page.wait_for_selector("#chat-input textarea", timeout=60_000)
        yield page
        browser.close()


def hf_spec(folder, **kw):
    from backends.base import ModelSpec

    return ModelSpec(name="tiny", backend="transformers", model=str(folder), device="cpu", **kw)


@contextlib.contextmanager
def loaded_backend(spec):
    """A backend with `spec` loaded, unloaded after."""
    from backends import create

    backend = create(spec)
    backend.load(spec)
    try:
        yield backend
    finally:
        backend.unload()


@contextlib.contextmanager
def loaded(spec):
    """A ModelManager with `spec` loaded, unloaded after."""
    from backends.manager import ModelManager

    manager = ModelManager()
    manager.load(spec)
    try:
        yield manager
    finally:
        manager.unload()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    """The transformers backend on the tiny Llama built in the test run."""
    with loaded_backend(hf_spec(tiny_model_dir)) as backend:
        yield backend


@pytest.fixture
def fake():
    """The manager on a named fake engine that streams a script (tests/fakes.py), for testing the
    layers above the engine."""
    import fakes  # noqa: F401 - registers the fake-script-engine backend
    from backends.base import ModelSpec

    with loaded(ModelSpec(name="fake", backend="fake-script-engine", model="x")) as manager:
        yield manager


def embedded_spec():
    from backends.base import ModelSpec

    return ModelSpec(name="embedded", backend="llamacpp", model="embedded", n_ctx=4096)


def saved_chat(saved: dict) -> tuple[list[dict], str]:
    """The chat on screen and its system prompt, from what the page keeps in the browser."""
    from chat import conversations as cv
    from ui.chat import clean_history

    conv = next(c for c in saved["conversations"] if c["id"] == saved["current"])
    return cv.messages(cv.from_data(conv, clean_history, 10_000)), conv["system"]
