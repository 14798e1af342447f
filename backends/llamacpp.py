"""llama.cpp backend through llama-cpp-python: GGUF files on the CPU (or offloaded to a GPU).

The prompt is rendered with the GGUF's own chat template and tokenized here, template text
with control tokens parsed and message content without, then handed to the engine as ids.
llama.cpp decodes in the consumer's thread, one token per `next()`, so closing the stream
stops it at once; its prefix matching reuses the KV cache of the previous reply.
llama_cpp is imported in `load`, never at module import.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

from . import register
from .base import BackendError, GenerationParams, Message, ModelSpec, ProgressFn, Prompt
from .hub import download
from .locate import locate
from .prompting import LocalEngine, encode_segments
from .templates import BUILTIN, ChatTemplate, render_segments, resolve

log = logging.getLogger(__name__)
FALLBACK_TEMPLATE = "chatml"


def _import_engine() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendError(
            "The llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python "
            "(it is in requirements.txt)."
        ) from e
    return llama_cpp


def default_threads() -> int:
    # llama-cpp-python defaults to half the cores; on small machines all of them decode faster.
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@register("llamacpp")
class LlamaCppBackend(LocalEngine):
    def __init__(self) -> None:
        self.llm: Any = None
        self.spec: ModelSpec | None = None
        self.template: ChatTemplate | None = None
        self.n_ctx = 0
        self.path = ""
        self._add_bos = False

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        llama_cpp = _import_engine()
        where = locate(spec.model, spec.gguf_file, spec.revision)
        if not where.gguf_file:
            raise BackendError(
                f"{spec.model} names no .gguf file; the llama.cpp backend needs one: a local path, "
                "or a hub repo and file such as org/name-GGUF/model.Q4_K_M.gguf."
            )
        where = download(where, progress, weights="gguf")
        self.path = os.path.join(where.path, where.gguf_file)
        progress and progress(0.1, f"Loading {os.path.basename(self.path)}")
        try:
            self.llm = llama_cpp.Llama(
                model_path=self.path,
                n_ctx=spec.n_ctx or 0,  # 0: the context length the model was trained with
                n_threads=spec.n_threads or default_threads(),
                n_threads_batch=spec.n_threads or default_threads(),
                n_gpu_layers=spec.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"llama.cpp could not load {self.path} ({e}). Is it a valid GGUF file?") from e
        self.spec = spec
        self.n_ctx = self.llm.n_ctx()
        self._setup_template(spec)
        progress and progress(1.0, f"Loaded {spec.name}")

    def _setup_template(self, spec: ModelSpec) -> None:
        meta = self.llm.metadata
        model = self.llm._model
        bos = model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        if spec.chat_template:
            self.template = resolve(spec.chat_template)
        elif meta.get("tokenizer.chat_template"):
            self.template = ChatTemplate("gguf", meta["tokenizer.chat_template"], bos_token=bos, eos_token=eos)
        else:
            log.warning("%s has no chat template; using the built-in %s", self.path, FALLBACK_TEMPLATE)
            self.template = BUILTIN[FALLBACK_TEMPLATE]
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._stops = tuple(self.template.stop) + tuple(spec.stop)

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None

    def render(self, messages: list[Message]) -> Prompt:
        self._require_loaded()
        segments = render_segments(self.template, messages)
        ids = encode_segments(segments, self._encode)
        bos = self.llm.token_bos()
        if self._add_bos and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)
        return Prompt("".join(s.text for s in segments), ids, self._stops)

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _cached_tokens(self, ids: list[int]) -> int:
        # llama.cpp keeps the KV cache of the last reply and re-uses its longest common prefix.
        return _common_prefix(self.llm._input_ids.tolist(), ids)

    def _generate(self, ids: list[int], params: GenerationParams) -> Iterator[tuple[str, int]]:
        llama_cpp = _import_engine()
        counted = [0]

        def count(_input_ids: Any, _logits: Any) -> bool:
            counted[0] += 1
            return False

        pieces = None
        try:
            pieces = self.llm.create_completion(
                prompt=ids,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if params.greedy else params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                repeat_penalty=params.repetition_penalty,
                seed=params.seed,
                stop=[],  # stop words are matched in prompting.chunks_from_deltas, as for every backend
                stream=True,
                stopping_criteria=llama_cpp.StoppingCriteriaList([count]),
            )
            for piece in pieces:
                yield piece["choices"][0]["text"], min(counted[0], params.max_new_tokens)
        except (RuntimeError, ValueError) as e:
            log.exception("llama.cpp generation failed")
            raise BackendError(f"llama.cpp failed while answering ({e}). Try again or lower max_new_tokens.") from e
        finally:
            if pieces is not None:
                pieces.close()  # stop the engine between tokens when the consumer goes away

    def _loaded(self) -> bool:
        return self.llm is not None

    def describe(self) -> dict[str, Any]:
        gpu = bool(self.spec and self.spec.n_gpu_layers)
        return {
            "backend": self.name,
            "model": self.spec.name if self.spec else None,
            "device": "cuda (offloaded layers)" if gpu else "cpu",
            "n_ctx": self.n_ctx,
            "threads": self.llm.context_params.n_threads if self.llm else None,
            "path": self.path,
        }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
