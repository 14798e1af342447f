"""llama.cpp backend through llama-cpp-python: GGUF files on the CPU (or offloaded to a GPU).

The prompt is rendered with the GGUF's own chat template and tokenized here, template text
with control tokens parsed and message content without, then handed as ids to the batching
engine in llamacpp_engine.py, which decodes every live reply together and keeps each
conversation's KV cache for its next turn. llama_cpp is imported in `load`, never at import.

With a vision projector (the preset's `mmproj_file`), a user message's pictures stand in its text
as marks no one can type; each is encoded as its layout from the projector: the model's own
wrapping tokens, and for each image chunk placeholder ids unique to that picture (negative, never
a real token), which the engine reads with the projector. A prompt without pictures is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import queue
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from . import register, zerogpu
from .base import (BackendError, Cancel, GenerationParams, ImageData, Message, ModelSpec, ParamError, ProgressFn, Prompt,
                   TokenLogprob, Usage, Waiting)
from .hub import download
from .llamacpp_engine import BatchEngine, Media
from .llamacpp_lib import Context, Lib, Model, Projector, log_probabilities
from .locate import Location, locate
from .prompting import Encode, LocalEngine, encode_segments, engine_options
from .templates import ChatTemplate, choose, render_segments, render_text, template_context

log = logging.getLogger(__name__)


# llama-cpp-python's verbose=False silences llama.cpp by pointing the process's stdout and stderr
# at /dev/null and back (os.dup2). Two loads at once (two models loaded from two threads) would
# restore each other's /dev/null and silence the process for good, so they take turns.
_QUIET_LOCK = threading.Lock()
QUEUED_PER_SLOT = 4  # replies the manager lets into the engine per slot (the engine's own line holds them)


def default_threads() -> int:
    # llama-cpp-python defaults to half the cores; on small machines all of them decode faster.
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@register("llamacpp")
class LlamaCppBackend(LocalEngine):
    ENGINE_KEYS = {"parallel": 8, "kv_cells": None, "n_batch": 512}
    features = frozenset({"penalties", "json_schema", "raw", "logprobs"})  # GenerationParams.features() it honours

    def prepare(self, messages: list[Message], params: GenerationParams, tools: list[dict[str, Any]] | None = None):
        grammar_of(params.json_schema)  # a schema it cannot follow is refused before the reply waits in line
        return super().prepare(messages, params, tools)

    def __init__(self) -> None:
        self.model: Model | None = None
        self.engine: BatchEngine | None = None
        self.projector: Projector | None = None  # reads pictures, when the preset names an mmproj_file
        self.mmproj_path = ""
        self.spec: ModelSpec | None = None
        self.template: ChatTemplate | None = None
        self.n_ctx = 0
        self.path = ""
        self.max_concurrent = self.slots = 1
        self._add_bos = False
        self._stops: tuple[str, ...] = ()

    @property
    def takes_images(self) -> bool:
        return self.projector is not None

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        if spec.n_gpu_layers and zerogpu.active():
            raise BackendError(zerogpu.CANNOT["llamacpp"])
        lib = Lib()
        options = engine_options(spec, self.ENGINE_KEYS)
        located = self.check(spec)
        where = download(located, progress, weights="gguf")
        self.path = os.path.join(where.path, where.gguf_file)
        self.mmproj_path = self._mmproj(spec, located, progress)
        progress and progress(0.1, f"Loading {os.path.basename(self.path)}")
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        try:
            with _QUIET_LOCK:
                self.model = lib.load_model(self.path, spec.n_gpu_layers)
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"llama.cpp could not load {self.path} ({e}). Is it a valid GGUF file?") from e
        self.n_ctx = spec.n_ctx or self.model.n_ctx_train()
        threads = spec.n_threads or default_threads()
        if self.mmproj_path:
            progress and progress(0.5, f"Loading the vision projector {os.path.basename(self.mmproj_path)}")
            try:
                self.projector = lib.projector(self.model, self.mmproj_path, threads=threads,
                                               gpu=bool(spec.n_gpu_layers))
            except BackendError:
                self.unload()
                raise
        self.slots = int(options["parallel"])
        # The engine keeps its own line, by KV room, where small replies may pass long ones (see
        # BatchEngine._admit_one) and each is told its place; the manager's line holds the rest.
        self.max_concurrent = QUEUED_PER_SLOT * self.slots
        try:
            with _QUIET_LOCK:
                self.engine = BatchEngine(
                    lib, self.model, n_ctx=self.n_ctx, slots=self.slots,
                    kv_cells=int(options["kv_cells"] or 2 * self.n_ctx), n_threads=threads, cpu=not spec.n_gpu_layers,
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

    def _mmproj(self, spec: ModelSpec, where: Location, progress: ProgressFn | None) -> str:
        """The vision projector's local path ("" if none): mmproj_file in the model's hub repo (fetched
        like the model) or folder, or a path of its own."""
        name = spec.mmproj_file
        if not name:
            return ""
        path = Path(name).expanduser()
        if not (path.is_absolute() or name.startswith(".")):
            if where.local:
                path = Path(where.path) / name
            else:
                got = download(Location(where.path, gguf_file=name, revision=where.revision, local=False), progress,
                               weights="gguf")
                path = Path(got.path) / got.gguf_file
        if not path.is_file():
            raise BackendError(f"{spec.name}: there is no vision projector at {path}. mmproj_file names a .gguf file in "
                               "the model's folder or hub repo, or a path of its own.")
        return str(path)

    def _setup_template(self, spec: ModelSpec) -> None:
        meta = self.model.metadata()
        bos, eos = self.model.token_text(self.model.bos()), self.model.token_text(self.model.eos())
        self.template = choose(spec.chat_template, meta.get("tokenizer.chat_template"), bos, eos, self.path)
        if _wants_parts(self.template):  # a vision template: content as a list of parts, as SmolVLM's
            self.template = dataclasses.replace(self.template, parts=True)
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._stops = tuple(self.template.stop) + tuple(spec.stop)

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()  # first: its thread may be reading a picture with the projector
        if self.projector is not None:
            self.projector.close()
        if self.model is not None:
            self.model.close()
        self.engine = self.model = self.projector = None

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               encode: Encode | None = None, thinking: bool | None = None) -> Prompt:
        self._require_loaded()
        encode = encode or self._encode
        images = [i for m in messages for i in m.images] if self.projector is not None else []
        pictures = Pictures(images, self.projector) if images else None
        if pictures:
            messages, encode = pictures.marked(messages), pictures.encoder(encode)
        segments = render_segments(self.template, messages, **template_context(tools, thinking))
        ids, public = encode_segments(segments, encode)
        bos = self.model.bos()
        if self._add_bos and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)
            public += 1
        text = "".join(s.text for s in segments)
        if not pictures:
            return Prompt(text, ids, self._stops, public)
        return Prompt(pictures.shown(text), ids, self._stops, public, images=pictures.placed(ids))

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.model.tokenize(text, special)

    def plain(self, text: str) -> Prompt:
        self._require_loaded()
        ids, bos = self._encode(text, False), self.model.bos()
        if self._add_bos and bos >= 0:
            ids.insert(0, bos)
        return Prompt(text, ids)

    def _loaded(self) -> bool:
        return self.engine is not None

    def _generate(
        self, prompt: Prompt, params: GenerationParams, usage: Usage, session_id: str | None, cancel: Cancel
    ) -> Iterator[tuple[str, int]]:
        # The engine finds a conversation's cache by its token prefix, among the slots of the same
        # owner; other owners' slots lend only the template's opening (prompt.public_tokens).
        engine = self.engine
        media = {p.start: Media(p.end - p.start, functools.partial(_read, self.projector, p.image, p.index))
                 for p in prompt.images}
        request = engine.submit(prompt.token_ids, params, owner=session_id, public=prompt.public_tokens,
                                cancel=cancel, media=media, grammar=grammar_of(params.json_schema))
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
                elif kind == "text":  # (piece, tokens so far, (token, its logits) when logprobs were asked)
                    yield data[0], data[1], self._logprob(data[2], params.logprobs)
                elif kind == "waiting":  # in the engine's line, for KV room
                    yield Waiting(data[0])
                elif kind == "error":
                    raise BackendError(data[0])
                elif kind == "refused":  # it can never fit: the request's fault, not the engine's
                    raise ParamError(data[0])
                else:  # done
                    return
        finally:
            request.cancel()  # the engine frees the slot within one step

    def _logprob(self, scored: tuple[int, Any] | None, top: int | None) -> TokenLogprob | None:
        """On the reply's reader thread (not the engine's): the token's log-probability and its
        top alternatives, from the logits the engine copied."""
        if scored is None or top is None:
            return None
        token, logits = scored
        logprob, best = log_probabilities(logits, token, top)
        return TokenLogprob(self.model.piece(token), logprob, tuple((self.model.piece(t), lp) for t, lp in best))

    def describe(self) -> dict[str, Any]:
        gpu = bool(self.spec and self.spec.n_gpu_layers)
        return {
            "backend": self.name,
            "model": self.spec.name if self.spec else None,
            "device": "cuda (offloaded layers)" if gpu else "cpu",
            "n_ctx": self.n_ctx,
            "parallel": self.slots,
            "path": self.path,
            "mmproj": self.mmproj_path or None,
        }


# A grammar is applied to every token of its reply on the engine thread, so each step of the whole
# batch waits for it. Measured on the embedded model, 2 cores: a 769-character grammar (3 fields,
# one nested, an enum of 3) 53 tok/s against 84 free; an enum of 320 values (7,977 characters)
# 13.6 tok/s; an enum of 2,500 (129k) 2.3 tok/s, which stalled every other reply too.
MAX_GRAMMAR_CHARS = 8192


@functools.lru_cache(maxsize=64)
def grammar_of(schema: str) -> str:
    """The GBNF grammar llama.cpp samples with for a JSON schema ("" for none), made by
    llama-cpp-python's own converter (the one its server uses for response_format)."""
    if not schema:
        return ""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(schema)
    except Exception as e:  # the converter raises what it meets (KeyError, ValueError, ...): the schema's fault
        raise ParamError(f"The JSON schema could not be turned into a grammar: {e!r:.200}. Use standard JSON "
                         "schema keywords (type, properties, required, items, enum, ...).") from e
    if len(grammar) > MAX_GRAMMAR_CHARS:  # its cost is paid on the engine thread, by every reply in the batch
        raise ParamError(f"This JSON schema makes a grammar of {len(grammar):,} characters; this server takes at "
                         f"most {MAX_GRAMMAR_CHARS:,} (long enums cost the most). Shorten the schema.")
    return grammar


