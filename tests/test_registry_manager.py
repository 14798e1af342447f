import threading

import pytest

import backends
from backends.base import BackendError, GenerationParams, Message, ModelSpec
from backends.manager import ModelManager
from fakes import FakeEngineBackend

FAKE = ModelSpec(name="fake", backend="fake-engine", model="x")


def test_registry_lists_the_real_backends_and_creates_instances():
    assert {"transformers", "llamacpp"} <= set(backends.names())
    assert type(backends.create(FAKE)) is FakeEngineBackend


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match="Unknown backend 'nope'.*llamacpp"):
        backends.create(ModelSpec(name="x", backend="nope", model="m"))


def test_registering_a_second_class_under_a_taken_name_fails():
    with pytest.raises(ValueError):
        backends.register("fake-engine")(type("Other", (), {}))


def test_backend_modules_do_not_import_engines():
    import subprocess, sys

    code = "import sys, backends; print(any(m in sys.modules for m in ('torch', 'transformers', 'llama_cpp')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_stream_without_a_model_says_to_load_one():
    with pytest.raises(BackendError, match="No model is loaded"):
        list(ModelManager().stream([Message("user", "hi")], GenerationParams()))


def test_stream_needs_a_message_to_answer_or_continue():
    m = ModelManager()
    m.load(FAKE)
    with pytest.raises(BackendError, match="nothing to answer"):
        list(m.stream([Message("user", "a"), Message("system", "b")], GenerationParams()))
    # An assistant message last is continued; the first chunk names the prompt it continues.
    chunks = list(m.stream([Message("user", "a"), Message("assistant", "b")], GenerationParams(max_new_tokens=2)))
    assert chunks[0].prompt.text.endswith("assistant:b\n") and "".join(c.text for c in chunks) == "one two"


def test_stream_yields_deltas_then_a_summary():
    m = ModelManager()
    m.load(FAKE)
    chunks = list(m.stream([Message("user", "hi")], GenerationParams(max_new_tokens=3)))
    assert "".join(c.text for c in chunks) == "one two three"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_word_ends_the_reply_without_showing_it():
    m = ModelManager()
    m.load(FAKE)
    chunks = list(m.stream([Message("user", "hi")], GenerationParams(stop=["four"])))
    assert "".join(c.text for c in chunks) == "one two three "
    assert chunks[-1].finish_reason == "stop"


def test_closing_the_stream_stops_the_engine_and_frees_the_manager():
    m = ModelManager()
    m.load(FAKE)
    stream = m.stream([Message("user", "hi")], GenerationParams())
    next(stream), next(stream)
    stream.close()
    assert m._backend.closed.is_set() and m._backend.steps == 2
    assert not m._active and not m._line


def test_failed_load_puts_the_previous_model_back_and_says_so():
    m = ModelManager()
    m.load(FAKE)
    version = m.version
    with pytest.raises(BackendError, match=f"fake load failure.*{FAKE.name} is still loaded"):
        m.load(ModelSpec(name="bad", backend="fake-engine", model="fail"))
    assert m.loaded and m.spec == FAKE and m.version > version  # pages notice the (re)load
    assert "".join(c.text for c in m.stream([Message("user", "hi")], GenerationParams(max_new_tokens=2))) == "one two"


def test_failed_load_with_nothing_to_go_back_to_leaves_no_model():
    m = ModelManager()
    with pytest.raises(BackendError, match="fake load failure"):
        m.load(ModelSpec(name="bad", backend="fake-engine", model="fail"))
    assert not m.loaded and m.describe() == {"loaded": False}


def test_a_load_that_cannot_start_unloads_nothing(tmp_path):
    """A missing file is found before the working model is unloaded (no reload needed)."""
    m = ModelManager()
    m.load(FAKE)
    version = m.version
    with pytest.raises(BackendError, match="No model file or folder"):
        m.load(ModelSpec(name="x", backend="llamacpp", model=str(tmp_path / "nope.gguf")))
    assert m.spec == FAKE and m.version == version


