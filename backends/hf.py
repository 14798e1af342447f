"""Hugging Face transformers backend: hub ids, local folders and GGUF files, CPU or CUDA.

One inference thread per loaded model owns the model (as `transformers serve` does): replies
reach it through a queue and share it a slice at a time (backends/hf_engine.py): a chunk of the
prompt, or a stretch of `generate` that goes on later from the reply's KV cache; text streams
through `TextIteratorStreamer`. A
`StoppingCriteria` watches the reply's `Cancel`, so the engine is idle within one token; the
consumer reads with a timeout and never joins, so it returns within one poll of a cancel.
Errors from the thread travel back as values. A seeded reply samples with its own
`torch.Generator`: no reply reseeds the process. A checkpoint whose config is an image-text
model loads with `AutoModelForImageTextToText` and its processor; backends/hf_vision.py puts
its pictures in the prompt and their pixels into `generate`. torch and transformers are
imported in `load`, never at module import.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import time
import logging
import threading
import weakref
from typing import Any, Iterator

from . import register, zerogpu
from .base import BackendError, Cancel, GenerationParams, Message, ModelSpec, ProgressFn, Prompt, Usage
from .hf_vision import Placed, Vision, cache_keys, is_vision, reusable
from .hf_engine import (STOPPED, HFJob, InferenceThread, JsonGuide, Resumable, SliceEnd, TokenCounter, chunk_size,
                        json_grammar, read_text, sampling_kwargs)
from .hub import download
from .locate import Location, locate
from .kvcache import SessionCaches, common_prefix
from .prompting import Encode, LocalEngine, encode_segments, engine_options as _engine_options
from .templates import ChatTemplate, choose, render_segments, template_context

log = logging.getLogger(__name__)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ALONE_CHUNKS = 2  # a prompt read while no other reply waits goes in chunks this many times longer (fewer, cheaper)
UNLOAD_WAIT_S = 2.0  # how long unload waits for the inference thread to finish its step

def _import_engine() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BackendError(
            f"The transformers backend needs torch and transformers ({e.name} is missing): "
            "pip install -r requirements.txt"
        ) from e
    return torch, transformers


@register("transformers")
class TransformersBackend(LocalEngine):
    # [engine] settings: how many conversations keep their KV cache between turns, and how big.
    # replies: how many share the inference thread a slice at a time (backends/hf_engine.py), each
    # holding its own KV cache; the rest wait in the manager's line.
    ENGINE_KEYS = {"cache_sessions": 8, "cache_tokens": 16384, "replies": 4}
    features = frozenset({"raw", "json_schema"})  # GenerationParams.features() it honours
    max_concurrent = 1  # until loaded: see load()

    def __init__(self) -> None:
        self.caches = SessionCaches(0, 0)
        self.model: Any = None
        self.draft: Any = None  # assistant model for assisted (speculative) generation
        self.tokenizer: Any = None
        self.template: ChatTemplate | None = None
        self.spec: ModelSpec | None = None
        self.n_ctx = 0
        self.device = "cpu"
        self._eos_ids: list[int] = []
        self._text_stops: tuple[str, ...] = ()
        self._inference: InferenceThread | None = None
        self.vision: Vision | None = None  # a vision model's processor
        self._zero_key = ""  # on ZeroGPU: this model's key in zerogpu.MODELS
        self._guide_vocab: Any = None  # llguidance's view of the vocabulary, made at the first JSON reply
        self._chunk = 256  # the next prompt chunk's length in tokens, sized from the last (hf_engine.chunk_size)
        self._one_logit: dict[str, Any] = {}  # forward()'s argument for the last position's logits only

    # ---- loading -------------------------------------------------------------------------
    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        torch, transformers = _import_engine()
        options = _engine_options(spec, self.ENGINE_KEYS)
        self.caches = SessionCaches(int(options["cache_tokens"]), int(options["cache_sessions"]))
        replies = options["replies"]
        if not isinstance(replies, int) or isinstance(replies, bool) or replies < 1:
            raise BackendError(f"{spec.name}: [engine] replies must be a whole number of at least 1, not {replies!r}.")
        where = download(self.check(spec), progress)
        placement = self._placement(spec, torch, transformers)
        progress and progress(0.05, f"Loading tokenizer for {spec.name}")
        try:
            self._load_weights(spec, where, placement, transformers, progress)
            if spec.draft_model:
                progress and progress(0.8, f"Loading draft model {spec.draft_model}")
                draft = download(locate(spec.draft_model), progress)
                self.draft = transformers.AutoModelForCausalLM.from_pretrained(
                    draft.path, **_files(spec, draft), **placement
                )
        except (OSError, ValueError) as e:
            self.unload()
            raise BackendError(_load_advice(spec, e)) from e
        self.model.eval()
        self.spec = spec
        self.device = str(self.model.device)
        text_config = self.model.config.get_text_config()  # a vision model's language half holds it
        self.n_ctx = spec.n_ctx or int(getattr(text_config, "max_position_embeddings", 0) or 2048)
        self._setup_template(spec)
        self._start_inference()
        if zerogpu.active():  # each reply runs in ZeroGPU's worker, which finds this model by its key
            self._zero_key = f"{spec.name}@{id(self)}"
            zerogpu.MODELS[self._zero_key] = self
        # Replies are written a slice at a time (prompt chunks, stretches of tokens) only where a
        # reply is one prompt and one cache: not pictures, assisted generation or ZeroGPU's worker.
        self.max_concurrent = 1 if self._zero_key or self.draft is not None or self.vision is not None else replies
        self._one_logit = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            self.model.forward).parameters else {}
        progress and progress(1.0, f"Loaded {spec.name}")

    def _load_weights(self, spec: ModelSpec, where: Location, placement: dict[str, Any], transformers: Any,
                      progress: ProgressFn | None) -> None:
        """The tokenizer (a vision model's processor) and the model, by what the config says it is."""
        files = _files(spec, where)
        self.vision = Vision.load(where.path, files, transformers) if is_vision(where.path, files, transformers) \
            else None
        if self.vision is not None and spec.draft_model:
            raise BackendError(f"{spec.name} is a vision model; assisted generation (draft_model) works with text "
                               "models only. Remove draft_model from the preset.")
        self.tokenizer = self.vision.tokenizer if self.vision else \
            transformers.AutoTokenizer.from_pretrained(where.path, **files)
        progress and progress(0.2, f"Loading weights for {spec.name}")
        auto = transformers.AutoModelForImageTextToText if self.vision else transformers.AutoModelForCausalLM
        self.model = auto.from_pretrained(where.path, **files, **placement)

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    def _start_inference(self) -> None:
        if self._inference is None or not self._inference.alive():
            self._inference = InferenceThread()
            weakref.finalize(self, self._inference.stop)  # a backend dropped without unload() frees its thread

    @staticmethod
    def check(spec: ModelSpec) -> Location:
        """Where the weights are, checked without loading or downloading anything."""
        return locate(spec.model, spec.gguf_file, spec.revision)

    def _placement(self, spec: ModelSpec, torch: Any, transformers: Any) -> dict[str, Any]:
        """dtype, device_map, max_memory and quantization as from_pretrained takes them."""
        cuda = torch.cuda.is_available()
        device = spec.device
        if spec.gpu_id is not None:
            device = f"cuda:{spec.gpu_id}"
        if device.startswith("cuda") and not cuda:
            raise BackendError(
                f"{spec.name} asks for {device}, but torch sees no CUDA GPU. Set device = \"cpu\" "
                "(or \"auto\") in the preset, or install a CUDA build of torch."
            )
        kwargs: dict[str, Any] = {}
        if device == "auto":
            kwargs["device_map"] = "auto" if cuda else {"": "cpu"}
            if spec.max_memory:
                kwargs["max_memory"] = _max_memory(spec.max_memory)
        else:
            kwargs["device_map"] = {"": "cuda:0" if device == "cuda" else device}
        on_gpu = cuda and device != "cpu"
        if spec.dtype != "auto":
            kwargs["dtype"] = getattr(torch, DTYPES[spec.dtype])
        else:  # the checkpoint's own dtype on a GPU; fp32 on CPU, where half precision is slow
            kwargs["dtype"] = "auto" if on_gpu else torch.float32
        if spec.quantization != "none":
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=spec.quantization == "8bit",
                load_in_4bit=spec.quantization == "4bit",
                bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
                bnb_4bit_quant_type="nf4",
            )
        return kwargs

    def _setup_template(self, spec: ModelSpec) -> None:
        tok = self.tokenizer
        own = (self.vision and self.vision.chat_template) or getattr(tok, "chat_template", None)
        self.template = choose(spec.chat_template, own, tok.bos_token or "", tok.eos_token or "", spec.name)
        if self.vision is not None and not spec.chat_template:  # the processor's template takes content parts
            self.template = dataclasses.replace(self.template, parts=True)
        stops = tuple(self.template.stop) + tuple(spec.stop)
        # Stop words that are single control tokens end generation in the engine (the streamer
        # hides special tokens, so text matching would never see them); the rest match as text.
        eos = self.model.generation_config.eos_token_id
        eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        text_stops = []
        for word in stops:
            ids = tok.convert_tokens_to_ids(word) if word in tok.all_special_tokens else None
            if isinstance(ids, int) and ids != tok.unk_token_id:
                eos_ids.add(ids)
            else:
                text_stops.append(word)
        self._eos_ids = sorted(eos_ids)
        self._text_stops = tuple(text_stops)

    def unload(self) -> None:
        had_model = self.model is not None
        engine, self._inference = self._inference, None
        if engine is not None and not engine.close(UNLOAD_WAIT_S):  # unload is not on the event loop
            log.warning("the transformers inference thread is still in a step; its memory is freed when it ends")
        self.caches.clear()
        zerogpu.MODELS.pop(self._zero_key, None)
        self._zero_key = ""
        self.model = self.draft = self.tokenizer = self.vision = self._guide_vocab = None
        if had_model:
            release_memory()

    # ---- prompts -------------------------------------------------------------------------
    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               encode: Encode | None = None, thinking: bool | None = None) -> Prompt:
        self._require_loaded()
        segments = render_segments(self.template, messages, **template_context(tools, thinking))
        ids, public = encode_segments(segments, encode or self._encode)
        placed = ()
        if self.vision is not None:  # each picture's image token becomes its span of tokens
            ids, public, placed = self.vision.place(ids, public, [i for m in messages for i in m.images])
        return Prompt("".join(s.text for s in segments), ids, self._text_stops, public, images=placed)

    def plain(self, text: str) -> Prompt:
        self._require_loaded()
        # The tokenizer's own special tokens (a BOS where the model wants one), content never parsed for them
        return Prompt(text, self.tokenizer(text, split_special_tokens=True)["input_ids"])

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    # ---- generation ----------------------------------------------------------------------
    def _generate(
        self, prompt: Prompt, params: GenerationParams, usage: Usage, session_id: str | None, cancel: Cancel
    ) -> Iterator[tuple[str, int]]:
        """The consumer side: hand the reply to the inference thread and read its text with a
        timeout, so a cancel or a dead thread is seen within one poll. Never joins: this runs on
        the caller's thread (Gradio's event loop worker)."""
        _, transformers = _import_engine()
        engine = self._inference
        if engine is None or not engine.alive():
            raise BackendError(STOPPED)
        if cancel.is_set():
            return
        streamer = transformers.TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=Cancel.POLL_S
        )
        closed = threading.Event()  # the consumer went away (its generator was closed)
        counter = TokenCounter(len(prompt.token_ids), (cancel, closed, engine.closing))
        reply = HFJob(prompt.token_ids, params, usage, session_id, streamer, counter, images=prompt.images,
                      context=contextvars.copy_context())
        engine.submit(self._run_reply, reply)
        try:
            yield from read_text(reply, engine, cancel)
        finally:
            closed.set()  # the inference thread stops within a token, on its own
        if reply.failure:
            raise BackendError(_generation_advice(reply.failure[0])) from reply.failure[0]

    def _run_reply(self, reply: "HFJob") -> Iterator[None]:
        """On the inference thread: generate one reply into its streamer, a slice of work per
        step (each `yield` lets another reply have the thread); keep its KV cache, also when it
        is stopped between slices."""
        if self._zero_key:
            self._run_on_zero_gpu(reply)
            return
        torch, transformers = _import_engine()
        keys = cache_keys(reply.ids, reply.images)  # the ids, each picture marked as itself
        kwargs: dict[str, Any] = {}
        try:
            cache, reply.usage.cached_tokens, unread = self._reusable_cache(reply.session_id, keys, reply.images,
                                                                            transformers)
            kwargs = self._generate_kwargs(reply, cache, torch, transformers)
            if self.max_concurrent > 1:  # one prompt, one cache: written in slices
                yield from self._read_prompt(reply, cache, torch)
                yield from self._write(reply, kwargs, torch, transformers)
            else:
                if unread:  # the pictures whose tokens the cache does not hold yet
                    kwargs.update(self.vision.pixels(unread, self.model))
                with torch.inference_mode():
                    self.model.generate(**kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            log.exception("generation failed")
            reply.failure.append(e)
            reply.streamer.end()
            return
        except GeneratorExit:  # stopped between slices: cancelled, its reader gone, or unloading
            reply.streamer.end()
        if "past_key_values" in kwargs and self._inference is not None:  # not once unload has cleared them
            self._keep_cache(reply.session_id, reply.counter, keys, kwargs["past_key_values"])

    def _read_prompt(self, reply: "HFJob", cache: Any, torch: Any) -> Iterator[None]:
        """Read the prompt's uncached tokens, all but the last, in chunks of about SLICE_S each
        (ALONE_CHUNKS times that while no other reply waits), so another reply can have the
        thread between them; `generate` reads the rest. Measured (SmolLM2-135M, 2 cores, a
        4,000-token prompt alone, interleaved runs): first token after 7.5-7.8 s in chunks
        against 7.0-7.2 s in one pass. (transformers' own `prefill_chunk_size` reads every chunk
        within one `generate` call: no reply could have the thread between them.)"""
        ids, device = reply.ids, self.model.device
        while (left := len(ids) - 1 - (done := cache.get_seq_length())) > self._chunk:
            n = min(left, self._chunk * (1 if self._inference.contended() else ALONE_CHUNKS))
            started = time.perf_counter()
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([ids[done:done + n]], device=device), past_key_values=cache,
                           use_cache=True, **self._one_logit)
            self._chunk = chunk_size(n, time.perf_counter() - started)
            yield

    def _write(self, reply: "HFJob", kwargs: dict[str, Any], torch: Any, transformers: Any) -> Iterator[None]:
        """`generate` in slices: one ends after SLICE_S while another reply waits, and the next goes
        on from the cache (which holds every token but the last sampled) with the same logits
        processors (a seeded sampler's generator, a JSON guide's state)."""
        turn = SliceEnd(self._inference)
        stream = Resumable(reply.streamer)
        kwargs.update(streamer=stream, stopping_criteria=transformers.StoppingCriteriaList([reply.counter, turn]))
        limit, eos = reply.params.max_new_tokens, set(self._eos_ids)
        while True:
            turn.start()
            with torch.inference_mode():
                sequence = self.model.generate(**kwargs)
            left = limit - reply.counter.generated
            if not turn.ended or left <= 0 or int(sequence[0, -1]) in eos or reply.counter.should_stop():
                break
            yield
            kwargs.update(input_ids=sequence, max_new_tokens=left,
                          attention_mask=torch.ones(sequence.shape, dtype=torch.long, device=sequence.device))
        reply.streamer.end()

    def _run_on_zero_gpu(self, reply: "HFJob") -> None:
        """On ZeroGPU (backends/zerogpu.py): the reply is generated in the platform's GPU worker and
        its token ids come back here, into the reply's own streamer. No KV cache is kept between
        turns: the worker's memory is not this process's. A stopped reply stops reading; the worker
        ends at max_new_tokens or its end of text, within the GPU time the call asked for."""
        torch, _ = _import_engine()
        stream = None
        try:
            if reply.images or self.draft is not None:
                raise BackendError("On ZeroGPU this transformers model must be a text model without a draft_model "
                                   "(pictures and assisted generation are not sent to the GPU worker).")
            reply.streamer.put(torch.tensor([reply.ids]))  # the prompt first, as generate gives it (skipped)
            stream = zerogpu.generate(self._zero_key, reply.ids, reply.params)
            # Read in the context of the request that asked (spaces finds the Gradio request there,
            # whose visitor's GPU quota the call is charged to), not this thread's.
            for ids in iter(lambda: reply.context.run(next, stream, None), None):
                reply.streamer.put(torch.tensor(ids))
                reply.counter.generated += len(ids)
                if reply.counter.should_stop():
                    break
        except Exception as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            log.exception("generation on ZeroGPU failed")
            reply.failure.append(e)
        finally:
            if stream is not None:
                stream.close()
            reply.streamer.end()

    def prepare(self, messages: list[Message], params: GenerationParams, tools: list[dict[str, Any]] | None = None):
        if params.json_schema:
            json_grammar(params.json_schema)  # a schema it cannot follow is refused before the reply waits in line
        return super().prepare(messages, params, tools)

    def _sampling(self, params: GenerationParams, prompt_len: int, transformers: Any) -> dict[str, Any]:
        """generate()'s sampling arguments, with the JSON guide first when the reply must be JSON
        (before the seeded sampler, which picks the token)."""
        kwargs = sampling_kwargs(params, transformers)
        if params.json_schema:
            if self._guide_vocab is None:  # ~0.3 s once per model
                import llguidance.hf

                vocab = self.model.config.get_text_config().vocab_size
                self._guide_vocab = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=vocab,
                                                                 eos_token=self._eos_ids or None)
            guide = JsonGuide(self._guide_vocab, json_grammar(params.json_schema), prompt_len)
            kwargs["logits_processor"] = transformers.LogitsProcessorList([guide, *kwargs.get("logits_processor", [])])
        return kwargs

    def generate_plain(self, ids: list[int], params: GenerationParams, streamer: Any, stop: Any) -> None:
        """Generate a reply to `ids` into `streamer` until its end or `stop` (an Event) is set, with
        no cache (in ZeroGPU's worker, where nothing of the server's replies is)."""
        torch, transformers = _import_engine()
        device = self.model.device
        with torch.inference_mode():
            self.model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                stopping_criteria=transformers.StoppingCriteriaList([TokenCounter(len(ids), (stop,))]),
                streamer=streamer, eos_token_id=self._eos_ids or None,
                pad_token_id=self.tokenizer.pad_token_id or (self._eos_ids[0] if self._eos_ids else None),
                **self._sampling(params, len(ids), transformers))

    def _generate_kwargs(self, reply: "HFJob", cache: Any, torch: Any, transformers: Any) -> dict[str, Any]:
        ids, device = reply.ids, self.model.device
        kwargs = dict(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            past_key_values=cache,
            streamer=reply.streamer,
            stopping_criteria=transformers.StoppingCriteriaList([reply.counter]),
            eos_token_id=self._eos_ids or None,
            pad_token_id=self.tokenizer.pad_token_id or (self._eos_ids[0] if self._eos_ids else None),
            **self._sampling(reply.params, len(ids), transformers),
        )
        if self.draft is not None:  # assisted generation keeps its own caches
            kwargs["assistant_model"] = self.draft
            kwargs.pop("past_key_values")
        return kwargs

    def _reusable_cache(self, session_id: str | None, keys: list[int], placed: tuple[Placed, ...],
                        transformers: Any) -> tuple[Any, int, list[Placed]]:
        """This conversation's cache from its last turn, cut back to the prefix the new prompt shares
        (`keys`: its ids, pictures marked), and the pictures the model must read (those after it)."""
        entry = self.caches.take(session_id)
        if entry is not None:
            old_keys, cache = entry
            reuse = min(common_prefix(old_keys, keys), len(keys) - 1)  # the last prompt token is always read
            reuse, unread = reusable(reuse, placed, self.vision is None or self.vision.cache_safe)
            if reuse > 0 and cache.is_croppable:
                extra = cache.get_seq_length() - reuse
                if extra > 0:
                    cache.crop(-extra)  # transformers 5: a negative count removes tokens from the end
                return cache, reuse, unread
        return transformers.DynamicCache(config=self.model.config), 0, list(placed)

    def _keep_cache(self, session_id: str | None, counter: "TokenCounter", keys: list[int], cache: Any) -> None:
        # The cache holds every token fed to the model: the prompt and all sampled tokens but the last.
        seen = counter.sequence.tolist() if counter.sequence is not None else keys
        seen = keys + seen[len(keys):]  # the prompt as its keys, so a picture is matched as itself
        self.caches.put(session_id, seen[: cache.get_seq_length()], cache)

    def _loaded(self) -> bool:
        return self.model is not None

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "backend": self.name,
            "model": spec.name if spec else None,
            "device": self.device,
            "n_ctx": self.n_ctx,
            "dtype": str(getattr(self.model, "dtype", "")).replace("torch.", "") if self.model else None,
            "quantization": spec.quantization if spec else None,
        }


def _max_memory(raw: dict[Any, str]) -> dict[Any, str]:
    """TOML keys are strings; accelerate wants GPU ids as ints: {"0": "20GiB"} -> {0: "20GiB"}."""
    return {int(k) if str(k).isdigit() else k: v for k, v in raw.items()}


def _files(spec: ModelSpec, where: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    return kwargs


def _load_advice(spec: ModelSpec, error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"Could not load {spec.name} from {spec.model} ({text})."


def release_memory() -> None:
    """Give freed model memory back to the system, so unloading shows in RSS and on the GPU."""
    import contextlib
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap pages; this returns them
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _generation_advice(error: BaseException) -> str:
    name = type(error).__name__
    if "OutOfMemory" in name or "out of memory" in str(error).lower():
        return (
            "The model ran out of memory while answering. Lower max_new_tokens, clear some of the "
            "conversation, or load the model in 4-bit."
        )
    return f"Generation failed ({name}: {error}). The model is still loaded; try again or change the settings."
