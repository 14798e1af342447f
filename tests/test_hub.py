"""Models by hub id: resolved through huggingface_hub's real cache, offline (nothing can be
downloaded here), listed for the model dropdown, and failures explained."""

import io

import pytest

from backends import create
from backends.base import BackendError, GenerationParams, Message, ModelSpec
from backends.hub import _tqdm_for, cached_models, hub_advice
from backends.locate import embedded_gguf, locate
from conftest import make_hub_cache


@pytest.mark.parametrize(
    "text, path, gguf, rev",
    [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", None, None),
        ("Qwen/Qwen2.5-7B-Instruct@v1.0", "Qwen/Qwen2.5-7B-Instruct", None, "v1.0"),
        ("org/x-GGUF/x.Q4_K_M.gguf", "org/x-GGUF", "x.Q4_K_M.gguf", None),
        ("org/x-GGUF@main/sub/x.gguf", "org/x-GGUF", "sub/x.gguf", "main"),
    ],
)
def test_hub_references(text, path, gguf, rev):
    where = locate(text)
    assert (where.path, where.gguf_file, where.revision, where.local) == (path, gguf, rev, False)


def test_transformers_loads_a_hub_id_from_the_cache(offline_hub, tiny_model_dir):
    files = {p.name: p for p in tiny_model_dir.iterdir() if p.is_file()}
    make_hub_cache(offline_hub, "confab/tiny-llama", files)
    spec = ModelSpec(name="tiny from hub", backend="transformers", model="confab/tiny-llama", device="cpu")
    backend = create(spec)
    seen = []
    backend.load(spec, progress=lambda f, d: seen.append(d))
    chunks = list(backend.stream([Message("user", "hello")], GenerationParams(do_sample=False, max_new_tokens=5)))
    assert chunks[-1].usage.completion_tokens == 5
    assert any("confab/tiny-llama" in d for d in seen)
    backend.unload()


def test_llamacpp_loads_a_gguf_from_a_hub_repo(offline_hub):
    gguf = embedded_gguf()
    make_hub_cache(offline_hub, "confab/smol-GGUF", {gguf.name: gguf})
    spec = ModelSpec(name="smol", backend="llamacpp", model=f"confab/smol-GGUF/{gguf.name}", n_ctx=512)
    backend = create(spec)
    backend.load(spec)
    assert backend.path.endswith(gguf.name) and str(offline_hub) in backend.path
    backend.unload()


def test_cached_models_are_listed_for_the_dropdown(offline_hub, tiny_model_dir):
    make_hub_cache(offline_hub, "confab/tiny-llama", {"config.json": tiny_model_dir / "config.json"})
    gguf = embedded_gguf()
    make_hub_cache(offline_hub, "confab/smol-GGUF", {gguf.name: gguf})
    assert set(cached_models()) == {"confab/tiny-llama", f"confab/smol-GGUF/{gguf.name}"}


def test_missing_model_offline_names_it_and_says_what_to_do(offline_hub):
    spec = ModelSpec(name="x", backend="transformers", model="confab/not-downloaded", device="cpu")
    with pytest.raises(BackendError) as err:
        create(spec).load(spec)
    assert "confab/not-downloaded" in str(err.value) and "offline" in str(err.value)


@pytest.mark.parametrize(
    "kind, words",
    [("GatedRepoError", "HF_TOKEN"), ("RepositoryNotFoundError", "no model"),
     ("RevisionNotFoundError", "revision"), ("LocalEntryNotFoundError", "offline")],
)
def test_hub_errors_become_advice(kind, words):
    error = type(kind, (Exception,), {})("boom")
    assert words in hub_advice("org/model", error)


def test_download_progress_reaches_the_progress_function():
    seen = []
    bar = _tqdm_for(lambda f, d: seen.append((f, d)), "org/model")(total=100, file=io.StringIO())
    for _ in range(4):
        bar.update(25)
    bar.close()
    assert seen[-1] == (1.0, "Downloading org/model") and len(seen) == 4
