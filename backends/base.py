"""The model-layer contract: messages, sampling parameters, chunks, model specs, errors.

Everything above the backends (manager, UI, API, terminal) speaks only these types. This
module knows nothing about Gradio, HTTP or any engine, and imports nothing heavy.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Protocol

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
TOOL_FORMATS = ("hermes", "llama3", "pythonic")  # read and written in chat/formats.py
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_STOP_WORDS, MAX_STOP_CHARS = 16, 1000  # stop words are held back while they may be starting
MAX_SCHEMA_CHARS = 65_536  # a response_format's JSON schema, as text


class BackendError(Exception):
    """A failure a person can act on; its message says what went wrong and what to do.

    `detail` is for the server's operator and log only (an upstream server's address or its
    error body): visitors on a shared link see the message alone."""

    def __init__(self, message: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def for_operator(self) -> str:
        return f"{self} ({self.detail})" if self.detail else str(self)


class ParamError(BackendError, ValueError):
    """Sampling parameters or a model spec that do not make sense."""


class NotLoaded(BackendError):
    """A reply was asked of a backend or manager with no model loaded."""

    def __init__(self, message: str = "No model is loaded: choose a model and press Load.") -> None:
        super().__init__(message)


class ContextOverflow(BackendError):
    """The conversation (or its last message) does not fit the model's context."""


