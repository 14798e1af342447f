"""app.py's flags: fast --help, presets listing, login flags, and a protected launch."""

import subprocess
import sys
import time

import pytest

from conftest import ROOT, RunningApp

APP = str(ROOT / "app.py")


def run(*args):
    return subprocess.run([sys.executable, APP, *args], capture_output=True, text=True, timeout=60)


def test_help_is_fast_and_lists_every_flag():
    start = time.perf_counter()
    out = run("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and elapsed < 2.0, elapsed
    for flag in ["--preset", "--model", "--backend", "--host", "--port", "--share", "--auth", "--auth-file",
                 "--concurrency", "--list-presets"]:
        assert flag in out.stdout


def test_list_presets():
    out = run("--list-presets")
    assert out.returncode == 0
    assert "smollm2-llamacpp" in out.stdout and "smollm2-transformers" in out.stdout


def test_unknown_preset_and_bad_login_exit_with_a_message(tmp_path):
    out = run("--preset", "nope", "--no-load", "--port", "1")
    assert out.returncode != 0 and "Unknown preset 'nope'" in out.stderr
    out = run("--auth", "justauser", "--no-load")
    assert out.returncode != 0 and "USER:PASS" in out.stderr
    out = run("--auth-file", str(tmp_path / "missing.txt"), "--no-load")
    assert out.returncode != 0 and "Cannot read --auth-file" in out.stderr


def test_auth_file_reading(tmp_path):
    sys.path.insert(0, str(ROOT))
    from app import read_auth

    f = tmp_path / "logins"
    f.write_text("# team\nann:secret\n\nbob:pa:ss\n")
    assert read_auth(["cli:pw"], f) == [("cli", "pw"), ("ann", "secret"), ("bob", "pa:ss")]


@pytest.mark.timeout(120)
def test_auth_protects_the_app(tmp_path):
    from gradio_client import Client

    logins = tmp_path / "logins"
    logins.write_text("ann:secret\n")
    app = RunningApp("--no-load", "--auth-file", str(logins))
    try:
        with pytest.raises(Exception):
            Client(app.url, verbose=False)
        client = Client(app.url, auth=("ann", "secret"), verbose=False)
        assert "/respond" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        app.stop()


def test_the_page_queue_looks_for_events_every_10_ms_not_every_1():
    """Gradio's queue wakes every `sleep_when_free` seconds while idle (1 ms by default: ~4% of a
    core, taken from decoding on a small machine); app.quiet_queue sets 10 ms. This checks the
    attribute is still the one Gradio's loop sleeps on, so an upgrade that renames it fails here."""
    import inspect

    import gradio as gr
    from gradio.queueing import Queue

    import app

    assert "asyncio.sleep(self.sleep_when_free)" in inspect.getsource(Queue.start_processing)
    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    app.quiet_queue(demo)
    assert demo._queue.sleep_when_free == app.QUEUE_POLL_S == 0.01
