"""The `llm` command-line tool (a real OpenAI client no one here wrote) against the launched app:
chat, continuing a conversation, `-o json_object 1` and `--schema` (structured output the engine
enforces). llm is set up as its docs say for an OpenAI-compatible server: extra-openai-models.yaml
in its own folder (LLM_USER_PATH, a temporary one here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def llm(app, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        "- model_id: confab\n"
        "  model_name: smollm2-llamacpp\n"
        f"  api_base: \"{app.url}/v1\"\n"
        "  supports_schema: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


def test_chat_and_its_continuation(llm):
    first = llm("-m", "confab", "-o", "temperature", "0", "My name is Ada. Say hello to me.")
    assert first.strip()
    second = llm("-c", "-o", "temperature", "0", "Say it again, shorter.")
    assert second.strip()
    logs = json.loads(llm("logs", "-n", "2", "--json"))
    assert len({entry["conversation_id"] for entry in logs}) == 1
    earlier, later = sorted(logs, key=lambda entry: entry["datetime_utc"])
    # The continuation sent the whole conversation: its prompt holds the first exchange.
    assert later["input_tokens"] > earlier["input_tokens"] + earlier["output_tokens"]


def test_json_object_comes_back_as_json_not_a_markdown_block(llm):
    out = llm("-m", "confab", "-o", "json_object", "1", "Describe a cat as JSON with a name and a colour.")
    assert isinstance(json.loads(out), dict), out


def test_a_schema_with_a_nested_object_and_an_enum_is_followed(llm):
    schema = {"type": "object", "required": ["name", "age", "pet"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "pet": {"type": "object", "required": ["kind", "legs"], "properties": {
            "kind": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer"}}}}}
    out = llm("-m", "confab", "--schema", json.dumps(schema), "Invent a person and a pet.")
    person = json.loads(out)
    assert isinstance(person["name"], str) and isinstance(person["age"], int), person
    assert person["pet"]["kind"] in ("cat", "dog", "bird") and isinstance(person["pet"]["legs"], int), person
