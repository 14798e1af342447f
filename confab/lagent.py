"""lagent's LMDeploy wrappers on Confab's engines: `LMDeployPipeline`, `LMDeployServer`,
`LMDeployClient` (and `TritonClient`, which only explains where it went).

    llm = LMDeployPipeline("internlm/internlm2_5-7b-chat", meta_template=INTERNLM2_META,
                           max_new_tokens=256, stop_words=["<|im_end|>"])
    print(llm.generate("Hi"))
    for status, text, _ in llm.stream_chat([{"role": "user", "content": "Hi"}]):
        ...

The pipeline runs on LMDeploy where it is installed (an NVIDIA GPU); given "embedded" or a
.gguf file it runs on llama.cpp, so agent scripts can be tried on a laptop. The server starts
`lmdeploy serve api_server` and the client talks to a running one, both over the OpenAI
API. A `meta_template` (lagent's role begin/end list) becomes a chat template that Confab
renders itself. Models load on first use, so the wrappers construct anywhere and say what to
install when used. Knows the manager, not Gradio.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from typing import Any, Iterator

from backends.base import BackendError, GenerationParams, Message, ModelSpec, ParamError
from chat.reply import Text
from backends.locate import guess_backend
from backends.manager import ModelManager

from ._models import open_model

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "environment": "tool", "tool": "tool"}


class ModelStatusCode(IntEnum):
    """lagent's statuses: negative ones are errors."""

    END = 0
    STREAM_ING = 1
    SERVER_ERR = -1
    SESSION_CLOSED = -2
    SESSION_OUT_OF_LIMIT = -3
    SESSION_INVALID_ARG = -4
    SESSION_READY = 2


