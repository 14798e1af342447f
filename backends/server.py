"""Engine servers that Confab starts and stops itself (lmdeploy api_server, vLLM, llama.cpp).

A `ManagedServer` runs one command as a child process in its own process group, waits until
its OpenAI-compatible API answers, and kills the whole group on `stop()`, on interpreter exit
and on SIGTERM (app.py turns SIGTERM into a normal exit). Knows processes and HTTP, not models.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from typing import Iterable

from .base import BackendError, ProgressFn

log = logging.getLogger(__name__)
_live: set["ManagedServer"] = set()  # process-wide: every child we must not leave behind
_live_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    def __init__(self, command: Iterable[str], base_url: str, ready_timeout: float = 600.0) -> None:
        self.command = [str(c) for c in command]
        self.base_url = base_url.rstrip("/")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="confab-server-", suffix=".log", delete=False)

    def start(self, progress: ProgressFn | None = None) -> None:
        log.info("starting engine server: %s", " ".join(self.command))
        try:
            self.proc = subprocess.Popen(
                self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() takes its workers too
            )
        except FileNotFoundError:
            raise BackendError(
                f"Cannot start {self.command[0]!r}: it is not installed or not on PATH."
            ) from None
        with _live_lock:
            _live.add(self)
        self._wait_ready(progress)

    def _wait_ready(self, progress: ProgressFn | None) -> None:
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < self.ready_timeout:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise BackendError(
                    f"The engine server exited with code {self.proc.returncode} while starting. "
                    f"Its last output:\n{tail}"
                )
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    log.info("engine server ready at %s in %.1f s", self.base_url, time.monotonic() - start)
                    return
            except httpx.HTTPError:
                pass
            if progress:
                waited = time.monotonic() - start
                progress(min(0.9, waited / self.ready_timeout), f"Starting the engine server ({waited:.0f} s)")
            time.sleep(0.5)
        self.stop()
        raise BackendError(
            f"The engine server did not answer at {self.base_url} within {self.ready_timeout:.0f} s. "
            f"Its last output:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self._log.name, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).strip()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        proc = self.proc
        with _live_lock:
            _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping engine server (pid %d)", proc.pid)
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@atexit.register
def stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()