def test_load_waits_for_the_reply_in_flight():
    m = ModelManager()
    m.load(FAKE)
    stream = m.stream([Message("user", "hi")], GenerationParams())
    next(stream)
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.load(FAKE), done.set()))
    t.start()
    assert not done.wait(0.3)  # blocked behind the reply
    stream.close()
    assert done.wait(5)
    t.join()


def test_replies_beyond_capacity_wait_in_line_and_are_told_their_place():
    m = ModelManager()
    m.load(FAKE)  # the fake engine declares no max_concurrent: one reply at a time
    first = m.stream([Message("user", "a")], GenerationParams())
    assert next(first).text == "one"
    second = m.stream([Message("user", "b")], GenerationParams())
    third = m.stream([Message("user", "c")], GenerationParams())
    assert next(second).ahead == 1
    assert next(third).ahead == 2
    first.close()
    assert next(second).text == "one"  # admitted as soon as the first one ended
    second.close()
    assert next(third).text == "one"
    third.close()
    assert not m._active and not m._line


def test_engines_that_batch_run_replies_side_by_side_up_to_the_limit():
    m = ModelManager(max_concurrent=2)
    m.load(FAKE)
    m._backend.max_concurrent = 8
    streams = [m.stream([Message("user", str(i))], GenerationParams()) for i in range(3)]
    firsts = [next(s) for s in streams]
    assert [f.text for f in firsts[:2]] == ["one", "one"] and firsts[2].ahead == 1
    for s in streams:
        s.close()


def test_a_waiting_reply_that_is_cancelled_leaves_the_line():
    m = ModelManager()
    m.load(FAKE)
    first = m.stream([Message("user", "a")], GenerationParams())
    next(first)
    second = m.stream([Message("user", "b")], GenerationParams())
    assert next(second).ahead == 1
    second.close()
    assert not m._line
    first.close()


def test_a_load_waits_for_a_reply_being_prepared():
    """Fitting a chat tokenizes with the loaded model: a swap must not free it meanwhile."""
    started, release = threading.Event(), threading.Event()

    class Preparing(FakeEngineBackend):
        def prepare(self, messages, params, tools=None):
            started.set()
            release.wait(5)
            return super().prepare(messages, params, tools)

    if "fake-preparing" not in backends.names():
        backends.register("fake-preparing")(Preparing)
    m = ModelManager()
    m.load(ModelSpec(name="p", backend="fake-preparing", model="x"))
    reply = threading.Thread(target=lambda: list(m.stream([Message("user", "hi")], GenerationParams())))
    reply.start()
    assert started.wait(5)
    swapped = threading.Event()
    threading.Thread(target=lambda: (m.load(FAKE), swapped.set())).start()
    assert not swapped.wait(0.3)  # the load waits for the prompt being prepared...
    release.set()
    assert swapped.wait(5)  # ...and goes on once it is done
    reply.join(5)


def test_a_short_prompt_goes_before_a_long_one_that_waits_unless_that_one_waited_too_long(monkeypatch):
    """One reply at a time (transformers on a CPU): a pasted document waiting in line does not make
    a one-line question wait for it too; after LINE_AGE_S it is passed no more."""
    from backends import manager as manager_module

    m = ModelManager()
    m.load(FAKE)
    first = m.stream([Message("user", "a")], GenerationParams())
    next(first)
    long = m.stream([Message("user", "word " * 300)], GenerationParams())
    assert next(long).ahead == 1
    short = m.stream([Message("user", "hi")], GenerationParams())
    assert next(short).ahead == 1  # before the long one
    assert next(long).ahead == 2  # which is told it moved back
    first.close()
    assert next(short).text == "one"
    short.close()
    assert next(long).text == "one"
    long.close()
    monkeypatch.setattr(manager_module, "LINE_AGE_S", 0.0)  # every waiting reply is overdue: first come, first served
    first = m.stream([Message("user", "a")], GenerationParams())
    next(first)
    long = m.stream([Message("user", "word " * 300)], GenerationParams())
    assert next(long).ahead == 1
    short = m.stream([Message("user", "hi")], GenerationParams())
    assert next(short).ahead == 2
    for stream in (first, long, short):
        stream.close()
    assert not m._line
