"""A batching llama.cpp engine: one thread owns the context and decodes every live reply together.

llama-cpp-python's `Llama` class decodes one sequence at a time and keeps the KV cache of the
last prompt only, so eight users would wait in line and each switch of user would re-read the
whole history. No library offers batching over it, hence this engine, on llama.h itself through
the small adapter in llamacpp_lib.py (the only module that touches llama-cpp-python's
internals): each *slot* is a llama.cpp sequence in one unified KV cache. A new reply takes the idle slot whose tokens share the longest prefix with its prompt
(the same conversation, usually), drops only what changed, and joins the next batch. Each step
does one kind of work (see `_step`): new short prompts, a token for every reply being written,
or a chunk of the long prompts, about STEP_S of it, so a question asked while documents are read
waits one short step, not for the documents. A reply starts only when its prompt and whole reply
fit the KV cache (`_admit_one`), with a reserve that only small replies may take.
Idle slots keep their KV cache until it is needed (least recently used first).

Cached tokens never cross from one owner (a conversation, a login, an API key) to another,
except a prompt's public opening (the chat template's own text, before any message content),
in the spirit of vLLM's per-request `cache_salt`: otherwise the time to first token, or the
cached-token count, would tell one user whether another's conversation begins with a guess.

Consumers talk to it through `Request`: text pieces arrive on `request.out` (and, while it waits
for room, ("waiting", place in line) whenever that changes); the request's
`Cancel` is checked before every step (a prompt is read in chunks, so a cancel during a long
prefill takes effect between chunks) and a cancelled request still in line is never started.
If the engine thread dies, every request in it or waiting for it gets an error, and `alive`
says so to consumers that poll.

A prompt may hold pictures (`Request.media`): each image chunk is a run of placeholder ids, unique
to that picture, that the engine reads on its own (`Media.read`, one chunk a step) instead of
batching. A cached prefix is reused up to a whole chunk, never into one, so two pictures are never
mixed up and half a picture is never kept. Prompts without pictures take exactly the path above.
This module knows llama.cpp, not prompts, templates, pictures or Gradio.
"""

from __future__ import annotations

import codecs
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import BackendError, Cancel, GenerationParams
from .kvcache import common_prefix
from .llamacpp_lib import NO_KV_SLOT, Batch, Context, Lib, Model, Sampler, decode_meaning

log = logging.getLogger(__name__)
PENALTY_LAST_N = 64  # as llama-cpp-python's create_completion
# Steps. A step is one llama_decode, and whoever arrives during it waits for it to end, so a step
# that reads a long prompt is kept to about STEP_S (its size follows the measured cost per token).
# Each step does one kind of work: new short prompts (what someone waits on for a first token),
# a token for every reply being written, or a chunk of the long prompts. Measured on 2 CPU cores
# (embedded model, 4 conversations of 3.6k tokens in the cache): a 40-token question alone 318 ms,
# with 3 replies' tokens 504 ms; 3 replies' tokens alone 183 ms; 64 tokens of a long prompt 605 ms,
# with 3 replies' tokens in the same batch 1,226 ms: mixed batches cost more than their parts.
STEP_S = 0.3
# llama.cpp's CPU flash attention reads a batch of 64 tokens or more in tiles; a smaller batch
# takes a per-token path whose cost grows with the context: at a 4k-token context 48 tokens cost
# 2,274 ms and 64 cost 605 ms (measured as above). So a long prompt is read in chunks of at least
# TILE tokens, never leaving a smaller remainder, and a short turn after a long cached conversation
# reads the last TILE tokens again instead of a few tokens alone (REREAD_AFTER: below that cached
# length the two cost the same).
TILE = 64
REREAD_AFTER = 1024
AGING_STEPS = 4  # every this many prompt steps the prompt waiting longest is read first (no prompt starves)
PASS_S = 5.0  # a request that fits the KV cache may start before an earlier one that does not, for so long
RESERVE = 16  # 1/RESERVE of the KV cache is kept for small replies: a long prompt waiting for room
# (and every long one behind it) never makes a one-line question wait for the long ones to end


