"""How a handler's errors reach the page: as a message that says what was wrong, never a crash.

`shown` wraps a handler: BackendError (bad input, a limit, an engine's failure) becomes gr.Error
with its message; anything else is logged and shown as a bug the server survived. `checked`
does the same for one call inside a handler. Knows Gradio, nothing else.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import gradio as gr

from backends.base import BackendError

log = logging.getLogger(__name__)
T = TypeVar("T")


def shown(fn: Callable) -> Callable:
    """Turn errors into messages in the page; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendError as e:
            raise gr.Error(str(e), print_exception=False) from e
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not look like a crash to the user
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The server is still running.") from e

    return wrapper


def checked(fn: Callable[[], T]) -> T:
    """fn(), its BackendError shown as a message (for a check in the middle of a handler)."""
    try:
        return fn()
    except BackendError as e:
        raise gr.Error(str(e), print_exception=False) from e
