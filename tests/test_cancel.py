"""`Reply.cancel()` in the threading production uses: one thread reads the reply (inside
`next()`), another cancels it. On the embedded model's llama.cpp engine, and on the named fake
engine for the manager's own states (a load under way, the grace before a swap)."""

import threading
import time

import pytest

from backends import create
from backends.base import BackendError, GenerationParams, Message, ModelSpec, Waiting
from backends.manager import ModelManager
from chat.reply import Text
from fakes import FakeEngineBackend  # noqa: F401 - registers the fake engine

pytestmark = pytest.mark.timeout(120)
LONG = GenerationParams(do_sample=False, max_new_tokens=2000, repetition_penalty=1.0)
STORY = [Message("user", "Write a very long story about a dragon.")]
FAKE = ModelSpec(name="fake", backend="fake-engine", model="x")


def read_in_thread(reply):
    """Read `reply` on a thread of its own, as Gradio's worker does; returns (thread, events, ended)."""
    events, ended = [], threading.Event()

    def read():
        for event in reply:
            events.append(event)
        ended.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, events, ended


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def manager(llama_backend):
    m = ModelManager(max_concurrent=1)
    m._backend, m.spec = llama_backend, ModelSpec(name="embedded", backend="llamacpp", model="embedded")
    yield m
    m._backend = None


def test_a_reply_waiting_in_line_leaves_it_and_is_never_prefilled(manager, llama_backend):
    submitted = []
    engine = llama_backend.engine
    real_submit = engine.submit
    engine.submit = lambda ids, *a, **k: (submitted.append(ids), real_submit(ids, *a, **k))[1]
    try:
        first = manager.reply(STORY, LONG, "a")
        _, first_events, _ = read_in_thread(first)
        wait_for(lambda: any(isinstance(e, Text) for e in first_events))
        second = manager.reply([Message("user", "Say hello.")], LONG, "b")
        _, second_events, second_ended = read_in_thread(second)
        wait_for(lambda: second_events)
        assert isinstance(second_events[0], Waiting) and second_events[0].ahead == 1
        start = time.perf_counter()
        second.cancel()
        assert second_ended.wait(1)
        assert time.perf_counter() - start < 0.1  # within 100 ms, from the line
        assert second.finish_reason == "cancelled" and not second.text
        first.cancel()
        wait_for(lambda: first.done)
        assert len(submitted) == 1  # the cancelled reply never reached the engine
        assert not manager._line and not manager._active
    finally:
        engine.submit = real_submit


def test_stop_during_a_long_prefill_frees_the_cpu_within_a_second(manager, llama_backend):
    long_prompt = [Message("user", "Here are my notes. " + "The sea was calm and the sky was grey. " * 200 +
                           "Summarise them.")]
    assert len(llama_backend.render(long_prompt).token_ids) > 2000
    reply = manager.reply(long_prompt, LONG, "prefill")
    _, events, ended = read_in_thread(reply)
    slots = llama_backend.engine.slots
    wait_for(lambda: any(s.request is not None and s.pending for s in slots))  # reading the prompt
    start = time.perf_counter()
    reply.cancel()
    assert ended.wait(1) and time.perf_counter() - start < 0.2  # the reader is told at once
    assert reply.finish_reason == "cancelled" and not [e for e in events if isinstance(e, Text)]
    wait_for(lambda: all(s.request is None for s in slots), timeout=1.0)  # the engine, between chunks
    freed = time.perf_counter() - start
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.1, "the engine kept computing after the cancel"
    assert freed < 1.0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dying_engine_thread_fails_every_reply_within_a_second():
    from presets import load_model_presets

    spec = load_model_presets()["smollm2-llamacpp"]
    backend = create(spec)
    backend.load(spec)
    m = ModelManager(max_concurrent=2)
    m._backend, m.spec = backend, spec
    try:
        replies = [m.reply(STORY, LONG, f"user-{i}") for i in range(2)]
        readers = [read_in_thread(r) for r in replies]
        wait_for(lambda: all(any(isinstance(e, Text) for e in events) for _, events, _ in readers))

        def die():
            raise SystemExit("simulated crash inside llama.cpp's thread")

        backend.engine._step = die
        start = time.perf_counter()
        for (_, _, ended), reply in zip(readers, replies):
            assert ended.wait(1)
            assert reply.finish_reason == "error" and "engine stopped" in str(reply.error)
        assert time.perf_counter() - start < 1
        assert not backend.engine.alive
        late = m.reply(STORY, LONG, "late").wait()  # a reply after the death fails at once too
        assert late.finish_reason == "error" and isinstance(late.error, BackendError)
    finally:
        m._backend = None
        backend.engine.close = lambda: None  # the thread is gone already
        backend.unload()


def test_a_reply_waiting_for_a_load_can_be_cancelled():
    started, release = threading.Event(), threading.Event()

    class SlowLoad(FakeEngineBackend):
        def load(self, spec, progress=None):
            started.set()
            release.wait(10)
            super().load(spec, progress)

    import backends

    if "fake-slow-load" not in backends.names():
        backends.register("fake-slow-load")(SlowLoad)
    m = ModelManager()
    m.load(FAKE)
    loader = threading.Thread(target=m.load, args=(ModelSpec(name="slow", backend="fake-slow-load", model="x"),))
    loader.start()
    assert started.wait(5)
    reply = m.reply([Message("user", "hi")], GenerationParams())
    _, _, ended = read_in_thread(reply)
    time.sleep(0.1)
    start = time.perf_counter()
    reply.cancel()
    assert ended.wait(1) and time.perf_counter() - start < 0.1
    assert reply.finish_reason == "cancelled"
    release.set()
    loader.join(5)


def test_a_load_stops_replies_still_running_after_the_grace_period_and_says_why():
    m = ModelManager(swap_grace_s=0.3)
    m.load(FAKE)
    m._backend.step_delay = 1.0  # ten words: a ten-second reply
    reply = m.reply([Message("user", "hi")], GenerationParams())
    _, _, ended = read_in_thread(reply)
    time.sleep(0.1)
    start = time.perf_counter()
    m.load(FAKE)
    assert time.perf_counter() - start < 1.5  # the grace, then the stop, then the load
    assert ended.wait(1)
    assert reply.finish_reason == "cancelled" and "operator changed the model" in reply.stop_reason


def test_a_reply_closed_by_its_reader_stops_the_engine(manager, llama_backend):
    reply = manager.reply(STORY, LONG, "closer")
    events = iter(reply)
    next(e for e in events if isinstance(e, Text))
    events.close()  # Gradio closing a generator on its own thread; the reply is cancelled with it
    assert reply.finish_reason == "cancelled"
    wait_for(lambda: all(s.request is None for s in llama_backend.engine.slots), timeout=1.0)
