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
    concurrency: int | None = None  # None: as many replies as the engine batches
    presets_dir: Path = HERE / "presets"
    tools_dir: Path = HERE / "tools"
    load: bool = True
    api_key: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Confab: a web chat for local large language models.",
        epilog="Examples: python app.py | python app.py --preset smollm2-transformers | "
        "python app.py --model ~/models/qwen.gguf --port 8080 | python app.py chat (the terminal chat)",
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
                   help="require this login for the page (repeatable)")
    p.add_argument("--auth-file", type=Path, help="file with one USER:PASS per line (# comments allowed)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="most replies generated at once; others wait in line and see their place "
                   "(default: what the engine batches, 8 for llama.cpp, 1 for transformers)")
    p.add_argument("--api-key", default=os.environ.get("CONFAB_API_KEY"),
                   help="require this bearer key on the OpenAI-compatible API at /v1 (or $CONFAB_API_KEY)")
    p.add_argument("--presets-dir", type=Path, default=HERE / "presets", help="folder of model presets")
    p.add_argument("--tools-dir", type=Path, default=HERE / "tools",
                   help="folder of tool files (@tool functions) that presets may switch on")
    p.add_argument("--no-load", action="store_true", help="start without loading a model")
    p.add_argument("--list-presets", action="store_true", help="list the model presets and exit")
    return p.parse_args(argv)


def read_auth(pairs: list[str], auth_file: Path | None) -> list[tuple[str, str]]:
    lines = list(pairs)
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


def settings_from(args: argparse.Namespace) -> Settings:
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1.")
    return Settings(
        preset=args.preset, model=args.model, backend=args.backend, host=args.host, port=args.port,
        share=args.share, auth=read_auth(args.auth, args.auth_file), concurrency=args.concurrency,
        presets_dir=args.presets_dir, tools_dir=args.tools_dir, load=not args.no_load, api_key=args.api_key,
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
        TerminalChat(manager, presets).run()
    finally:
        manager.unload()


def serve(settings: Settings, presets: dict, sampling: dict, key: str | None, spec) -> None:
    from backends.base import BackendError
    from backends.manager import ModelManager
    from ui.handlers import Handlers
    from ui.layout import CSS, build

    # SIGTERM (systemd, docker stop, kill) becomes a normal exit, so atexit stops any engine
    # server this process started instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    manager = ModelManager(max_concurrent=settings.concurrency)
    if settings.load:
        try:
            manager.load(spec)
        except BackendError as e:
            log.error("Could not load %s: %s The page will open without a model.", spec.name, e)
    # Gradio lets many replies in; the manager admits as many as the engine can batch and tells
    # the others their place in line. Waiting replies hold a worker thread, hence max_threads.
    demo = build(Handlers(manager, presets, sampling, load_tools(settings.tools_dir, presets)), key,
                 concurrency=UI_REPLIES)
    demo.queue(default_concurrency_limit=4, max_size=256)
    demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        auth=settings.auth or None, css=CSS, footer_links=["api"], max_threads=2 * UI_REPLIES + 16,
        prevent_thread_lock=True,
    )
    add_openai_api(demo.app, manager, presets, settings.api_key)
    log.info("OpenAI-compatible API at %s/v1%s", demo.local_url.rstrip("/"),
             " (API key required)" if settings.api_key else "")
    demo.block_thread()


def load_tools(folder: Path, presets: dict) -> dict:
    """The tools folder's tools; a preset that names a missing tool stops the start-up."""
    from backends.base import BackendError
    from backends.tools import load_tools_dir, pick

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


def add_openai_api(app, manager, presets: dict, api_key: str | None) -> None:
    """Serve /v1 on the page's own server; its routes go first so nothing of Gradio's shadows them."""
    from api.openai_api import build_router

    def model_id() -> str:
        return next((k for k, s in presets.items() if s == manager.spec), manager.spec.model)

    before = len(app.router.routes)
    app.include_router(build_router(manager, model_id, api_key))
    app.router.routes[:] = app.router.routes[before:] + app.router.routes[:before]

if __name__ == "__main__":
    sys.exit(main())
