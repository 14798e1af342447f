"""Confab's Python API: the model interfaces Confab grew from, thin over its backends and manager.

    from confab import ChatModel          # OpenChatKit's inference/bot.py interface

Each class loads its model through the same registry and streams through the same
`ModelManager.stream` as the page, the API and the terminal.
"""

from .openchatkit import ChatModel

__all__ = ["ChatModel"]
