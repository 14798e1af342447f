"""The state folder: what must outlive a restart of the server, and nothing that piles up.

The browser keeps each chat in localStorage, encrypted with a key that Gradio would make anew at
each launch (so after a restart the page could not read its chat and overwrote it). The key is
kept here, or given by $CONFAB_SECRET. It is no password: Gradio hands it to every browser with
the page; it keeps other sites' scripts from reading the chat at rest, nothing more. Exported chats need not survive a restart:
they go to one temporary folder per process (Gradio serves downloads from the temp folder
only), old ones are removed as new ones come, and the folder goes at exit. Knows files, not Gradio.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
EXPORT_KEEP_S = 3600  # an export is a download: an hour is plenty to fetch it


def default_state_dir() -> Path:
    """$CONFAB_STATE_DIR; on a Space, /data (its persistent storage) when it is mounted; else
    $XDG_STATE_HOME/confab (~/.local/state/confab)."""
    if os.environ.get("CONFAB_STATE_DIR"):
        return Path(os.environ["CONFAB_STATE_DIR"]).expanduser()
    if os.environ.get("SPACE_ID") and os.access("/data", os.W_OK):
        return Path("/data/confab")
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "confab"


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise SystemExit(f"Cannot use the state folder {self.path} ({e.strerror}); pass --state-dir DIR.") from None
        self.exports = Path(tempfile.mkdtemp(prefix="confab-exports-"))
        atexit.register(shutil.rmtree, self.exports, ignore_errors=True)

    def browser_secret(self) -> str:
        """The key the page's saved chats are encrypted with: $CONFAB_SECRET, else a file here
        made once (private to this user, as the rest of the folder)."""
        if os.environ.get("CONFAB_SECRET"):
            return os.environ["CONFAB_SECRET"]
        path = self.path / "browser-secret"
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        secret = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret)
        return secret

    def export(self, name: str, text: str) -> Path:
        """Write an export (in a folder of its own, so two users' names never collide) and remove
        those older than EXPORT_KEEP_S."""
        now = time.time()
        for old in self.exports.iterdir():
            try:
                if now - old.stat().st_mtime > EXPORT_KEEP_S:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            except OSError:  # another export removed it first
                pass
        folder = self.exports / secrets.token_hex(8)
        folder.mkdir()
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return path
