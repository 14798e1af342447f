"""Fetching models from the Hugging Face hub, and listing what is already downloaded.

All downloads go through huggingface_hub (resumable, cached, `HF_TOKEN` for gated models);
progress reaches the caller's ProgressFn. Hub errors become messages that name the model and
say what to do. Knows the hub and the cache, not engines.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .base import BackendError, ProgressFn
from .locate import Location

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.2  # a download reports its bytes at most this often (the last report always)

# Weights in formats no backend here loads; skipping them saves gigabytes per download.
IGNORE = ["*.pth", "*.pt", "*.bin.index.json.bak", "*.h5", "*.msgpack", "*.ckpt", "*.onnx", "*.ot",
          "original/*", "onnx/*", "*.tflite"]


def _tqdm_for(progress: ProgressFn | None, label: str) -> Any:
    """A tqdm class that reports a download to `progress`: bytes as "Downloading org/name: 12.3 MB /
    456.0 MB", else the fraction done. huggingface_hub updates its bars from its own worker threads,
    so `progress` must take calls from any thread. (Gradio also tracks tqdm itself.)"""
    from tqdm.auto import tqdm

    lock = threading.Lock()
    state = {"bytes": False, "last": 0.0}  # shared by the bars of one download

    class Reporting(tqdm):  # type: ignore[misc,valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if progress and self.total:
                self._report()
            return shown

        def _report(self) -> None:
            fraction = min(self.n / self.total, 1.0)
            if self.unit != "B":  # files fetched: said only while no bytes are known
                if not state["bytes"]:
                    progress(fraction, f"Downloading {label}")
                return
            if str(self.desc).startswith("Downloading bytes"):
                return  # snapshot_download's network counter; its total is a guess, the other bar's is not
            with lock:
                now = time.monotonic()
                if fraction < 1.0 and now - state["last"] < REPORT_EVERY_S:
                    return
                state["bytes"], state["last"] = True, now
            progress(fraction, f"Downloading {label}: {size(self.n)} / {size(self.total)}")

    return Reporting


def size(n: float) -> str:
    """Bytes for a person: 12.3 MB, 4.56 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def download(where: Location, progress: ProgressFn | None = None, weights: str = "all") -> Location:
    """Make `where` local: a hub repo becomes a folder in the HF cache. Local ones pass through.

    weights="gguf" fetches only the named GGUF file; "all" the repo minus foreign formats.
    """
    if where.local:
        return where
    from huggingface_hub import hf_hub_download, snapshot_download

    label = where.path + (f"/{where.gguf_file}" if where.gguf_file else "")
    progress and progress(0.0, f"Fetching {label} from the Hugging Face hub")
    try:
        if weights == "gguf":
            if not where.gguf_file:
                raise BackendError(
                    f"{where.path} is a hub repo: name the .gguf file in it, e.g. {where.path}/model.Q4_K_M.gguf"
                )
            path = Path(hf_hub_download(where.path, where.gguf_file, revision=where.revision,
                                        tqdm_class=_tqdm_for(progress, label)))
            return Location(str(path.parent), gguf_file=path.name, revision=where.revision)
        allow = [where.gguf_file, "*.json", "*.jinja", "tokenizer*"] if where.gguf_file else None
        folder = snapshot_download(where.path, revision=where.revision, allow_patterns=allow,
                                   ignore_patterns=None if allow else IGNORE,
                                   tqdm_class=_tqdm_for(progress, label))
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - every hub failure becomes advice below
        raise BackendError(hub_advice(label, e)) from e
    return Location(folder, gguf_file=where.gguf_file, revision=where.revision)


def hub_advice(name: str, error: Exception) -> str:
    kind = type(error).__name__
    if kind == "GatedRepoError":
        return (f"{name} is gated: accept its licence on huggingface.co with your account, then set HF_TOKEN "
                "(a read token) before starting Confab.")
    if kind == "RepositoryNotFoundError":
        return f"There is no model {name} on the Hugging Face hub (or it is private: set HF_TOKEN). Check the name."
    if kind == "RevisionNotFoundError":
        return f"{name} has no such revision; check the part after @ (a branch, tag or commit)."
    if kind in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
        return f"{name}: that file is not in the repo; check the file name."
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(error).lower():
        return (f"{name} is not in the local Hugging Face cache and the hub cannot be reached (offline). "
                "Connect to the internet, or download it on another machine with "
                f"`hf download {name.split('/')[0]}/{name.split('/')[1]}` and copy the cache.")
    return f"Could not fetch {name} from the Hugging Face hub ({kind}: {error}). Check the name and your connection."


def cached_models(cache_dir: str | Path | None = None) -> list[str]:
    """Model repos already in the local Hugging Face cache, most recently used first."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception:  # noqa: BLE001 - no cache yet, or unreadable: nothing to list
        return []
    repos = [r for r in info.repos if r.repo_type == "model"]
    repos.sort(key=lambda r: r.last_accessed or 0, reverse=True)
    out = []
    for repo in repos:
        ggufs = sorted({f.file_name for rev in repo.revisions for f in rev.files if f.file_name.endswith(".gguf")})
        out += [f"{repo.repo_id}/{g}" for g in ggufs] if ggufs else [repo.repo_id]
    return out
