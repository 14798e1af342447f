"""Fair under load, in the llama.cpp batching engine on the embedded model: a short question is
read before long prompts that arrived first, and a long prompt still makes progress while short
ones keep coming (no starvation). Orders of events, not timings: the machine may be busy."""

import threading
import time

from backends.base import GenerationParams

GREEDY = GenerationParams(do_sample=False, max_new_tokens=4)


def first_text(request, deadline_s=120.0) -> float:
    """When the request's first token came (monotonic), reading its events to the end."""
    first = None
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        kind, *rest = request.out.get(timeout=deadline_s)
        if kind == "text" and first is None:
            first = time.monotonic()
        if kind in ("done", "error"):
            assert kind == "done", rest
            return first
    raise AssertionError("no end")


def prompt(seed: int, n: int) -> list[int]:
    # Token ids of plain words (the embedded vocabulary's 300-2000 range), different per seed so
    # no two prompts share a prefix.
    return [300 + (seed * 7919 + i * 104729) % 1700 for i in range(n)]


def test_a_short_question_is_read_before_long_prompts_that_came_first(llama_backend):
    engine = llama_backend.engine
    engine.forget_all()
    longs = [engine.submit(prompt(i, 3000), GREEDY, owner=f"heavy{i}") for i in range(3)]
    time.sleep(0.05)  # they are in the engine first
    short = engine.submit(prompt(99, 20), GREEDY, owner="light")
    times = {}
    threads = [threading.Thread(target=lambda k=k, r=r: times.__setitem__(k, first_text(r)))
               for k, r in [*((f"long{i}", r) for i, r in enumerate(longs)), ("short", short)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert times["short"] < min(times[f"long{i}"] for i in range(3)), times


def test_a_long_prompt_keeps_moving_while_short_ones_keep_coming(llama_backend):
    engine = llama_backend.engine
    engine.forget_all()
    long = engine.submit(prompt(7, 2500), GREEDY, owner="long")
    got = {}
    reader = threading.Thread(target=lambda: got.__setitem__("long", first_text(long)))
    reader.start()
    finished, seed = [], 100

    def keep_asking(lane: int) -> None:
        nonlocal seed
        while reader.is_alive() and len(finished) < 200:
            seed += 1
            r = engine.submit(prompt(seed, 300), GREEDY, owner=f"short{lane}")
            first_text(r)
            finished.append(time.monotonic())

    lanes = [threading.Thread(target=keep_asking, args=(lane,)) for lane in range(6)]
    for t in lanes:
        t.start()
    reader.join(240)
    for t in lanes:
        t.join(240)
    # Six lanes of 300-token prompts fill every step's budget: read shortest-first alone, the long
    # prompt would wait for all 200. It is answered while they still come.
    assert "long" in got and len(finished) < 200, len(finished)
    assert sum(1 for t in finished if t > got["long"]) > 0


def test_replies_wait_for_kv_room_instead_of_failing_and_a_small_one_passes_them(llama_backend):
    """A cache that holds two of four long replies at once: all four are answered (two wait for
    room, none fails a batch), a small question that fits starts before the waiting ones, and a
    reply that could never fit is refused at once with the numbers."""
    from backends.llamacpp_engine import BatchEngine
    from backends.llamacpp_lib import Lib

    engine = BatchEngine(Lib(), llama_backend.model, n_ctx=1024, kv_cells=2048, slots=6, n_threads=2, n_batch=128)
    try:
        params = GenerationParams(do_sample=False, max_new_tokens=100)
        big = [engine.submit(prompt(i, 700), params, owner=f"big{i}") for i in range(4)]
        time.sleep(0.05)
        small = engine.submit(prompt(50, 20), GREEDY, owner="small")
        times = {}
        threads = [threading.Thread(target=lambda k=k, r=r: times.__setitem__(k, first_text(r)))
                   for k, r in [*((i, r) for i, r in enumerate(big)), ("small", small)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert len(times) == 5 and all(times.values()), times  # every one answered: none failed
        waited = sorted(times[i] for i in range(4))[2:]  # the two that had to wait for room
        assert times["small"] < min(waited), times
        never = engine.submit(prompt(60, 2000), GenerationParams(max_new_tokens=100), owner="huge")
        kind, message = never.out.get(timeout=30)
        assert kind == "refused" and "more than the engine's 2,048" in message
    finally:
        engine.close()


def test_a_reply_in_the_engines_line_is_told_its_place_and_a_small_one_passes(llama_backend):
    """Through the manager, with the embedded model's template and tokenizer over an engine whose
    cache holds one long reply (a named fake of llama.cpp under the real scheduler): the second
    long one is told "1 ahead" (not held in the manager's line as if the engine were full), and a
    short question asked after it is answered first."""
    from backends.base import Message, Waiting
    from backends.llamacpp_engine import BatchEngine
    from backends.manager import ModelManager
    from fakes import FakeLlama

    fake = FakeLlama(cells=2048, row_s=0.002)
    real, llama_backend.engine = llama_backend.engine, BatchEngine(fake, fake, n_ctx=2048, kv_cells=2048, slots=8,
                                                                   n_threads=1, n_batch=128)
    manager = ModelManager()
    manager._backend = llama_backend
    try:
        long_text = "Words of a long document. " * 200  # ~1,200 tokens with the reply: one at a time
        params = GenerationParams(do_sample=False, max_new_tokens=20)
        first = manager.stream([Message("user", "A " + long_text)], params, session_id="a")
        assert next(first).text is not None  # reading
        second = manager.stream([Message("user", "B " + long_text)], params, session_id="b")
        told = next(second)
        short = manager.stream([Message("user", "Hi?")], GenerationParams(do_sample=False, max_new_tokens=2),
                               session_id="c")
        assert isinstance(next(short), Waiting) is False  # straight in, beside the long one
        assert isinstance(told, Waiting) and told.ahead == 1 and told.loading is None
        for stream in (short, first, second):
            *_, last = stream
            assert last.finish_reason == "length"
    finally:
        llama_backend.engine.close()
        llama_backend.engine = real