@dataclass(frozen=True)
class Media:
    """Prompt tokens the engine cannot batch (a picture's image chunk): `read(ctx, seq, pos)` puts
    all `n_tokens` of them into sequence `seq` from `pos`, returning 0, else llama.cpp's failure code."""

    n_tokens: int
    read: Callable[[Context, int, int], int]


@dataclass
class Request:
    ids: list[int]
    params: GenerationParams
    owner: str | None = None  # whose conversation: cached tokens are reused only within it
    public: int = 0  # leading ids anyone's cache may lend (the template's opening)
    media: dict[int, Media] = field(default_factory=dict)  # where each picture chunk starts in `ids`
    out: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: Cancel = field(default_factory=Cancel)  # the reply's own stop switch
    cached: int = 0  # prompt tokens reused from this owner's own cache, set on admission
    abandoned: threading.Event = field(default_factory=threading.Event)  # its consumer went away
    arrived: float = field(default_factory=time.monotonic)
    grammar: str = ""  # GBNF the reply must follow (backends/llamacpp.py makes it from a JSON schema)
    told: int = 0  # the place in the engine's line it was last told (a ("waiting", ahead) event)

    def cancel(self) -> None:
        """The consumer stops reading (its round ended, or it was closed): free the slot."""
        self.abandoned.set()

    @property
    def stopped(self) -> bool:
        return self.abandoned.is_set() or self.cancelled.is_set()


@dataclass
class Slot:
    seq: int
    ids: list[int] = field(default_factory=list)  # exactly the tokens in this sequence's KV cache
    owner: str | None = None  # the owner of the conversation whose tokens these are
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not read yet
    next_token: int | None = None  # sampled, not yet in the KV cache
    generated: int = 0
    sampler: Sampler | None = None
    decoder: Any = None
    last_used: float = 0.0


