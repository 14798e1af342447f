"""Fair under load on the transformers engine, which runs one reply at a time on one thread:
replies share that thread a slice at a time (a chunk of a prompt, a stretch of tokens), so a
short question is answered while a long prompt is read, a long reply keeps moving while short
ones keep coming, and a reply written in slices is the same as one written alone. Orders of
events, not timings: the machine may be busy."""

import itertools
import json
import threading
import time

import pytest

from conftest import hf_spec, loaded_backend

from backends import create, hf_engine
from backends.base import BackendError, Cancel, GenerationParams, Message
from backends.manager import ModelManager

GREEDY = GenerationParams(do_sample=False, max_new_tokens=6)
TICKS = itertools.count()  # one clock for every reader: which event came first


class Reader(threading.Thread):
    """Reads a reply on its own thread (as a Gradio worker would), noting the tick of its first
    text and of its end."""

    def __init__(self, backend, messages, params=GREEDY, session=None, cancel=None):
        super().__init__(daemon=True)
        self.stream = backend.run(backend.prepare(messages, params), session or f"s{id(self)}", cancel or Cancel())
        self.text, self.last, self.error, self.first, self.ended = "", None, None, None, None
        self.start()

    def run(self):
        try:
            for chunk in self.stream:
                if chunk.text and self.first is None:
                    self.first = next(TICKS)
                self.text += chunk.text
                self.last = chunk
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error = e
        self.ended = next(TICKS)

    def result(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive(), "the reply never ended"
        if self.error is not None:
            raise self.error
        return self


def long_question(words: int) -> list[Message]:
    return [Message("user", " ".join(f"word{i % 97}" for i in range(words)) + " What is this?")]


SHORT = [Message("user", "Hi!")]


@pytest.fixture
def sliced(monkeypatch, tiny_model_dir):
    """The tiny Llama with every forward pass 20 ms slower (so a long prompt takes many slices
    whatever the machine), prompts read in chunks of 64 tokens (128 alone) and slices of one token."""
    monkeypatch.setattr(hf_engine, "SLICE_S", 0.0)
    monkeypatch.setattr("backends.hf.chunk_size", lambda tokens, seconds: 64)
    # rotary positions: the tiny Llama reads past its 512
    with loaded_backend(hf_spec(tiny_model_dir, n_ctx=8192)) as backend:
        backend._chunk = 64
        original, backend.forwards = backend.model.forward, []

        def slow_forward(*args, **kwargs):
            backend.forwards.append(kwargs["input_ids"].shape[-1])
            time.sleep(0.02)
            return original(*args, **kwargs)

        monkeypatch.setattr(backend.model, "forward", slow_forward)
        yield backend


def started_reading(backend, chunks=2):
    deadline = time.monotonic() + 30
    while sum(1 for n in backend.forwards if n >= 64) < chunks:  # chunks, not tokens
        assert time.monotonic() < deadline, "the long prompt was never read in chunks"
        time.sleep(0.01)


def test_a_short_question_is_answered_while_a_long_prompt_is_read(sliced):
    long = Reader(sliced, long_question(450))  # ~3,100 tokens: ~48 chunks
    started_reading(sliced)
    short = Reader(sliced, SHORT)
    short.result()
    long.result()
    assert short.ended < long.first, "the short question waited for the long prompt"
    assert long.last.finish_reason == "length" and long.last.usage.completion_tokens == GREEDY.max_new_tokens


def test_a_long_reply_keeps_moving_while_short_questions_keep_coming(sliced):
    long = Reader(sliced, long_question(300), GenerationParams(do_sample=False, max_new_tokens=12))
    started_reading(sliced)
    answered = []

    def keep_asking():
        while long.is_alive() and len(answered) < 300:
            answered.append(Reader(sliced, SHORT, session=f"lane{len(answered)}").result())

    lanes = [threading.Thread(target=keep_asking) for _ in range(3)]  # three readers always waiting
    for lane in lanes:
        lane.start()
    long.result(180)
    for lane in lanes:
        lane.join(60)
    assert long.last.usage.completion_tokens == 12, "the long reply starved"
    assert len(answered) < 300 and len(answered) >= 3, len(answered)  # the lanes were answered meanwhile


def test_a_reply_stopped_between_slices_ends_at_once_and_keeps_what_it_read(sliced):
    cancel = Cancel()
    stopped = Reader(sliced, long_question(450), session="stopped", cancel=cancel)
    started_reading(sliced, chunks=4)
    other = Reader(sliced, SHORT)
    cancel.set()
    stopped.result(5)
    assert stopped.last.finish_reason == "cancelled"
    assert other.result().last.finish_reason == "length"
    kept = sliced.caches.take("stopped")
    assert kept is not None and len(kept[0]) >= 4 * 64  # the chunks it read, for its next turn


def test_unloading_with_replies_between_slices_tells_each_it_was_cut_short(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(hf_engine, "SLICE_S", 0.0)
    backend = create(hf_spec(tiny_model_dir))
    backend.load(hf_spec(tiny_model_dir))
    original = backend.model.forward
    backend.model.forward = lambda *a, **k: (time.sleep(0.02), original(*a, **k))[1]
    long = GenerationParams(do_sample=False, max_new_tokens=400)
    readers = [Reader(backend, SHORT, long) for _ in range(3)]
    deadline = time.monotonic() + 30
    while not all(r.text for r in readers):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    backend.unload()
    for r in readers:
        r.join(5)
        assert isinstance(r.error, BackendError) and "inference thread stopped" in str(r.error)


def test_the_manager_lets_as_many_replies_in_as_the_engine_shares_and_the_rest_wait(tiny_model_dir):
    manager = ModelManager()
    manager.load(hf_spec(tiny_model_dir, engine={"replies": 2}))
    try:
        assert manager.capacity() == 2
        with pytest.raises(BackendError, match=r"\[engine\] replies must be a whole number"):
            manager.load(hf_spec(tiny_model_dir, engine={"replies": 0}))
        assert manager.capacity() == 2  # the model that was loaded is loaded again
    finally:
        manager.unload()


@pytest.fixture(scope="module")
def smol():
    """The embedded SmolLM2 in transformers: a real model, whose text depends on every token read."""
    from presets import load_model_presets

    with loaded_backend(load_model_presets()["smollm2-transformers"]) as backend:
        yield backend


def document(n: int, sentences: int) -> list[Message]:
    return [Message("user", " ".join(f"Ship {n}-{i} left the harbour at dawn with {i} crates of salt." for i in
                                     range(sentences)) + " Which ship carried the most salt?")]


def test_replies_written_in_slices_are_what_they_are_in_one_pass(smol, monkeypatch):
    """In one pass (`generate` alone, as with `replies = 1`), in slices alone (chunks twice as long),
    and three at once in slices of one token and chunks of 64: the same text, greedy or seeded."""
    asks = [(document(1, 30), GenerationParams(do_sample=False, max_new_tokens=24)),
            (document(2, 20), GenerationParams(temperature=0.9, seed=11, max_new_tokens=24)),
            (SHORT, GenerationParams(temperature=0.7, top_k=20, seed=3, max_new_tokens=24, repetition_penalty=1.3))]
    monkeypatch.setattr(smol, "max_concurrent", 1)
    one_pass = [Reader(smol, m, p).result().text for m, p in asks]
    monkeypatch.setattr(smol, "max_concurrent", 4)
    monkeypatch.setattr(hf_engine, "SLICE_S", 0.0)
    monkeypatch.setattr("backends.hf.chunk_size", lambda tokens, seconds: 64)
    monkeypatch.setattr(smol, "_chunk", 64)
    chunks, original = [], smol.model.forward
    monkeypatch.setattr(smol.model, "forward", lambda *a, **k: (chunks.append(k["input_ids"].shape[-1]),
                                                                original(*a, **k))[1])
    assert [Reader(smol, m, p).result().text for m, p in asks] == one_pass
    assert chunks.count(128) >= 4  # alone: chunks of 128
    chunks.clear()
    together = [Reader(smol, m, p) for m, p in asks]
    assert [r.result().text for r in together] == one_pass
    assert chunks.count(64) >= 8  # side by side: chunks of 64


def test_json_replies_written_in_slices_still_follow_their_schema(smol, monkeypatch):
    """A JSON guide's state carries across slices."""
    import jsonschema

    monkeypatch.setattr(hf_engine, "SLICE_S", 0.0)
    schema = {"type": "object", "required": ["city", "country"],
              "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}
    ask = [Message("user", "Name the capital of France as JSON.")]
    params = GenerationParams(temperature=0.8, seed=3, max_new_tokens=60, json_schema=json.dumps(schema))
    alone = Reader(smol, ask, params).result()
    together = [Reader(smol, ask, params), Reader(smol, ask, params.replace(seed=4))]
    texts = [r.result().text for r in together]
    assert texts[0] == alone.text
    for r in together:
        assert r.last.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)


class FakeReply:
    """A fake reply for the inference thread's scheduling alone (no model): a prompt length, a
    stop switch and a streamer whose end is noted."""

    def __init__(self, name, tokens):
        self.name, self.ids, self.ended = name, [0] * tokens, False
        self.counter = self
        self.streamer = self
        self.stopped = threading.Event()

    def should_stop(self):
        return self.stopped.is_set()

    def end(self):
        self.ended = True


def test_a_long_reply_takes_its_turns_while_new_short_ones_keep_coming():
    """The inference thread's order, with fake jobs: a new reply goes first, shortest first, but
    never more than FRESH_RUN in a row while a started one waits, and started ones take turns. As the manager
    would (capacity 4), three short replies are live beside the long one; each is answered in
    its first slice and brings in a new one, so a new one always waits when the long one could run."""
    engine = hf_engine.InferenceThread()
    slices, names = [], itertools.count()
    done = threading.Event()

    def fake(name, tokens, n):
        reply = FakeReply(name, tokens)
        reply.slices = n
        return reply

    def run(reply):  # every slice is noted (the last ends the reply); a short reply brings in the next
        for i in range(reply.slices):
            slices.append(reply.name)
            if i < reply.slices - 1:
                yield
        if reply.name == "long":
            done.set()
        elif len(slices) < 400:
            engine.submit(run, fake(f"short{next(names)}", 20, 1))

    engine.submit(run, fake("long", 3000, 40))
    for _ in range(3):
        engine.submit(run, fake(f"short{next(names)}", 20, 1))
    try:
        assert done.wait(30), f"the long reply starved: {slices[:60]}"
    finally:
        engine.close(5)
    long_at = [i for i, s in enumerate(slices) if s == "long"]
    assert long_at[0] <= hf_engine.PASSES, slices[:10]  # shorter new ones may go first, but only so many
    assert max(b - a for a, b in zip(long_at, long_at[1:])) <= hf_engine.FRESH_RUN + 1, slices[:80]  # then its turns
    assert len(long_at) == 40 and len(slices) > long_at[-1] + 10  # short ones kept coming all the while
