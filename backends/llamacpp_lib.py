"""The one place Confab touches llama-cpp-python below its public `Llama` class.

`Llama` decodes one sequence at a time and keeps only the last prompt's cache, so the batching
engine (llamacpp_engine.py) needs llama.h itself: a context with many sequences, raw batches,
per-sequence cache edits and sampler chains. llama-cpp-python exposes those only as its
private `_internals` wrappers and ctypes bindings, whose shapes change between releases. Every
such use is here, in a few small classes, so a new release is checked in one file and by one
contract test (tests/test_llamacpp_lib.py); requirements.txt pins the version it was tested
with (`TESTED_VERSION`). Pictures go through libmtmd (`llama_cpp.mtmd_cpp`) in `Projector`.
Knows llama.cpp, not prompts, slots or Gradio.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from .base import BackendError, ImageData, ParamError

TESTED_VERSION = "0.3.36"  # requirements.txt pins this; the contract test checks the installed one

# llama_decode's results (llama.h): 0 is success, 1 a warning, the rest failures.
NO_KV_SLOT, ABORTED, INVALID_BATCH = 1, 2, -1
DECODE_RESULTS = {
    NO_KV_SLOT: "no room in the KV cache for this batch",
    ABORTED: "the batch was aborted",
    INVALID_BATCH: "llama.cpp refused the batch as invalid (a bug in Confab's engine)",
}

_init_lock = threading.Lock()
_inited = False


def decode_meaning(code: int) -> str:
    return DECODE_RESULTS.get(code, f"llama.cpp failed with error {code} while decoding")


class Lib:
    """The llama_cpp module and its internals, imported on first use (never at Confab's import)."""

    def __init__(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError as e:
            raise BackendError(
                "The llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python "
                "(it is in requirements.txt)."
            ) from e
        self.c, self.internals = llama_cpp, _internals
        global _inited
        with _init_lock:
            if not _inited:
                llama_cpp.llama_backend_init()
                _inited = True

    @property
    def version(self) -> str:
        return str(getattr(self.c, "__version__", "?"))

    def load_model(self, path: str, n_gpu_layers: int = 0) -> "Model":
        params = self.c.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        return Model(self, self.internals.LlamaModel(path_model=path, params=params, verbose=False))

    def context(self, model: "Model", *, cells: int, n_batch: int, sequences: int, threads: int,
                flash_attention: bool = True) -> "Context":
        params = self.c.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = sequences
        params.kv_unified = True  # one pool of cells: a long conversation may use what idle ones do not
        params.n_threads = params.n_threads_batch = threads
        # Said either way: llama.cpp's default is "auto", which turns it on wherever it runs.
        params.flash_attn_type = (self.c.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention
                                  else self.c.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = self.internals.LlamaContext(model=model.raw, params=params, verbose=False)
        return Context(self, ctx, n_batch, sequences)

    def projector(self, model: "Model", path: str, *, threads: int, gpu: bool) -> "Projector":
        return Projector(self, model, path, threads=threads, gpu=gpu)


class Model:
    """A loaded GGUF: its vocabulary, metadata and tokenizer."""

    def __init__(self, lib: Lib, raw: Any) -> None:
        self.lib, self.raw = lib, raw
        self.n_vocab = raw.n_vocab()
        self._buf = ctypes.create_string_buffer(64)

    def n_ctx_train(self) -> int:
        return int(self.raw.n_ctx_train())

    def metadata(self) -> dict[str, str]:
        return self.raw.metadata()

    def bos(self) -> int:
        return int(self.raw.token_bos())

    def eos(self) -> int:
        return int(self.raw.token_eos())

    def token_text(self, token: int) -> str:
        return self.raw.token_get_text(token) if token >= 0 else ""

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.raw.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`, control tokens written out (for previews and tests)."""
        return self.raw.detokenize(ids, special=True).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.c.llama_vocab_is_eog(self.raw.vocab, token))

    def piece(self, token: int) -> bytes:
        """The token's bytes (a piece of a UTF-8 character, sometimes); control tokens give none."""
        c = self.lib.c
        n = c.llama_token_to_piece(self.raw.vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:  # the buffer was too small: -n is the size needed
            self._buf = ctypes.create_string_buffer(-n)
            n = c.llama_token_to_piece(self.raw.vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n]

    def close(self) -> None:
        self.raw.close()


class Batch:
    """A llama_batch filled row by row: each row is one token of one sequence at one position."""

    def __init__(self, lib: Lib, n_tokens: int, sequences: int) -> None:
        self.raw = lib.internals.LlamaBatch(n_tokens=n_tokens, embd=0, n_seq_max=sequences, verbose=False)
        self.capacity = n_tokens

    def __len__(self) -> int:
        return int(self.raw.batch.n_tokens)

    def reset(self) -> None:
        self.raw.batch.n_tokens = 0

    def add(self, seq: int, tokens: list[int], first_pos: int, logits_last: bool) -> int:
        """Append tokens of one sequence; returns the row of the last one (whose logits count)."""
        b, n = self.raw.batch, self.raw.batch.n_tokens
        if n + len(tokens) > self.capacity:
            raise ValueError(f"batch overflow: {n} + {len(tokens)} > {self.capacity}")
        for i, token in enumerate(tokens):
            b.token[n + i] = token
            b.pos[n + i] = first_pos + i
            b.seq_id[n + i][0] = seq
            b.n_seq_id[n + i] = 1
            b.logits[n + i] = logits_last and i == len(tokens) - 1
        b.n_tokens = n + len(tokens)
        return b.n_tokens - 1

    def rows(self) -> Iterator[tuple[int, int]]:
        """(sequence, token) for each row, in order."""
        b = self.raw.batch
        for i in range(b.n_tokens):
            yield b.seq_id[i][0], b.token[i]

    def close(self) -> None:
        self.raw.close()


class Sampler:
    """A llama.cpp sampler chain for one reply."""

    def __init__(self, lib: Lib) -> None:
        self.lib, self.raw = lib, lib.internals.LlamaSampler()

    def chain(self, *, n_vocab: int, penalty_last_n: int, repetition_penalty: float, greedy: bool,
              top_k: int, top_p: float, min_p: float, temperature: float, seed: int,
              frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seen: Sequence[int] = (),
              grammar: tuple["Model", str] | None = None) -> "Sampler":
        """The sampler chain. `seen`: tokens the penalties count before the reply (the end of the
        prompt); `grammar`: (model, GBNF text) the reply must follow (applied after `seen`, which
        it would refuse, and before any token is picked)."""
        s = self.raw
        s.add_penalties(n_vocab, penalty_last_n, repetition_penalty, frequency_penalty, presence_penalty)
        for token in seen:
            s.accept(token)
        if grammar is not None:
            model, text = grammar
            raw = self.lib.c.llama_sampler_init_grammar(model.raw.vocab, text.encode(), b"root")
            if not raw:  # llama.cpp could not parse it (and logged why)
                raise BackendError("llama.cpp could not read the grammar made from this JSON schema.")
            self.lib.c.llama_sampler_chain_add(s.sampler, raw)
        if greedy:
            s.add_greedy()
        else:
            s.add_top_k(top_k if top_k > 0 else n_vocab)
            s.add_top_p(top_p, 1)
            s.add_min_p(min_p, 1)
            s.add_temp(temperature)
            s.add_dist(seed)
        return self

    def sample(self, ctx: "Context", row: int) -> int:
        return int(self.raw.sample(ctx.raw, row))

    def accept(self, token: int) -> None:
        self.raw.accept(token)

    def close(self) -> None:
        self.raw.close()


def log_probabilities(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under `logits` (a log-softmax), and the `top` likeliest tokens
    with theirs, likeliest first."""
    import numpy as np

    logits = logits.astype(np.float64)
    peak = logits.max()
    logits -= peak + np.log(np.exp(logits - peak).sum())
    best = np.argpartition(-logits, top)[:top] if top else np.array([], dtype=int)
    best = best[np.argsort(-logits[best])]
    return float(logits[token]), [(int(t), float(logits[t])) for t in best]


class Context:
    """A llama.cpp context: one unified KV cache shared by `sequences` sequences."""

    def __init__(self, lib: Lib, raw: Any, n_batch: int, sequences: int) -> None:
        self.lib, self.raw, self.n_batch, self.sequences = lib, raw, n_batch, sequences

    def batch(self) -> Batch:
        return Batch(self.lib, self.n_batch, self.sequences)

    def sampler(self) -> Sampler:
        return Sampler(self.lib)

    def decode(self, batch: Batch) -> int:
        """0 on success, else one of DECODE_RESULTS' codes (see `decode_meaning`)."""
        return int(self.lib.c.llama_decode(self.raw.ctx, batch.raw.batch))

    def logits(self, row: int, n_vocab: int) -> Any:
        """A copy of batch row `row`'s logits (float32, n_vocab of them): the model's own scores,
        before any sampler; read before the next decode overwrites them."""
        import numpy as np

        return np.ctypeslib.as_array(self.lib.c.llama_get_logits_ith(self.raw.ctx, row), shape=(n_vocab,)).copy()

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop a sequence's cached tokens from position `start` on (all of them by default)."""
        self.lib.c.llama_memory_seq_rm(self.raw.memory, seq, start if start > 0 else -1, -1)

    def share(self, src: int, dst: int, n: int) -> None:
        """Let sequence `dst` use `src`'s first `n` cached tokens (the cells are shared, not copied)."""
        self.lib.c.llama_memory_seq_cp(self.raw.memory, src, dst, 0, n)

    def close(self) -> None:
        self.raw.close()


class Projector:
    """A vision projector (an mmproj GGUF) beside its model, through libmtmd.

    A picture becomes a *layout*, the pieces the model reads in order: text token ids (the
    model's own wrapping, such as `<fake_token_around_image><row_1_col_1>`) and image chunks
    (their token counts). On the engine thread, `read` puts one image chunk into one sequence's
    KV cache. Pictures are decoded by backends/images.py, so every format Confab takes works.
    """

    CHUNKS_KEPT = 2  # pictures whose prepared pixels (up to ~50 MB each) are kept between layout and reading
    LAYOUTS_KEPT = 64  # pictures whose layouts (a few ints) are kept: a chat is rendered again each turn

    def __init__(self, lib: Lib, model: Model, path: str, *, threads: int, gpu: bool) -> None:
        try:
            from llama_cpp import mtmd_cpp
            from llama_cpp._logger import llama_log_callback
        except (ImportError, OSError) as e:
            raise BackendError(f"This llama-cpp-python cannot read pictures (no libmtmd: {e}); install "
                               f"llama-cpp-python=={TESTED_VERSION} as requirements.txt does.") from e
        self.lib, self.m = lib, mtmd_cpp
        mtmd_cpp.mtmd_log_set(llama_log_callback, None)  # to llama-cpp-python's logger, like llama.cpp's own
        mtmd_cpp.mtmd_helper_log_set(llama_log_callback, None)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = gpu, threads, False
        params.flash_attn_type = getattr(lib.c, "LLAMA_FLASH_ATTN_TYPE_ENABLED", 1)
        self.raw = mtmd_cpp.mtmd_init_from_file(path.encode(), model.raw.model, params)
        if not self.raw:
            raise BackendError(f"llama.cpp could not load the vision projector {path}. Is it a valid mmproj GGUF, "
                               "made for this model?")
        self._lock = threading.Lock()  # renders (any thread) and the engine thread share the prepared pixels
        self._chunks: OrderedDict[str, Any] = OrderedDict()
        self._layouts: OrderedDict[str, tuple[list[int] | int, ...]] = OrderedDict()
        problem = "it reads no pictures" if not mtmd_cpp.mtmd_support_vision(self.raw) else (
            "it places pictures with M-RoPE (Qwen2-VL and kin), which Confab's llama.cpp engine does not do; "
            "use the transformers backend for it" if mtmd_cpp.mtmd_decode_use_mrope(self.raw) else "")
        if problem:
            self.close()
            raise BackendError(f"The vision projector {path} cannot be used: {problem}.")

    def layout(self, image: ImageData) -> tuple[list[int] | int, ...]:
        """How the model reads `image`: lists of text token ids and image chunks' token counts, in order."""
        m, key = self.m, image.digest
        pieces: list[list[int] | int] = []
        with self._lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
            chunks = self._prepare(image)
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                kind = m.mtmd_input_chunk_get_type(chunk)
                if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    pieces.append([int(tokens[j]) for j in range(n.value)])
                elif kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tokens = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                    if int(m.mtmd_input_chunk_get_n_pos(chunk)) != n_tokens:  # the engine counts one position a token
                        raise BackendError("This vision projector gives a picture's tokens other positions than one "
                                           "each, which Confab's llama.cpp engine does not do.")
                    pieces.append(n_tokens)
                else:
                    raise BackendError("The vision projector made a chunk that is not text or a picture.")
        if any(t < 0 for piece in pieces if isinstance(piece, list) for t in piece):
            raise BackendError("This model's vocabulary lacks the tokens its vision projector puts around a picture; "
                               "is the mmproj made for this model?")
        with self._lock:
            self._layouts[key] = layout = tuple(pieces)
            while len(self._layouts) > self.LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return layout

    def read(self, ctx: Context, seq: int, pos: int, image: ImageData, index: int) -> int:
        """Encode the picture's `index`-th image chunk and decode it into sequence `seq` from position
        `pos`, on the thread that owns `ctx`. 0 on success, else llama.cpp's failure code."""
        m = self.m
        with self._lock:
            chunks = self._prepare(image)
            found = [m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))]
            found = [c for c in found if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            chunk = m.mtmd_input_chunk_copy(found[index])  # ours: the cache may drop the picture meanwhile
        try:
            end = self.lib.c.llama_pos(pos)
            return int(m.mtmd_helper_eval_chunk_single(self.raw, ctx.raw.ctx, chunk, pos, seq, ctx.n_batch, False,
                                                        ctypes.byref(end)))
        finally:
            m.mtmd_input_chunk_free(chunk)

    def _prepare(self, image: ImageData) -> Any:
        """The picture as libmtmd's chunks (its pixels resized, tiled and normalised); the lock is held."""
        key = image.digest
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        if not self.raw:
            raise BackendError("The model was unloaded while this reply was being prepared; load it again.")
        from .images import decode

        m, picture = self.m, decode(image)
        pixels = picture.tobytes()
        bitmap = m.mtmd_bitmap_init(picture.width, picture.height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
        if not bitmap:
            raise ParamError(f"llama.cpp could not take {image.name or 'a picture'} ({picture.width} x {picture.height}).")
        chunks = m.mtmd_input_chunks_init()
        marker = m.mtmd_default_marker()  # the picture alone: its text around it is Confab's to tokenize
        text = m.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        try:
            code = m.mtmd_tokenize(self.raw, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        finally:
            m.mtmd_bitmap_free(bitmap)
        if code != 0:
            m.mtmd_input_chunks_free(chunks)
            raise ParamError(f"llama.cpp's vision projector could not read {image.name or 'a picture'} (error {code}).")
        self._chunks[key] = chunks
        while len(self._chunks) > self.CHUNKS_KEPT:
            m.mtmd_input_chunks_free(self._chunks.popitem(last=False)[1])
        return chunks

    def close(self) -> None:
        with self._lock:
            while self._chunks:
                self.m.mtmd_input_chunks_free(self._chunks.popitem()[1])
            if self.raw:
                self.m.mtmd_free(self.raw)
                self.raw = None
