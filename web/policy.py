"""Who may do what, and how much: operators and visitors, credentials, limits, slowed guessing.

An operator loads and unloads models and types paths, hub ids and server URLs; a visitor
chats within the limits. With no logins and nobody else able to reach the server (loopback,
no share link, not a Space), the person at the page is the machine's owner and operates it.
Otherwise only the logins named as admins do. The server checks this on every action; the
page only mirrors it. Knows settings and HTTP credentials, not Gradio or engines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from backends.base import GenerationParams, ParamError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TooLarge(ParamError):
    """A request past one of the server's limits; the message names the limit and its flag."""


@dataclass(frozen=True)
class Limits:
    """Size limits on what one request may ask; each has a flag (see app.py)."""

    body_bytes: int = 8 * 1024 * 1024  # --max-body
    message_chars: int = 100_000  # --max-message-chars
    messages: int = 1_000  # --max-messages
    max_new_tokens: int = 4_096  # --max-new-tokens
    conversations: int = 200  # --max-conversations: kept per browser or per login
    # Attachments (chat/attachments.py reads these fields): a file before it is read, one picture
    # as sent and as decoded, and pictures per conversation (each costs hundreds of tokens).
    file_bytes: int = 8 * 1024 * 1024  # --max-file-bytes
    image_bytes: int = 8 * 1024 * 1024  # --max-image-bytes
    image_pixels: int = 20_000_000  # --max-image-pixels
    images: int = 16  # --max-images

    def check_conversations(self, n: int) -> None:
        """How many conversations one person keeps (a new one past the limit is refused, so an
        old one is never dropped without a word)."""
        if n > self.conversations:
            raise TooLarge(
                f"You have {n - 1:,} conversations; this server keeps at most {self.conversations:,} per person "
                "(--max-conversations). Delete or export some, then start a new one."
            )

    def check_count(self, n: int) -> None:
        """How many messages one conversation holds (checked before any work is done on them)."""
        if n > self.messages:
            raise TooLarge(
                f"This conversation has {n:,} messages; this server takes at most {self.messages:,} "
                "(--max-messages). Start a new chat, or export this one and keep its latest part."
            )

    def check_text(self, where: str, text: str) -> None:
        if len(text) > self.message_chars:
            raise TooLarge(
                f"{where} is {len(text):,} characters; this server takes at most {self.message_chars:,} per "
                "message (--max-message-chars). Shorten it, or split it over several messages."
            )

    def check_texts(self, texts: Sequence[tuple[str, str]]) -> None:
        """(where, text) pairs: a conversation's messages, a system prompt, a message being sent."""
        self.check_count(len(texts))
        for where, text in texts:
            self.check_text(where, text)

    def clamp(self, defaults: GenerationParams) -> GenerationParams:
        """A model's default settings within the limits (a preset may default to more tokens than
        this server allows; what a person asks for is checked, not clamped)."""
        if defaults.max_new_tokens <= self.max_new_tokens:
            return defaults
        return defaults.replace(max_new_tokens=self.max_new_tokens)

    def check_params(self, params: GenerationParams) -> None:
        if params.max_new_tokens > self.max_new_tokens:
            raise TooLarge(
                f"max_new_tokens is {params.max_new_tokens:,}; this server allows at most {self.max_new_tokens:,} "
                "(--max-new-tokens)."
            )


