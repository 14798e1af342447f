"""Contract tests against LMDeploy's own classes, so a renamed field fails here and not on a
user's GPU. lmdeploy cannot run on this CPU machine (and pins an older torch), so its wheel is
installed without dependencies into a side folder and only its config module is loaded."""

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from backends import create
from backends.base import BackendError, GenerationParams, ModelSpec
from backends.lmdeploy import INSTALL_HINT, engine_config, generation_config_kwargs
from backends.openai import lmdeploy_server_command
from conftest import ROOT
from presets import load_model_presets

pytestmark = pytest.mark.timeout(600)
VERSION = re.search(r"^lmdeploy==(\S+)", (ROOT / "requirements-lmdeploy.txt").read_text(), re.M).group(1)
SITE = Path.home() / ".cache" / "confab" / f"lmdeploy-{VERSION}"


@pytest.fixture(scope="module")
def lmdeploy_site() -> Path:
    if not (SITE / "lmdeploy" / "messages.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE),
                        f"lmdeploy=={VERSION}"], check=True)
    return SITE


@pytest.fixture(scope="module")
def messages(lmdeploy_site):
    """lmdeploy.messages loaded from the wheel, without the package __init__ (which needs CUDA libs)."""
    saved = {k: v for k, v in sys.modules.items() if k == "lmdeploy" or k.startswith("lmdeploy.")}
    package = types.ModuleType("lmdeploy")
    package.__path__ = [str(lmdeploy_site / "lmdeploy")]
    sys.modules["lmdeploy"] = package
    spec = importlib.util.spec_from_file_location("lmdeploy.messages", lmdeploy_site / "lmdeploy" / "messages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lmdeploy.messages"] = module
    spec.loader.exec_module(module)
    yield module
    for name in [k for k in sys.modules if k == "lmdeploy" or k.startswith("lmdeploy.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_sampling_maps_onto_generation_config(messages):
    params = GenerationParams(max_new_tokens=99, temperature=0.6, top_p=0.8, top_k=20, min_p=0.05,
                              repetition_penalty=1.1, seed=7, stop=["<|im_end|>"])
    config = messages.GenerationConfig(**generation_config_kwargs(params))
    assert config.do_sample is True  # without it lmdeploy is greedy and ignores temperature
    assert (config.max_new_tokens, config.temperature, config.top_p, config.top_k) == (99, 0.6, 0.8, 20)
    assert (config.min_p, config.repetition_penalty, config.random_seed) == (0.05, 1.1, 7)
    assert config.stop_words == ["<|im_end|>"]


def test_greedy_maps_to_do_sample_off(messages):
    config = messages.GenerationConfig(**generation_config_kwargs(GenerationParams(do_sample=False)))
    assert config.do_sample is False


def test_shipped_lmdeploy_presets_build_their_engine_configs(messages):
    presets = [s for s in load_model_presets().values() if s.backend == "lmdeploy"]
    assert len(presets) >= 2
    for spec in presets:
        config = engine_config(spec, messages)
        assert config.enable_prefix_caching is True
        assert config.session_len == spec.n_ctx
    awq = load_model_presets()["qwen2.5-7b-instruct-awq-lmdeploy"]
    config = engine_config(awq, messages)
    assert type(config).__name__ == "TurbomindEngineConfig"
    assert config.model_format == "awq" and int(config.quant_policy) == 8


def test_pytorch_engine_and_gpu_placement(messages):
    spec = ModelSpec(name="pt", backend="lmdeploy", model="m", n_ctx=4096, dtype="bf16",
                     engine={"backend": "pytorch", "tp": 2, "cache_max_entry_count": 0.5, "device_type": "cuda"})
    config = engine_config(spec, messages)
    assert type(config).__name__ == "PytorchEngineConfig"
    assert (config.tp, config.cache_max_entry_count, config.dtype, config.session_len) == (2, 0.5, "bfloat16", 4096)
    tm = engine_config(ModelSpec(name="tm", backend="lmdeploy", model="m", gpu_id=1), messages)
    assert tm.devices == [1]


def test_unknown_engine_setting_lists_the_real_fields(messages):
    spec = ModelSpec(name="bad", backend="lmdeploy", model="m", engine={"tensor_parallel": 2})
    with pytest.raises(BackendError, match="'tensor_parallel' is not a TurbomindEngineConfig setting.*session_len"):
        engine_config(spec, messages)


def test_api_server_flags_exist_in_lmdeploys_cli(lmdeploy_site):
    cli = "".join(p.read_text() for p in (lmdeploy_site / "lmdeploy" / "cli").glob("*.py"))
    spec = load_model_presets()["qwen2.5-14b-lmdeploy-server-tp2"]
    command = lmdeploy_server_command(spec.__class__.from_dict({
        **{f: getattr(spec, f) for f in ("name", "backend", "model", "n_ctx")},
        "engine": {**spec.engine, "cache_max_entry_count": 0.5, "quant_policy": 8, "model_format": "awq",
                   "max_batch_size": 64, "dtype": "bfloat16", "device_type": "cuda"},
        "trust_remote_code": True, "api_key": "k"}))
    assert command[:4] == ["lmdeploy", "serve", "api_server", "Qwen/Qwen2.5-14B-Instruct"]
    flags = [c for c in command if c.startswith("--")]
    assert {"--tp", "--enable-prefix-caching", "--session-len"} <= set(flags)
    for flag in flags:
        assert f"'{flag}'" in cli, f"lmdeploy {VERSION} has no {flag} flag"


def test_loading_without_lmdeploy_or_a_gpu_is_one_actionable_line():
    spec = load_model_presets()["internlm2_5-7b-chat-lmdeploy"]
    with pytest.raises(BackendError) as err:
        create(spec).load(spec)
    message = str(err.value)
    assert "\n" not in message
    assert message == INSTALL_HINT or "only on a GPU" in message


def test_raw_prompts_for_confab_rendered_templates_exist_in_the_pipeline(lmdeploy_site):
    """A Jinja template (lagent's meta_template) is rendered by Confab and sent with do_preprocess=False."""
    import ast

    tree = ast.parse((lmdeploy_site / "lmdeploy" / "pipeline.py").read_text())
    stream_infer = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "stream_infer")
    args = [a.arg for a in stream_infer.args.args]
    assert {"prompts", "sessions", "gen_config", "do_preprocess"} <= set(args)
