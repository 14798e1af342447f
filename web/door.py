"""The one door: an ASGI middleware that every request to the server passes, page and API alike.

It enforces what no single route can: a body size limit (413 before anything is parsed), JSON
that cannot crash a parser (nesting too deep) or the page's event stream (lone surrogates,
replaced), one login for every route (`/v1` takes the page's logins as HTTP Basic, or an API
key), slowed password guessing, and Gradio sessions that only their opener can cancel, stream
or end. Gradio's own `auth=` guards only Gradio's routes and its `/cancel` answers anyone, hence
this layer. Knows HTTP and Gradio's wire protocol (its login cookie, session and event ids);
no engine, no page layout.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import anyio

from starlette.requests import cookie_parser

from .jsonsafe import TooDeep, safe_json
from .policy import Access, Limits, Throttle

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# What a browser without a login may fetch: the login page and what it is drawn with (measured
# with a real browser: the page, its scripts, styles and fonts, then POST /login).
# Gradio's launch() itself calls startup-events without a login; it only runs them once.
ANONYMOUS_PATHS = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/manifest.json", "/robots.txt",
                   "/theme.css", "/gradio_api/theme.css", "/gradio_api/startup-events"}
ANONYMOUS_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# Routes of Gradio features this app does not use (some ask for no login), and the REST routes
# that run an event around the queue, where a caller may name any session.
CLOSED_PREFIXES = ("/gradio_api/stream/", "/gradio_api/run-history", "/gradio_api/vibe", "/gradio_api/undo-vibe",
                   "/monitoring", "/openapi.json", "/docs", "/redoc", "/gradio_api/call/", "/gradio_api/run/",
                   "/gradio_api/api/", "/gradio_api/component_server")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
LOGIN_BODY_BYTES = 64 * 1024  # a login form is small: nobody unknown gets to send megabytes
BODY_TIMEOUT_S = 60  # a body must arrive within this (a trickle would hold a worker forever)
BIG_BODY = 64 * 1024  # JSON larger than this is checked in a worker thread, off the event loop


@dataclass
class _Session:
    owner: str  # the login that opened it ("" without logins)
    events: deque = field(default_factory=lambda: deque(maxlen=64))  # its latest event ids


class SessionBook:
    """Which login opened each Gradio session, and the events it started. Bounded (LRU)."""

    def __init__(self, max_sessions: int = 20_000) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def claim(self, session: str, owner: str) -> bool:
        entry = self._sessions.get(session)
        if entry is not None and entry.owner != owner:
            return False
        self._sessions[session] = entry or _Session(owner)
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return True

    def add_event(self, session: str, event_id: str) -> None:
        entry = self._sessions.get(session)
        if entry is not None:
            entry.events.append(event_id)

    def foreign(self, session: str, caller: str) -> bool:
        """The session is known to belong to someone else."""
        entry = self._sessions.get(session)
        return entry is not None and entry.owner != caller

    def started(self, session: str, event_id: str, caller: str) -> bool:
        entry = self._sessions.get(session)
        return entry is not None and entry.owner == caller and event_id in entry.events


@dataclass
class Gate:
    """The door's settings and memory. `gradio` (the Gradio app) is set once it is launched;
    `api` is the app that serves /v1 (requests there never reach Gradio)."""

    access: Access
    limits: Limits
    throttle: Throttle = field(default_factory=Throttle)
    sessions: SessionBook = field(default_factory=SessionBook)
    gradio: Any = None
    api: Any = None

    def check_login(self, user: str, password: str) -> bool:
        """Gradio's `auth=`: the name it checks is the one counted. While that name is locked,
        no password is even tried, so a guess there tells nothing."""
        keys = [f"user:{user}"]
        if self.throttle.retry_after(keys) > 0:
            return False
        ok = self.access.login_ok(user, password)
        (self.throttle.succeeded if ok else self.throttle.failed)(keys)
        if not ok:
            log.warning("failed login for %r", user)
        return ok

    def login_of(self, scope: Scope) -> str | None:
        """The page login this request carries (Gradio's access-token cookie), if any."""
        app = self.gradio
        if app is None or not self.access.logins:
            return None
        cookies = cookie_parser(_header(scope, b"cookie"))
        for name in (f"access-token-{app.cookie_id}", f"access-token-unsecure-{app.cookie_id}"):
            user = app.tokens.get(cookies.get(name))
            if user is not None:
                return user
        return None


class Door:
    def __init__(self, app: Callable, gate: Gate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.gate.access.logins and self.gate.login_of(scope) is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._http(scope, receive, send)
        except _Refused as refusal:
            await refusal.send(send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, api = scope["path"], scope["path"].startswith("/v1")
        if path.startswith(CLOSED_PREFIXES):
            raise _Refused(404, "Not found.", api)
        self._same_site(scope, api)
        login = self.gate.login_of(scope)
        logging_in = path in ("/login", "/login/") and scope["method"] == "POST"
        if api:
            self._api_credential(scope)
        elif self.gate.access.logins and login is None and not logging_in and not _anonymous(path):
            raise _Refused(401, "Not authenticated: log in first.", api)
        limit = LOGIN_BODY_BYTES if logging_in else self.gate.limits.body_bytes
        body = await self._body(scope, receive, api, limit)  # only once the caller may send one
        if body is not None:
            if len(body) > BIG_BODY:
                body = await anyio.to_thread.run_sync(_safe_json, scope, body, api)
            else:
                body = _safe_json(scope, body, api)
            receive = _replay(body, receive)
        if logging_in:
            await self._login(scope, body or b"", receive, send)
            return
        if path.startswith("/gradio_api/"):
            send = self._sessions(scope, path, body, login or "", send)
        await (self.gate.api if api and self.gate.api is not None else self.app)(scope, receive, send)

    # ---- where a request comes from ----------------------------------------------------------
    def _same_site(self, scope: Scope, api: bool) -> None:
        """Refuse what another website makes a visitor's browser send (Gradio's CORS answers any
        origin with credentials on a non-local host, and its login cookie is SameSite=None), and,
        when the machine's owner is whoever reaches the page, any Host but a loopback one: a
        rebound DNS name would otherwise make every website the owner."""
        host = _header(scope, b"host").lower()
        if self.gate.access.owner_mode and host and host.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
            raise _Refused(403, f"This server answers to localhost only, not {host!r}; to serve a network, start "
                                "it with --host and --auth (see Sharing safely in the README).", api)
        origin = _header(scope, b"origin")
        if origin and origin != "null":
            hosts = {host, _header(scope, b"x-forwarded-host").lower()}
            if urlsplit(origin).netloc.lower() not in hosts:
                raise _Refused(403, f"Cross-site request refused: the page at {origin} is not this server "
                                    f"({host}). Behind a proxy, pass the Host header on.", api)

    # ---- bodies ----------------------------------------------------------------------------
    async def _body(self, scope: Scope, receive: Receive, api: bool, limit: int) -> bytes | None:
        """The whole body (bounded in size and time), or None for requests that carry none."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise _too_big(int(declared), limit, api)
        chunks, size = [], 0
        with anyio.move_on_after(BODY_TIMEOUT_S) as late:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Refused(400, "The client went away.", api)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_big(size, limit, api)
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
        assert late.cancel_called
        raise _Refused(408, f"The request body did not arrive within {BODY_TIMEOUT_S} s.", api)

    # ---- credentials -----------------------------------------------------------------------
    def _api_credential(self, scope: Scope) -> None:
        """/v1: an API key (Bearer) or a login (HTTP Basic), unless it is open; never the page's
        cookie, which a browser would attach for any website. The caller's identity goes to the
        route in scope["state"], for its cache owner."""
        access, throttle = self.gate.access, self.gate.throttle
        header = _header(scope, b"authorization")
        identity, tried = access.identify(header) if header else (None, None)
        keys = _guess_keys(scope, tried)
        wait = throttle.retry_after(keys)
        if wait > 0:
            raise _Refused(429, f"Too many failed attempts: try again in {wait:.0f} s.", True,
                           headers=[(b"retry-after", str(int(wait) + 1).encode())])
        if identity is None and header and access.api_keys + tuple(access.logins):
            throttle.failed(keys)
        if identity is None and not access.api_open:
            raise _Refused(401, _api_advice(access), True, kind="invalid_api_key",
                           headers=[(b"www-authenticate", b'Basic realm="confab"')] if access.logins else [])
        if identity is not None and header:
            throttle.succeeded([k for k in keys if k.startswith("user:")])  # an address's count stays, as for /login
        scope.setdefault("state", {})["confab_identity"] = identity or f"addr:{_client(scope)}"

    async def _login(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Gradio's login form. Gate.check_login counts failures by the name Gradio checks; here a
        locked name gets a 429 that says how long to wait, and failures count against the client's
        address too."""
        user = _form_field(scope, body, "username").strip()
        keys = _guess_keys(scope, user)
        throttle = self.gate.throttle
        wait = throttle.retry_after(keys)
        if wait > 0:
            raise _Refused(429, f"Too many failed logins: try again in {wait:.0f} s.", False,
                           headers=[(b"retry-after", str(int(wait) + 1).encode())])
        status: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        address = [k for k in keys if k.startswith("addr:")]
        if status and status[0] != 200:
            throttle.failed(address)

    # ---- Gradio sessions -------------------------------------------------------------------
    def _sessions(self, scope: Scope, path: str, body: bytes | None, caller: str, send: Send) -> Send:
        """Only a session's opener may join events to it, read its stream, cancel its events or
        keep it alive; a cancel must also name an event the caller started."""
        book = self.gate.sessions
        if path == "/gradio_api/queue/join":
            session = str(_json_field(body, "session_hash") or "")
            if not session:
                return send
            if not book.claim(session, caller):
                raise _Refused(403, "That session belongs to someone else.", False)
            return _capture_event(send, lambda event_id: book.add_event(session, event_id))
        if path in ("/gradio_api/cancel", "/gradio_api/reset"):
            session = str(_json_field(body, "session_hash") or "")
            event_id = str(_json_field(body, "event_id") or "")
            if not book.started(session, event_id, caller):
                raise _Refused(403, "There is no reply of yours to stop there.", False)
        elif path.startswith("/gradio_api/queue/data"):
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [""]
            if len(given) > 1:  # which one would the route read? Refuse the question.
                raise _Refused(400, "Give session_hash once.", False)
            session = given[0]
            if book.foreign(session, caller):
                raise _Refused(403, "That session belongs to someone else.", False)
        elif path.startswith("/gradio_api/heartbeat/"):
            if book.foreign(path.rsplit("/", 1)[-1], caller):
                raise _Refused(403, "That session belongs to someone else.", False)
        return send


# ---- helpers -------------------------------------------------------------------------------
class _Refused(Exception):
    """A response the door gives instead of the route's: OpenAI's error shape on /v1."""

    def __init__(self, status: int, message: str, api: bool, kind: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.api, self.headers = status, message, api, headers or []
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    async def send(self, send: Send) -> None:
        if self.api:
            body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.status}}
        else:
            body = {"detail": self.message}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _too_big(size: int, limit: int, api: bool) -> _Refused:
    return _Refused(413, f"The request is {size:,} bytes; this server takes at most {limit:,} (--max-body). "
                         "Send a shorter conversation or a smaller file.", api)


def _api_advice(access: Access) -> str:
    if access.logins or access.api_keys:
        return ("Missing or wrong credentials: send 'Authorization: Bearer <key>' (an --api-key) or a login of "
                "this server as HTTP Basic.")
    return ("This server is public and its API has no key, so it is closed. Its operator can open it by starting "
            "Confab with --api-key KEY (then send 'Authorization: Bearer KEY').")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _client(scope: Scope) -> str:
    """The caller's address. Behind a proxy on a private address (a Space's, a share link's
    tunnel), the address that proxy saw: the last X-Forwarded-For entry, the one it added (the
    ones before it are whatever the client wrote)."""
    client = scope.get("client")
    peer = client[0] if client else "?"
    forwarded = _header(scope, b"x-forwarded-for").split(",")[-1].strip()
    return forwarded if forwarded and _private(peer) else peer


def _private(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_private  # loopback counts as private too
    except ValueError:
        return False


def _guess_keys(scope: Scope, user: str | None) -> list[str]:
    """What failed guesses are counted against: the login name tried, and the caller's address
    unless it is loopback (a share link's tunnel brings everyone from there: counting it would
    let one guesser lock every visitor out)."""
    address = _client(scope)
    loopback = address in ("127.0.0.1", "::1", "localhost")
    return ([f"user:{user}"] if user else []) + ([] if loopback else [f"addr:{address}"])


def _anonymous(path: str) -> bool:
    return path in ANONYMOUS_PATHS or path.startswith(ANONYMOUS_PREFIXES)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the already-read body once, then listens for the disconnect."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _capture_event(send: Send, found: Callable[[str], None]) -> Send:
    """Pass a queue/join response through, noting the event id it hands out."""
    parts: list[bytes] = []

    async def watch(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                event_id = _json_field(b"".join(parts), "event_id")
                if isinstance(event_id, str):
                    found(event_id)
        await send(message)

    return watch


def _form_field(scope: Scope, body: bytes, name: str) -> str:
    """One field of a form body, urlencoded or multipart (Gradio's login page sends multipart)."""
    if "multipart/" in _header(scope, b"content-type"):
        match = re.search(rb'name="' + re.escape(name.encode()) + rb'"\r\n\r\n([^\r\n]{0,256})', body)
        return match[1].decode("utf-8", "replace") if match else ""
    return (parse_qs(body.decode("utf-8", "replace")).get(name) or [""])[0]


def _json_field(body: bytes | None, name: str) -> Any:
    try:
        data = json.loads(body or b"")
    except (ValueError, RecursionError):
        return None
    return data.get(name) if isinstance(data, dict) else None


def _safe_json(scope: Scope, body: bytes, api: bool) -> bytes:
    """JSON bodies through web.jsonsafe: too deep is refused, lone surrogates are replaced."""
    if "json" not in _header(scope, b"content-type").lower():
        return body
    try:
        new = safe_json(body)
    except TooDeep as e:
        raise _Refused(400, str(e), api) from None
    if new is not body:
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope["headers"].append((b"content-length", str(len(new)).encode()))
    return new