def meta_template_source(meta_template: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """lagent's meta_template -> (Jinja chat template, roles it defines). Each entry is
    {role, begin, end, generate?}; `begin` may be lagent's {with_name, without_name} form."""
    table: dict[str, tuple[str, str]] = {}
    generate = None
    for item in meta_template:
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            raise ParamError(f"meta_template entries need a role among {', '.join(ROLES)}; got {item!r}.")
        begin = item.get("begin", "")
        if isinstance(begin, dict):
            begin = begin.get("without_name", "")
        table[ROLES[item["role"]]] = (str(begin), str(item.get("end", "")))
        if item.get("generate"):
            generate = ROLES[item["role"]]
    generate = generate or "assistant"
    if generate not in table:
        raise ParamError("meta_template has no assistant entry to generate with.")
    literal = json.dumps(table)  # a JSON object is a valid Jinja dict literal
    source = (
        f"{{% set roles = {literal} %}}{{% for m in messages %}}{{{{ roles[m['role']][0] }}}}"
        "{{ m['content'] }}{{ roles[m['role']][1] }}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ roles[{json.dumps(generate)}][0] }}}}{{% endif %}}"
    )
    return source, list(table)


class _LagentLLM:
    """What lagent's BaseLLM gives every wrapper: generation settings, generate, stream_chat, chat."""

    def __init__(self, spec: ModelSpec, meta_template: list[dict] | None = None, max_new_tokens: int = 512,
                 top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8, repetition_penalty: float = 1.0,
                 stop_words: list[str] | str | None = None, do_sample: bool | None = None,
                 manager: ModelManager | None = None) -> None:
        self.meta_template = meta_template
        self.roles = list(ROLES.values())
        if meta_template:
            source, self.roles = meta_template_source(meta_template)
            spec = spec.replace(chat_template=source)
            # The assistant's end marker ends a reply, as the template's own stop word would.
            end = next((str(i.get("end", "")).strip() for i in meta_template if ROLES[i["role"]] == "assistant"), "")
            stop_words = [stop_words] if isinstance(stop_words, str) else list(stop_words or [])
            stop_words += [end] if end and end not in stop_words else []
        self.spec = spec
        self.gen_params = {"max_new_tokens": max_new_tokens, "top_p": top_p, "top_k": top_k,
                           "temperature": temperature, "repetition_penalty": repetition_penalty,
                           "stop_words": [stop_words] if isinstance(stop_words, str) else list(stop_words or [])}
        self.do_sample = do_sample
        self._params()  # bad settings fail now
        self._manager = manager
        self._loading = threading.Lock()

    @property
    def manager(self) -> ModelManager:
        """The model, loaded on first use (once, even when a batch's threads all ask at once)."""
        with self._loading:
            if self._manager is None:
                self._manager, _ = open_model(self.spec)
        return self._manager

    def update_gen_params(self, **kwargs: Any) -> dict[str, Any]:
        """The settings with this call's overrides (lagent's name for it)."""
        unknown = sorted(set(kwargs) - set(self.gen_params) - {"do_sample"})
        if unknown:
            raise ParamError(f"unknown generation settings {', '.join(unknown)}; "
                             f"known: {', '.join([*self.gen_params, 'do_sample'])}.")
        return {**self.gen_params, **kwargs}

    def _params(self, **overrides: Any) -> GenerationParams:
        g = self.update_gen_params(**overrides)
        do_sample = g.pop("do_sample", None)
        if do_sample is None:
            do_sample = self.do_sample
        if do_sample is None:  # lagent's rule: sampling unless top_k is 1 or temperature 0
            do_sample = g["top_k"] != 1 and g["temperature"] > 0
        stop = g.pop("stop_words")
        return GenerationParams(do_sample=do_sample, stop=stop, **g)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, inputs: str | list[str], **kwargs: Any) -> str | list[str]:
        """The reply to one prompt, or a list of replies to a batch (generated together)."""
        batched = not isinstance(inputs, str)
        prompts = list(inputs) if batched else [inputs]
        if not all(isinstance(p, str) for p in prompts):
            raise ParamError("generate() takes a prompt or a list of prompts (text); for messages use chat().")
        params = self._params(**kwargs)
        replies = self._batch([[Message("user", p)] for p in prompts], params)
        return replies if batched else replies[0]

    def stream_chat(self, inputs: list[dict], **kwargs: Any) -> Iterator[tuple[ModelStatusCode, str, None]]:
        """(STREAM_ING, the reply so far, None) while it grows, then (END, the reply, None).
        A failure ends the stream with (SERVER_ERR, what went wrong and what to do, None)."""
        messages, params = self._messages(inputs), self._params(**kwargs)
        try:
            reply = self.manager.reply(messages, params)  # a client's first use connects here
        except BackendError as e:
            yield ModelStatusCode.SERVER_ERR, str(e), None
            return
        try:
            for event in reply:
                if isinstance(event, Text):
                    yield ModelStatusCode.STREAM_ING, reply.text, None
        finally:
            reply.cancel()  # a caller that stops reading stops the engine (a no-op once it ended)
        if reply.error is not None:
            yield ModelStatusCode.SERVER_ERR, str(reply.error), None
            return
        yield ModelStatusCode.END, reply.text, None

    def chat(self, inputs: list[dict] | list[list[dict]], **kwargs: Any) -> str | list[str]:
        """The reply to a conversation (a list of {role, content}), or to each of a batch of them."""
        batched = bool(inputs) and isinstance(inputs[0], list)
        conversations = [self._messages(c) for c in (inputs if batched else [inputs])]
        replies = self._batch(conversations, self._params(**kwargs))
        return replies if batched else replies[0]

    def _reply(self, messages: list[Message], params: GenerationParams) -> str:
        return self.manager.reply(messages, params).result()

    def _batch(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        """Replies to several conversations, in flight together so the engine can batch them."""
        self.manager  # noqa: B018 - load before the threads start, not in each of them
        if len(conversations) == 1:
            return [self._reply(conversations[0], params)]
        with ThreadPoolExecutor(max_workers=len(conversations)) as pool:
            return list(pool.map(lambda c: self._reply(c, params), conversations))

    def _messages(self, inputs: list[dict]) -> list[Message]:
        if not isinstance(inputs, list) or not all(isinstance(m, dict) and "role" in m for m in inputs):
            raise ParamError('Messages must be a list of {"role": ..., "content": ...} dicts.')
        out = []
        for m in inputs:
            role = ROLES.get(m["role"])
            if role is None or role not in self.roles:
                raise ParamError(f"Role {m['role']!r} is not in this model's template; use one of "
                                 f"{', '.join(r for r, v in ROLES.items() if v in self.roles)}.")
            out.append(Message(role, m.get("content", "")))
        return out

    def close(self) -> None:
        if self._manager is not None:
            self._manager.unload()
            self._manager = None


def _split_gen(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    known = {"meta_template", "max_new_tokens", "top_p", "top_k", "temperature", "repetition_penalty",
             "stop_words", "do_sample"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ParamError(f"{owner} got unknown settings {', '.join(unknown)}; it takes {', '.join(sorted(known))}.")
    return kwargs


class LMDeployPipeline(_LagentLLM):
    def __init__(self, path: str, model_name: str | None = None, tp: int = 1, pipeline_cfg: dict | None = None,
                 backend: str | None = None, **kwargs: Any) -> None:
        """`path`: a hub id or folder (LMDeploy), or "embedded" / a .gguf file (llama.cpp).
        `model_name`: LMDeploy's chat template name; `pipeline_cfg`: TurbomindEngineConfig fields."""
        backend = backend or ("llamacpp" if guess_backend(path) == "llamacpp" else "lmdeploy")
        engine = {"tp": tp, **(pipeline_cfg or {})} if backend == "lmdeploy" else {}
        spec = ModelSpec(name=path, backend=backend, model=path, engine=engine,
                         chat_template=model_name if backend == "lmdeploy" else None)
        self.model_name = model_name
        super().__init__(spec, **_split_gen(kwargs, "LMDeployPipeline"))


class LMDeployServer(_LagentLLM):
    def __init__(self, path: str, model_name: str | None = None, server_name: str = "0.0.0.0",
                 server_port: int = 23333, tp: int = 1, log_level: str = "WARNING", serve_cfg: dict | None = None,
                 server_command: list[str] | None = None, **kwargs: Any) -> None:
        """Starts `lmdeploy serve api_server` for `path` on first use and stops it on close().
        `server_command` runs another OpenAI-compatible server instead ({model}, {host}, {port})."""
        server: dict[str, Any] = {"host": server_name, "port": server_port}
        if server_command:
            server["command"] = list(server_command)
        spec = ModelSpec(name=path, backend="lmdeploy-server", model=path, engine={"tp": tp, **(serve_cfg or {})},
                         server=server)
        self.model_name, self.log_level = model_name, log_level
        super().__init__(spec, **_split_gen(kwargs, "LMDeployServer"))


class LMDeployClient(_LagentLLM):
    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        """Talks to a running api_server (or any OpenAI-compatible server) at `url`
        (http://host:port); `model_name` is the served model (None: the first one)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ParamError(f"url must be the server's address, like http://127.0.0.1:23333; got {url!r}.")
        base = url.rstrip("/")
        spec = ModelSpec(name=model_name or base, backend="openai", model=model_name or "auto",
                         base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key)
        self.url, self.model_name = url, model_name
        super().__init__(spec, **_split_gen(kwargs, "LMDeployClient"))


class TritonClient:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise BackendError(
            "TritonClient is gone: LMDeploy removed its Triton inference server path in v0.5.2. Serve the model "
            "with `lmdeploy serve api_server MODEL` and use LMDeployClient('http://host:23333', model_name=...) "
            "(or LMDeployServer to start it from Python)."
        )


INTERNLM2_META = [
    {"role": "system", "begin": "<|im_start|>system\n", "end": "<|im_end|>\n"},
    {"role": "user", "begin": "<|im_start|>user\n", "end": "<|im_end|>\n"},
    {"role": "assistant", "begin": "<|im_start|>assistant\n", "end": "<|im_end|>\n", "generate": True},
    {"role": "environment", "begin": "<|im_start|>environment\n", "end": "<|im_end|>\n"},
]
