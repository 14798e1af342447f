"""The one loaded model: loading, switching and unloading under a lock, and streaming replies.

Everything above (UI, API, terminal) calls `ModelManager.stream`; nothing else talks to a
backend. One reply runs at a time on a loaded engine (the CPU engines here are serial);
a load waits for the reply in flight, then swaps the model. Knows nothing of Gradio or HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

from . import create
from .base import BackendError, Backend, Chunk, GenerationParams, Message, ModelSpec, ProgressFn, Prompt

log = logging.getLogger(__name__)


class ModelManager:
    def __init__(self) -> None:
        self._swap = threading.Lock()  # held while loading or unloading
        self._busy = threading.Lock()  # held while a reply streams; a plain Lock, so any thread may release it
        self._backend: Backend | None = None
        self.spec: ModelSpec | None = None
        self.load_seconds: float | None = None

    # ---- model lifecycle -----------------------------------------------------------------
    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> dict[str, Any]:
        backend = create(spec)  # unknown backend names fail here, before anything is unloaded
        with self._swap, self._busy:
            self._unload_locked()
            start = time.perf_counter()
            try:
                backend.load(spec, progress)
            except BackendError:
                raise
            except ImportError as e:
                raise BackendError(f"{spec.backend} needs a package that is not installed: {e}") from e
            except Exception as e:  # noqa: BLE001 - a load failure must not take the server down
                log.exception("loading %s failed", spec.name)
                raise BackendError(f"Could not load {spec.name}: {type(e).__name__}: {e}") from e
            self.load_seconds = time.perf_counter() - start
            self._backend, self.spec = backend, spec
            log.info("loaded %s with %s in %.2f s", spec.name, spec.backend, self.load_seconds)
        return self.describe()

    def unload(self) -> None:
        with self._swap, self._busy:
            self._unload_locked()

    def _unload_locked(self) -> None:
        if self._backend is not None:
            log.info("unloading %s", self.spec.name if self.spec else "?")
            backend, self._backend, self.spec = self._backend, None, None
            backend.unload()

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def describe(self) -> dict[str, Any]:
        backend = self._backend
        if backend is None:
            return {"loaded": False}
        return {"loaded": True, "name": self.spec.name, "load_s": self.load_seconds, **backend.describe()}

    # ---- replies -------------------------------------------------------------------------
    def _require(self) -> Backend:
        if self._backend is None:
            raise BackendError("No model is loaded: choose a model and press Load.")
        return self._backend

    def render(self, messages: list[Message]) -> Prompt:
        return self._require().render(messages)

    def default_params(self) -> GenerationParams:
        return self.spec.default_params if self.spec else GenerationParams()

    def stream(
        self, messages: list[Message], params: GenerationParams, session_id: str | None = None
    ) -> Iterator[Chunk]:
        """Stream a reply. Closing the iterator stops the engine and frees it for the next one."""
        if not messages or messages[-1].role not in ("user", "tool"):
            raise BackendError("There is nothing to answer: the conversation must end with a user message.")
        with self._busy:
            backend = self._require()
            yield from backend.stream(messages, params, session_id)
