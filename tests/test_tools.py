"""Tool calling: tools from functions, reading the model's calls safely, and the reply loop on the
embedded model (a few-shot chat makes SmolLM2 write real calls)."""

import json
from pathlib import Path

import pytest

from backends.base import BackendError, GenerationParams, Message, ModelSpec
from backends.manager import ModelManager
from chat.formats import Hermes, Llama3, Pythonic, ToolCall, detect, parse_json_call
from chat.reply import Reply
from chat.tools import Tool, Toolset, ToolStep, load_tools_dir, tool
from ui.chat import clean_history, export_json, import_json, step_call, step_message, to_messages
from conftest import embedded_spec, loaded

ROOT = Path(__file__).resolve().parent.parent
TOOLS = load_tools_dir(ROOT / "tools")
GREEDY = GenerationParams(do_sample=False, max_new_tokens=60)


def add(a: int, b: int = 1) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number,
            which defaults to one.
    """
    return a + b


def call_text(expression):
    return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>' % expression


FEW_SHOT = [Message("system", "You are a helpful assistant with a calculator tool.")]
for q, e, r in [("What is 2+3?", "2+3", "5"), ("What is 10*4?", "10*4", "40")]:
    FEW_SHOT += [Message("user", q), Message("assistant", call_text(e)), Message("tool", r),
                 Message("assistant", f"{e} = {r}.")]


# ---- tools from functions ----------------------------------------------------------------
def test_schema_and_docs_come_from_the_signature_and_docstring():
    t = Tool.from_function(add)
    fn = t.schema()["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two whole numbers."
    props = fn["parameters"]["properties"]
    assert props["a"] == {"description": "The first number.", "type": "integer"}
    assert props["b"]["default"] == 1 and "defaults to one" in props["b"]["description"]
    assert fn["parameters"]["required"] == ["a"]
    assert t.signature() == "add(a: int, b: int = 1)"
    assert "The first number." in Toolset([t]).generate_docs()


def test_arguments_are_validated_before_the_function_runs():
    ts = Toolset([add])
    assert ts.run(ToolCall("add", {"a": 2, "b": 3})).output == "5"
    assert ts.run(ToolCall("add", {}, (4,))).output == "5"
    bad = ts.run(ToolCall("add", {"a": "two", "c": 1}))
    assert not bad.ok
    assert "a: Input should be a valid integer" in bad.output and "c: Extra inputs are not permitted" in bad.output
    assert "add(a: int, b: int = 1)" in bad.output  # says how to call it


def test_unknown_tools_and_failing_tools_are_reported_to_the_model():
    def broken() -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    ts = Toolset([add, broken])
    unknown = ts.run(ToolCall("weather", {"city": "Oslo"}))
    assert not unknown.ok and "no tool named 'weather'" in unknown.output and "add, broken" in unknown.output
    failed = ts.run(ToolCall("broken"))
    assert not failed.ok and "RuntimeError: disk on fire" in failed.output


def test_decorator_marks_without_registering(tmp_path):
    @tool(name="shout", docs="Upper-case the text.\n\nArgs:\n    text: what to shout")
    def loud(text: str) -> str:
        return text.upper()

    assert loud("hi") == "HI"  # still a plain function
    assert loud.__tool__.name == "shout"
    assert Toolset([loud]).run(ToolCall("shout", {"text": "hey"})).output == "HEY"
    assert "shout" not in Toolset().tools  # no process-wide registry: a toolset holds what it is given

    @tool(enabled=False)
    def hidden() -> str:
        return "x"

    assert "hidden" not in Toolset([hidden]).tools


def test_varargs_cannot_be_tools():
    def anything(*args):
        return args

    with pytest.raises(TypeError, match="name each argument"):
        Tool.from_function(anything)


# ---- reading calls ---------------------------------------------------------------------------
def test_each_format_reads_its_own_calls_and_only_those():
    known = set(TOOLS)
    tagged = Hermes().find("Let me work it out.\n" + call_text("12*7"), known)
    assert tagged == [ToolCall("calculator", {"expression": "12*7"})]
    unterminated = Hermes().find('<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n', known)
    assert unterminated == [ToolCall("calculator", {"expression": "1+1"})]
    two = Hermes().find(call_text("1+1") + "\n" + call_text("2+2"), known)  # parallel calls in one round
    assert [c.arguments["expression"] for c in two] == ["1+1", "2+2"] and two[0].id != two[1].id
    llama31 = Llama3().find('{"name": "current_time", "parameters": {"timezone": "UTC"}}', known)
    assert llama31 == [ToolCall("current_time", {"timezone": "UTC"})]
    assert len(Llama3().find('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1"}}; '
                             '{"name": "current_time", "parameters": {}}', known)) == 2
    nanollm = Pythonic().find('The time is `current_time("Europe/Paris")`.', known)
    assert nanollm == [ToolCall("current_time", {}, ("Europe/Paris",))]
    listed = Pythonic().find('[calculator(expression="1+1"), current_time(timezone="UTC")]', known)
    assert [c.name for c in listed] == ["calculator", "current_time"]
    # No guessing across formats: each reads only its own.
    assert Hermes().find('{"name": "current_time", "parameters": {}}', known) == []
    assert Llama3().find(call_text("1+1"), known) == [] and Pythonic().find(call_text("1+1"), known) == []
    assert Llama3().find('{"name": "Ann", "age": 3}', known) == []  # JSON that names no tool is an answer
    assert Pythonic().find("use `print('x')` in Python", known) == []
    string_args = parse_json_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}')
    assert string_args == ToolCall("calculator", {"expression": "2"})


def test_the_format_comes_from_the_preset_or_the_template():
    assert isinstance(detect("{% if tools %}<tool_call>{{ t }}</tool_call>{% endif %}"), Hermes)
    assert isinstance(detect("<|start_header_id|>ipython<|end_header_id|> <|python_tag|>"), Llama3)
    assert isinstance(detect("[func_name1(params_name1=params_value1), func_name2(...)]"), Pythonic)
    assert isinstance(detect(None), Hermes)
    with pytest.raises(BackendError, match="tool_format must be one of hermes, llama3, pythonic"):
        ModelSpec(name="m", backend="llamacpp", model="embedded", tool_format="xml")


def test_a_tool_past_its_time_limit_or_a_cancelled_reply_stops_the_wait():
    import threading
    import time

    from backends.base import Cancel

    def slow() -> str:
        """Sleeps."""
        time.sleep(5)
        return "late"

    ts = Toolset([slow], timeout_s=0.2)
    start = time.perf_counter()
    step = ts.run(ToolCall("slow"))
    assert not step.ok and "took longer than 0.2 s" in step.output and time.perf_counter() - start < 1
    cancel = Cancel()
    threading.Timer(0.1, cancel.set).start()
    start = time.perf_counter()
    step = Toolset([slow]).run(ToolCall("slow"), cancel)
    assert not step.ok and "stopped" in step.output and time.perf_counter() - start < 0.3


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    ts = Toolset(TOOLS.values())
    for text in (f"`calculator(open({str(marker)!r}, 'w'))`", f"`calculator(__import__('os').system('touch {marker}'))`"):
        steps = [ts.run(c) for c in Pythonic().find(text, set(ts.tools))]
        assert steps and not steps[0].ok and "plain values" in steps[0].output
    step = ts.run(ToolCall("calculator", {"expression": f"__import__('os').system('touch {marker}')"}))
    assert not step.ok and "unsupported part" in step.output
    assert not marker.exists()


def test_malformed_json_calls_come_back_as_errors():
    ts = Toolset(TOOLS.values())
    [call] = Hermes().find('<tool_call>{"name": "calculator", "arguments": {"expression": }</tool_call>', set(ts.tools))
    step = ts.run(call)
    assert not step.ok and "not valid JSON" in step.output


def test_calculator_and_clock_tools():
    ts = Toolset(TOOLS.values())
    assert ts.run(ToolCall("calculator", {"expression": "(3+4)**2 / 7"})).output == "7"
    assert ts.run(ToolCall("calculator", {"expression": "sqrt(2)"})).output.startswith("1.414")
    assert "too large" in ts.run(ToolCall("calculator", {"expression": "9**99999"})).output
    assert "division by zero" in ts.run(ToolCall("calculator", {"expression": "1/0"})).output
    now = ts.run(ToolCall("current_time", {"timezone": "UTC"}))
    assert now.ok and "UTC" in now.output
    assert "unknown time zone" in ts.run(ToolCall("current_time", {"timezone": "Mars/Base"})).output


def test_tools_folder_loading(tmp_path):
    (tmp_path / "a.py").write_text("from chat.tools import tool\n@tool\ndef ping() -> str:\n    'Pong.'\n    return 'pong'\n")
    (tmp_path / "_private.py").write_text("raise SystemExit('never imported')\n")
    assert list(load_tools_dir(tmp_path)) == ["ping"]
    (tmp_path / "b.py").write_text("from chat.tools import tool\n@tool\ndef ping() -> str:\n    return 'again'\n")
    with pytest.raises(BackendError, match="Two tools are named 'ping'"):
        load_tools_dir(tmp_path)
    (tmp_path / "b.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(BackendError, match=r"b\.py: ModuleNotFoundError"):
        load_tools_dir(tmp_path)


# ---- the loop on the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def manager(llama_backend):
    with loaded(embedded_spec()) as m:
        yield m


class Spy:
    """The real manager, with each round's conversation and `tools=` recorded."""

    def __init__(self, manager):
        self.manager, self.rounds, self.kwargs = manager, [], []

    def __getattr__(self, name):
        return getattr(self.manager, name)

    def stream(self, messages, params, session=None, **kwargs):
        self.rounds.append(messages)
        self.kwargs.append(kwargs)
        return self.manager.stream(messages, params, session, **kwargs)


