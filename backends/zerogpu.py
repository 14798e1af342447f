"""Hugging Face ZeroGPU: a Space that lends a GPU to each call of a function marked `@spaces.GPU`.

On ZeroGPU (`SPACES_ZERO_GPU` set by the Space), the `spaces` package must be imported before
torch (app.py calls `setup()` first), and GPU work runs in a worker process the platform forks
and schedules per call, for a duration the call asks for. So the transformers backend hands each
reply to `generate` below: a generator, marked once at import (the platform checks at start-up
that a marked function exists), that streams token ids back from the worker. Everything it needs
is in that process already (forked with the loaded model); only ids and settings cross over.

Without `SPACES_ZERO_GPU`, or without the `spaces` package, nothing changes: `generate` is not
used, and `spaces` is not even imported (off a Space its `@spaces.GPU` returns the function as it is).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)

# What ZeroGPU cannot run, in one line each (the loads say so instead of failing on a missing GPU).
CANNOT = {
    "llamacpp": ("llama.cpp on a GPU needs CUDA in the server process, which ZeroGPU lends only to "
                 "@spaces.GPU calls: set n_gpu_layers to 0 (llama.cpp on the CPU) or use a transformers preset."),
    "lmdeploy": ("LMDeploy (TurboMind and its PyTorch engine) keeps the GPU for its own scheduler, which ZeroGPU "
                 "does not lend: use a transformers preset on a ZeroGPU Space."),
}
MIN_S, MAX_S = 15, 120  # the GPU time a reply may ask for (ZeroGPU's default is 60 s)
PROMPT_TOKENS_PER_S = 4000  # conservative for a small model on ZeroGPU's H200 slice
TOKENS_PER_S = 20


def active() -> bool:
    """Whether this runs on a ZeroGPU Space (the Space sets SPACES_ZERO_GPU)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def setup() -> None:
    """Called first thing by app.py: importing this module imported `spaces` (on ZeroGPU it must
    patch torch before anything imports torch); say so if it could not."""
    if active() and _problem:
        log.warning("This is a ZeroGPU Space but %s; replies run without the GPU.", _problem)


def duration_s(_key: str, ids: list[int], params: Any) -> int:
    """GPU seconds to ask for a reply: reading its prompt and writing max_new_tokens, with room."""
    need = 5 + len(ids) / PROMPT_TOKENS_PER_S + params.max_new_tokens / TOKENS_PER_S
    return int(min(MAX_S, max(MIN_S, need)))


# The models `generate` may run, by key (set by the backend that loaded them, in this process and
# so in every worker forked from it).
MODELS: dict[str, Any] = {}


def _generate(key: str, ids: list[int], params: Any) -> Iterator[list[int]]:
    """In the GPU worker: generate a reply to `ids` and yield its new token ids as they come.
    Closed early (the reply was stopped), generation stops within a token, so the GPU is not
    used after the call gives it back."""
    backend = MODELS[key]
    streamer, stop = _Ids(), threading.Event()

    def work() -> None:
        try:
            backend.generate_plain(ids, params, streamer, stop)
        except BaseException as e:  # noqa: BLE001 - raised to the caller below (ZeroGPU sends it back)
            streamer.error = e
        finally:
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if streamer.error is not None:
        raise streamer.error


def _mark() -> tuple[Any, str]:
    """`_generate` marked with `@spaces.GPU`, once, at import (ZeroGPU looks for marked functions
    when the Space starts); unmarked, and why, where `spaces` is missing or failed."""
    try:
        import spaces
    except ImportError:
        return _generate, "the `spaces` package is missing (add `spaces` to requirements.txt)"
    except Exception as e:  # noqa: BLE001 - e.g. its torch patching, where torch has no CUDA
        return _generate, f"the `spaces` package failed to start ({type(e).__name__}: {e})"
    return spaces.GPU(duration=duration_s)(_generate), ""


# Only on ZeroGPU: off it the decorator changes nothing, and importing `spaces` costs ~200 ms a start.
generate, _problem = _mark() if active() else (_generate, "")


class _Ids:
    """A streamer for `generate` that hands on token ids (not text: the worker's output crosses a
    process boundary, and the consumer's own streamer decodes them)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False
        self.error: BaseException | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        self.queue.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get()) is not None:
            yield ids
