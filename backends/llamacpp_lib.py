"""The one place Confab touches llama-cpp-python below its public `Llama` class.

`Llama` decodes one sequence at a time and keeps only the last prompt's cache, so the batching
engine (llamacpp_engine.py) needs llama.h itself: a context with many sequences, raw batches,
per-sequence cache edits and sampler chains. llama-cpp-python exposes those only as its
private `_internals` wrappers and ctypes bindings, whose shapes change between releases. Every
such use is here, in a few small classes, so a new release is checked in one file and by one
contract test (tests/test_llamacpp_lib.py); requirements.txt pins the version it was tested
with (`TESTED_VERSION`). Knows llama.cpp, not prompts, slots or Gradio.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Iterator

from .base import BackendError

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
        if flash_attention:
            params.flash_attn_type = getattr(self.c, "LLAMA_FLASH_ATTN_TYPE_ENABLED", 1)
        ctx = self.internals.LlamaContext(model=model.raw, params=params, verbose=False)
        return Context(self, ctx, n_batch, sequences)


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
        self.raw = lib.internals.LlamaSampler()

    def chain(self, *, n_vocab: int, penalty_last_n: int, repetition_penalty: float, greedy: bool,
              top_k: int, top_p: float, min_p: float, temperature: float, seed: int) -> "Sampler":
        s = self.raw
        s.add_penalties(n_vocab, penalty_last_n, repetition_penalty, 0.0, 0.0)
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

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop a sequence's cached tokens from position `start` on (all of them by default)."""
        self.lib.c.llama_memory_seq_rm(self.raw.memory, seq, start if start > 0 else -1, -1)

    def share(self, src: int, dst: int, n: int) -> None:
        """Let sequence `dst` use `src`'s first `n` cached tokens (the cells are shared, not copied)."""
        self.lib.c.llama_memory_seq_cp(self.raw.memory, src, dst, 0, n)

    def close(self) -> None:
        self.raw.close()