@dataclass(frozen=True, repr=False)
class ImageData:
    """An image attached to a user message: its bytes as sent (PNG, JPEG, WebP, GIF or BMP) and its
    size, as chat/attachments.py read and checked them. Vision backends decode it (backends/images.py);
    the others refuse it."""

    data: bytes
    mime: str
    width: int
    height: int
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes) or not self.data:
            raise ParamError("An image must be the non-empty bytes of a picture file.")
        if not (isinstance(self.mime, str) and self.mime.startswith("image/")):
            raise ParamError(f"An image's type must be image/..., got {self.mime!r}.")
        if not (isinstance(self.width, int) and isinstance(self.height, int) and self.width > 0 and self.height > 0):
            raise ParamError(f"An image's width and height must be whole numbers above 0, got {self.width!r} "
                             f"and {self.height!r}.")

    @property
    def digest(self) -> str:
        """Which picture this is (the same bytes, the same digest), for caches keyed by content."""
        return hashlib.sha256(self.data).hexdigest()

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def __repr__(self) -> str:  # never the bytes: a repr lands in logs
        return f"ImageData({self.name!r}, {self.mime}, {self.width}x{self.height}, {len(self.data):,} bytes)"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    images: tuple[ImageData, ...] = ()  # a user message's pictures, shown to the model before its text

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ParamError(f"Unknown message role {self.role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(self.content, str):
            raise ParamError(f"Message content must be text, got {type(self.content).__name__}.")
        object.__setattr__(self, "content", valid_text(self.content))
        _check_images(self)

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _check_images(message: Message) -> None:
    images = message.images
    if isinstance(images, (list, ImageData)):
        images = tuple(images) if isinstance(images, list) else (images,)
        object.__setattr__(message, "images", images)
    if not isinstance(images, tuple) or not all(isinstance(i, ImageData) for i in images):
        raise ParamError("A message's images must be ImageData (chat/attachments.py reads them).")
    if images and message.role != "user":
        raise ParamError(f"Only user messages may carry images, not {message.role} messages.")


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """Text with any lone UTF-16 surrogate (JSON can carry one; UTF-8 cannot) replaced by U+FFFD,
    so every tokenizer and every JSON encoder downstream can take it."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _unknown_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ParamError(
            f"Unknown {where} {', '.join(map(repr, unknown))}; known ones are: {', '.join(sorted(known))}."
        )


@dataclass(frozen=True)
class GenerationParams:
    """Every sampling knob. Validates itself; backends map it onto their engine."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    do_sample: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = ()
    thinking: bool | None = None  # the chat template's `enable_thinking`; None: the template's default
    # OpenAI's penalties (-2 to 2): subtracted from a token's logit once if it is already in the
    # reply (presence), or once per time it is (frequency). Only engines that name "penalties"
    # in their `features` take them (ModelManager refuses them elsewhere).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The reply must be JSON that this JSON schema (as text) accepts; "" for free text. Only
    # engines that name "json_schema" in their `features` take it.
    json_schema: str = ""
    # The last message's text is the whole prompt, as it is: no chat template (POST /v1/completions).
    # Only engines that name "raw" in their `features` take it.
    raw: bool = False
    # Each generated token's log-probability, with this many likeliest alternatives (0-20); None:
    # off. Only engines that name "logprobs" in their `features` take it.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Normalise types first so the checks below compare numbers, not strings.
        object.__setattr__(self, "stop", _as_stop_tuple(self.stop))
        for name, kind in (("max_new_tokens", int), ("top_k", int)):
            object.__setattr__(self, name, _as_number(name, getattr(self, name), kind))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _as_number(name, getattr(self, name), float))
        for name in ("seed", "logprobs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_number(name, getattr(self, name), int))
        for name in ("do_sample", "raw"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.thinking is not None and not isinstance(self.thinking, bool):
            raise ParamError(f"thinking must be true, false or empty (the chat template's default), "
                             f"got {self.thinking!r}.")
        self._check_ranges()

    def _check_ranges(self) -> None:
        if self.max_new_tokens < 1:
            raise ParamError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ParamError(
                f"temperature must be 0 or more, got {self.temperature}. Use 0 (or sampling off) for greedy output."
            )
        if not 0 < self.top_p <= 1:
            raise ParamError(f"top_p must be above 0 and at most 1, got {self.top_p}. Use 1 to turn it off.")
        if not 0 <= self.top_k < 2**31:  # engines take it as a C int
            raise ParamError(f"top_k must be 0 or more (and below 2**31), got {self.top_k}. Use 0 to turn it off.")
        if self.max_new_tokens >= 2**31:
            raise ParamError(f"max_new_tokens must be below 2**31, got {self.max_new_tokens}.")
        if not 0 <= self.min_p < 1:
            raise ParamError(f"min_p must be at least 0 and below 1, got {self.min_p}. Use 0 to turn it off.")
        if self.repetition_penalty <= 0:
            raise ParamError(
                f"repetition_penalty must be above 0, got {self.repetition_penalty}. Use 1 to turn it off."
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParamError(f"seed must be from 0 to 2**63 - 1, got {self.seed}. Leave it empty (or -1 in the page) "
                             "for a random seed.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ParamError(f"logprobs asks for 0 to {MAX_TOP_LOGPROBS} alternatives per token, got {self.logprobs}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ParamError(f"{name} must be from -2 to 2, got {getattr(self, name)}. Use 0 to turn it off.")
        if not isinstance(self.json_schema, str) or len(self.json_schema) > MAX_SCHEMA_CHARS:
            raise ParamError(f"json_schema must be a JSON schema as text of at most {MAX_SCHEMA_CHARS:,} characters.")
        if len(self.stop) > MAX_STOP_WORDS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ParamError(f"Give at most {MAX_STOP_WORDS} stop words of at most {MAX_STOP_CHARS} characters each.")

    def features(self) -> set[str]:
        """What of these settings only some engines take (see `features` on a backend)."""
        wanted = set()
        if self.presence_penalty or self.frequency_penalty:
            wanted.add("penalties")
        if self.json_schema:
            wanted.add("json_schema")
        if self.raw:
            wanted.add("raw")
        if self.logprobs is not None:
            wanted.add("logprobs")
        return wanted

    @property
    def seed32(self) -> int | None:
        """The seed folded to the 32 bits local engines take (an API may send any 64-bit seed)."""
        return None if self.seed is None else self.seed % 2**32

    @property
    def greedy(self) -> bool:
        """Sampling off, or a temperature of 0, both mean: always take the likeliest token."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "GenerationParams | None" = None) -> "GenerationParams":
        """Overlay `data` on `base` (or the defaults); unknown keys are an error."""
        _unknown_keys(cls, data, "sampling setting")
        values = dataclasses.asdict(base or cls())
        values.update(data)
        return cls(**values)

    def replace(self, **changes: Any) -> "GenerationParams":
        return self.from_dict(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        return data

    def check_context(self, n_ctx: int) -> None:
        if self.max_new_tokens >= n_ctx:
            raise ParamError(
                f"max_new_tokens ({self.max_new_tokens}) must be smaller than the model's context "
                f"({n_ctx} tokens); lower it, or load the model with a larger context."
            )


def _as_number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ParamError(f"{name} must be a number, got {value!r}.")
    if isinstance(value, int) and kind is int:
        return value  # exactly: a float would round 2**63 - 1, and overflow past 1e308
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ParamError(f"{name} must be a number of sensible size, got {str(value)[:40]!r}.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ParamError(f"{name} must be a finite number, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise ParamError(f"{name} must be a whole number, got {value!r}.")
        return int(number)
    return number


def _as_stop_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        raise ParamError(f"stop must be a list of strings, got {value!r}.") from None
    if not all(isinstance(s, str) for s in items):
        raise ParamError(f"stop must be a list of strings, got {value!r}.")
    return tuple(dict.fromkeys(s for s in items if s))  # drop empties and repeats, keep order


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    dropped_messages: int = 0

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        decode_s = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        return data


@dataclass(frozen=True)
class Chunk:
    """A text delta. The last chunk of a stream carries finish_reason and usage; the first one
    from the manager carries the prompt it continues (the chat layer reads the text by it: a
    prompt may open a `<think>` that only the reply closes)."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    usage: Usage | None = None
    prompt: "Prompt | None" = None
    logprobs: tuple["TokenLogprob", ...] = ()  # the tokens behind this text, when params.logprobs asked


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before any sampling setting), and
    the likeliest alternatives' (as many as params.logprobs asked), each as (bytes, logprob)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Waiting:
    """The reply waits: in line, with `ahead` replies to be answered before it; or, when `loading`
    is not None, for the operator's model switch (`loading` names the model being loaded; "" means
    the model is being unloaded), under way for `waited_s` seconds."""

    ahead: int = 0
    loading: str | None = None
    waited_s: float = 0.0


class Cancel:
    """One reply's stop switch: set from any thread, seen wherever the reply is.

    Every wait on a reply's path either polls `is_set()` at least every 50 ms (`POLL_S`) or
    registers a hook that wakes it (a condition to notify, an HTTP response to close). Closing a
    generator cannot do this: it fails while another thread is inside the generator's `next()`.
    """

    POLL_S = 0.05

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], Any]] = []
        self.reason = ""  # why, when someone other than the reply's own user stopped it

    def set(self, reason: str = "") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            _call_hook(hook)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def on_set(self, hook: Callable[[], Any]) -> Callable[[], None]:
        """Run `hook` when this is set (at once if it already is). Returns a function that
        removes the hook (call it when the thing it would wake is gone)."""
        with self._lock:
            if not self._event.is_set():
                self._hooks.append(hook)
                return lambda: self._remove(hook)
        _call_hook(hook)
        return lambda: None

    def _remove(self, hook: Callable[[], Any]) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)


