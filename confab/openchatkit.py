"""OpenChatKit's `ChatModel`: raw `<human>:` / `<bot>:` prompts in, the bot's reply out.

The caller formats the conversation itself (OpenChatKit's Conversation class does), so the
prompt goes to the engine as it is (the built-in "raw" template); generation stops at the
next human turn. Knows the manager and presets, not Gradio or HTTP.
"""

from __future__ import annotations

from typing import Callable

from backends.base import GenerationParams, Message, ModelSpec
from backends.locate import guess_backend
from backends.manager import ModelManager
from chat.reply import Text


class ChatModel:
    human_id = "<human>"
    bot_id = "<bot>"

    def __init__(self, model_name: str, gpu_id: int = 0, max_memory: dict | None = None,
                 load_in_8bit: bool = False, backend: str | None = None) -> None:
        backend = backend or guess_backend(model_name)
        self.spec = ModelSpec(
            name=model_name, backend=backend, model=model_name, chat_template="raw",
            gpu_id=gpu_id if backend == "transformers" and _cuda() else None,
            max_memory=max_memory if backend == "transformers" else None,
            quantization="8bit" if load_in_8bit else "none", stop=(f"{self.human_id}:",),
        )
        self.manager = ModelManager()
        self.manager.load(self.spec)

    def do_inference(self, prompt: str, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                     stream_callback: Callable[[str], None] | None = None) -> str:
        """The reply to `prompt` (without the prompt), cut before the next human turn."""
        params = GenerationParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, stop=(f"{self.human_id}:",))
        reply = self.manager.reply([Message("user", prompt)], params)
        try:
            for event in reply:
                if isinstance(event, Text) and stream_callback is not None:
                    stream_callback(event.text)
        finally:
            reply.cancel()  # a callback that raises stops the engine too (a no-op once it ended)
        return reply.result()

    def close(self) -> None:
        self.manager.unload()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
