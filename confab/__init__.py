"""Confab's Python API: the model interfaces Confab grew from, thin over its backends and manager.

    from confab import ChatModel                                        # OpenChatKit
    from confab import ChatHistory, bot_function, BotFunctions          # NanoLLM
    from confab import BaseLLM                                          # swarm_models
    from confab import LMDeployPipeline, LMDeployServer, LMDeployClient  # lagent

Each class loads its model through the same registry and answers through the same `Reply`
(`ModelManager.reply`) as the page, the API and the terminal. "The model" may be a preset name,
"embedded", a .gguf path, a local folder or a hub id, a `ModelSpec`, or a loaded `ModelManager`.
"""

from backends.base import BackendError, GenerationParams, Message, ModelSpec, ParamError
from backends.manager import ModelManager
from chat.reply import Reply
from chat.tools import Tool, Toolset, ToolStep, tool

from .lagent import INTERNLM2_META, LMDeployClient, LMDeployPipeline, LMDeployServer, ModelStatusCode, TritonClient
from .nanollm import BotFunctions, ChatHistory, bot_function
from .openchatkit import ChatModel
from .swarm import BaseLLM

__all__ = [
    "INTERNLM2_META", "BackendError", "BaseLLM", "BotFunctions", "ChatHistory", "ChatModel", "GenerationParams",
    "LMDeployClient", "LMDeployPipeline", "LMDeployServer", "Message", "ModelManager", "ModelSpec", "ModelStatusCode",
    "ParamError", "Reply", "Tool", "ToolStep", "Toolset", "TritonClient", "bot_function", "tool",
]
