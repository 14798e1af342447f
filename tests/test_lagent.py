"""lagent's LMDeploy wrappers end to end on CPU: the pipeline on the embedded model (llama.cpp),
the client against real OpenAI-compatible servers (llama-cpp-python's and Confab's own), the
server wrapper starting and stopping one. LMDeploy itself needs a GPU: there the wrappers must
construct and say what to install."""

import time

import psutil
import pytest

from backends.base import BackendError, Message, ParamError
from backends.locate import embedded_gguf
from confab import INTERNLM2_META, LMDeployClient, LMDeployPipeline, LMDeployServer, ModelStatusCode, TritonClient
from test_openai_backend import llama_server, server_command  # noqa: F401 - a real server fixture

pytestmark = pytest.mark.timeout(300)
GREEDY = dict(max_new_tokens=32, top_k=1, temperature=0)
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def pipeline():
    llm = LMDeployPipeline("embedded", meta_template=INTERNLM2_META, stop_words=["<|im_end|>"], **GREEDY)
    yield llm
    llm.close()


def test_pipeline_generates_one_and_a_batch(pipeline):
    one = pipeline.generate("What is the capital of France? Answer in one sentence.")
    assert "Paris" in one
    batch = pipeline.generate(["What is the capital of France? Answer in one sentence.", "Name a colour."])
    assert isinstance(batch, list) and len(batch) == 2 and batch[0] == one and batch[1]
    assert pipeline.generate("Count to ten.", max_new_tokens=3) != one  # per-call overrides


def test_stream_chat_yields_lagent_statuses(pipeline):
    events = list(pipeline.stream_chat(PARIS))
    statuses = [s for s, _, _ in events]
    assert statuses[:-1] == [ModelStatusCode.STREAM_ING] * (len(events) - 1) and statuses[-1] == ModelStatusCode.END
    texts = [t for _, t, _ in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # lagent streams the reply so far
    assert "Paris" in texts[-1] and events[-1][2] is None
    assert pipeline.chat(PARIS) == texts[-1]
    assert pipeline.chat([PARIS, [{"role": "user", "content": "Name a colour."}]])[0] == texts[-1]


def test_meta_template_is_honoured(pipeline):
    prompt = pipeline.manager.render([Message("system", "S"), Message("user", "Hi"), Message("tool", "42")])
    assert prompt.text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>environment\n42<|im_end|>\n<|im_start|>assistant\n")
    old_style = [dict(role="system", begin="<|System|>:", end="\n"), dict(role="user", begin="<|User|>:", end="<eoh>\n"),
                 dict(role="assistant", begin="<|Bot|>:", end="<eoa>\n", generate=True)]
    llm = LMDeployPipeline("embedded", meta_template=old_style, **GREEDY)
    assert llm.gen_params["stop_words"] == ["<eoa>"]  # the assistant's end marker ends a reply
    try:
        assert llm.manager.render([Message("user", "Hi")]).text == "<|User|>:Hi<eoh>\n<|Bot|>:"
        with pytest.raises(ParamError, match="Role 'environment' is not in this model's template"):
            llm.chat([{"role": "environment", "content": "x"}])
    finally:
        llm.close()


def test_bad_settings_are_refused_at_once():
    with pytest.raises(ParamError, match="unknown settings beam"):
        LMDeployPipeline("embedded", beam=4)
    with pytest.raises(ParamError, match="top_p must be above 0"):
        LMDeployPipeline("embedded", top_p=0)
    with pytest.raises(ParamError, match="url must be the server's address"):
        LMDeployClient("localhost:23333", "m")


def test_lmdeploy_is_needed_only_when_used():
    llm = LMDeployPipeline("internlm/internlm2_5-7b-chat", model_name="internlm2", tp=1)  # constructs here
    assert llm.spec.backend == "lmdeploy" and llm.spec.engine == {"tp": 1}
    with pytest.raises(BackendError, match="requirements-lmdeploy.txt|only on a GPU"):
        llm.generate("hi")
    server = LMDeployServer("internlm/internlm2_5-7b-chat", server_port=23999)
    with pytest.raises(BackendError, match="requirements-lmdeploy.txt"):
        server.generate("hi")


def test_triton_client_points_to_the_replacement():
    with pytest.raises(BackendError, match=r"removed .* v0\.5\.2.*LMDeployClient"):
        TritonClient("127.0.0.1:33337", "internlm2")


def test_client_with_a_meta_template_uses_completions(llama_server):  # noqa: F811
    llm = LMDeployClient(llama_server.base_url.removesuffix("/v1"), meta_template=INTERNLM2_META, **GREEDY)
    try:
        reply = llm.chat(PARIS)
        assert "Paris" in reply and "<|im_end|>" not in reply
        assert llm.manager.describe()["backend"] == "openai"
        events = list(llm.stream_chat(PARIS))
        assert events[-1][0] == ModelStatusCode.END and events[-1][1] == reply
    finally:
        llm.close()


def test_client_against_confabs_own_api(app):
    llm = LMDeployClient(app.url, model_name="smollm2-llamacpp", **GREEDY)
    try:
        assert "Paris" in llm.chat(PARIS)
        assert llm.generate(["Name a colour.", "Name a fruit."])[1]
    finally:
        llm.close()
    down = LMDeployClient("http://127.0.0.1:9", model_name="x")
    events = list(down.stream_chat(PARIS))
    assert events == [(ModelStatusCode.SERVER_ERR, events[0][1], None)] and "Cannot reach" in events[0][1]


def test_server_starts_and_stops_its_engine():
    command = [c.replace(str(embedded_gguf()), "{model}") for c in server_command(1024)]
    llm = LMDeployServer(str(embedded_gguf()), server_name="127.0.0.1", server_port=0, server_command=command, **GREEDY)
    try:
        assert "Paris" in llm.generate("What is the capital of France? Answer in one sentence.")
        pid = llm.manager._backend.server.proc.pid
        assert psutil.pid_exists(pid)
    finally:
        llm.close()
    time.sleep(0.5)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
