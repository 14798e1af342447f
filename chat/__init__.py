"""The chat layer, between the engines (backends/) and the callers (ui/, api/, terminal.py, confab/):
a `Reply` with real cancellation, tools and their call formats, thinking apart from the answer.
Knows no Gradio and no HTTP."""

from .formats import ToolCall, ToolFormat
from .reply import Reply, Text, Thinking
from .tools import Tool, Toolset, ToolStep, load_tools_dir, pick, tool

__all__ = ["Reply", "Text", "Thinking", "Tool", "ToolCall", "ToolFormat", "Toolset", "ToolStep", "load_tools_dir",
           "pick", "tool"]