def _call_hook(hook: Callable[[], Any]) -> None:
    try:
        hook()
    except Exception:  # noqa: BLE001 - a hook closes or wakes something; its failure must not stop the rest
        log.debug("a cancel hook raised", exc_info=True)


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation: the text a person can read and the ids the engine sees."""

    text: str
    token_ids: list[int]
    stop: tuple[str, ...] = ()
    public_tokens: int = 0  # leading ids that are the template's own text, the same for everyone
    images: tuple[Any, ...] = ()  # vision models: where each image's tokens are in token_ids (hf_vision.Placed)


ProgressFn = Callable[[float, str], None]  # (fraction 0..1, what is happening)


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model: which backend, which weights, and how to place them."""

    name: str
    backend: str
    model: str  # hub id (org/name[@revision]), local folder, .gguf path, or "embedded"
    description: str = ""
    gguf_file: str | None = None
    mmproj_file: str | None = None  # llama.cpp vision: the projector GGUF beside gguf_file (same repo or folder)
    revision: str | None = None
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpu_id: int | None = None
    max_memory: dict[Any, str] | None = None
    quantization: str = "none"  # none | 8bit | 4bit
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    chat_template: str | None = None  # built-in template name or a path to a Jinja file
    stop: tuple[str, ...] = ()
    trust_remote_code: bool = False
    draft_model: str | None = None  # transformers: a small model for assisted generation
    base_url: str | None = None  # remote engines: the server's OpenAI-compatible /v1 URL
    api_key: str | None = None  # remote engines; falls back to $OPENAI_API_KEY
    timeout_s: float = 120.0  # remote engines: longest wait for the next piece of a reply
    engine: dict[str, Any] = field(default_factory=dict)  # passed to the engine's own config class
    server: dict[str, Any] = field(default_factory=dict)  # a server Confab starts and stops
    sampling: dict[str, Any] = field(default_factory=dict)
    tools: tuple[str, ...] = ()  # names of tools (from the tools folder) this model may call
    tool_format: str | None = None  # how the model writes calls: hermes | llama3 | pythonic (else from its template)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_stop_tuple(self.stop))
        if isinstance(self.tools, str) or not all(isinstance(t, str) for t in self.tools):
            raise ParamError(f"tools must be a list of tool names, got {self.tools!r}.")
        object.__setattr__(self, "tools", tuple(self.tools))
        if self.tool_format not in (None, *TOOL_FORMATS):
            raise ParamError(f"tool_format must be one of {', '.join(TOOL_FORMATS)}, got {self.tool_format!r}.")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ParamError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}.")
        if self.quantization not in ("none", "8bit", "4bit"):
            raise ParamError(f"quantization must be none, 8bit or 4bit, got {self.quantization!r}.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ParamError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        if self.mmproj_file is not None and not (isinstance(self.mmproj_file, str)
                                                 and self.mmproj_file.lower().endswith(".gguf")):
            raise ParamError(f"mmproj_file must name a .gguf file (a vision projector), got {self.mmproj_file!r}.")
        if self.n_ctx is not None and self.n_ctx < 16:
            raise ParamError(f"n_ctx must be at least 16, got {self.n_ctx}.")
        GenerationParams.from_dict(self.sampling)  # fail at load time, not at first message

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        _unknown_keys(cls, data, "model setting")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with some settings changed (checked like a preset's)."""
        _unknown_keys(ModelSpec, changes, "model setting")
        return dataclasses.replace(self, **changes)

    @property
    def default_params(self) -> GenerationParams:
        return GenerationParams.from_dict(self.sampling)


@dataclass(frozen=True)
class Job:
    """A reply ready to run: the conversation fitted to the context (and rendered, for engines
    that take token ids), before it takes an engine slot."""

    messages: list[Message]
    params: GenerationParams
    prompt: Prompt | None = None  # None: the engine applies the chat template itself (no ids: a text prompt)
    dropped: int = 0


class Backend(Protocol):
    """`prepare` fits a conversation to the context without holding the engine (the manager calls
    it before a reply waits in line); `run` generates it, ending with finish_reason "cancelled"
    within 100 ms of `cancel` being set, wherever it is; `stream` is the two in one."""

    name: ClassVar[str]
    n_ctx: int

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None: ...

    def prepare(self, messages: list[Message], params: GenerationParams,
                tools: list[dict[str, Any]] | None = None) -> Job: ...

    def run(self, job: Job, session_id: str | None = None, cancel: Cancel | None = None) -> Iterator[Chunk]: ...

    def stream(
        self, messages: list[Message], params: GenerationParams, session_id: str | None = None
    ) -> Iterator[Chunk]: ...

    def render(self, messages: list[Message]) -> Prompt: ...

    def unload(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class Clock:
    """Times one reply: time to first token and total, for Usage."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def mark_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def fill(self, usage: Usage) -> Usage:
        now = time.perf_counter()
        usage.ttft_s = None if self.first is None else self.first - self.start
        usage.total_s = now - self.start
        return usage