def test_model_calls_a_tool_and_goes_on_with_its_result(manager):
    spy = Spy(manager)
    reply = Reply(spy, [*FEW_SHOT, Message("user", "What is 12*7?")], GREEDY, tools=Toolset([TOOLS["calculator"]]))
    events = list(reply)
    steps = [e for e in events if isinstance(e, ToolStep)]
    assert steps == [ToolStep(ToolCall("calculator", {"expression": "12*7"}), "84", True, steps[0].seconds)]
    # The second round shows the model its call and the result (how well a 135M model then uses
    # the number is the model's business).
    assert len(spy.rounds) == 2
    assert spy.rounds[1][-2:] == [Message("assistant", Hermes().write([steps[0].call])), Message("tool", "84")]
    assert reply.text.strip() and "<tool_call>" not in reply.text  # the call is a step, not reply text
    assert reply.finish_reason == "stop" and reply.steps == steps
    # Usage is summed over both rounds.
    assert reply.usage.prompt_tokens > len(manager.render(spy.rounds[0]).token_ids)
    assert reply.turn()[:2] == spy.rounds[1][-2:] and reply.turn()[-1].role == "assistant"


def test_a_failing_call_goes_back_to_the_model_as_an_error(manager):
    @tool(name="calculator")
    def strict(expression: int) -> str:  # the model sends text, so validation refuses it
        """Needs a number."""
        return str(expression)

    spy = Spy(manager)
    reply = Reply(spy, [*FEW_SHOT, Message("user", "What is 12*7?")], GREEDY, tools=Toolset([strict]), max_rounds=1)
    failed = [e for e in reply if isinstance(e, ToolStep)][0]
    assert not failed.ok and "Invalid arguments for calculator (expression: Input should be a valid integer" in failed.output
    assert spy.rounds[1][-1] == Message("tool", failed.output)
    assert reply.finish_reason == "stop"


