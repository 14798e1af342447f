"""Pictures on the llama.cpp backend: a GGUF and its vision projector (mmproj), read by libmtmd.

The test run writes a tiny random SmolVLM (Idefics3) pair with the `gguf` package's writer, laid
out as llama.cpp's own converter writes them (checked against `convert_hf_to_gguf.py` and its
`--mmproj` run on tests/test_vision.py's tiny Idefics3: the same keys, tensor names and shapes).
The converter itself is not used: it lives only in llama.cpp's source (a 76 MB sdist), and on a
tiny tokenizer it wants sentencepiece and a known pre-tokenizer hash. A 2-layer Llama reads
pictures through a 1-layer vision tower whose 64-pixel preprocessing cuts a picture into 2 x 2
tiles of 32 pixels plus an overview, 4 tokens each.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

from backends.base import BackendError, Cancel, GenerationParams, ImageData, Message, ModelSpec, ParamError
from conftest import loaded, loaded_backend, make_hub_cache

pytestmark = pytest.mark.timeout(120)
GREEDY = GenerationParams(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
TEMPLATE = (  # as SmolVLM's: content is a list of parts (a plain string renders as nothing)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>", "<global-img>",
            "<end_of_utterance>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TEXT, VISION, PATCH, TILE = 64, 32, 8, 32  # text and vision widths, patch and tile sizes in pixels


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the text of each of the 256 byte tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_text_gguf(path: Path, rng, paragraph_token: bool = True) -> None:
    import numpy as np
    from gguf import GGUFWriter

    pair = "Ċ" if paragraph_token else "Ġ"  # "\n\n" is a token: Idefics3 opens a picture with it
    tokens = SPECIALS + byte_tokens() + [pair * 2]
    w = GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 2, "context_length": 1024, "embedding_length": TEXT,
                       "feed_forward_length": 2 * TEXT, "attention.head_count": 4, "attention.head_count_kv": 2,
                       "rope.dimension_count": 16, "vocab_size": len(tokens)}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32("general.file_type", 0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_array("tokenizer.ggml.merges", [f"{pair} {pair}"])
    for key, token in {"bos": "<|endoftext|>", "eos": "<|im_end|>", "padding": "<|endoftext|>"}.items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(token))
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", TEMPLATE)

    def weight(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    output = weight(len(tokens), TEXT)
    output[: len(SPECIALS)] = 0  # control tokens (the end of a turn among them) never win: replies run full length
    w.add_tensor("token_embd.weight", weight(len(tokens), TEXT))
    w.add_tensor("output.weight", output)
    w.add_tensor("output_norm.weight", np.ones(TEXT, np.float32))
    for i in range(2):
        for name, shape in {"attn_q": (TEXT, TEXT), "attn_k": (TEXT // 2, TEXT), "attn_v": (TEXT // 2, TEXT),
                            "attn_output": (TEXT, TEXT), "ffn_gate": (2 * TEXT, TEXT), "ffn_up": (2 * TEXT, TEXT),
                            "ffn_down": (TEXT, 2 * TEXT)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape, scale=0.2))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(TEXT, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(TEXT, np.float32))
    _finish(w)


def write_mmproj_gguf(path: Path, rng) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "clip")
    w.add_string("general.type", "mmproj")
    w.add_uint32("general.file_type", 0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "idefics3")
    w.add_bool("clip.use_gelu", True)
    for key, value in {"projection_dim": TEXT, "image_size": TILE, "patch_size": PATCH, "embedding_length": VISION,
                       "feed_forward_length": 2 * VISION, "block_count": 1, "attention.head_count": 2,
                       "projector.scale_factor": 2, "preproc_image_size": 2 * TILE}.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def weight(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("v.patch_embd.weight", weight(VISION, 3, PATCH, PATCH))
    w.add_tensor("v.patch_embd.bias", weight(VISION))
    w.add_tensor("v.position_embd.weight", weight((TILE // PATCH) ** 2, VISION))
    for name, shape in {"attn_q": (VISION, VISION), "attn_k": (VISION, VISION), "attn_v": (VISION, VISION),
                        "attn_out": (VISION, VISION), "ffn_up": (2 * VISION, VISION),
                        "ffn_down": (VISION, 2 * VISION)}.items():
        w.add_tensor(f"v.blk.0.{name}.weight", weight(*shape))
        w.add_tensor(f"v.blk.0.{name}.bias", weight(shape[0]))
    for norm in ("v.blk.0.ln1", "v.blk.0.ln2", "v.post_ln"):
        w.add_tensor(f"{norm}.weight", np.ones(VISION, np.float32))
        w.add_tensor(f"{norm}.bias", np.zeros(VISION, np.float32))
    w.add_tensor("mm.model.fc.weight", weight(TEXT, 4 * VISION, scale=2.0))  # loud pictures: they steer the reply
    _finish(w)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_tiny_vision_gguf(folder: Path) -> tuple[Path, Path]:
    """A tiny random SmolVLM as llama.cpp reads it: (model GGUF, mmproj GGUF)."""
    import numpy as np

    rng = np.random.default_rng(0)
    model, mmproj = folder / "tiny-vlm-f32.gguf", folder / "mmproj-tiny-vlm-f32.gguf"
    write_text_gguf(model, rng)
    write_mmproj_gguf(mmproj, rng)
    return model, mmproj


def picture(seed: int, size=(40, 48)) -> ImageData:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return ImageData(buf.getvalue(), "image/png", size[0], size[1], f"picture-{seed}.png")


def vision_spec(model: Path, mmproj_file: str | None = None) -> ModelSpec:
    return ModelSpec(name="tiny vision", backend="llamacpp", model=str(model),
                     mmproj_file=mmproj_file or f"mmproj-{model.name}", n_ctx=1024, n_threads=1,  # tiny: one is fastest
                     engine={"parallel": 4})


def load(spec: ModelSpec) -> None:
    from backends import create

    backend = create(spec)
    backend.load(spec)
    backend.unload()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_vision_gguf(tmp_path_factory.mktemp("tiny-vlm-gguf"))


@pytest.fixture(scope="module")
def vlm(tiny_gguf):
    with loaded_backend(vision_spec(tiny_gguf[0])) as backend:
        yield backend


def ask(backend, messages, session="s", params=GREEDY):
    chunks = list(backend.stream(messages, params, session_id=session))
    return "".join(c.text for c in chunks), chunks[-1]


def about(seed: int, text: str = "what is this?") -> list[Message]:
    return [Message("user", text, images=(picture(seed),))]


def fresh(backend, messages):
    """The reply with nothing cached (every idle conversation forgotten first)."""
    backend.engine.forget_all()
    return ask(backend, messages, session=None)[0]


# ---- loading -----------------------------------------------------------------------------------

def test_a_gguf_with_its_mmproj_takes_pictures(vlm, tiny_gguf):
    assert vlm.takes_images and vlm.template.parts  # the template's content parts were found by a probe
    assert vlm.describe()["mmproj"] == str(tiny_gguf[1])
    prompt = vlm.render(about(1, "what is <__media__> this?"))
    assert [p.end - p.start for p in prompt.images] == [4] * 5  # 2 x 2 tiles and the overview; typed text stays text
    assert prompt.text.startswith("<|im_start|>user\n<__media__>what is <__media__> this?<|im_end|>")
    assert all(t < 0 for p in prompt.images for t in prompt.token_ids[p.start:p.end])
    assert len({prompt.token_ids[p.start] for p in prompt.images}) == 5  # each tile is itself
    assert prompt.public_tokens <= prompt.images[0].start and prompt.token_ids[-1] >= 0


def test_a_missing_or_broken_projector_is_a_clear_error(tiny_gguf, tmp_path):
    model, _ = tiny_gguf
    with pytest.raises(BackendError, match="no vision projector at .*nothing.gguf"):
        load(vision_spec(model, mmproj_file="nothing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really")
    with pytest.raises(BackendError, match="could not load the vision projector .*junk.gguf"):
        load(vision_spec(model, mmproj_file=str(junk)))
    with pytest.raises(ParamError, match="mmproj_file must name a .gguf"):
        ModelSpec(name="x", backend="llamacpp", model="embedded", mmproj_file="mmproj.bin")


def test_a_vocabulary_without_the_pictures_wrapping_tokens_is_refused(tiny_gguf, tmp_path):
    import numpy as np

    model = tmp_path / "no-paragraphs.gguf"
    write_text_gguf(model, np.random.default_rng(0), paragraph_token=False)
    with loaded_backend(vision_spec(model, mmproj_file=str(tiny_gguf[1]))) as backend:
        with pytest.raises(BackendError, match="vocabulary lacks the tokens its vision projector puts around a picture"):
            backend.prepare(about(1), GREEDY)
        assert ask(backend, [Message("user", "hello")])[1].finish_reason == "length"  # text still works


def test_a_projector_made_for_another_model_is_refused(tiny_gguf):
    spec = ModelSpec(name="mismatch", backend="llamacpp", model="embedded", mmproj_file=str(tiny_gguf[1]), n_ctx=512)
    with pytest.raises(BackendError, match="vision projector"):  # SmolLM2 is 576 wide, the projector makes 64
        load(spec)


def test_the_preset_fetches_both_files_from_its_hub_repo(tiny_gguf, offline_hub):
    from presets import load_model_presets

    spec = load_model_presets()["smolvlm-256m-llamacpp"]
    make_hub_cache(offline_hub, spec.model, {spec.gguf_file: tiny_gguf[0], spec.mmproj_file: tiny_gguf[1]})
    with loaded_backend(spec.replace(n_ctx=1024)) as backend:  # the files are tiny stand-ins, named as the repo's
        assert backend.takes_images and backend.describe()["mmproj"].endswith(spec.mmproj_file)


# ---- replies -----------------------------------------------------------------------------------

def test_the_picture_reaches_the_model(vlm):
    replies = [fresh(vlm, about(seed)) for seed in (1, 2, 3)]
    assert len(set(replies)) == 3, replies  # different pictures, different greedy replies
    assert fresh(vlm, about(2)) == replies[1]  # the same picture, the same reply
    assert fresh(vlm, [Message("user", "what is this?")]) not in replies


def test_a_text_follow_up_reuses_the_picture_from_the_cache(vlm):
    first = about(4)
    said, _ = ask(vlm, first, session="follow")
    second = first + [Message("assistant", said), Message("user", "and the colours?")]
    again, last = ask(vlm, second, session="follow")
    assert last.usage.cached_tokens > vlm.render(first).images[-1].end
    assert again == fresh(vlm, second)  # the same reply as with no cache at all


def test_another_picture_of_the_same_size_is_never_taken_from_the_cache(vlm):
    ask(vlm, about(5), session="swap")
    text, last = ask(vlm, about(6), session="swap")
    assert last.usage.cached_tokens <= vlm.render(about(6)).images[0].start
    assert text == fresh(vlm, about(6))


def test_a_second_picture_later_in_the_chat(vlm):
    first = about(8)
    said, _ = ask(vlm, first, session="two")
    second = first + [Message("assistant", said), Message("user", "and this one?", images=(picture(9),))]
    text, last = ask(vlm, second, session="two")
    assert len(vlm.render(second).images) == 10
    assert last.usage.cached_tokens > vlm.render(first).images[-1].end
    assert text == fresh(vlm, second)


def test_replies_with_and_without_pictures_are_batched_and_stay_apart(vlm):
    conversations = {"one": about(11), "two": about(12), "text": [Message("user", "hello there")]}
    alone = {name: fresh(vlm, messages) for name, messages in conversations.items()}
    vlm.engine.forget_all()
    together = {}

    def run(name):
        together[name] = ask(vlm, conversations[name], session=name)[0]

    threads = [threading.Thread(target=run, args=(name,)) for name in conversations]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone


def test_a_reply_about_a_picture_stops_on_cancel(vlm):
    cancel = Cancel()
    job = vlm.prepare(about(13, "describe it"), GREEDY.replace(max_new_tokens=400))
    chunks = []
    for chunk in vlm.run(job, "cancel", cancel):
        chunks.append(chunk)
        if len(chunks) == 2:
            threading.Timer(0, cancel.set).start()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].usage.completion_tokens < 400
    time.sleep(0.2)
    assert all(slot.request is None for slot in vlm.engine.slots)


def test_a_broken_picture_ends_only_its_own_reply(vlm):
    broken = ImageData(picture(1).data[:60], "image/png", 40, 48, "cut.png")  # a PNG cut short
    with pytest.raises(ParamError, match="cut.png"):
        ask(vlm, [Message("user", "what is this?", images=(broken,))])
    assert ask(vlm, about(1))[1].finish_reason == "length"


def test_a_text_only_gguf_still_refuses_a_picture_in_one_line(llama_backend):
    with pytest.raises(ParamError, match=r"^SmolLM2-135M-Instruct \(llama.cpp, embedded\) reads text only") as err:
        llama_backend.prepare(about(1), GREEDY)
    assert "\n" not in str(err.value)


def test_the_api_takes_a_picture_for_a_llamacpp_vision_model(tiny_gguf):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.openai_api import build_router
    from web.policy import Limits

    def body(*parts):
        return {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, *parts]}]}

    with loaded(vision_spec(tiny_gguf[0])) as manager:
        app = FastAPI()
        app.include_router(build_router(manager, lambda: "tiny", Limits()))
        client = TestClient(app)
        r = client.post("/v1/chat/completions", json=body({"type": "image_url", "image_url": {
            "url": picture(1).data_url()}}))
        plain = client.post("/v1/chat/completions", json=body())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 5 * 4  # 5 tiles, and wrapping
