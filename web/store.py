"""Conversations kept on the server, per login, in one SQLite file in the state folder.

With logins (--auth), a person's chats follow them to any browser, so they live here instead
of in the browser. Python's sqlite3 in WAL mode: each save is one transaction, so a crash in
the middle of a reply leaves the last save whole, never a torn file. A conversation is stored
as its JSON (chat/conversations.py), with its title and time beside it for the list. One
connection per call: sqlite3 connections must not cross threads, and Gradio runs handlers on a
pool. Knows SQLite and JSON, not Gradio or engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    title TEXT NOT NULL,
    updated REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS by_owner ON conversations (owner, updated DESC);
CREATE TABLE IF NOT EXISTS pending (
    holder TEXT NOT NULL,
    id TEXT NOT NULL,
    updated REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (holder, id)
);
CREATE INDEX IF NOT EXISTS pending_by_time ON pending (updated);
"""
# What the server holds of chats kept in browsers (ConversationStore.hold): a reply's chat while it
# streams, until its browser has it. Bounded in time, per browser and in all.
HOLD_S = 7 * 24 * 3600  # a browser that never comes back loses its held chats after this long
HOLD_PER_BROWSER = 8  # conversations held for one browser (one streams at a time per tab)
HOLD_BYTES = 256 * 1024**2  # held in all; past it the oldest go first


