"""Confab's entry point: flags -> settings -> presets -> model manager -> Gradio UI -> launch.

`python app.py chat [flags]` runs the same stack in the terminal instead of the page.

Only the standard library is imported before the flags are parsed, so `--help` and
`--list-presets` answer at once; Gradio and the engines load after.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("confab")
HERE = Path(__file__).resolve().parent
UI_REPLIES = 64  # replies the page accepts at once; beyond this Gradio's own queue shows positions


@dataclass
class Settings:
    preset: str | None = None
    model: str | None = None
    backend: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    concurrency: int | None = None  # None: as many replies as the engine batches
    swap_grace: float = 5.0  # seconds a load or unload lets replies in flight finish before stopping them
    presets_dir: Path = HERE / "presets"
    tools_dir: Path = HERE / "tools"
    state_dir: Path | None = None  # None: web.state.default_state_dir()
    load: bool = True
    limits: dict = field(default_factory=dict)  # web.policy.Limits fields


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="confab" if Path(sys.argv[0]).name == "confab" else "python app.py",  # pip install -e . names it confab
        description="Confab: a web chat for local large language models.",
        epilog="Examples: python app.py | python app.py --preset smollm2-transformers | "
        "python app.py --model ~/models/qwen.gguf --port 8080 | python app.py chat (the terminal chat) | "
        "python app.py --share --auth me:secret --admin me (see Sharing safely in the README)",
    )
    p.add_argument("--preset", help="model preset to load at start (see --list-presets); default smollm2-llamacpp")
    p.add_argument("--model", help="a hub id (org/name[@rev]), local folder or .gguf file to load instead of a preset")
    p.add_argument("--backend", help="backend for --model: transformers or llamacpp (default: llamacpp for .gguf)")
    # GRADIO_SERVER_NAME/PORT are how Hugging Face Spaces (and Docker setups) say where to listen.
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for your network (default %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port to listen on (default %(default)s)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                   help="require this login for the page and its API (repeatable; also $CONFAB_AUTH, comma-separated)")
    p.add_argument("--auth-file", type=Path, help="file with one USER:PASS per line (# comments allowed)")
    p.add_argument("--admin", action="append", default=[], metavar="USER",
                   help="this login may load and unload models (repeatable; also $CONFAB_ADMINS). Without logins "
                   "and on loopback, whoever uses the page may")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key on the OpenAI-compatible API at /v1 (repeatable; also "
                   "$CONFAB_API_KEY, comma-separated)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="most replies generated at once; others wait in line and see their place "
                   "(default: what the engine takes: 4 per llama.cpp slot, 4 for transformers)")
    p.add_argument("--swap-grace", type=float, default=5.0, metavar="SECONDS",
                   help="when a model is loaded or unloaded, replies still being written get this long to "
                   "finish; the rest are stopped and their users told why (default %(default)s)")
    p.add_argument("--max-body", default="8MB", metavar="SIZE",
                   help="largest request or upload, e.g. 8MB or 500KB (default %(default)s)")
    p.add_argument("--max-message-chars", type=int, default=100_000, metavar="N",
                   help="longest message, system prompt or imported message in characters (default %(default)s)")
    p.add_argument("--max-messages", type=int, default=1_000, metavar="N",
                   help="most messages in one conversation (default %(default)s)")
    p.add_argument("--max-conversations", type=int, default=200, metavar="N",
                   help="most conversations kept per browser, or per login with --auth (default %(default)s)")
    p.add_argument("--max-file-bytes", default="8MB", metavar="SIZE",
                   help="largest attached file, read before anything else is done with it (default %(default)s)")
    p.add_argument("--max-image-bytes", default="8MB", metavar="SIZE",
                   help="largest picture sent to a vision model (default %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=20_000_000, metavar="N",
                   help="most pixels in one picture, checked before it is decoded (default %(default)s)")
    p.add_argument("--max-images", type=int, default=16, metavar="N",
                   help="most pictures in one conversation (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=4_096, metavar="N",
                   help="most tokens one reply may ask for (default %(default)s)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="folder for what outlives a restart (the key of the chats saved in browsers, exports); "
                   "default $CONFAB_STATE_DIR, /data/confab on a Space with storage, else ~/.local/state/confab")
    p.add_argument("--presets-dir", type=Path, default=HERE / "presets", help="folder of model presets")
    p.add_argument("--tools-dir", type=Path, default=HERE / "tools",
                   help="folder of tool files (@tool functions) that presets may switch on")
    p.add_argument("--no-load", action="store_true", help="start without loading a model")
    p.add_argument("--list-presets", action="store_true", help="list the model presets and exit")
    return p.parse_args(argv)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").replace("\n", ",").split(",") if item.strip()]


def read_auth(pairs: list[str], auth_file: Path | None) -> list[tuple[str, str]]:
    lines = list(pairs) + _env_list("CONFAB_AUTH")  # a Space keeps its logins in a secret
    if auth_file is not None:
        try:
            lines += auth_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise SystemExit(f"Cannot read --auth-file {auth_file}: {e.strerror}.") from None
    creds = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"Bad login {line.split(':')[0]!r}: write it as USER:PASS.")
        creds.append((user, password))
    return creds


def parse_size(text: str, flag: str = "--max-body") -> int:
    """8MB, 500kb, 2GiB, 1048576 -> bytes."""
    import re

    match = re.fullmatch(r"(\d+)\s*([kmg]?)(?:i?b)?", text.strip().lower())
    if not match or int(match[1]) < 1:
        raise SystemExit(f"{flag} {text!r}: give a size such as 8MB, 500KB or 1048576.")
    return int(match[1]) * 1024 ** " kmg".index(match[2] or " ")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1.")
    if not 0 <= args.swap_grace <= 3600:
        raise SystemExit("--swap-grace must be from 0 to 3600 seconds.")
    for flag in ("max_message_chars", "max_messages", "max_new_tokens", "max_conversations", "max_image_pixels",
                 "max_images"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1.")
    limits = {"body_bytes": parse_size(args.max_body), "message_chars": args.max_message_chars,
              "messages": args.max_messages, "max_new_tokens": args.max_new_tokens,
              "conversations": args.max_conversations, "file_bytes": parse_size(args.max_file_bytes, "--max-file-bytes"),
              "image_bytes": parse_size(args.max_image_bytes, "--max-image-bytes"), "image_pixels": args.max_image_pixels,
              "images": args.max_images}
    return Settings(
        preset=args.preset, model=args.model, backend=args.backend, host=args.host, port=args.port,
        share=args.share, auth=read_auth(args.auth, args.auth_file), admins=args.admin + _env_list("CONFAB_ADMINS"),
        api_keys=args.api_key + _env_list("CONFAB_API_KEY"), concurrency=args.concurrency,
        swap_grace=args.swap_grace, presets_dir=args.presets_dir, tools_dir=args.tools_dir, state_dir=args.state_dir, load=not args.no_load,
        limits=limits,
    )


def choose_spec(settings: Settings, presets: dict):
    """The model to load at start: --model, else --preset, else the default preset."""
    from backends.base import ModelSpec
    from backends.locate import guess_backend
    from presets import DEFAULT_PRESET

    if settings.model:
        backend = settings.backend or guess_backend(settings.model)
        return None, ModelSpec(name=Path(settings.model).name or settings.model, backend=backend, model=settings.model)
    key = settings.preset or DEFAULT_PRESET
    if key not in presets:
        raise SystemExit(f"Unknown preset {key!r}. Known presets: {', '.join(presets)}.")
    return key, presets[key]


def list_presets(presets: dict) -> None:
    width = max(map(len, presets), default=10)
    for key, spec in presets.items():
        print(f"{key:<{width}}  {spec.backend:<16}  {spec.model}\n{'':<{width}}  {spec.description or spec.name}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    chat = bool(argv) and argv[0] == "chat"  # `python app.py chat ...`: the terminal chat
    args = parse_args(argv[1:] if chat else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from backends import zerogpu

    zerogpu.setup()  # on a ZeroGPU Space, `spaces` first: it must patch torch before anything imports it
    from presets import PresetError, load_model_presets, load_sampling_presets

    try:
        presets = load_model_presets(args.presets_dir)
        sampling = load_sampling_presets(args.presets_dir / "sampling")
    except PresetError as e:
        raise SystemExit(str(e)) from None
    if args.list_presets:
        list_presets(presets)
        return
    settings = settings_from(args)
    key, spec = choose_spec(settings, presets)
    if chat:
        terminal(settings, presets, spec)
    else:
        serve(settings, presets, sampling, key, spec)


def terminal(settings: Settings, presets: dict, spec) -> None:
    from backends.base import BackendError
    from backends.manager import ModelManager
    from terminal import TerminalChat

    logging.getLogger().setLevel(logging.WARNING)  # the chat, not the log, belongs on the screen
    manager = ModelManager()
    try:
        manager.load(spec)
    except BackendError as e:
        raise SystemExit(f"Could not load {spec.name}: {e}") from None
    try:
        TerminalChat(manager, presets, tools=load_tools(settings.tools_dir, presets)).run()
    finally:
        manager.unload()


def serve(settings: Settings, presets: dict, sampling: dict, key: str | None, spec) -> None:
    from starlette.middleware import Middleware

    from backends.base import BackendError
    from backends.manager import ModelManager
    from ui.handlers import Handlers
    from ui.layout import CSS, JS, build
    from web.door import Door, Gate
    from web.policy import Access, Limits
    from web.state import StateDir, default_state_dir

    try:
        access = Access.for_server(settings.auth, settings.admins, settings.api_keys, settings.host,
                                   settings.share, space=bool(os.environ.get("SPACE_ID")))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    limits = Limits(**settings.limits)
    state = StateDir(settings.state_dir or default_state_dir())
    # SIGTERM (systemd, docker stop, kill) becomes a normal exit, so atexit stops any engine
    # server this process started instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    manager = ModelManager(max_concurrent=settings.concurrency, swap_grace_s=settings.swap_grace)
    if settings.load:
        try:
            manager.load(spec)
        except BackendError as e:
            log.error("Could not load %s: %s The page will open without a model.", spec.name, e.for_operator())
    handlers = Handlers(manager, presets, sampling, load_tools(settings.tools_dir, presets), access=access,
                        limits=limits, state=state)
    # Gradio lets many replies in; the manager admits as many as the engine can batch and tells
    # the others their place in line. Waiting replies hold a worker thread, hence max_threads.
    demo = build(handlers, key, concurrency=UI_REPLIES, secret=state.browser_secret())
    demo.queue(default_concurrency_limit=4, max_size=256)
    quiet_queue(demo)
    # /v1 is its own app, built before the server starts and served by the door, so a client
    # never finds the page up and /v1 missing (routes added after launch raced the first call).
    gate = Gate(access, limits, api=openai_app(manager, presets, limits, handlers.preset_tools))
    demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        auth=gate.check_login if settings.auth else None, css=CSS, js=JS, footer_links=["api"], max_threads=2 * UI_REPLIES + 16,
        prevent_thread_lock=True, max_file_size=limits.body_bytes,
        # Gradio's own checks of a malformed payload then say what was wrong (our handlers turn
        # every error into a message already; this adds Gradio's, which name the field).
        show_error=True,
        # Every request passes the door first; FastAPI's own /openapi.json is not served.
        app_kwargs={"middleware": [Middleware(Door, gate=gate)], "openapi_url": None},
    )
    gate.gradio = demo.app  # the door reads Gradio's login cookie from here
    log.info("OpenAI-compatible API at %s/v1", demo.local_url.rstrip("/"))
    for line in access.summary():
        log.info("%s", line)
    log.info("State folder: %s", state.path)
    demo.block_thread()


# Gradio's queue looks for new page events every 1 ms while it has none (gradio/queueing.py,
# Queue.sleep_when_free; there is no public setting): ~4% of a core on an idle server, and
# ~0.8 ms of CPU per token streamed through /v1, taken from the decoding threads on a small
# machine (2 cores here). Every 10 ms instead: ~1% idle, and a page event starts at most 10 ms
# later. tests/test_app_cli.py checks Gradio still sleeps on the attribute.
QUEUE_POLL_S = 0.01


def quiet_queue(demo) -> None:
    demo._queue.sleep_when_free = max(demo._queue.sleep_when_free, QUEUE_POLL_S)


def load_tools(folder: Path, presets: dict) -> dict:
    """The tools folder's tools; a preset that names a missing tool stops the start-up."""
    from backends.base import BackendError
    from chat.tools import load_tools_dir, pick

    try:
        tools = load_tools_dir(folder) if folder.is_dir() else {}
    except BackendError as e:
        raise SystemExit(str(e)) from None
    for key, spec in presets.items():
        try:
            pick(tools, spec.tools, f"tools in {folder}")
        except BackendError as e:
            raise SystemExit(f"Preset {key!r}: {e}") from None
    return tools


def openai_app(manager, presets: dict, limits, server_tools=lambda: None):
    """The OpenAI-compatible API as an ASGI app of its own; the door sends /v1 to it and decides
    who may call it (web/door.py)."""
    from fastapi import FastAPI

    from api.openai_api import build_router

    def model_id() -> str:
        return next((k for k, s in presets.items() if s == manager.spec), manager.spec.model)

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(build_router(manager, model_id, limits, server_tools))
    return app


if __name__ == "__main__":
    sys.exit(main())
