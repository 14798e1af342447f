import pytest

from presets import DEFAULT_PRESET, PresetError, load_model_presets, load_sampling_presets, parse_model_preset
from backends import names as backend_names
from backends.base import GenerationParams


def test_shipped_presets_parse_and_name_known_backends():
    presets = load_model_presets()
    assert DEFAULT_PRESET in presets
    assert {"smollm2-llamacpp", "smollm2-transformers", "qwen2.5-7b-instruct",
            "llama-3.1-8b-instruct-4bit", "internlm2_5-7b-chat"} <= set(presets)
    for spec in presets.values():
        assert spec.backend in backend_names()
        spec.default_params  # valid sampling defaults


def test_sampling_presets_are_sparse_overlays():
    sampling = load_sampling_presets()
    assert {"precise", "balanced", "creative"} <= set(sampling)
    base = GenerationParams(max_new_tokens=77)
    for overlay in sampling.values():
        assert GenerationParams.from_dict(overlay, base=base).max_new_tokens == 77


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "llamacpp"\nmodel = "embedded"\ncontext = 4096\n')
    with pytest.raises(PresetError) as err:
        parse_model_preset(bad)
    assert "bad.toml" in str(err.value) and "'context'" in str(err.value)


def test_unknown_sampling_key_names_the_file(tmp_path):
    (tmp_path / "model.toml").write_text('backend = "llamacpp"\nmodel = "embedded"\n[sampling]\ntemp = 1\n')
    with pytest.raises(PresetError, match=r"model\.toml.*'temp'"):
        load_model_presets(tmp_path)


def test_missing_backend_and_broken_toml(tmp_path):
    (tmp_path / "nobackend.toml").write_text('model = "embedded"\n')
    with pytest.raises(PresetError, match="nobackend.toml.*backend"):
        load_model_presets(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text("backend = \n")
    with pytest.raises(PresetError, match="broken.toml.*TOML"):
        parse_model_preset(broken)


def test_template_file_is_relative_to_the_preset(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "m.toml").write_text('backend = "llamacpp"\nmodel = "embedded"\nchat_template = "t.jinja"\n')
    spec = load_model_presets(tmp_path)["m"]
    assert spec.chat_template == str(tmp_path / "t.jinja")
