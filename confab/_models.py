"""Turning what a script passes as "the model" into a loaded ModelManager.

A script may pass a loaded `ModelManager`, a `ModelSpec`, a preset name (`smollm2-llamacpp`),
or a model: "embedded", a .gguf path, a local folder or a hub id. Knows presets and the
manager, not the classes built on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.base import ModelSpec, ParamError
from backends.locate import guess_backend
from backends.manager import ModelManager


def spec_for(model: ModelSpec | str, backend: str | None = None, **fields: Any) -> ModelSpec:
    """A preset by name, else a spec for the model path or hub id; `fields` override either."""
    from presets import load_model_presets

    if isinstance(model, ModelSpec):
        return model.replace(**fields)
    presets = load_model_presets()
    if model in presets:
        return presets[model].replace(**fields, **({"backend": backend} if backend else {}))
    return ModelSpec(name=Path(model).name or model, backend=backend or guess_backend(model), model=model, **fields)


def open_model(model: Any, backend: str | None = None, **fields: Any) -> tuple[ModelManager, bool]:
    """(a manager with the model loaded, whether this call loaded it and so owns it)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if isinstance(model, ModelManager):
        if fields or backend:
            raise ParamError(
                f"The model is already loaded, so {', '.join(sorted(fields)) or 'backend'} cannot change it; "
                "pass a preset name, path or ModelSpec instead and it is loaded with them."
            )
        return model, False
    if not isinstance(model, (ModelSpec, str)):
        raise ParamError(f"model must be a ModelManager, ModelSpec, preset name or model path, got {type(model).__name__}.")
    manager = ModelManager()
    manager.load(spec_for(model, backend, **fields))
    return manager, True