class ConversationStore:
    """Logins' conversations, and (`hold`) the chat of a reply streaming for a browser that keeps
    its own: written as it streams like a login's, so a reload, a closed tab or a restart of the
    server in the middle of a reply loses nothing; the browser takes it back (`held`) on its next
    page load, and it is dropped (`release`) once the browser has a copy as new."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one writer at a time (SQLite allows one anyway; no busy errors)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, never corrupt
        return db

    def load(self, owner: str) -> list[Any]:
        """Every conversation of a login, newest first, as stored (the caller checks them)."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT data FROM conversations WHERE owner = ? ORDER BY updated DESC",
                              (owner,)).fetchall()
        out = []
        for (data,) in rows:
            try:
                out.append(json.loads(data))
            except (json.JSONDecodeError, RecursionError):
                continue  # a row no one can read is skipped, not a page that cannot load
        return out

    def save(self, owner: str, conv: dict[str, Any]) -> None:
        data = json.dumps(conv, ensure_ascii=False, separators=(",", ":"))
        with self._lock, closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO conversations (owner, id, title, updated, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (owner, id) DO UPDATE SET title = excluded.title, updated = excluded.updated, "
                "data = excluded.data",
                (owner, conv["id"], conv["title"], conv["updated"], data),
            )

    def delete(self, owner: str, conv_id: str) -> None:
        with self._lock, closing(self._connect()) as db, db:
            db.execute("DELETE FROM conversations WHERE owner = ? AND id = ?", (owner, conv_id))

    # ---- chats held for browsers ------------------------------------------------------------
    @staticmethod
    def _holder(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()  # the browser's key itself is not stored

    def hold(self, key: str, conv: dict[str, Any]) -> None:
        """Keep `conv` for the browser whose secret key is `key` until it has a copy as new."""
        data = json.dumps(conv, ensure_ascii=False, separators=(",", ":"))
        holder = self._holder(key)
        with self._lock, closing(self._connect()) as db, db:
            db.execute("INSERT INTO pending (holder, id, updated, data) VALUES (?, ?, ?, ?) ON CONFLICT (holder, id) "
                       "DO UPDATE SET updated = excluded.updated, data = excluded.data",
                       (holder, conv["id"], conv["updated"], data))
            db.execute("DELETE FROM pending WHERE holder = ? AND id NOT IN (SELECT id FROM pending WHERE holder = ? "
                       "ORDER BY updated DESC LIMIT ?)", (holder, holder, HOLD_PER_BROWSER))
            db.execute("DELETE FROM pending WHERE updated < ?", (time.time() - HOLD_S,))
            db.execute("DELETE FROM pending WHERE rowid IN (SELECT rowid FROM (SELECT rowid, SUM(LENGTH(data)) OVER "
                       "(ORDER BY updated DESC) AS total FROM pending) WHERE total > ?)", (HOLD_BYTES,))

    def held(self, key: str) -> list[Any]:
        """What is held for a browser, newest first, as stored (the caller checks them)."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT data FROM pending WHERE holder = ? ORDER BY updated DESC",
                              (self._holder(key),)).fetchall()
        out = []
        for (data,) in rows:
            try:
                out.append(json.loads(data))
            except (json.JSONDecodeError, RecursionError):
                continue
        return out

    def release(self, key: str, copies: dict[str, float]) -> None:
        """The browser has these conversations ({id: updated}; inf: deleted there): what is held of
        them and no newer goes."""
        holder = self._holder(key)
        with closing(self._connect()) as db:  # most calls find nothing held: a read, no write
            rows = db.execute("SELECT id, updated FROM pending WHERE holder = ?", (holder,)).fetchall()
        done = [(holder, conv_id, copies[conv_id]) for conv_id, updated in rows
                if conv_id in copies and updated <= copies[conv_id]]
        if done:  # a newer checkpoint written meanwhile stays
            with self._lock, closing(self._connect()) as db, db:
                db.executemany("DELETE FROM pending WHERE holder = ? AND id = ? AND updated <= ?", done)

    def count(self, owner: str) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM conversations WHERE owner = ?", (owner,)).fetchone()[0]


class AttachmentStore:
    """What people attached to messages, kept by content in a folder of the state folder: a
    picture as it was sent, a text file or PDF as the text the model reads. A conversation (in
    the browser or SQLite) names an attachment by its file name here, so a saved chat stays small
    and an attachment is never stored twice for one owner. A name is an HMAC (keyed with the
    server's `secret`) of its owner's key and its bytes, then a suffix: knowing a file's content
    does not give its name, so nobody can look up (or learn that someone has) a file they did
    not attach. A name from a page is hostile input: only names of that exact shape are looked
    up. The folder is held to `budget_bytes`; past it the files used longest ago go first."""

    NAME = re.compile(r"[0-9a-f]{64}\.(?:png|jpe?g|webp|gif|bmp|txt)")

    def __init__(self, folder: Path, secret: str = "", budget_bytes: int = 2 * 1024**3) -> None:
        self.folder = Path(folder)
        self._secret = (secret or secrets.token_hex(32)).encode()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()

    def put(self, data: bytes, suffix: str, owner: str = "") -> str:
        """Keep `data` for `owner` (a login, or a browser's own random key); its name here."""
        digest = hmac.new(self._secret, owner.encode() + b"\0" + hashlib.sha256(data).digest(), "sha256")
        name = f"{digest.hexdigest()}.{suffix.lstrip('.').lower()}"
        if not self.NAME.fullmatch(name):
            raise ValueError(f"Cannot keep a .{suffix} attachment.")
        path = self.folder / name
        with self._lock:
            if path.exists():
                os.utime(path)
            else:
                tmp = path.with_suffix(".part")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self._prune(keep=name)
        return name

    def path(self, name: Any) -> Path | None:
        """The file of a name (marked as used), or None: not a name of this store, or gone."""
        if not isinstance(name, str) or not self.NAME.fullmatch(name):
            return None
        path = self.folder / name
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def gone(self, name: str) -> Path:
        """A short note standing in for an attachment no longer kept, under the same file name (so
        a chat that names it still reads back the same), in a folder of its own."""
        path = self.folder / "gone" / name
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text("This attachment is no longer kept on this server.\n", encoding="utf-8")
        return path

    def read(self, name: Any) -> bytes | None:
        path = self.path(name)
        try:
            return path.read_bytes() if path is not None else None
        except OSError:
            return None

    def _prune(self, keep: str) -> None:
        files = []
        for entry in os.scandir(self.folder):
            if not entry.is_file():
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, entry.path, entry.name))  # utime marks a use
        total = sum(f[1] for f in files)
        for _, size, path, name in sorted(files):
            if total <= self.budget_bytes:
                break
            if name != keep:
                with contextlib.suppress(OSError):
                    os.remove(path)
                total -= size
