"""llama.cpp backend through llama-cpp-python: GGUF files on the CPU (or offloaded to a GPU).

The prompt is rendered with the GGUF's own chat template and tokenized here, template text
with control tokens parsed and message content without, then handed as ids to the batching
engine in llamacpp_engine.py, which decodes every live reply together and keeps each
conversation's KV cache for its next turn. llama_cpp is imported in `load`, never at import.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

from . import register
from .base import BackendError, GenerationParams, Message, ModelSpec, ProgressFn, Prompt, Usage
from .hub import download
from .llamacpp_engine import BatchEngine, init_backend
from .locate import Location, locate
from .prompting import Encode, LocalEngine, encode_segments, engine_options
from .templates import ChatTemplate, choose, render_segments

log = logging.getLogger(__name__)


def _import_engine() -> tuple[Any, Any]:
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError as e:
        raise BackendError(
            "The llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python "
            "(it is in requirements.txt)."
        ) from e
    return llama_cpp, _internals


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
        self.model: Any = None
        self.engine: BatchEngine | None = None
        self.spec: ModelSpec | None = None
        self.template: ChatTemplate | None = None
        self.n_ctx = 0
        self.path = ""
        self.max_concurrent = 1
        self._add_bos = False
        self._stops: tuple[str, ...] = ()

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        llama_cpp, internals = _import_engine()
        options = engine_options(spec, self.ENGINE_KEYS)
        where = download(self.check(spec), progress, weights="gguf")
        self.path = os.path.join(where.path, where.gguf_file)
        progress and progress(0.1, f"Loading {os.path.basename(self.path)}")
        init_backend(llama_cpp)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = spec.n_gpu_layers
        try:
            with _QUIET_LOCK:
                self.model = internals.LlamaModel(path_model=self.path, params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"llama.cpp could not load {self.path} ({e}). Is it a valid GGUF file?") from e
        self.n_ctx = spec.n_ctx or self.model.n_ctx_train()
        threads = spec.n_threads or default_threads()
        self.max_concurrent = int(options["parallel"])
        try:
            with _QUIET_LOCK:
                self.engine = BatchEngine(
                    llama_cpp, internals, self.model, n_ctx=self.n_ctx, slots=self.max_concurrent,
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
        bos_id, eos_id = self.model.token_bos(), self.model.token_eos()
        bos = self.model.token_get_text(bos_id) if bos_id >= 0 else ""
        eos = self.model.token_get_text(eos_id) if eos_id >= 0 else ""
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
               encode: Encode | None = None) -> Prompt:
        self._require_loaded()
        segments = render_segments(self.template, messages, **({"tools": tools} if tools else {}))
        ids, public = encode_segments(segments, encode or self._encode)
        bos = self.model.token_bos()
        if self._add_bos and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)
            public += 1
        return Prompt("".join(s.text for s in segments), ids, self._stops, public)

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _loaded(self) -> bool:
        return self.engine is not None

    def _generate(
        self, prompt: Prompt, params: GenerationParams, usage: Usage, session_id: str | None
    ) -> Iterator[tuple[str, int]]:
        # The engine finds a conversation's cache by its token prefix, among the slots of the same
        # owner; other owners' slots lend only the template's opening (prompt.public_tokens).
        request = self.engine.submit(prompt.token_ids, params, owner=session_id, public=prompt.public_tokens)
        try:
            while True:
                kind, *data = request.out.get()
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
