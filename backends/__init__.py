"""The backend registry: a plain dict from name to class, filled by the `register` decorator.

Importing this package imports each backend module, which is cheap: engines (torch,
transformers, llama_cpp) are imported only when a backend loads a model.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

from .base import Backend, BackendError, ModelSpec

_REGISTRY: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register(name: str) -> Callable[[_T], _T]:
    def decorate(cls: _T) -> _T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"Unknown backend {name!r}; choose one of: {', '.join(names())}.") from None


# The packages each engine imports when it loads (found, not imported: cheap). A backend class
# may also have an `unavailable()` of its own, for what a package cannot tell (a GPU).
PACKAGES = {"transformers": ("torch", "transformers"), "llamacpp": ("llama_cpp",), "openai": ("openai", "httpx")}


def unavailable(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, in a few words for a list ("needs an NVIDIA
    GPU with CUDA"), or None. Cheap: no engine is imported. Loading one anyway says exactly why."""
    check = getattr(get(name), "unavailable", None) or _CHECKS.get(name)
    reason = check() if callable(check) else None
    missing = [p for p in PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
    return reason or (f"not installed: needs {', '.join(missing)}" if missing else None)


def create(spec: ModelSpec) -> Backend:
    """A new, unloaded backend instance for `spec` (call `.load(spec)` on it)."""
    return get(spec.backend)()


# Each module registers itself on import.
from . import hf, llamacpp, lmdeploy, openai  # noqa: E402,F401
# lmdeploy-server runs LMDeploy on this machine (its api_server), so it needs what LMDeploy needs.
_CHECKS = {"lmdeploy-server": lmdeploy.unavailable}
