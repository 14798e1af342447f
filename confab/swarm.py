"""swarm_models' `BaseLLM` on Confab's engines: run / arun / batch_run / abatch_run / chat, with
speed metrics, logging, JSON checkpoints and resource tracking.

    llm = BaseLLM("embedded", max_tokens=64, temperature=0.2)
    print(llm("Name three colours."))
    print(llm.metrics())          # tokens/s, time to first token, generation time

`abatch_run` is really concurrent: its replies are admitted together by the manager and batched
by engines that can (llama.cpp: up to 8 at once). Knows the manager, not Gradio or HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from backends.base import GenerationParams, Message, ParamError, Usage

from ._models import open_model

# swarm_models' settings Confab's engines have no use for; a script may pass them, and is told
# once, in the log, that they do nothing here.
_IGNORED = ("beam_width", "num_return_sequences", "frequency_penalty", "presence_penalty", "length_penalty",
            "early_stopping", "num_beams", "pad_token_id", "eos_token_id", "bos_token_id", "freq_penalty",
            "stop_token_id", "max_length", "role", "device", "model_id")
_SETTINGS = ("max_tokens", "temperature", "top_k", "top_p", "system_prompt", "seed", "stop_token", "do_sample",
             "repetition_penalty")


class BaseLLM:
    def __init__(self, model_name: Any = "embedded", max_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, system_prompt: str | None = None,
                 seed: int | None = None, stop_token: str | list[str] | None = None, do_sample: bool | None = None,
                 repetition_penalty: float | None = None, repition_penalty: float | None = None,
                 backend: str | None = None, **kwargs: Any) -> None:
        """`model_name`: a preset name, "embedded", a .gguf path, a folder or hub id, a ModelSpec
        or a loaded ModelManager. Settings left as None take the model preset's defaults."""
        self.log = logging.getLogger(f"confab.swarm.{id(self):x}")
        unknown = sorted(set(kwargs) - set(_IGNORED))
        if unknown:
            raise ParamError(f"BaseLLM got unknown settings {', '.join(unknown)}; it takes {', '.join(_SETTINGS)}.")
        ignored = sorted(k for k, v in kwargs.items() if v not in (None, False, 1))
        if ignored:
            self.log.warning("BaseLLM: %s have no effect on Confab's engines", ", ".join(ignored))
        self.manager, self._owns_model = open_model(model_name, backend)
        self.model_name = model_name if isinstance(model_name, str) else self.manager.spec.name
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k, top_p
        self.system_prompt, self.seed, self.stop_token, self.do_sample = system_prompt, seed, stop_token, do_sample
        self.repetition_penalty = repetition_penalty if repetition_penalty is not None else repition_penalty
        self.params()  # bad settings fail here, not at the first run
        self.history: list[dict[str, str]] = []
        self.last_usage: Usage | None = None
        self._log_handler: logging.Handler | None = None

    # ---- settings ------------------------------------------------------------------------------
    def params(self, **overrides: Any) -> GenerationParams:
        values = {
            "max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_k": self.top_k,
            "top_p": self.top_p, "seed": self.seed, "stop": self.stop_token, "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if "max_tokens" in overrides:
            overrides["max_new_tokens"] = overrides.pop("max_tokens")
        if "stop_token" in overrides:
            overrides["stop"] = overrides.pop("stop_token")
        values.update(overrides)
        return GenerationParams.from_dict({k: v for k, v in values.items() if v is not None},
                                          base=self.manager.default_params())

    def set_temperature(self, value: float) -> None:
        self.temperature = value
        self.params()

    def set_max_tokens(self, value: int) -> None:
        self.max_tokens = value
        self.params()

    def clear_history(self) -> None:
        self.history.clear()

    # ---- generation ----------------------------------------------------------------------------
    def run(self, task: str, *args: Any, **overrides: Any) -> str:
        """The reply to `task` (one user message after the system prompt)."""
        if args:
            raise ParamError("run() takes the task and keyword settings (max_tokens=..., temperature=...).")
        if not isinstance(task, str):
            raise ParamError(f"task must be text, got {type(task).__name__}.")
        return self._generate([Message("user", task)], self.params(**overrides))

    def __call__(self, task: str, *args: Any, **overrides: Any) -> str:
        return self.run(task, *args, **overrides)

    async def arun(self, task: str, **overrides: Any) -> str:
        return await asyncio.to_thread(self.run, task, **overrides)

    def batch_run(self, tasks: list[str], **overrides: Any) -> list[str]:
        """One reply per task, one after another (see abatch_run for all at once)."""
        return [self.run(task, **overrides) for task in tasks]

    async def abatch_run(self, tasks: list[str], **overrides: Any) -> list[str]:
        """One reply per task, generated concurrently; results in the order of `tasks`."""
        return list(await asyncio.gather(*(self.arun(task, **overrides) for task in tasks)))

    def chat(self, task: str, history: list[dict[str, str]] | str | None = None, **overrides: Any) -> str:
        """A reply in a conversation: `history` (OpenAI-style dicts, or swarm's text transcript)
        or, when None, this object's own `history`, which the exchange is added to."""
        own = history is None
        if isinstance(history, str):  # swarm's form: the transcript goes before the task
            past, task_text = [], f"{history.strip()}\n\n{task}" if history.strip() else task
        else:
            past, task_text = [Message(m["role"], m["content"]) for m in (self.history if own else history)], task
        reply = self._generate([*past, Message("user", task_text)], self.params(**overrides))
        if own:
            self.history += [{"role": "user", "content": task}, {"role": "assistant", "content": reply}]
        return reply

    def _generate(self, messages: list[Message], params: GenerationParams) -> str:
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        reply = self.manager.reply([*system, *messages], params)
        text = reply.result()
        self.last_usage = reply.usage
        if self._log_handler is not None:
            self.log_event(f"generated {reply.usage.completion_tokens} tokens: {self.metrics()}")
        return text

    # ---- metrics ---------------------------------------------------------------------------------
    def _tokens_per_second(self) -> float | None:
        return self.last_usage.tokens_per_s if self.last_usage else None

    def time_to_first_token(self, prompt: str | None = None) -> float | None:
        """Seconds to the first token of the last reply (or of a reply to `prompt`, run now)."""
        if prompt is not None:
            self.run(prompt)
        return self.last_usage.ttft_s if self.last_usage else None

    def get_generation_time(self) -> float | None:
        return self.last_usage.total_s if self.last_usage else None

    def _time_for_generation(self, task: str) -> float:
        start = time.perf_counter()
        self.run(task)
        return time.perf_counter() - start

    def metrics(self) -> dict[str, Any]:
        u = self.last_usage
        return {
            "tokens_per_second": self._tokens_per_second(), "time_to_first_token": u.ttft_s if u else None,
            "generation_time": u.total_s if u else None, "prompt_tokens": u.prompt_tokens if u else 0,
            "completion_tokens": u.completion_tokens if u else 0, "cached_tokens": u.cached_tokens if u else 0,
        }

    def get_num_tokens(self, text: str) -> int:
        return len(self.manager.render([Message("user", text)]).token_ids) or len(text.split())

    # ---- logging -----------------------------------------------------------------------------------
    def enable_logging(self, log_file: str | Path = "model.log") -> None:
        """Write this model's events (one per reply, with its metrics) to `log_file`."""
        self.disable_logging()
        self._log_handler = logging.FileHandler(log_file, encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(self._log_handler)
        self.log.setLevel(logging.INFO)

    def disable_logging(self) -> None:
        if self._log_handler is not None:
            self.log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def log_event(self, event: str, event_type: str = "info") -> None:
        level = logging.getLevelName(event_type.upper())
        if not isinstance(level, int):
            raise ParamError(f"event_type must be debug, info, warning, error or critical, got {event_type!r}.")
        self.log.log(level, event)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint_dir: str | Path = "checkpoints") -> Path:
        """Settings and history as JSON in `checkpoint_dir` (the weights are the model's own files)."""
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{Path(str(self.model_name)).name or 'model'}.checkpoint.json"
        state = {"model_name": str(self.model_name), "settings": {k: getattr(self, k) for k in _SETTINGS},
                 "history": self.history}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(path)  # never a half-written checkpoint
        return path

    def load_checkpoint(self, checkpoint_path: str | Path) -> None:
        path = Path(checkpoint_path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            settings, history = state["settings"], state["history"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ParamError(f"{path} is not a BaseLLM checkpoint ({type(e).__name__}: {e}); "
                             "make one with save_checkpoint().") from None
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise ParamError(f"{path}: unknown settings {', '.join(unknown)}.")
        previous = {k: getattr(self, k) for k in _SETTINGS}
        for key, value in settings.items():
            setattr(self, key, value)
        try:
            self.params()
            checked = [Message(m["role"], m["content"]).to_dict() for m in history]
        except (ParamError, KeyError, TypeError) as e:
            for key, value in previous.items():
                setattr(self, key, value)
            raise ParamError(f"{path}: {e}") from None
        self.history = checked

    # ---- resources -----------------------------------------------------------------------------
    def track_resource_utilization(self) -> dict[str, Any]:
        """CPU and RAM of the machine and this process, and GPU memory where torch sees a GPU."""
        import psutil

        process = psutil.Process()
        memory = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=0.1), "ram_percent": memory.percent,
            "ram_used_mb": round((memory.total - memory.available) / 2**20, 1),
            "process_rss_mb": round(process.memory_info().rss / 2**20, 1), "gpu_memory_mb": _gpu_memory(),
        }

    def close(self) -> None:
        self.disable_logging()
        if self._owns_model:
            self.manager.unload()


def _gpu_memory() -> dict[str, float] | None:
    import sys

    torch = sys.modules.get("torch")  # only if an engine already imported it: importing costs seconds
    if torch is None or not torch.cuda.is_available():
        return None
    return {f"cuda:{i}": round(torch.cuda.memory_allocated(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
