"""llama.cpp backend through llama-cpp-python: GGUF files on the CPU (or offloaded to a GPU).

The prompt is rendered with the GGUF's own chat template and tokenized here, template text
with control tokens parsed and message content without, then handed as ids to the batching
engine in llamacpp_engine.py, which decodes every live reply together and keeps each
conversation's KV cache for its next turn. llama_cpp is imported in `load`, never at import.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Iterator

from . import register
from .base import BackendError, Cancel, GenerationParams, Message, ModelSpec, ProgressFn, Prompt, Usage
from .hub import download
from .llamacpp_engine import BatchEngine
from .llamacpp_lib import Lib, Model
from .locate import Location, locate
from .prompting import Encode, LocalEngine, encode_segments, engine_options
from .templates import ChatTemplate, choose, render_segments, template_context

log = logging.getLogger(__name__)


# llama-cpp-python's verbose=False silences llama.cpp by pointing the process's stdout and stderr
# at /dev/null and back (os.dup2). Two loads at once (two models loaded from two threads) would
# restore each other's /dev/null and silence the process for good, so they take turns.
_QUIET_LOCK = threading.Lock()


def default_threads() -> int:
    # llama-cpp-python defaults to half the cores; on small machines all of them decode faster.
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@register("llamacpp")
class LlamaCppBackend(LocalEngine):
    ENGINE_KEYS = {"parallel": 8, "kv_cells": None, "n_batch": 512}

    def __init__(self) -> None:
        self.model: Model | None = None
        self.engine: BatchEngine | None = None
        self.spec: ModelSpec | None = None
        self.template: ChatTemplate | None = None
        self.n_ctx = 0
        self.path = ""
        self.max_concurrent = 1
        self._add_bos = False
        self._stops: tuple[str, ...] = ()

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        lib = Lib()
        options = engine_options(spec, self.ENGINE_KEYS)
        where = download(self.check(spec), progress, weights="gguf")
        self.path = os.path.join(where.path, where.gguf_file)
        progress and progress(0.1, f"Loading {os.path.basename(self.path)}")
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        try:
            with _QUIET_LOCK:
                self.model = lib.load_model(self.path, spec.n_gpu_layers)
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"llama.cpp could not load {self.path} ({e}). Is it a valid GGUF file?") from e
        self.n_ctx = spec.n_ctx or self.model.n_ctx_train()
        threads = spec.n_threads or default_threads()
        self.max_concurrent = int(options["parallel"])
        try:
            with _QUIET_LOCK:
                self.engine = BatchEngine(
                    lib, self.model, n_ctx=self.n_ctx, slots=self.max_concurrent,
                    kv_cells=int(options["kv_cells"] or 2 * self.n_ctx), n_threads=threads,
                    n_batch=int(options["n_batch"]),
                )
        except (ValueError, RuntimeError) as e:
            self.unload()
            raise BackendError(f"llama.cpp could not set up a context for {self.path} ({e}); lower n_ctx.") from e
        self.spec = spec
        self._setup_template(spec)
        progress and progress(1.0, f"Loaded {spec.name}")

    def check(self, spec: ModelSpec) -> Location:
        """Where the weights are, checked without loading or downloading anything."""
        where = locate(spec.model, spec.gguf_file, spec.revision)
        if not where.gguf_file:
            raise BackendError(
                f"{spec.model} names no .gguf file; the llama.cpp backend needs one: a local path, "
                "or a hub repo and file such as org/name-GGUF/model.Q4_K_M.gguf."
            )
        return where

    def _setup_template(self, spec: ModelSpec) -> None:
        meta = self.model.metadata()
        bos, eos = self.model.token_text(self.model.bos()), self.model.token_text(self.model.eos())
        self.template = choose(spec.chat_template, meta.get("tokenizer.chat_template"), bos, eos, self.path)
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._stops = tuple(self.template.stop) + tuple(spec.stop)

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.model is not None:
            self.model.close()
        self.engine = self.model = None

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               encode: Encode | None = None, thinking: bool | None = None) -> Prompt:
        self._require_loaded()
        segments = render_segments(self.template, messages, **template_context(tools, thinking))
        ids, public = encode_segments(segments, encode or self._encode)
        bos = self.model.bos()
        if self._add_bos and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)
            public += 1
        return Prompt("".join(s.text for s in segments), ids, self._stops, public)

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.model.tokenize(text, special)

    def _loaded(self) -> bool:
        return self.engine is not None

    def _generate(
        self, prompt: Prompt, params: GenerationParams, usage: Usage, session_id: str | None, cancel: Cancel
    ) -> Iterator[tuple[str, int]]:
        # The engine finds a conversation's cache by its token prefix, among the slots of the same
        # owner; other owners' slots lend only the template's opening (prompt.public_tokens).
        engine = self.engine
        request = engine.submit(prompt.token_ids, params, owner=session_id, public=prompt.public_tokens,
                                cancel=cancel)
        try:
            while True:
                try:
                    kind, *data = request.out.get(timeout=Cancel.POLL_S)
                except queue.Empty:
                    if cancel.is_set():
                        return  # the engine drops the request before its next step
                    if not engine.alive:
                        raise BackendError(engine.failure or "The llama.cpp engine has stopped; load the model "
                                                             "again.") from None
                    continue
                if kind == "start":
                    usage.cached_tokens = data[0]
                elif kind == "text":
                    yield data[0], data[1]
                elif kind == "error":
                    raise BackendError(data[0])
                else:  # done
                    return
        finally:
            request.cancel()  # the engine frees the slot within one step

    def describe(self) -> dict[str, Any]:
        gpu = bool(self.spec and self.spec.n_gpu_layers)
        return {
            "backend": self.name,
            "model": self.spec.name if self.spec else None,
            "device": "cuda (offloaded layers)" if gpu else "cpu",
            "n_ctx": self.n_ctx,
            "parallel": self.max_concurrent,
            "path": self.path,
        }
