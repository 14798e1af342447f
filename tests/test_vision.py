"""Pictures for vision models: a tiny random Idefics3 (SmolVLM's architecture) built in the test run
drives the real processor and `generate` path through the transformers backend; a text-only model
refuses a picture in one line; the OpenAI API takes data URLs and refuses the rest."""

from __future__ import annotations

import base64
import io
import threading

import pytest

from backends.base import Cancel, GenerationParams, ImageData, Message, ParamError
from backends.manager import ModelManager
from conftest import CORPUS, hf_spec, loaded, loaded_backend

pytestmark = pytest.mark.timeout(120)
GREEDY = GenerationParams(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
VISION_TEMPLATE = (  # as SmolVLM's: content is a list of parts, a picture is written as <image>
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vlm(folder):
    """A tiny Idefics3 (a 1-layer vision tower, a 2-layer Llama) with a BPE tokenizer and the PIL
    image processor (no torchvision), saved as a hub checkpoint would be."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>",
                "<global-img>", "<end_of_utterance>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    Idefics3Processor(image_processor=images, tokenizer=fast, image_seq_len=4,
                      chat_template=VISION_TEMPLATE).save_pretrained(folder)
    torch.manual_seed(0)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id),
        image_token_id=fast.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():  # louder pictures, so a different picture gives a different greedy reply
        model.model.connector.modality_projection.proj.weight.mul_(50)
        model.lm_head.weight[fast.eos_token_id] = 0  # run to max_new_tokens (see conftest.build_tiny_model)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(folder)
    return folder


def picture(seed: int, size=(40, 48)) -> ImageData:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return ImageData(buf.getvalue(), "image/png", size[0], size[1], f"picture-{seed}.png")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    with loaded_backend(hf_spec(vlm_dir)) as backend:
        yield backend


@pytest.fixture
def tower(vlm):
    """The pixel values each call of the vision tower received."""
    seen = []
    handle = vlm.model.model.vision_model.register_forward_hook(lambda mod, args, kw, out: seen.append(
        kw.get("pixel_values", args[0] if args else None)), with_kwargs=True)
    yield seen
    handle.remove()


def ask(backend, messages, session="s"):
    chunks = list(backend.stream(messages, GREEDY, session_id=session))
    return "".join(c.text for c in chunks), chunks[-1]


def test_a_vision_checkpoint_loads_with_its_processor_and_template(vlm):
    assert vlm.takes_images and vlm.template.parts and vlm.n_ctx == 1024
    prompt = vlm.render([Message("user", "what is <image> this?", images=(picture(1),))])
    (placed,) = prompt.images  # the typed <image> stays text: one picture, one place
    span = prompt.token_ids[placed.start:placed.end]
    assert span.count(vlm.vision.image_token_id) == 5 * 4  # 2x2 tiles and the whole picture, 4 tokens each
    assert prompt.text.startswith("<|im_start|>user\n<image>what is <image> this?")
    assert prompt.public_tokens <= placed.start


def test_the_picture_reaches_the_vision_tower_through_generate(vlm, tower):
    import torch

    image = picture(1)
    text, last = ask(vlm, [Message("user", "what is this?", images=(image,))], session="tower")
    assert last.finish_reason == "length" and last.usage.completion_tokens == 6
    assert len(tower) == 1
    expected = vlm.vision.pixels([vlm.render([Message("user", "x", images=(image,))]).images[0]], vlm.model)
    pixels = expected["pixel_values"]
    assert torch.equal(tower[0], pixels.view(-1, *pixels.shape[2:]))  # the tower sees this picture's tiles


def test_different_pictures_give_different_greedy_replies(vlm):
    replies = {ask(vlm, [Message("user", "what is this?", images=(picture(seed),))], session=None)[0]
               for seed in (1, 2, 3)}
    assert len(replies) == 3


def test_a_text_follow_up_reuses_the_cache_without_reading_the_picture_again(vlm, tower):
    first = [Message("user", "what is this?", images=(picture(4),))]
    said, _ = ask(vlm, first, session="follow")
    placed = vlm.render(first).images[0]
    second = first + [Message("assistant", said), Message("user", "and the colours?")]
    again, last = ask(vlm, second, session="follow")
    assert len(tower) == 1  # only the first turn read the picture
    assert last.usage.cached_tokens > placed.end
    assert again == ask(vlm, second, session="fresh")[0]  # the same reply as with no cache at all


def test_another_picture_of_the_same_size_is_never_taken_from_the_cache(vlm, tower):
    same_size = [[Message("user", "what is this?", images=(picture(seed),))] for seed in (5, 6)]
    ask(vlm, same_size[0], session="swap")
    text, last = ask(vlm, same_size[1], session="swap")
    assert len(tower) == 2
    assert last.usage.cached_tokens <= vlm.render(same_size[1]).images[0].start
    assert text == ask(vlm, same_size[1], session="other")[0]


def test_a_second_picture_later_in_the_chat_is_read_alone(vlm, tower):
    first = [Message("user", "what is this?", images=(picture(8),))]
    said, _ = ask(vlm, first, session="two")
    second = first + [Message("assistant", said), Message("user", "and this one?", images=(picture(9),))]
    text, last = ask(vlm, second, session="two")
    assert len(tower) == 2 and tower[1].shape[0] == 5  # the new picture's 5 tiles only
    assert last.usage.cached_tokens > vlm.render(first).images[0].end
    assert text == ask(vlm, second, session="fresh-two")[0]
    assert tower[2].shape[0] == 10  # with no cache, both pictures are read


def test_a_reply_about_a_picture_stops_on_cancel(vlm):
    cancel = Cancel()
    job = vlm.prepare([Message("user", "describe it", images=(picture(7),))], GREEDY.replace(max_new_tokens=400))
    chunks = []
    for chunk in vlm.run(job, "cancel", cancel):
        chunks.append(chunk)
        if len(chunks) == 2:
            threading.Timer(0, cancel.set).start()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].usage.completion_tokens < 400
    assert vlm._inference.idle.wait(2)


def test_a_text_only_model_refuses_a_picture_in_one_line(hf):
    messages = [Message("user", "what is this?", images=(picture(1),))]
    with pytest.raises(ParamError, match=r"^tiny reads text only; load a vision model such as SmolVLM") as err:
        hf.prepare(messages, GREEDY)
    assert "\n" not in str(err.value)


def test_llamacpp_refuses_a_picture_before_any_engine_work(llama_backend):
    messages = [Message("user", "what is this?", images=(picture(1),))]
    with pytest.raises(ParamError, match=r"^SmolLM2-135M-Instruct \(llama.cpp, embedded\) reads text only"):
        llama_backend.prepare(messages, GREEDY)


def test_text_models_still_reuse_their_cache(hf):
    first = [Message("user", "hello there")]
    said, _ = ask(hf, first, session="text")
    _, last = ask(hf, first + [Message("assistant", said), Message("user", "how are you?")], session="text")
    assert last.usage.cached_tokens >= len(hf.render(first).token_ids)


def test_images_belong_to_user_messages_only():
    with pytest.raises(ParamError, match="Only user messages"):
        Message("assistant", "x", images=(picture(1),))
    with pytest.raises(ParamError, match="ImageData"):
        Message("user", "x", images=(b"png bytes",))
    assert "bytes" in repr(picture(1)) and "\\x" not in repr(picture(1))


# ---- the OpenAI API ----------------------------------------------------------------------------

def api_client(manager, **limits):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.openai_api import build_router
    from web.policy import Limits

    app = FastAPI()
    app.include_router(build_router(manager, lambda: "tiny", Limits(**limits)))
    return TestClient(app)


@pytest.fixture(scope="module")
def vlm_manager(vlm_dir):
    with loaded(hf_spec(vlm_dir)) as manager:
        yield manager


def with_image(url, text="what is this?"):
    return {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]}


def test_the_api_takes_a_picture_as_a_data_url(vlm_manager):
    client = api_client(vlm_manager)
    r = client.post("/v1/chat/completions", json=with_image(picture(1).data_url()))
    assert r.status_code == 200, r.text
    plain = client.post("/v1/chat/completions", json={**with_image(""), "messages": [
        {"role": "user", "content": "what is this?"}]})
    assert r.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 20  # the picture's tokens


@pytest.mark.parametrize("url, limits, words", [
    ("https://example.com/cat.png", {}, "Only data URLs"),
    ("http://127.0.0.1/secret.png", {}, "never fetches a URL"),
    ("data:text/plain;base64,aGk=", {}, "data:image/<type>;base64"),
    ("data:image/png;base64,not base64!", {}, "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), {}, "not a picture"),
    (None, {"image_pixels": 1000}, "1,920 pixels"),  # 40 x 48
    (None, {"image_bytes": 1000}, "this server takes at most 1,000 bytes"),
])
def test_the_api_refuses_other_urls_and_oversized_pictures(vlm_manager, url, limits, words):
    r = api_client(vlm_manager, **limits).post("/v1/chat/completions", json=with_image(url or picture(1).data_url()))
    error = r.json()["error"]
    assert r.status_code == 400 and words in error["message"], error
    assert error["param"] == "messages[0].content[1].image_url" and "\n" not in error["message"]


def test_the_api_refuses_too_many_pictures_before_decoding_them(vlm_manager):
    body = with_image(picture(1).data_url())
    body["messages"][0]["content"] *= 3
    r = api_client(vlm_manager, images=2).post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "3 images" in r.json()["error"]["message"]


def test_the_api_says_a_text_only_model_reads_text_only(tiny_model_dir):
    manager = ModelManager()
    manager.load(hf_spec(tiny_model_dir))
    try:
        r = api_client(manager).post("/v1/chat/completions", json={**with_image(picture(1).data_url()),
                                                                     "stream": True})
        assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"]
    finally:
        manager.unload()
