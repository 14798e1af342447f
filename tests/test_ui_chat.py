"""The conversation helpers between Gradio's chat format and the model layer."""

import json

import pytest

from backends.base import GenerationParams, ParamError, Usage
from ui.chat import (
    PARAM_FIELDS,
    clean_history,
    export_json,
    format_status,
    import_json,
    params_from_ui,
    parse_stop_words,
    to_messages,
    ui_values,
)

GRADIO_HISTORY = [
    {"role": "user", "metadata": None, "content": [{"type": "text", "text": "hi"}], "options": None},
    {"role": "assistant", "metadata": {"title": "🔧 tool"}, "content": "step"},
    {"role": "assistant", "metadata": None, "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
]


def test_history_parts_are_flattened_and_tool_steps_dropped():
    assert clean_history(GRADIO_HISTORY) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_system_prompt_leads_the_messages_only_when_set():
    assert [m.role for m in to_messages(clean_history(GRADIO_HISTORY), "  ")] == ["user", "assistant"]
    assert to_messages([], "Be nice")[0].content == "Be nice"


def test_ui_values_round_trip():
    p = GenerationParams(temperature=0.3, seed=7, stop=("a,b", "\n\n"), do_sample=False)
    values = dict(zip(PARAM_FIELDS, ui_values(p)))
    assert values["stop"] == "a\\,b, \\n\\n"
    assert params_from_ui(values) == p


def test_seed_minus_one_means_random():
    assert params_from_ui({"seed": -1}).seed is None
    assert params_from_ui({"seed": 3.0}).seed == 3


def test_bad_slider_value_is_a_param_error():
    with pytest.raises(ParamError, match="top_p"):
        params_from_ui({"top_p": 0})


def test_stop_words_parsing():
    assert parse_stop_words("###, \\n\\n, User:") == ["###", "\n\n", "User:"]
    assert parse_stop_words("") == []


def test_export_then_import_is_lossless():
    text = export_json(GRADIO_HISTORY, "Be brief")
    assert json.loads(text)[0] == {"role": "system", "content": "Be brief"}
    history, system = import_json(text)
    assert system == "Be brief" and history == clean_history(GRADIO_HISTORY)


def test_import_accepts_an_object_with_messages():
    history, system = import_json('{"messages": [{"role": "user", "content": "x"}]}')
    assert history == [{"role": "user", "content": "x"}] and system == ""


@pytest.mark.parametrize(
    "text, words",
    [
        ("not json", "not valid JSON"),
        ('{"a": 1}', "not a list"),
        ('[{"role": "user"}]', "Message 1 has no role or no content"),
        ('[{"role": "wizard", "content": "x"}]', "role 'wizard'"),
    ],
)
def test_bad_imports_explain_the_format(text, words):
    with pytest.raises(ParamError) as err:
        import_json(text)
    assert words in str(err.value) and "Expected" in str(err.value) or "role" in str(err.value)


def test_status_line():
    info = {"loaded": True, "name": "M", "backend": "llamacpp", "device": "cpu", "n_ctx": 8192}
    usage = Usage(prompt_tokens=100, completion_tokens=20, cached_tokens=80, ttft_s=0.05, total_s=0.24)
    line = format_status(info, usage)
    for part in ["**M**", "llamacpp", "cpu", "context 120 / 8,192", "80 cached", "first token 50 ms", "tok/s"]:
        assert part in line
    assert "Load" in format_status({"loaded": False})


def test_the_thinking_switch_maps_to_enable_thinking():
    assert [params_from_ui({"thinking": v}).thinking for v in ("default", "on", "off")] == [None, True, False]
    assert dict(zip(PARAM_FIELDS, ui_values(GenerationParams(thinking=False))))["thinking"] == "off"
    with pytest.raises(ParamError, match="Thinking must be one of default, on, off"):
        params_from_ui({"thinking": "maybe"})
