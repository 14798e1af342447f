"""LMDeploy in process: `lmdeploy.pipeline` with the TurboMind or PyTorch engine, on GPUs.

The preset's `[engine]` table becomes `TurbomindEngineConfig` / `PytorchEngineConfig` (its
`backend` key picks which; unknown keys are refused with the class's own field list), and
`GenerationParams` becomes `GenerationConfig` with `do_sample` set from the sampling settings
(LMDeploy's default is greedy, which silently ignores temperature). Each reply runs in its own
LMDeploy session; closing the stream aborts it in the engine. lmdeploy is imported in `load`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import sys
from typing import Any, Iterator

from . import register, zerogpu
from .base import BackendError, Cancel, GenerationParams, Message, ModelSpec, ProgressFn, Usage
from .hub import download
from .locate import Location, locate
from .prompting import EngineTemplated
from .templates import is_source, render_text, resolve, template_context

log = logging.getLogger(__name__)
INSTALL_HINT = (
    "LMDeploy is not installed here: on a machine with an NVIDIA GPU, run "
    "pip install -r requirements-lmdeploy.txt (see the README's LMDeploy section)."
)
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16"}


def _import_engine() -> Any:
    try:
        import lmdeploy
    except ImportError as e:
        raise BackendError(INSTALL_HINT) from e
    return lmdeploy


def generation_config_kwargs(params: GenerationParams) -> dict[str, Any]:
    """GenerationParams -> lmdeploy.GenerationConfig keyword arguments."""
    return {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": not params.greedy,  # lmdeploy defaults to greedy and then ignores the knobs below
        "temperature": params.temperature if not params.greedy else 1.0,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "random_seed": params.seed,
        "stop_words": list(params.stop) or None,
    }


def engine_config(spec: ModelSpec, messages_module: Any) -> Any:
    """The preset's [engine] table -> TurbomindEngineConfig or PytorchEngineConfig."""
    engine = dict(spec.engine)
    kind = engine.pop("backend", "turbomind")
    classes = {"turbomind": messages_module.TurbomindEngineConfig, "pytorch": messages_module.PytorchEngineConfig}
    if kind not in classes:
        raise BackendError(f"{spec.name}: engine backend must be turbomind or pytorch, got {kind!r}.")
    cls = classes[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(engine) - known)
    if unknown:
        raise BackendError(
            f"{spec.name}: {', '.join(map(repr, unknown))} is not a {cls.__name__} setting; "
            f"known ones: {', '.join(sorted(known))}."
        )
    if spec.n_ctx:
        engine.setdefault("session_len", spec.n_ctx)
    engine.setdefault("enable_prefix_caching", True)  # reuse the KV cache of earlier turns
    if spec.dtype in DTYPES:
        engine.setdefault("dtype", DTYPES[spec.dtype])
    if spec.gpu_id is not None and "devices" in known:
        engine.setdefault("devices", [spec.gpu_id])
    try:
        return cls(**engine)
    except (TypeError, ValueError) as e:
        raise BackendError(f"{spec.name}: LMDeploy refused the engine settings ({e}).") from e