class BatchEngine:
    def __init__(self, lib: Lib, model: Model, *, n_ctx: int, kv_cells: int, slots: int, n_threads: int,
                 n_batch: int = 512, cpu: bool = True) -> None:
        self.model = model
        # Flash attention on, also on the CPU. There its batches of fewer than 64 tokens take a
        # slow per-token path (see TILE; a token at 3,600 tokens of context 62 ms, 24 without),
        # but without it attention reads every used cell of the unified cache, other
        # conversations' too (masked), so idle conversations slow everyone: with 10,000 cached
        # cells of others, a token of a 300-token chat costs 52 ms without and 23 with it, a
        # 100-token turn 1,585 vs 481 ms (2 cores, llama-cpp-python 0.3.36); the API's long chat
        # went from 423 -> 756 ms (turn 1 -> 10) to 754 -> 1,085 ms without.
        self.ctx: Context = lib.context(model, cells=kv_cells, n_batch=n_batch, sequences=slots, threads=n_threads,
                                        flash_attention=True)
        self.batch: Batch = self.ctx.batch()
        self.n_ctx, self.n_batch, self.n_vocab, self.kv_cells = n_ctx, n_batch, model.n_vocab, kv_cells
        self.slots = [Slot(seq=i) for i in range(slots)]
        self.inbox: "queue.Queue[Request | None]" = queue.Queue()
        self.waiting: list[Request] = []
        self._steps = 0  # prompt steps so far (AGING_STEPS counts them)
        self._last_kind, self._repeats = "", 0  # the kind of work the last steps did, and how many in a row
        self._row_s = 0.0  # seconds a prompt token costs, measured (0: not yet, the first step is 4 tiles)
        self.reserve = kv_cells // RESERVE  # cells only small replies may take (see _admit_one)
        self.cpu = cpu
        self.failure = ""  # why the engine thread stopped, if it died
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)
        self.thread.start()

    # ---- the consumer side ---------------------------------------------------------------
    def submit(self, ids: list[int], params: GenerationParams, owner: str | None = None, public: int = 0,
               cancel: Cancel | None = None, media: dict[int, Media] | None = None, grammar: str = "") -> Request:
        request = Request(list(ids), params, owner, max(0, min(public, len(ids))), media=dict(media or {}),
                          cancelled=cancel or Cancel(), grammar=grammar)
        if not self.alive:
            request.out.put(("error", self.failure or "The llama.cpp engine has stopped; load the model again."))
            return request
        self.inbox.put(request)
        return request

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.failure

    def forget_all(self) -> None:
        """Drop every idle conversation's cache (benchmarks start each run from an empty cache)."""
        self.inbox.put(("forget",))

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
        try:
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
        except BaseException as e:  # noqa: BLE001 - the thread is dying: nobody may wait on it forever
            self.failure = f"The llama.cpp engine stopped ({type(e).__name__}: {e}); load the model again."
            log.exception("llama.cpp engine thread died")
            raise
        finally:
            self._fail_everyone()

    def _fail_everyone(self) -> None:
        """The thread is ending: every request it holds or will never read gets an answer."""
        message = self.failure or "The model was unloaded while this reply waited."
        pending = [s.request for s in self.slots if s.request] + self.waiting
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                pending.append(item)
        for request in pending:
            request.out.put(("error", message))

    def _admit(self, block: bool) -> None:
        try:
            while True:
                request = self.inbox.get(timeout=0.5) if block and not self.waiting else self.inbox.get_nowait()
                block = False
                if request is None:
                    return
                if isinstance(request, tuple):  # ("forget",)
                    for slot in self.slots:
                        if slot.request is None:
                            self._forget(slot)
                    continue
                self.waiting.append(request)
        except queue.Empty:
            pass
        self.waiting = [r for r in self.waiting if not r.stopped]
        while self._admit_one():
            pass
        for ahead, request in enumerate(self.waiting, 1):  # those still waiting are told where they are
            if request.told != ahead:
                request.told = ahead
                request.out.put(("waiting", ahead))

    def _admit_one(self) -> bool:
        """Start the first waiting request whose prompt and whole reply fit the KV cache (idle
        conversations' caches are dropped for it first, least recently used first). A request
        that does not fit yet waits, never failing a batch or a reply in flight; later ones that
        fit may start before it for PASS_S, then only small ones may, within the reserve, so the
        cells it needs come free. A large reply never takes the reserve: small ones always find
        room there (a question is not kept waiting behind long documents)."""
        now = time.monotonic()
        for i, request in enumerate(self.waiting):
            cells = len(request.ids) + request.params.max_new_tokens
            if cells > self.kv_cells:
                self.waiting.pop(i)
                request.out.put(("refused", f"This reply needs {cells:,} cells of the KV cache (its prompt and "
                                            f"max_new_tokens), more than the engine's {self.kv_cells:,}; "
                                            "lower max_new_tokens or shorten the conversation."))
                return True
            overdue = i > 0 and now - self.waiting[0].arrived > PASS_S
            if overdue and cells > self.reserve:
                continue
            slot = self._pick_slot(request)
            if slot is None:
                return False
            if self._make_room(request, slot, within_reserve=overdue):
                self._start(slot, self.waiting.pop(i))
                return True
        return False

    def _make_room(self, request: Request, slot: Slot, within_reserve: bool = False) -> bool:
        """Whether `request` on `slot` fits the cache with every reply in flight at its longest,
        after dropping idle caches as needed. A large request leaves the reserve free; a small one
        passing a request that waits (`within_reserve`) takes only what is left of the reserve."""
        def held(s: Slot) -> int:
            return len(s.ids) + len(s.pending) + max(0, s.request.params.max_new_tokens - s.generated)

        running = [s for s in self.slots if s.request is not None]
        small = [s for s in running if len(s.request.ids) + s.request.params.max_new_tokens <= self.reserve]
        total, held_small = sum(map(held, running)), sum(map(held, small))
        keep = self._reusable(slot, request)
        need = len(request.ids) - keep + request.params.max_new_tokens
        if len(request.ids) + request.params.max_new_tokens > self.reserve:
            room = self.kv_cells - max(self.reserve, held_small)  # what large replies may hold
            if total - held_small + keep + need > room:
                return False
        elif within_reserve and held_small + keep + need > self.reserve:
            return False
        idle = sorted((s for s in self.slots if s.request is None and s.ids and s is not slot),
                      key=lambda s: s.last_used)
        # llama.cpp places a batch in any free cells (find_slot without `cont`): no headroom is needed.
        while total + keep + need + sum(len(s.ids) for s in idle) > self.kv_cells:
            if not idle:
                return False
            self._forget(idle.pop(0))
        return True

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
        if self.cpu and len(request.ids) > REREAD_AFTER and not request.media:
            limit = min(limit, len(request.ids) - TILE)  # a whole tile: see TILE
        keep = self._whole(request, min(self._reusable(slot, request), limit))
        own = keep if slot.owner == request.owner else 0
        self._truncate(slot, keep)
        donor = max(self.slots, key=lambda s: self._reusable(s, request))
        shared = self._whole(request, min(self._reusable(donor, request), limit))
        if shared > keep:
            # Another slot holds a longer prefix (this owner's other conversation, or the template's
            # opening): share its cells instead of computing them again. The unified cache lets
            # cells belong to many sequences.
            self.ctx.forget(slot.seq)
            self.ctx.share(donor.seq, slot.seq, shared)
            slot.ids[:] = request.ids[:shared]
            keep = shared
            own = shared if donor.owner == request.owner else own
        request.cached = own  # what a caller is told counts only its own reuse
        slot.owner = request.owner
        slot.request, slot.pending, slot.generated, slot.next_token = request, request.ids[keep:], 0, None
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if slot.sampler is not None:
            slot.sampler.close()
        # The penalties see the end of the prompt too (a picture's placeholders are no tokens).
        seen = [t for t in request.ids[-PENALTY_LAST_N:] if t >= 0]
        try:
            slot.sampler = self._sampler(request.params, seen, request.grammar)
        except BackendError as e:  # a grammar llama.cpp would not take: this reply fails, the others go on
            slot.sampler = None
            request.out.put(("start", request.cached))
            self._finish(slot, "error", str(e))
            return
        request.out.put(("start", request.cached))

    @staticmethod
    def _whole(request: Request, n: int) -> int:
        """`n` cached tokens, less any part of a picture chunk they end inside (it is read again whole)."""
        for start, media in request.media.items():
            if start < n < start + media.n_tokens:
                return start
        return n

    def _truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.ids):
            self.ctx.forget(slot.seq, keep)
            del slot.ids[keep:]

    def _forget(self, slot: Slot) -> None:
        self.ctx.forget(slot.seq)
        slot.ids.clear()
        slot.request, slot.pending, slot.next_token = None, [], None

    def _sampler(self, params: GenerationParams, seen: list[int], grammar: str = "") -> Sampler:
        return self.ctx.sampler().chain(
            n_vocab=self.n_vocab, penalty_last_n=PENALTY_LAST_N, repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty, seen=seen,
            grammar=(self.model, grammar) if grammar else None,
            greedy=params.greedy, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
            temperature=params.temperature,
            seed=params.seed32 if params.seed is not None else random.getrandbits(32))

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.stopped:
                self._finish(slot, "cancelled")

    def _step(self) -> None:
        """One llama_decode of one kind of work (see STEP_S): new short prompts, read whole, the
        shortest first (a question is answered after one step however long the others' prompts);
        else a token for each reply being written; else chunks of the long prompts, the shortest
        left first and every AGING_STEPS-th time the one that came first (so a long prompt keeps
        moving however many short ones come). The kind done last goes last while another has work
        (short prompts may go twice in a row), so none waits more than three steps."""
        self.batch.reset()
        live = [s for s in self.slots if s.request is not None]
        writing = [s for s in live if not s.pending]
        reading = sorted((s for s in live if s.pending), key=lambda s: len(s.pending))
        budget = self._budget()
        short = [s for s in reading if len(s.pending) <= budget]
        kinds = [k for k, work in (("short", short), ("write", writing), ("read", reading)) if work]
        if len(kinds) > 1 and self._last_kind in kinds and (self._last_kind != "short" or self._repeats >= 2):
            kinds.remove(self._last_kind)
        kind = kinds[0]
        self._repeats = self._repeats + 1 if kind == self._last_kind else 1
        self._last_kind = kind
        rows: list[tuple[Slot, int]] = []  # (slot, batch row whose logits to sample)
        if kind == "write":
            for slot in writing:
                rows.append((slot, self._add(slot, [slot.next_token], logits_last=True)))
        else:
            if kind == "read":
                self._steps += 1
                if len(reading) > 1 and self._steps % AGING_STEPS == 0:
                    oldest = min(reading, key=lambda s: s.request.arrived)
                    reading.remove(oldest)
                    reading.insert(0, oldest)
            self._read(short if kind == "short" else reading, budget, rows)
        if not len(self.batch):
            return
        started = time.perf_counter()
        if not self._decode():
            return
        if kind == "read" and len(self.batch) >= TILE:  # what a prompt token costs now (the cache's fill changes it)
            cost = (time.perf_counter() - started) / len(self.batch)
            self._row_s = cost if not self._row_s else 0.7 * self._row_s + 0.3 * cost
        log.debug("step: %s, %d tokens, %.3f s", kind, len(self.batch), time.perf_counter() - started)
        for slot, row in rows:
            self._sample(slot, row)

    def _budget(self) -> int:
        """Prompt tokens a step reads: about STEP_S of work, in whole tiles, within n_batch."""
        if not self._row_s:
            return min(self.n_batch, 4 * TILE)
        return max(TILE, min(self.n_batch, int(STEP_S / self._row_s) // TILE * TILE))

    def _read(self, reading: list[Slot], budget: int, rows: list[tuple[Slot, int]]) -> None:
        """Add prompt chunks of `reading`, in order, to the batch: about `budget` tokens, each chunk
        at least TILE tokens (or the whole rest of its prompt) and never leaving less than TILE."""
        for slot in reading:
            left = min(budget, self.n_batch) - len(self.batch)
            space = self.n_batch - len(self.batch)
            if left <= 0 and len(self.batch):
                break
            text = self._text_ahead(slot)
            if not text:  # a picture chunk comes next: read alone, this step
                self._read_media(slot)
                continue
            n = min(left, text)
            if 0 < text - n < TILE:  # no small remainder: read it all now, or leave a whole tile
                n = text if text <= space else n - TILE
            if n < min(TILE, text) and len(self.batch):
                continue
            n = max(1, min(n, space))
            row = self._add(slot, slot.pending[:n], logits_last=n == len(slot.pending))
            if not slot.pending:
                rows.append((slot, row))

    @staticmethod
    def _text_ahead(slot: Slot) -> int:
        """How many of the slot's pending prompt tokens are text before the next picture chunk."""
        media = slot.request.media
        if not media:
            return len(slot.pending)
        pos = len(slot.ids)
        return min([start - pos for start in media if start >= pos] + [len(slot.pending)])

    def _read_media(self, slot: Slot) -> None:
        pos = len(slot.ids)
        media = slot.request.media[pos]
        try:
            code = media.read(self.ctx, slot.seq, pos)
            if code == NO_KV_SLOT and self._evict_idle():  # the cache is full: make room, read it again
                self.ctx.forget(slot.seq, pos)
                code = media.read(self.ctx, slot.seq, pos)
        except BackendError as e:  # the picture itself is wrong: this reply ends, the others go on
            self._finish(slot, "error", str(e))
            return
        if code != 0:
            self.ctx.forget(slot.seq, pos)  # a chunk read in parts may have left some of itself
            self._finish(slot, "error", f"llama.cpp could not read a picture: {decode_meaning(code)}.")
            return
        slot.ids.extend(slot.pending[: media.n_tokens])
        del slot.pending[: media.n_tokens]

    def _evict_idle(self) -> bool:
        """Drop every idle conversation's cache, to make room; whether there was any."""
        idle = [s for s in self.slots if s.request is None and s.ids]
        for slot in idle:
            self._forget(slot)
        return bool(idle)

    def _add(self, slot: Slot, tokens: list[int], logits_last: bool) -> int:
        row = self.batch.add(slot.seq, tokens, len(slot.ids), logits_last)
        slot.ids.extend(tokens)  # in the KV cache once this batch decodes (undone below if it fails)
        if slot.pending:
            del slot.pending[: len(tokens)]
        else:
            slot.next_token = None
        return row

    def _decode(self) -> bool:
        code = self.ctx.decode(self.batch)
        if code == 0:
            return True
        self._undo_batch()
        evicted = [s for s in self.slots if s.request is None and s.ids]
        if code == NO_KV_SLOT and evicted:  # evict idle conversations; the batch runs again next step
            for slot in sorted(evicted, key=lambda s: s.last_used)[: max(1, len(evicted) // 2)]:
                self._forget(slot)
            return False
        if code == NO_KV_SLOT:
            victim = max((s for s in self.slots if s.request), key=lambda s: len(s.ids))
            self._finish(victim, "error", "The model's KV cache is full: too many long conversations at once. "
                                          "Try again in a moment, or clear this chat.")
            self._forget(victim)
            return False
        # Anything else is a failure, not a full cache: the replies in this batch end with what it
        # means, and their sequences are dropped (a failed decode may leave part of the batch cached).
        log.error("llama_decode returned %d: %s", code, decode_meaning(code))
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "error", f"llama.cpp could not go on: {decode_meaning(code)}. Try again.")
                self._forget(slot)
        return False

    def _undo_batch(self) -> None:
        rows = list(self.batch.rows())
        for slot in self.slots:
            tokens = [token for seq, token in rows if seq == slot.seq]
            if not tokens:
                continue
            del slot.ids[-len(tokens):]
            self.ctx.forget(slot.seq, len(slot.ids))
            if slot.request is not None and slot.next_token is None and not slot.pending and slot.generated:
                slot.next_token = tokens[-1]
            else:
                slot.pending[:0] = tokens

    def _sample(self, slot: Slot, index: int) -> None:
        request = slot.request
        token = slot.sampler.sample(self.ctx, index)  # llama_sampler_sample accepts it too (once: a grammar
        # sampler given a token twice aborts the process; the penalties counted each token twice)
        slot.generated += 1
        if self.model.is_eog(token):
            self._finish(slot, "stop")
            return
        piece = slot.decoder.decode(self.model.piece(token))
        request.out.put(("text", piece, slot.generated, self._logprob(request, index, token)))
        if slot.generated >= request.params.max_new_tokens or len(slot.ids) + 1 >= self.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _logprob(self, request: Request, row: int, token: int) -> tuple[int, Any] | None:
        """The sampled token and a copy of its row's logits, when the reply asked for log-
        probabilities: the reply's own reader works them out (backends/llamacpp.py), so the
        batch's step pays only the copy (65 us median for 49k floats here)."""
        return None if request.params.logprobs is None else (token, self.ctx.logits(row, self.n_vocab))

    def _finish(self, slot: Slot, reason: str, message: str = "") -> None:
        request, slot.request = slot.request, None
        slot.pending, slot.next_token, slot.last_used = [], None, time.monotonic()
        if request is not None:
            request.out.put(("error", message) if reason == "error" else ("done", reason))
