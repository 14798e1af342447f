"""Conversations kept on the server, per login, in one SQLite file in the state folder.

With logins (--auth), a person's chats follow them to any browser, so they live here instead
of in the browser. Python's sqlite3 in WAL mode: each save is one transaction, so a crash in
the middle of a reply leaves the last save whole, never a torn file. A conversation is stored
as its JSON (chat/conversations.py), with its title and time beside it for the list. One
connection per call: sqlite3 connections must not cross threads, and Gradio runs handlers on a
pool. Knows SQLite and JSON, not Gradio or engines.
"""

from __future__ import annotations

import json
import sqlite3
import threading
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
"""


class ConversationStore:
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

    def count(self, owner: str) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM conversations WHERE owner = ?", (owner,)).fetchone()[0]
