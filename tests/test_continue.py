"""Continue: a conversation whose last message is the assistant's is extended, not answered —
in the Reply (over a fake engine), the tool loop, transformers on the tiny model, and llama.cpp,
whose prefix cache must reuse the earlier prompt and reply."""

import pytest

from backends.base import GenerationParams, Message
from chat.tools import Toolset, ToolStep, load_tools_dir
from conftest import ROOT, embedded_spec, loaded

pytestmark = pytest.mark.timeout(180)
QUESTION = [Message("user", "Write a short poem about the sea.")]


def test_a_continued_reply_gives_new_text_and_a_turn_that_replaces_the_message(fake):
    fake._backend.script = " the sea is wide."
    reply = fake.reply([*QUESTION, Message("assistant", "Oh,")], GenerationParams()).wait()
    assert reply.continued and reply.finish_reason == "stop"
    assert reply.text == " the sea is wide."  # the new text only, its first space kept
    assert reply.turn() == [Message("assistant", "Oh, the sea is wide.")]
    assert fake._backend.seen[-1][-1] == Message("assistant", "Oh,")  # the engine got the message to extend


def test_a_call_the_continuation_completes_is_run_and_the_round_replaces_the_cut_message(fake):
    calculator = load_tools_dir(ROOT / "tools")["calculator"]
    cut = Message("assistant", '<tool_call>\n{"name": "calculator", "arguments": {"expression": ')
    fake._backend.script = '"12*7"}}\n</tool_call>'
    reply = fake.reply([*QUESTION, cut], GenerationParams(), tools=Toolset([calculator]))
    steps = [e for e in reply if isinstance(e, ToolStep)]
    assert [s.output for s in steps] == ["84"]
    second = fake._backend.seen[1]
    assert cut not in second and second[-2].content.startswith('<tool_call>\n{"name": "calculator"')
    assert second[-1] == Message("tool", "84")  # ends with the result: the model answers it afresh
    assert reply.turn()[:2] == second[-2:]


def test_transformers_continues_the_message_without_closing_it(hf):
    prompt = hf.render([*QUESTION, Message("assistant", "the quick brown")])
    assert prompt.text.endswith("<|im_start|>assistant\nthe quick brown")
    assert prompt.token_ids[-len(hf._encode("the quick brown", False)):] == hf._encode("the quick brown", False)
    params = GenerationParams(do_sample=False, max_new_tokens=8)
    first = list(hf.stream(QUESTION, params, session_id="continue"))
    text = "".join(c.text for c in first)
    again = list(hf.stream([*QUESTION, Message("assistant", text)], params, session_id="continue"))
    assert again[-1].finish_reason == "length"
    assert again[-1].usage.cached_tokens >= len(hf.render(QUESTION).token_ids)  # the question was not read again


@pytest.fixture(scope="module")
def embedded(llama_backend):
    with loaded(embedded_spec()) as manager:
        yield manager


def test_llamacpp_continues_a_cut_off_reply_from_its_cache(embedded):
    params = GenerationParams(do_sample=False, max_new_tokens=16)
    first = embedded.reply(QUESTION, params, session="continue").wait()
    assert first.finish_reason == "length"
    conversation = [*QUESTION, *first.turn()]
    more = embedded.reply(conversation, params, session="continue").wait()
    assert more.continued and more.text.strip() and more.finish_reason == "length"
    # The earlier prompt and reply are reused (a token or two of the reply's end may re-tokenize).
    assert more.usage.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens - 3
    assert more.usage.prompt_tokens - more.usage.cached_tokens <= 3
    assert more.turn()[0].content.startswith(first.text.strip())
