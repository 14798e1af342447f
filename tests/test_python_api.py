"""The Python interfaces Confab grew from, end to end on real models."""

import pytest

from confab import ChatModel

pytestmark = pytest.mark.timeout(300)
PROMPT = "<human>: What is the capital of France? Answer in one sentence.\n<bot>:"


@pytest.fixture(scope="module")
def chat_model():
    model = ChatModel("embedded")
    yield model
    model.close()


def test_chatmodel_streams_the_bot_reply_without_the_prompt(chat_model):
    pieces = []
    text = chat_model.do_inference(PROMPT, max_new_tokens=64, do_sample=False, temperature=0.7, top_k=40,
                                   stream_callback=pieces.append)
    assert text and text == "".join(pieces) and len(pieces) > 1
    assert "<human>" not in text and PROMPT not in text


def test_chatmodel_stops_at_the_next_human_turn(chat_model):
    # A prompt that invites the model to write both sides of a dialogue.
    prompt = ("<human>: Hi!\n<bot>: Hello! How can I help?\n<human>: Tell me a joke.\n<bot>: Why did the cat "
              "sit on the computer? To keep an eye on the mouse!\n<human>: Another one.\n<bot>:")
    text = chat_model.do_inference(prompt, max_new_tokens=200, do_sample=True, temperature=0.9, top_k=40)
    assert "<human>:" not in text


def test_chatmodel_on_transformers_with_openchatkit_arguments(tiny_model_dir):
    model = ChatModel(str(tiny_model_dir), gpu_id=0, max_memory={0: "1GiB", "cpu": "4GiB"})
    try:
        text = model.do_inference("<human>: hello there\n<bot>:", max_new_tokens=8, do_sample=False,
                                  temperature=1.0, top_k=0)
        assert isinstance(text, str) and "<human>:" not in text
        assert model.manager.describe()["backend"] == "transformers"
    finally:
        model.close()
