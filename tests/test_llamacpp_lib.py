"""The contract with llama-cpp-python below its public API: every signature, struct field and
result code backends/llamacpp_lib.py relies on, checked on the installed release, then used for
real on the embedded GGUF. A new llama-cpp-python that changes any of them fails here first."""

import ctypes
import inspect
from importlib.metadata import version

import pytest

from backends.llamacpp_lib import DECODE_RESULTS, INVALID_BATCH, NO_KV_SLOT, TESTED_VERSION, Lib, decode_meaning
from backends.locate import embedded_gguf

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp import _internals  # noqa: E402


def test_the_installed_release_is_the_tested_one():
    assert version("llama-cpp-python") == TESTED_VERSION, "bump TESTED_VERSION and requirements.txt together"


@pytest.mark.parametrize("name, argtypes, restype", [
    ("llama_decode", [ctypes.c_void_p, llama_cpp.llama_batch], ctypes.c_int32),
    ("llama_memory_seq_rm", [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_bool),
    ("llama_memory_seq_cp", [ctypes.c_void_p] + [ctypes.c_int32] * 4, None),
    ("llama_token_to_piece", [ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32,
                              ctypes.c_bool], ctypes.c_int32),
    ("llama_vocab_is_eog", [ctypes.c_void_p, ctypes.c_int32], ctypes.c_bool),
])
def test_llama_h_functions_keep_their_ctypes_signatures(name, argtypes, restype):
    fn = getattr(llama_cpp, name)
    assert list(fn.argtypes) == argtypes and fn.restype == restype


def test_llama_batch_keeps_its_fields():
    fields = dict(llama_cpp.llama_batch._fields_)
    assert list(fields) == ["n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits"]
    assert fields["n_tokens"] == ctypes.c_int32
    assert fields["token"] == ctypes.POINTER(ctypes.c_int32) and fields["pos"] == ctypes.POINTER(ctypes.c_int32)
    assert fields["seq_id"] == ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))
    assert fields["logits"] == ctypes.POINTER(ctypes.c_int8)


def test_parameter_structs_keep_the_fields_we_set():
    context = {name for name, _ in llama_cpp.llama_context_params._fields_}
    assert {"n_ctx", "n_batch", "n_ubatch", "n_seq_max", "kv_unified", "n_threads", "n_threads_batch",
            "flash_attn_type"} <= context
    assert "n_gpu_layers" in {name for name, _ in llama_cpp.llama_model_params._fields_}


@pytest.mark.parametrize("cls, method, params", [
    (_internals.LlamaModel, "__init__", ["self", "path_model", "params", "verbose"]),
    (_internals.LlamaContext, "__init__", ["self", "model", "params", "verbose"]),
    (_internals.LlamaBatch, "__init__", ["self", "n_tokens", "embd", "n_seq_max", "verbose"]),
    (_internals.LlamaModel, "tokenize", ["self", "text", "add_bos", "special"]),
    (_internals.LlamaModel, "detokenize", ["self", "tokens", "special"]),
    (_internals.LlamaSampler, "add_penalties", ["self", "n_vocab", "penalty_last_n", "penalty_repeat",
                                                "penalty_freq", "penalty_present"]),
    (_internals.LlamaSampler, "add_top_k", ["self", "k"]),
    (_internals.LlamaSampler, "add_top_p", ["self", "p", "min_keep"]),
    (_internals.LlamaSampler, "add_min_p", ["self", "p", "min_keep"]),
    (_internals.LlamaSampler, "add_temp", ["self", "temp"]),
    (_internals.LlamaSampler, "add_dist", ["self", "seed"]),
    (_internals.LlamaSampler, "add_greedy", ["self"]),
    (_internals.LlamaSampler, "sample", ["self", "ctx", "idx"]),
    (_internals.LlamaSampler, "accept", ["self", "token"]),
])
def test_internal_wrappers_keep_their_signatures(cls, method, params):
    assert list(inspect.signature(getattr(cls, method)).parameters) == params


def test_decode_results_say_what_they_mean():
    assert "KV cache" in decode_meaning(NO_KV_SLOT) and "invalid" in decode_meaning(INVALID_BATCH)
    assert "error -3" in decode_meaning(-3) and set(DECODE_RESULTS) == {1, 2, -1}


@pytest.fixture(scope="module")
def lib_model():
    lib = Lib()
    model = lib.load_model(str(embedded_gguf()))
    yield lib, model
    model.close()


def test_two_sequences_share_cells_decode_and_sample(lib_model):
    lib, model = lib_model
    ctx = lib.context(model, cells=256, n_batch=64, sequences=2, threads=2)
    batch = ctx.batch()
    try:
        ids = model.tokenize("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", special=True)
        assert model.detokenize(ids).startswith("<|im_start|>user")
        row = batch.add(0, ids, 0, logits_last=True)
        assert row == len(ids) - 1 and len(batch) == len(ids)
        assert ctx.decode(batch) == 0
        greedy = ctx.sampler().chain(n_vocab=model.n_vocab, penalty_last_n=64, repetition_penalty=1.0, greedy=True,
                                     top_k=40, top_p=1.0, min_p=0.0, temperature=1.0, seed=1)
        first = greedy.sample(ctx, row)
        ctx.share(0, 1, len(ids))  # sequence 1 reads the same prompt from shared cells
        batch.reset()
        batch.add(0, [first], len(ids), logits_last=True)
        batch.add(1, [first], len(ids), logits_last=True)
        assert [seq for seq, _ in batch.rows()] == [0, 1]
        assert ctx.decode(batch) == 0
        assert greedy.sample(ctx, 0) == greedy.sample(ctx, 1)  # same cells, same next token
        assert model.piece(first) and not model.is_eog(first) and model.is_eog(model.eos())
        ctx.forget(1)
        batch.reset()
        batch.add(0, [model.n_vocab + 10], len(ids) + 1, logits_last=True)  # no such token
        assert ctx.decode(batch) == INVALID_BATCH
        greedy.close()
    finally:
        batch.close()
        ctx.close()


@pytest.mark.parametrize("flash", [True, False])
def test_flash_attention_is_set_either_way_never_left_to_auto(lib_model, flash):
    """llama.cpp's default is "auto", which turns flash attention on wherever it runs; the engine
    turns it off on the CPU (backends/llamacpp_engine.py), so "off" must say DISABLED."""
    lib, model = lib_model
    ctx = lib.context(model, cells=256, n_batch=64, sequences=1, threads=1, flash_attention=flash)
    try:
        assert ctx.raw.params.flash_attn_type == (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    finally:
        ctx.close()