def _wants_parts(template: ChatTemplate) -> bool:
    """Whether the template shows a message's content only when it is a list of parts."""
    probe = [Message("user", "\ue002probe\ue003")]
    try:
        if "\ue002probe\ue003" in render_text(template, probe):
            return False
        return "\ue002probe\ue003" in render_text(dataclasses.replace(template, parts=True), probe)
    except BackendError:
        return False


def _read(projector: Projector, image: ImageData, index: int, ctx: Context, seq: int, pos: int) -> int:
    return projector.read(ctx, seq, pos, image, index)


class PictureChunk(NamedTuple):
    """One image chunk of a picture in a prompt: its placeholder ids are token_ids[start:end]."""

    image: ImageData
    index: int  # which of the picture's image chunks (a large picture is read as tiles)
    start: int
    end: int


def placeholder(image: ImageData, index: int) -> int:
    """The id that stands for each token of a picture's image chunk: negative (never a real token)
    and unique to the picture and chunk, so a cached prefix never takes one picture for another."""
    return -1 - int(hashlib.sha256(f"{image.digest}:{index}".encode()).hexdigest()[:15], 16)


class Pictures:
    """The pictures of one render: each stands in its message's text as a mark with a fresh nonce
    (so no typed text can be one), and is encoded as its layout from the projector."""

    SHOWN = "<__media__>"  # a picture in the prompt's text, as llama.cpp writes it

    def __init__(self, images: list[ImageData], projector: Projector) -> None:
        nonce = secrets.token_hex(4)
        self.images, self.projector = images, projector
        self.marks = [f"\ue002{nonce}:{i}\ue003" for i in range(len(images))]
        self.pattern = re.compile(f"\ue002{nonce}:(\\d+)\ue003")
        self.layouts = [projector.layout(i) for i in images]
        self.known = {placeholder(image, k): (image, k, n) for image, layout in zip(images, self.layouts)
                      for k, n in enumerate(p for p in layout if isinstance(p, int))}
        self.encoded = 0

    def marked(self, messages: list[Message]) -> list[Message]:
        """The messages with their pictures as marks before their text (where the engine reads them)."""
        out, i = [], 0
        for m in messages:
            if m.images:
                n = len(m.images)
                m, i = Message(m.role, "".join(self.marks[i:i + n]) + m.content), i + n
            out.append(m)
        return out

    def encoder(self, encode: Encode) -> Encode:
        def encode_with_pictures(text: str, special: bool) -> list[int]:
            ids, pos = [], 0
            for match in self.pattern.finditer(text):
                ids += encode(text[pos:match.start()], special) if match.start() > pos else []
                ids += self._ids(int(match.group(1)))
                pos = match.end()
            if pos < len(text) or pos == 0:
                ids += encode(text[pos:], special)
            return ids

        return encode_with_pictures

    def _ids(self, i: int) -> list[int]:
        image, ids, k = self.images[i], [], 0
        for piece in self.layouts[i]:
            if isinstance(piece, list):
                ids += piece
            else:
                ids += [placeholder(image, k)] * piece
                k += 1
        self.encoded += 1
        return ids

    def placed(self, ids: list[int]) -> tuple[PictureChunk, ...]:
        """Where each image chunk is in the final ids (after BOS)."""
        if self.encoded != len(self.images):
            raise BackendError(f"The chat template placed {self.encoded} picture(s) for the {len(self.images)} in this "
                               "conversation; use the model's own chat template to send pictures.")
        if ids and ids[-1] < 0:
            raise BackendError("The chat template ends the prompt with a picture; the model needs text after it.")
        out, i = [], 0
        while i < len(ids):
            if ids[i] < 0:
                image, k, n = self.known[ids[i]]
                out.append(PictureChunk(image, k, i, i + n))
                i += n
            else:
                i += 1
        return tuple(out)

    def shown(self, text: str) -> str:
        return self.pattern.sub(self.SHOWN, text)
