"""Presets: one TOML file per model (`*.toml` here) and sparse sampling overlays (`sampling/`).

A model preset's file name (without .toml) is its key; its keys are `ModelSpec` fields, with
default sampling under `[sampling]`. Unknown keys are errors that name the file and the key.
This module reads files; it loads no model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from backends.base import GenerationParams, ModelSpec, ParamError
from backends.templates import is_source

PRESETS_DIR = Path(__file__).resolve().parent
DEFAULT_PRESET = "smollm2-llamacpp"


class PresetError(ParamError):
    """A preset file that cannot be used; the message names the file."""


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PresetError(f"{path}: not valid TOML ({e}).") from e


def parse_model_preset(path: Path) -> ModelSpec:
    data = _read(path)
    data.setdefault("name", path.stem)
    for key in ("backend", "model"):
        if key not in data:
            raise PresetError(f"{path}: missing {key!r}; every model preset names a backend and a model.")
    try:
        spec = ModelSpec.from_dict(data)
    except (ParamError, TypeError) as e:
        raise PresetError(f"{path}: {e}") from e
    template = spec.chat_template
    if template and not is_source(template) and ("/" in template or template.endswith(".jinja")):
        # Template files are named relative to the preset that uses them.
        spec = ModelSpec.from_dict({**data, "chat_template": str((path.parent / template).resolve())})
    return spec


def parse_sampling_preset(path: Path) -> dict[str, Any]:
    data = _read(path)
    try:
        GenerationParams.from_dict(data)
    except ParamError as e:
        raise PresetError(f"{path}: {e}") from e
    return data


def load_model_presets(directory: Path = PRESETS_DIR) -> dict[str, ModelSpec]:
    """Every model preset in `directory`, keyed by file name. Any bad file is an error."""
    return {p.stem: parse_model_preset(p) for p in sorted(directory.glob("*.toml"))}


def load_sampling_presets(directory: Path = PRESETS_DIR / "sampling") -> dict[str, dict[str, Any]]:
    return {p.stem: parse_sampling_preset(p) for p in sorted(directory.glob("*.toml"))}