def test_without_tools_nothing_is_parsed_or_run(manager):
    reply = manager.reply([*FEW_SHOT, Message("user", "What is 12*7?")], GREEDY).wait()
    assert not reply.steps and "<tool_call>" in reply.text  # shown as the model wrote it


def test_templates_that_take_tools_get_them(tmp_path, llama_backend):
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% if tools %}<|im_start|>system\nTOOLS {{ tools | map(attribute='function.name') | join(',') }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    m = ModelManager()
    m.load(ModelSpec(name="t", backend="llamacpp", model="embedded", n_ctx=2048, chat_template=str(template)))
    try:
        assert m.takes_tools()
        ts = Toolset(TOOLS.values())
        assert "TOOLS calculator,current_time" in m.render([Message("user", "hi")], tools=ts.schemas()).text
        spy = Spy(m)
        Reply(spy, [Message("user", "hi")], GREEDY.replace(max_new_tokens=4), tools=ts).wait()
        assert [t["function"]["name"] for t in spy.kwargs[0]["tools"]] == ["calculator", "current_time"]
    finally:
        m.unload()


def test_tool_docs_go_into_the_system_prompt_when_the_template_has_no_tools():
    ts = Toolset(TOOLS.values())
    msgs = ts.prepare([Message("system", "Be brief."), Message("user", "hi")], takes_tools=False)
    assert msgs[0].content.startswith("Be brief.\n\nYou can call these tools.") and "calculator(expression: str)" in msgs[0].content
    assert ts.prepare([Message("user", "hi")], takes_tools=False)[0].role == "system"
    assert ts.prepare([Message("user", "hi")], takes_tools=True) == [Message("user", "hi")]


# ---- steps in the chat transcript -----------------------------------------------------------------
def test_steps_round_trip_through_the_chat_and_its_export():
    step = ToolStep(ToolCall("calculator", {"expression": "12*7"}), "84", True, 0.0012)
    history = [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": "Let me check."},
               step_message(step), {"role": "assistant", "content": "It is 84."}]
    assert step_message(step)["metadata"]["title"] == "Tool: calculator(expression='12*7')"
    assert step_call(step_message(step)["metadata"]) == step.call  # kept as data, id and all
    assert step_call(step_message(step)["metadata"]).id == step.call.id
    assert step_call({"title": step.title}) == step.call  # chats saved before calls were data
    kept = clean_history(history + [{"role": "assistant", "content": "hmm", "metadata": {"title": "Thinking"}}])
    assert kept == clean_history(history) and kept[2]["metadata"]["title"] == step.title
    messages = to_messages(kept, "Be brief.")
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2].content == "Let me check.\n" + Hermes().write([step.call]) and messages[3].content == "84"
    back, system = import_json(export_json(kept, "Be brief."))
    def titles(h):  # the step's duration is not part of the OpenAI format
        return [{**m, "metadata": m["metadata"]["title"]} if "metadata" in m else m for m in h]

    assert system == "Be brief." and titles(back) == titles(kept)
    assert json.loads(export_json(kept, ""))[2]["role"] == "tool"


def test_bad_tool_input_gets_a_clear_message(tmp_path):
    from backends.base import ParamError

    with pytest.raises(ParamError, match="does not follow an assistant message that called a tool"):
        import_json(json.dumps([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]))
    import app

    presets = {"mine": ModelSpec(name="m", backend="llamacpp", model="embedded", tools=("calculator", "weather"))}
    with pytest.raises(SystemExit, match="Preset 'mine': Unknown tool 'weather'; the tools in .* are: calculator, current_time"):
        app.load_tools(ROOT / "tools", presets)
    with pytest.raises(BackendError, match="tools must be a list of tool names"):
        ModelSpec(name="m", backend="llamacpp", model="embedded", tools="calculator")