NEEDS_GPU = "needs an NVIDIA GPU with CUDA"
# Where a machine with an NVIDIA driver shows it (Linux; WSL's GPU device), read without importing torch.
NVIDIA_SIGNS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why LMDeploy cannot run on this machine, by cheap signs (for the page's list; checked once),
    or None. A load checks exactly, with torch (`LMDeployBackend.check`)."""
    torch = sys.modules.get("torch")  # already imported: ask it, it is free now
    cuda = torch.cuda.is_available() if torch is not None else any(os.path.exists(p) for p in NVIDIA_SIGNS)
    if not cuda:
        return NEEDS_GPU
    if importlib.util.find_spec("lmdeploy") is None:
        return "not installed: pip install -r requirements-lmdeploy.txt"
    return None


def _require_gpu() -> None:
    try:
        import torch
    except ImportError as e:
        raise BackendError(INSTALL_HINT) from e
    if not torch.cuda.is_available():
        raise BackendError(
            "LMDeploy runs only on a GPU (CUDA) and torch sees none here; use a transformers or llama.cpp "
            "preset on this machine, or point the openai backend at an lmdeploy api_server elsewhere."
        )


@register("lmdeploy")
class LMDeployBackend(EngineTemplated):
    max_concurrent = 64  # TurboMind and the PyTorch engine batch requests themselves
    unavailable = staticmethod(unavailable)

    def __init__(self) -> None:
        self.pipe: Any = None
        self.spec: ModelSpec | None = None
        self.n_ctx = 0
        self._messages: Any = None
        self.template = None

    @staticmethod
    def check(spec: ModelSpec) -> Location:
        """Whether LMDeploy can load `spec` here, asked before anything is unloaded: a GPU with CUDA,
        LMDeploy installed, weights it reads. Each failure is one line that says what to do."""
        _require_gpu()
        _import_engine()
        where = locate(spec.model, spec.gguf_file, spec.revision)
        if where.gguf_file:
            raise BackendError(f"LMDeploy does not load GGUF files; use the llamacpp backend for {spec.model}.")
        return where

    def load(self, spec: ModelSpec, progress: ProgressFn | None = None) -> None:
        if zerogpu.active():
            raise BackendError(zerogpu.CANNOT["lmdeploy"])
        where = self.check(spec)
        lmdeploy = _import_engine()
        import lmdeploy.messages as messages

        path = download(where, progress).path
        config = engine_config(spec, messages)
        # A Jinja template (inline or a file, e.g. from lagent's meta_template) is rendered here and
        # sent as a raw prompt; any other name is one of LMDeploy's own templates.
        local = spec.chat_template and (is_source(spec.chat_template) or spec.chat_template.endswith(".jinja"))
        self.template = resolve(spec.chat_template) if local else None
        template = lmdeploy.ChatTemplateConfig(model_name=spec.chat_template) if spec.chat_template and not local else None
        engine = "PyTorch" if type(config).__name__.startswith("Pytorch") else "TurboMind"
        progress and progress(0.3, f"Loading weights of {spec.name} into LMDeploy's {engine} engine (it warms up too)")
        try:
            self.pipe = lmdeploy.pipeline(path, backend_config=config, chat_template_config=template,
                                          trust_remote_code=spec.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - engine start-up errors are many and engine-specific
            raise BackendError(f"LMDeploy could not start {spec.name}: {type(e).__name__}: {e}") from e
        self.spec, self._messages = spec, messages
        self.n_ctx = int(getattr(config, "session_len", None) or spec.n_ctx or 0)
        progress and progress(1.0, f"Loaded {spec.name}")

    def unload(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        self.pipe = None

    def _loaded(self) -> bool:
        return self.pipe is not None

    def _deltas(
        self, messages: list[Message], params: GenerationParams, usage: Usage, session_id: str | None,
        cancel: Cancel,
    ) -> Iterator[tuple[str, int]]:
        gen_config = self._messages.GenerationConfig(**generation_config_kwargs(params))
        session = self.pipe.session()
        finished = False
        unhook = cancel.on_set(session.abort)  # stops the request in the engine from the cancelling thread
        try:
            # One prompt: the conversation, or with a Confab-rendered template the finished text.
            # (LMDeploy's own templates are not given `thinking`; a Confab-rendered one is.)
            prompt = [m.to_dict() for m in messages] if self.template is None else \
                render_text(self.template, messages, **template_context(thinking=params.thinking))
            outputs = self.pipe.stream_infer(prompt, sessions=session, gen_config=gen_config,
                                             do_preprocess=self.template is None)
            for out in outputs:
                usage.prompt_tokens = out.input_token_len or usage.prompt_tokens
                if out.finish_reason == "error":
                    raise BackendError(f"LMDeploy failed while answering: {out.error_message or 'engine error'}")
                finished = out.finish_reason is not None
                yield out.text or "", out.generate_token_len
        finally:
            unhook()
            if not finished:
                session.abort()  # stop the request in the engine, not just here
            session.close()

    def describe(self) -> dict[str, Any]:
        engine = dict(self.spec.engine) if self.spec else {}
        return {
            "backend": self.name,
            "model": self.spec.name if self.spec else None,
            "device": f"cuda ({engine.get('backend', 'turbomind')}, tp={engine.get('tp', 1)})",
            "n_ctx": self.n_ctx,
        }
