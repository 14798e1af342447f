"""A batching llama.cpp engine: one thread owns the context and decodes every live reply together.

llama-cpp-python's `Llama` class decodes one sequence at a time and keeps the KV cache of the
last prompt only, so eight users would wait in line and each switch of user would re-read the
whole history. No library offers batching over it, hence this engine, on llama-cpp-python's own
thin wrappers of llama.h (`_internals`): each *slot* is a llama.cpp sequence in one unified KV
cache. A new reply takes the idle slot whose tokens share the longest prefix with its prompt
(the same conversation, usually), drops only what changed, and joins the next batch; every step
decodes one token for each slot that is generating, plus a chunk of any prompt being read.
Idle slots keep their KV cache until it is needed (least recently used first).

Cached tokens never cross from one owner (a conversation, a login, an API key) to another,
except a prompt's public opening (the chat template's own text, before any message content),
in the spirit of vLLM's per-request `cache_salt`: otherwise the time to first token, or the
cached-token count, would tell one user whether another's conversation begins with a guess.

Consumers talk to it through `Request`: text pieces arrive on `request.out`; `cancel()` frees
the slot within one step. This module knows llama.cpp, not prompts, templates or Gradio.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .base import GenerationParams
from .kvcache import common_prefix

log = logging.getLogger(__name__)
PENALTY_LAST_N = 64  # as llama-cpp-python's create_completion
PREFILL_CHUNK = 256  # prompt tokens read per step, so a long prompt does not stall other replies
_backend_ready = threading.Lock()
_backend_inited = False


def init_backend(llama_cpp: Any) -> None:
    global _backend_inited
    with _backend_ready:
        if not _backend_inited:
            llama_cpp.llama_backend_init()
            _backend_inited = True


@dataclass
class Request:
    ids: list[int]
    params: GenerationParams
    owner: str | None = None  # whose conversation: cached tokens are reused only within it
    public: int = 0  # leading ids anyone's cache may lend (the template's opening)
    out: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached: int = 0  # prompt tokens reused from this owner's own cache, set on admission

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Slot:
    seq: int
    ids: list[int] = field(default_factory=list)  # exactly the tokens in this sequence's KV cache
    owner: str | None = None  # the owner of the conversation whose tokens these are
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not read yet
    next_token: int | None = None  # sampled, not yet in the KV cache
    generated: int = 0
    sampler: Any = None
    decoder: Any = None
    last_used: float = 0.0


class BatchEngine:
    def __init__(self, llama_cpp: Any, internals: Any, model: Any, *, n_ctx: int, kv_cells: int,
                 slots: int, n_threads: int, n_batch: int = 512) -> None:
        self.llama_cpp, self.internals, self.model = llama_cpp, internals, model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_cells
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.kv_unified = True  # one pool of cells: a long conversation may use what idle ones do not
        params.n_threads = params.n_threads_batch = n_threads
        # Flash attention keeps long conversations cheap: measured here, reading 200 prompt tokens
        # after 1,800 cached ones costs 1.56x the same read at the start with it, 1.80x without.
        params.flash_attn_type = getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_ENABLED", 1)
        self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self.batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=slots, verbose=False)
        self.n_ctx, self.n_batch, self.n_vocab = n_ctx, n_batch, model.n_vocab()
        self.slots = [Slot(seq=i) for i in range(slots)]
        self.inbox: "queue.Queue[Request | None]" = queue.Queue()
        self.waiting: list[Request] = []
        self._buf = ctypes.create_string_buffer(64)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)
        self.thread.start()

    # ---- the consumer side ---------------------------------------------------------------
    def submit(self, ids: list[int], params: GenerationParams, owner: str | None = None, public: int = 0) -> Request:
        request = Request(list(ids), params, owner, max(0, min(public, len(ids))))
        self.inbox.put(request)
        return request

    def close(self) -> None:
        self._stop = True
        self.inbox.put(None)
        self.thread.join()
        for slot in self.slots:
            if slot.sampler is not None:
                slot.sampler.close()
        self.batch.close()
        self.ctx.close()

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                self._admit(block=not any(s.request for s in self.slots))
                self._drop_cancelled()
                if any(s.request for s in self.slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - fail the replies in flight, keep the engine alive
                log.exception("llama.cpp engine step failed")
                for slot in self.slots:
                    if slot.request:
                        self._finish(slot, "error", f"llama.cpp failed while answering ({e}).")
                    self._forget(slot)

    def _admit(self, block: bool) -> None:
        try:
            while True:
                request = self.inbox.get(timeout=0.5) if block and not self.waiting else self.inbox.get_nowait()
                block = False
                if request is None:
                    return
                self.waiting.append(request)
        except queue.Empty:
            pass
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        while self.waiting:
            slot = self._pick_slot(self.waiting[0])
            if slot is None:
                return
            self._start(slot, self.waiting.pop(0))

    @staticmethod
    def _reusable(slot: Slot, request: Request) -> int:
        """How many of the request's leading tokens this slot's cache may give it."""
        shared = common_prefix(slot.ids, request.ids)
        return shared if slot.owner == request.owner else min(shared, request.public)

    def _pick_slot(self, request: Request) -> Slot | None:
        idle = [s for s in self.slots if s.request is None]
        if not idle:
            return None
        # This owner's slot with the longest shared prefix, else an empty slot, else the least
        # recently used one. Another owner's slot is never taken for the public opening it holds:
        # that is copied from it (see _start), and its conversation stays cached.
        def rank(s: Slot) -> tuple[int, bool, float]:
            own = common_prefix(s.ids, request.ids) if s.owner == request.owner else 0
            return own, not s.ids, -s.last_used

        return max(idle, key=rank)

    def _start(self, slot: Slot, request: Request) -> None:
        limit = len(request.ids) - 1  # at least one prompt token is read, to get fresh logits
        keep = min(self._reusable(slot, request), limit)
        own = keep if slot.owner == request.owner else 0
        self._truncate(slot, keep)
        donor = max(self.slots, key=lambda s: self._reusable(s, request))
        shared = min(self._reusable(donor, request), limit)
        if shared > keep:
            # Another slot holds a longer prefix (this owner's other conversation, or the template's
            # opening): share its cells instead of computing them again. The unified cache lets
            # cells belong to many sequences.
            self.llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq, -1, -1)
            self.llama_cpp.llama_memory_seq_cp(self.ctx.memory, donor.seq, slot.seq, 0, shared)
            slot.ids[:] = request.ids[:shared]
            keep = shared
            own = shared if donor.owner == request.owner else own
        request.cached = own  # what a caller is told counts only its own reuse
        slot.owner = request.owner
        slot.request, slot.pending, slot.generated, slot.next_token = request, request.ids[keep:], 0, None
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = self._sampler(request.params)
        for token in request.ids[-PENALTY_LAST_N:]:
            slot.sampler.accept(token)  # the repetition penalty sees the end of the prompt too
        request.out.put(("start", request.cached))

    def _truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.ids):
            self.llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq, keep, -1)
            del slot.ids[keep:]

    def _forget(self, slot: Slot) -> None:
        self.llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq, -1, -1)
        slot.ids.clear()
        slot.request, slot.pending, slot.next_token = None, [], None

    def _sampler(self, params: GenerationParams) -> Any:
        s = self.internals.LlamaSampler()
        s.add_penalties(self.n_vocab, PENALTY_LAST_N, params.repetition_penalty, 0.0, 0.0)
        if params.greedy:
            s.add_greedy()
        else:
            s.add_top_k(params.top_k if params.top_k > 0 else self.n_vocab)
            s.add_top_p(params.top_p, 1)
            s.add_min_p(params.min_p, 1)
            s.add_temp(params.temperature)
            s.add_dist(params.seed32 if params.seed is not None else random.getrandbits(32))
        return s

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                self._finish(slot, "cancelled")

    def _step(self) -> None:
        """One llama_decode over every live slot: a token each, or a chunk of prompt."""
        self.batch.reset()
        rows: list[tuple[Slot, int]] = []  # (slot, batch index whose logits to sample)
        budget = self.n_batch
        for slot in self.slots:
            if slot.request is None or budget == 0:
                continue
            if slot.pending:
                chunk = slot.pending[: min(PREFILL_CHUNK, budget)]
                last = len(chunk) == len(slot.pending)
                self._add(slot, chunk, logits_last=last)
                if last:
                    rows.append((slot, self.batch.n_tokens() - 1))
            else:
                self._add(slot, [slot.next_token], logits_last=True)
                rows.append((slot, self.batch.n_tokens() - 1))
            budget = self.n_batch - self.batch.n_tokens()
        if not self._decode():
            return
        for slot, index in rows:
            self._sample(slot, index)

    def _add(self, slot: Slot, tokens: list[int], logits_last: bool) -> None:
        b, n = self.batch.batch, self.batch.batch.n_tokens
        for i, token in enumerate(tokens):
            b.token[n + i] = token
            b.pos[n + i] = len(slot.ids) + i
            b.seq_id[n + i][0] = slot.seq
            b.n_seq_id[n + i] = 1
            b.logits[n + i] = logits_last and i == len(tokens) - 1
        b.n_tokens = n + len(tokens)
        slot.ids.extend(tokens)  # in the KV cache once this batch decodes (undone below if it fails)
        if slot.pending:
            del slot.pending[: len(tokens)]
        else:
            slot.next_token = None

    def _decode(self) -> bool:
        code = self.llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if code == 0:
            return True
        # 1: no room in the KV cache. Evict idle conversations, undo this batch, try next step.
        self._undo_batch()
        evicted = [s for s in self.slots if s.request is None and s.ids]
        if code == 1 and evicted:
            for slot in sorted(evicted, key=lambda s: s.last_used)[: max(1, len(evicted) // 2)]:
                self._forget(slot)
            return False
        victim = max((s for s in self.slots if s.request), key=lambda s: len(s.ids))
        self._finish(victim, "error", "The model's KV cache is full: too many long conversations at once. "
                                      "Try again in a moment, or clear this chat.")
        self._forget(victim)
        return False

    def _undo_batch(self) -> None:
        b = self.batch.batch
        for slot in self.slots:
            mine = [i for i in range(b.n_tokens) if b.seq_id[i][0] == slot.seq]
            if not mine:
                continue
            tokens = [b.token[i] for i in mine]
            del slot.ids[-len(tokens):]
            self.llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq, len(slot.ids), -1)
            if slot.request is not None and slot.next_token is None and not slot.pending and slot.generated:
                slot.next_token = tokens[-1]
            else:
                slot.pending[:0] = tokens

    def _sample(self, slot: Slot, index: int) -> None:
        request = slot.request
        token = slot.sampler.sample(self.ctx, index)
        slot.sampler.accept(token)
        slot.generated += 1
        if self.llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(slot, "stop")
            return
        piece = slot.decoder.decode(self._piece(token))
        request.out.put(("text", piece, slot.generated))
        if slot.generated >= request.params.max_new_tokens or len(slot.ids) + 1 >= self.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _piece(self, token: int) -> bytes:
        """The token's bytes (a piece of a UTF-8 character, sometimes); control tokens give none."""
        n = self.llama_cpp.llama_token_to_piece(self.model.vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:  # the buffer was too small: -n is the size needed
            self._buf = ctypes.create_string_buffer(-n)
            n = self.llama_cpp.llama_token_to_piece(self.model.vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n]

    def _finish(self, slot: Slot, reason: str, message: str = "") -> None:
        request, slot.request = slot.request, None
        slot.pending, slot.next_token, slot.last_used = [], None, time.monotonic()
        if request is not None:
            request.out.put(("error", message) if reason == "error" else ("done", reason))
