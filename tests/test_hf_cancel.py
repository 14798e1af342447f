"""Stopping a transformers reply, in the threading production uses: the consumer iterates on its
own thread (Gradio's worker), a Cancel is set from another, one inference thread generates."""

import threading
import time
from contextlib import contextmanager

import pytest

from conftest import hf_spec

from backends import create, hf_engine
from backends.base import BackendError, Cancel, GenerationParams, Message

QUESTION = [Message("user", "what is the capital of france?")]
LONG = GenerationParams(do_sample=False, max_new_tokens=400)
STEP_S = 0.3  # a slow decode step: longer than any wait the consumer may do after a cancel


spec_for = hf_spec  # the `hf` fixture is in conftest.py


@contextmanager
def slow_steps(backend, slow: threading.Event | None = None):
    """Every forward pass (or, with `slow`, those while it is set) takes STEP_S longer.
    Yields the list of forward start times."""
    calls, original = [], backend.model.forward

    def forward(*args, **kwargs):
        calls.append(time.perf_counter())
        if slow is None or slow.is_set():
            time.sleep(STEP_S)
        return original(*args, **kwargs)

    backend.model.forward = forward
    try:
        yield calls
    finally:
        del backend.model.forward


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Consumer(threading.Thread):
    """Iterates a reply as a Gradio worker would, noting when the iteration ended."""

    def __init__(self, backend, cancel, params=LONG, session="s"):
        super().__init__(daemon=True)
        self.run_gen = backend.run(backend.prepare(QUESTION, params), session, cancel)
        self.chunks, self.error, self.ended = [], None, None
        self.start()

    def run(self):
        try:
            for chunk in self.run_gen:
                self.chunks.append(chunk)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error = e
        self.ended = time.perf_counter()


def test_cancel_from_another_thread_ends_the_reply_at_once(hf):
    cancel = Cancel()
    with slow_steps(hf) as calls:
        consumer = Consumer(hf, cancel)
        wait_for(lambda: len(calls) >= 3)  # decoding; the consumer waits inside next()
        time.sleep(STEP_S / 2)
        set_at = time.perf_counter()
        cancel.set()
        consumer.join(2)
        assert consumer.ended is not None and consumer.error is None
        took = consumer.ended - set_at
        print(f"consumer returned {took * 1000:.0f} ms after cancel.set()")
        assert took < 0.5
        assert consumer.chunks[-1].finish_reason == "cancelled"
        assert hf._inference.idle.wait(STEP_S + 1)  # the step under way, then idle
    chunks = list(hf.run(hf.prepare(QUESTION, GenerationParams(do_sample=False, max_new_tokens=5)), "s"))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5


def test_closing_the_reply_never_waits_for_the_engine(hf):
    slow = threading.Event()
    with slow_steps(hf, slow) as calls:
        stream = hf.run(hf.prepare(QUESTION, LONG), "s", Cancel())
        next(stream)  # the first text arrives at full speed
        slow.set()
        n = len(calls)
        wait_for(lambda: len(calls) > n)  # the engine is inside a slow step now
        started = time.perf_counter()
        stream.close()
        took = time.perf_counter() - started
        print(f"close() took {took * 1000:.2f} ms while a {STEP_S * 1000:.0f} ms step ran")
        assert took < 0.05
        assert hf._inference.idle.wait(STEP_S + 1)
        assert len(calls) <= n + 2  # the step under way, and no other


def test_a_queued_reply_that_is_cancelled_never_runs(hf, monkeypatch):
    monkeypatch.setattr(hf_engine, "SLICE_S", 60.0)  # the running reply keeps the thread: the other waits
    generated, original = [], hf.model.generate

    def counting_generate(**kwargs):
        generated.append(kwargs["input_ids"].shape[-1])
        return original(**kwargs)

    hf.model.generate = counting_generate
    first, second = Cancel(), Cancel()
    try:
        with slow_steps(hf) as calls:
            running = Consumer(hf, first)
            wait_for(lambda: len(calls) >= 2)
            queued = Consumer(hf, second, session="t")  # waits behind the first on the one thread
            time.sleep(0.2)
            set_at = time.perf_counter()
            second.set()
            queued.join(2)
            assert queued.ended - set_at < 0.5 and queued.chunks[-1].finish_reason == "cancelled"
            first.set()
            running.join(2)
            assert running.chunks[-1].finish_reason == "cancelled"
            assert hf._inference.idle.wait(STEP_S + 1)
            time.sleep(0.1)  # the skipped reply passes through the queue
        assert len(generated) == 1
    finally:
        del hf.model.generate


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_inference_thread_is_an_error_not_a_hang(tiny_model_dir):
    class Fatal(BaseException):
        """Escapes the job's `except Exception`, as SystemExit would, and ends the thread."""

    backend = create(spec_for(tiny_model_dir))
    backend.load(spec_for(tiny_model_dir))

    def dying_generate(**kwargs):
        raise Fatal()

    backend.model.generate = dying_generate
    started = time.perf_counter()
    with pytest.raises(BackendError, match="inference thread stopped.*load the model again"):
        list(backend.run(backend.prepare(QUESTION, LONG), "s", Cancel()))
    assert time.perf_counter() - started < 1
    with pytest.raises(BackendError, match="inference thread stopped"):  # at once, from now on
        list(backend.stream(QUESTION, LONG))
    del backend.model.generate
    backend.load(spec_for(tiny_model_dir))  # what the message says to do
    chunks = list(backend.stream(QUESTION, GenerationParams(do_sample=False, max_new_tokens=4)))
    assert chunks[-1].usage.completion_tokens == 4
    backend.unload()
    assert backend._inference is None
