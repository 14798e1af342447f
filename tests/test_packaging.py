"""Where Confab runs: installed with `pip install -e .` (a `confab` command, `import confab` from
any directory), and as a Hugging Face Space straight from the repository (README front matter)."""

import re
import subprocess
import tomllib

import gradio
import pytest
import yaml
from packaging.requirements import Requirement

from conftest import ROOT

pytestmark = pytest.mark.timeout(600)


def requirements() -> dict[str, Requirement]:
    """requirements.txt, without pip's own options (--config-settings), by package name."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split(" #")[0].split(" --")[0].strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            out.setdefault(req.name.lower(), req)
    return out


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md starts with the Space's YAML front matter between --- lines"
    return yaml.safe_load(match.group(1))


def test_the_readme_front_matter_is_a_space_config_that_matches_the_requirements():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert (ROOT / meta["app_file"]).exists()
    # The Space runs the Gradio the tests run, which requirements.txt pins.
    pinned = requirements()["gradio"].specifier
    assert str(pinned) == f"=={meta['sdk_version']}", (pinned, meta["sdk_version"])
    assert meta["sdk_version"] == gradio.__version__
    assert re.fullmatch(r"3\.\d+", str(meta["python_version"]))
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    for key in ("title", "emoji", "colorFrom", "colorTo"):
        assert meta[key], key
    assert meta["colorFrom"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert all(isinstance(m, str) and "/" in m for m in meta.get("models", []))


def test_pyproject_depends_on_what_requirements_txt_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}
    wanted = requirements()
    assert declared.keys() == wanted.keys()
    for name, req in wanted.items():
        assert declared[name].specifier == req.specifier, name
    assert project["scripts"]["confab"] == "app:main"


def test_pip_install_e_gives_a_confab_command_and_the_python_api_anywhere(installed, tmp_path):
    confab = installed.parent / "confab"
    done = subprocess.run([str(confab), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: confab" in done.stdout and "--preset" in done.stdout
    listed = subprocess.run([str(confab), "--list-presets"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and "smollm2-llamacpp" in listed.stdout, listed.stderr[-2000:]
    code = ("import confab, app; from confab import ChatModel, BaseLLM, ChatHistory, LMDeployPipeline; "
            "print(confab.__file__)")
    done = subprocess.run([str(installed), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(ROOT))  # the editable install: the repository's own code
