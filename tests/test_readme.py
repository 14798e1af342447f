"""Every Python example in the README runs as written (the server address it names is the launched
app's), so the README cannot drift from the code."""

import os
import re
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_readme_example_runs(index, app, installed, tmp_path):
    """Run as a user of `pip install -e .` would: that venv's python, in a folder of its own."""
    code = BLOCKS[index].replace("http://127.0.0.1:7860", app.url)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(installed), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() or "def " in code  # examples print what they show
