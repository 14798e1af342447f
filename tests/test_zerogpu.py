"""ZeroGPU (backends/zerogpu.py) as far as a CPU machine allows: the real `spaces` package from
PyPI, whose `@spaces.GPU` returns the function as it is off a ZeroGPU Space, and the Space's
environment (SPACES_ZERO_GPU) set by hand. What needs the platform (its scheduler, the forked
GPU worker, the GPU time it grants) is not tested here."""

import os
import subprocess
import sys
import threading

import pytest

from backends import zerogpu
from backends.base import BackendError, Cancel, GenerationParams, Message, ModelSpec
from conftest import ROOT, hf_spec, loaded_backend

spaces = pytest.importorskip("spaces")  # requirements-dev.txt installs it
GREEDY = GenerationParams(do_sample=False, max_new_tokens=24, repetition_penalty=1.0)
QUESTION = [Message("user", "what is the capital of france?")]


def text_of(stream):
    chunks = list(stream)
    return "".join(c.text for c in chunks), chunks[-1]


def test_the_generate_function_is_marked_with_the_real_decorator_which_is_a_no_op_off_spaces():
    assert not spaces.config.Config.zero_gpu  # this machine is no ZeroGPU Space
    assert zerogpu.generate is zerogpu._generate  # off ZeroGPU, `spaces` is not even imported for it
    marked, problem = zerogpu._mark()  # what the app does on ZeroGPU, with the real package
    assert marked is zerogpu._generate and problem == ""  # spaces.GPU(duration=...) off Spaces: as it is
    # The duration it asks for grows with the prompt and the reply, within bounds.
    short = zerogpu.duration_s("k", [1] * 10, GREEDY.replace(max_new_tokens=16))
    long = zerogpu.duration_s("k", [1] * 100_000, GREEDY.replace(max_new_tokens=2048))
    assert zerogpu.MIN_S == short < zerogpu.duration_s("k", [1] * 10, GREEDY.replace(max_new_tokens=1024))
    assert long == zerogpu.MAX_S


def test_on_zerogpu_transformers_replies_come_from_the_gpu_function_and_match(tiny_model_dir, monkeypatch):
    """The same greedy text as the normal path, each reply through zerogpu.generate (the function
    ZeroGPU would run in its GPU worker), no KV cache kept between turns, and a stopped reply
    stops reading at once."""
    with loaded_backend(hf_spec(tiny_model_dir)) as plain:
        expected, _ = text_of(plain.stream(QUESTION, GREEDY, session_id="s"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    calls = []
    real = zerogpu.generate

    def counted(key, ids, params):
        calls.append((key, len(ids), params.max_new_tokens))
        yield from real(key, ids, params)

    monkeypatch.setattr(zerogpu, "generate", counted)
    with loaded_backend(hf_spec(tiny_model_dir)) as backend:
        key = backend._zero_key
        assert zerogpu.MODELS[key] is backend
        got, last = text_of(backend.stream(QUESTION, GREEDY, session_id="s"))
        assert got == expected and last.usage.completion_tokens == 24 and last.finish_reason == "length"
        assert calls == [(key, last.usage.prompt_tokens, 24)]
        assert len(backend.caches) == 0  # the worker's memory is not the server's: nothing cached
        # A reply stopped after its first piece ends as cancelled, without waiting for the rest.
        cancel = Cancel()
        job = backend.prepare(QUESTION, GREEDY.replace(max_new_tokens=400))
        pieces = []
        for chunk in backend.run(job, "s", cancel):
            pieces.append(chunk)
            if chunk.text:
                threading.Timer(0, cancel.set).start()
        assert pieces[-1].finish_reason == "cancelled" and pieces[-1].usage.completion_tokens < 400
    assert key not in zerogpu.MODELS  # unloaded: forgotten


def test_engines_zerogpu_cannot_run_say_so_in_one_line(monkeypatch):
    from backends import create

    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    gpu_gguf = ModelSpec(name="g", backend="llamacpp", model="embedded", n_gpu_layers=99)
    with pytest.raises(BackendError, match="n_gpu_layers to 0"):
        create(gpu_gguf).load(gpu_gguf)
    turbomind = ModelSpec(name="t", backend="lmdeploy", model="org/model")
    with pytest.raises(BackendError, match="transformers preset on a ZeroGPU Space"):
        create(turbomind).load(turbomind)


def test_the_app_imports_spaces_before_torch_on_a_zerogpu_space():
    """With the Space's environment, the app's start asks for the real `spaces` before anything
    imported torch (spaces patches torch). On this machine spaces then fails (its patching needs a
    CUDA build of torch): the app says so in one line and goes on, replies running without a GPU."""
    code = ("import sys\n"
            "seen = []\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'spaces' and not seen:\n"
            "            seen.append('torch' in sys.modules)\n"
            "sys.meta_path.insert(0, Watch())\n"
            "import app\n"
            "try:\n"
            "    app.main(['--list-presets'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('TORCH_BEFORE_SPACES', seen)\n")
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9/"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "TORCH_BEFORE_SPACES [False]" in out.stdout, out.stdout + out.stderr
    assert "smollm2-llamacpp" in out.stdout  # the app went on
    assert "ZeroGPU Space but the `spaces` package failed to start" in out.stderr
