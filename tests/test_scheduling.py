"""The llama.cpp batching engine's scheduling, exactly, on a named fake of llama.cpp (tests/fakes.py
FakeLlama: it keeps cells like a unified KV cache and records every batch). What each step holds,
who is admitted when: the rules of issue 12 (fair under load). test_fairness.py checks the same
rules on the embedded model; bench/fairness.py measures them."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import pytest

from backends import llamacpp_engine
from backends.base import GenerationParams
from backends.llamacpp_engine import STEP_S, TILE, BatchEngine
from fakes import FakeLlama


def params(max_new: int = 4) -> GenerationParams:
    return GenerationParams(do_sample=False, max_new_tokens=max_new)


def ids(seed: int, n: int) -> list[int]:
    return [seed * FakeLlama.TAG + i for i in range(n)]  # no two prompts share a prefix; the fake tags rows by seed


@contextlib.contextmanager
def engine(fake: FakeLlama, *, slots: int = 8, n_batch: int = 512):
    e = BatchEngine(fake, fake, n_ctx=fake.cells, kv_cells=fake.cells, slots=slots, n_threads=1, n_batch=n_batch)
    try:
        yield e
    finally:
        e.close()


def events(request, timeout: float = 60.0) -> list[tuple[float, str]]:
    """(when, kind) of each event, to the end of the reply."""
    seen = []
    while True:
        try:
            kind, *rest = request.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no end after {seen}") from None
        seen.append((time.monotonic(), kind))
        if kind in ("done", "error", "refused"):
            assert kind == "done", rest
            return seen


def in_parallel(requests: dict) -> dict:
    got: dict = {}
    threads = [threading.Thread(target=lambda k=k, r=r: got.__setitem__(k, events(r))) for k, r in requests.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(got) == set(requests), got.keys()
    return got


def wait_for_steps(fake: FakeLlama, n: int) -> int:
    deadline = time.monotonic() + 30
    while len(fake.steps) < n:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return len(fake.steps)


def chunks(fake: FakeLlama, seed: int) -> list[tuple[int, int]]:
    """(step index, tokens) of each step that held more than one prompt token of request `seed`."""
    return [(i, n) for i, step in enumerate(fake.steps) for _, n, tag in step if tag == seed and n > 1]


def steps_of(fake: FakeLlama, seed: int) -> list[int]:
    """The steps that held any row of request `seed` (its prompt or its reply)."""
    return [i for i, step in enumerate(fake.steps) if any(tag == seed for _, _, tag in step)]


def test_a_short_question_is_read_in_the_next_step_alone_while_long_prompts_are_read_in_whole_tiles():
    fake = FakeLlama(cells=65_536, row_s=0.0005)
    with engine(fake) as e:
        longs = {f"long{i}": e.submit(ids(i, 3000), params(), owner=f"heavy{i}") for i in range(3)}
        k = wait_for_steps(fake, 3)  # the long prompts are being read
        short = e.submit(ids(9, 20), params(), owner="light")
        in_parallel({**longs, "short": short})
    (step, n), = chunks(fake, 9)
    # The short prompt is read whole in the step after the step under way when it came, alone.
    assert n == 20 and step <= k + 1, (step, k)
    assert [tag for _, _, tag in fake.steps[step]] == [9]
    for seed in range(3):
        sizes = [n for _, n in chunks(fake, seed)]
        assert sum(sizes) == 3000 and all(n >= TILE for n in sizes), sizes


def test_the_prompt_step_is_as_long_as_the_measured_cost_allows_in_whole_tiles():
    # 1.3 ms a token: STEP_S (0.3 s) holds 230 tokens, so 3 tiles (192) a step after the first.
    fake = FakeLlama(cells=65_536, row_s=0.0013)
    with engine(fake) as e:
        in_parallel({"long": e.submit(ids(1, 3000), params(), owner="a")})
    sizes = [n for _, n in chunks(fake, 1)]
    assert sizes[0] == 4 * TILE  # nothing measured yet
    assert all(n == 3 * TILE for n in sizes[2:-1]), sizes  # the last one takes the rest
    assert int(STEP_S / 0.0013) // TILE == 3
    fast = FakeLlama(cells=65_536, row_s=0.000_01)  # a GPU: the whole batch
    with engine(fast) as e:
        in_parallel({"long": e.submit(ids(1, 3000), params(), owner="a")})
    assert all(n == 512 for _, n in chunks(fast, 1)[1:-1])


def test_a_long_prompt_keeps_moving_while_short_ones_keep_coming():
    fake = FakeLlama(cells=65_536, row_s=0.001)
    with engine(fake) as e:
        long = e.submit(ids(1, 4000), params(2), owner="long")
        done = threading.Event()
        asked = []

        def lane(n: int) -> None:
            seed = 100 + 1000 * n
            while not done.is_set():
                seed += 1
                asked.append(seed)
                events(e.submit(ids(seed, 20), params(2), owner=f"lane{n}"))

        lanes = [threading.Thread(target=lane, args=(n,)) for n in range(7)]
        for t in lanes:
            t.start()
        events(long, timeout=120)
        done.set()
        for t in lanes:
            t.join(60)
    reads = [i for i, n in chunks(fake, 1)]
    assert len(asked) > 50, "the short ones kept coming"
    # Between two reads of the long prompt at most three other steps ran (shorts twice, then writing).
    assert max(b - a for a, b in zip(reads, reads[1:])) <= 4, reads


def test_a_large_reply_leaves_the_reserve_free_so_a_small_one_starts_at_once():
    fake = FakeLlama(cells=4096, row_s=0.0005)  # the reserve is 4096 / 16 = 256 cells
    with engine(fake, n_batch=128) as e:
        first = e.submit(ids(1, 2000), params(100), owner="a")
        time.sleep(0.05)
        second = e.submit(ids(2, 1800), params(100), owner="b")  # 2,100 + 1,900 fit, but not with the reserve
        time.sleep(0.05)
        small = e.submit(ids(3, 30), params(8), owner="c")
        in_parallel({"first": first, "second": second, "small": small})
    assert steps_of(fake, 3)[0] < steps_of(fake, 2)[0]
    assert steps_of(fake, 2)[0] > steps_of(fake, 1)[-1]  # it waited for room, and did not fail


def test_a_request_waiting_for_room_is_passed_only_by_small_ones_once_it_waited(monkeypatch):
    monkeypatch.setattr(llamacpp_engine, "PASS_S", 0.05)
    fake = FakeLlama(cells=4096, row_s=0.0005)
    with engine(fake, n_batch=128) as e:
        first = e.submit(ids(1, 2000), params(100), owner="a")
        time.sleep(0.02)
        head = e.submit(ids(2, 2500), params(100), owner="b")  # waits for the first to end
        time.sleep(0.2)  # it has waited longer than PASS_S
        later = e.submit(ids(3, 1000), params(100), owner="c")  # would fit beside the first
        small = e.submit(ids(4, 30), params(8), owner="d")
        in_parallel({"first": first, "head": head, "later": later, "small": small})
    assert steps_of(fake, 4)[0] < steps_of(fake, 2)[0] <= steps_of(fake, 3)[0]
    assert steps_of(fake, 2)[0] > steps_of(fake, 1)[-1]


@pytest.mark.parametrize("cached, new, reread", [(2000, 20, True), (600, 20, False), (2000, 200, False)])
def test_a_short_turn_after_a_long_cached_conversation_reads_a_whole_tile(cached, new, reread):
    fake = FakeLlama(cells=65_536)
    with engine(fake) as e:
        turn1 = ids(1, cached)
        in_parallel({"1": e.submit(turn1, params(1), owner="a")})
        before = len(fake.steps)
        in_parallel({"2": e.submit(turn1 + ids(2, new), params(1), owner="a")})
    read = sum(n for step in fake.steps[before:] for _, n, _ in step if n > 1)
    # The turn reads its new tokens (and, when they are fewer than a tile after a long
    # conversation, enough cached ones again to make a tile).
    assert read == (TILE if reread else new), (read, fake.steps[before:])


def test_a_reply_waiting_for_room_is_told_its_place_in_the_engines_line():
    fake = FakeLlama(cells=4096, row_s=0.0005)
    with engine(fake, n_batch=128) as e:
        first = e.submit(ids(1, 2000), params(100), owner="a")
        time.sleep(0.02)
        second = e.submit(ids(2, 2500), params(100), owner="b")
        third = e.submit(ids(3, 2500), params(100), owner="c")
        told = {}
        for name, r in (("second", second), ("third", third)):
            kind, ahead = r.out.get(timeout=10)
            told[name] = (kind, ahead)
        in_parallel({"first": first, "second": second, "third": third})
    assert told == {"second": ("waiting", 1), "third": ("waiting", 2)}


def test_the_engine_asks_for_flash_attention():
    """Without it, attention reads every cached cell of the unified cache, so others' idle
    conversations would slow every reply (see BatchEngine.__init__)."""
    fake = FakeLlama(cells=4096)
    BatchEngine(fake, fake, n_ctx=4096, kv_cells=4096, slots=2, n_threads=1).close()
    assert fake.flash_attention is True