@dataclass(frozen=True)
class Access:
    """Logins, admins and API keys, and how exposed the server is."""

    logins: Mapping[str, str] = field(default_factory=dict)  # user -> password
    admins: frozenset[str] = frozenset()
    api_keys: tuple[str, ...] = ()
    exposed: bool = False  # strangers may reach it: a share link, a Space, or not listening on loopback
    public: bool = False  # a share link or a Space: the API needs a credential even without logins

    def __post_init__(self) -> None:
        unknown = sorted(self.admins - set(self.logins))
        if unknown:
            raise ValueError(
                f"--admin {', '.join(unknown)}: each admin must be a login from --auth, --auth-file or "
                "$CONFAB_AUTH (USER:PASS)."
            )

    @classmethod
    def for_server(cls, logins: Iterable[tuple[str, str]], admins: Iterable[str], api_keys: Iterable[str],
                   host: str, share: bool, space: bool) -> "Access":
        return cls(dict(logins), frozenset(admins), tuple(k for k in api_keys if k),
                   exposed=share or space or host not in LOOPBACK, public=share or space)

    @property
    def owner_mode(self) -> bool:
        """No logins and nobody else can reach the page: whoever is at it owns the machine."""
        return not self.logins and not self.exposed

    def is_operator(self, user: str | None) -> bool:
        if self.owner_mode:
            return True
        return user is not None and user in self.admins and user in self.logins

    @property
    def api_open(self) -> bool:
        """Whether /v1 answers without a credential."""
        return not (self.logins or self.api_keys or self.public)

    def login_ok(self, user: str, password: str) -> bool:
        """Constant time in the password, and the same work whether or not the user exists
        (digests are compared, so even the password's length does not show)."""
        expected = self.logins.get(user)
        ok = hmac.compare_digest(_digest(password), _digest(expected if expected is not None else "\0" + password))
        return ok and expected is not None

    def key_index(self, key: str) -> int | None:
        """Which API key this is (compared in constant time against every key), or None."""
        found, given = None, _digest(key)
        for i, candidate in enumerate(self.api_keys):
            if hmac.compare_digest(given, _digest(candidate)):
                found = i
        return found

    def identify(self, authorization: str) -> tuple[str | None, str | None]:
        """An Authorization header -> (identity, login name tried). Identity is `key:N` or
        `login:USER` when the credential is good, else None."""
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            index = self.key_index(value)
            return (f"key:{index}" if index is not None else None), None
        if scheme == "basic" and value:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, None
            return (f"login:{user}" if self.login_ok(user, password) else None), user
        return None, None

    def summary(self) -> list[str]:
        """What start-up says about who can do what."""
        lines = []
        if self.owner_mode:
            lines.append("Only this machine can reach the page, so whoever uses it operates Confab (loads models).")
        elif self.admins:
            lines.append(f"Operators (may load and unload models): {', '.join(sorted(self.admins))}. "
                         "Everyone else can chat and nothing more.")
        else:
            lines.append("Visitors can chat; nobody can load or unload models from the page. To operate it, "
                         "start with --auth USER:PASS --admin USER.")
        if self.api_open:
            lines.append("The OpenAI-compatible API at /v1 answers without a key.")
        elif not (self.logins or self.api_keys):
            lines.append("The OpenAI-compatible API at /v1 is closed: this server is public and has no key. "
                         "Start with --api-key KEY (or --auth) to open it.")
        else:
            lines.append("The OpenAI-compatible API at /v1 takes " + " or ".join(
                (["a login (HTTP Basic)"] if self.logins else []) + (["an API key (Bearer)"] if self.api_keys else [])
            ) + ".")
        return lines


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class Throttle:
    """Slows password guessing. After `free` failures for a key (a login name, a client address),
    each further try must wait twice as long as the last (1 s, 2 s, 4 s ... up to `max_s`); a
    success clears the key, and so do `forget_s` without a failure. Bounded: past `max_keys`,
    the least recently failed keys that are not locked are forgotten first (so a flood of new
    names cannot wipe out a lock)."""

    def __init__(self, free: int = 5, base_s: float = 1.0, max_s: float = 300.0, forget_s: float = 900.0,
                 max_keys: int = 100_000, clock=time.monotonic) -> None:
        self.free, self.base_s, self.max_s, self.forget_s = free, base_s, max_s, forget_s
        self.max_keys, self.clock = max_keys, clock
        self._keys: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # failures, next allowed, last

    def retry_after(self, keys: Iterable[str]) -> float:
        now = self.clock()
        return max((self._keys.get(k, (0, 0.0, 0.0))[1] - now for k in keys), default=0.0)

    def failed(self, keys: Iterable[str]) -> None:
        now = self.clock()
        for key in keys:
            failures, _, last = self._keys.pop(key, (0, 0.0, now))
            failures = 1 if now - last > self.forget_s else failures + 1
            wait = 0.0 if failures <= self.free else min(self.max_s, self.base_s * 2 ** (failures - self.free - 1))
            self._keys[key] = (failures, now + wait, now)
        if len(self._keys) > self.max_keys:
            self._shrink(now)

    def _shrink(self, now: float) -> None:
        unlocked = [k for k, (_, allowed, _) in self._keys.items() if allowed <= now]
        for key in unlocked[: len(self._keys) - self.max_keys]:
            del self._keys[key]
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def succeeded(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._keys.pop(key, None)
