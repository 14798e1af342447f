"""A reasoning model's thinking, told apart from its answer as the text streams.

Reasoning models write `<think>…</think>` before the answer; some chat templates open the tag
in the prompt themselves (DeepSeek-R1, Qwen3-Thinking), so only `</think>` appears in the
reply. `ThinkSplitter` takes text deltas and gives back (thinking, answer) pieces, whatever way
the tags are cut across deltas; `opens_thinking` says whether a rendered prompt left a
`<think>` open. Only a think block at the start of a reply counts: a `<think>` later on is
answer text. Knows text, not engines, Gradio or HTTP.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def opens_thinking(prompt_text: str) -> bool:
    """Whether a prompt ends inside a `<think>` block the model is to close."""
    return prompt_text.rstrip().endswith(OPEN)


class ThinkSplitter:
    """Splits one reply's streamed text into thinking and answer (thinking first, then answer)."""

    def __init__(self, opened: bool = False) -> None:
        self.opened = opened  # the prompt opened `<think>`: the reply starts inside it
        self.state = "start"  # start -> thinking -> answer, or start -> answer
        self.buffer = ""  # text not given out yet: a tag that may be starting, or leading space
        self.trim = False  # drop the white space that opens a section (`<think>\n`, `</think>\n\n`)

    def feed(self, delta: str) -> tuple[str, str]:
        """Returns (thinking, answer) text that is safe to show now."""
        self.buffer += delta
        thinking = ""
        if self.state == "start" and not self._start():
            return "", ""
        if self.state == "thinking":
            thinking = self._thinking()
        if self.state == "answer":
            return thinking, self._answer()
        return thinking, ""

    def finish(self) -> tuple[str, str]:
        """The text held back at the end of the reply (a tag that never came is text after all)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "start":
            return (rest.strip(), "") if self.opened else ("", rest)
        if self.state == "thinking":
            return rest, ""
        return "", rest

    def _start(self) -> bool:
        """Whether the start of the reply shows yet if it opens with `<think>`."""
        head = self.buffer.lstrip()
        if head.startswith(OPEN):
            self.buffer, self.state, self.trim = head[len(OPEN):], "thinking", True
        elif OPEN.startswith(head):  # nothing but space yet, or a part of the tag: wait
            return False
        else:
            self.state = "thinking" if self.opened else "answer"
            self.trim = self.opened  # the answer keeps its first space (a continued message needs it)
        return True

    def _thinking(self) -> str:
        if not self._trimmed():
            return ""
        cut = self.buffer.find(CLOSE)
        if cut >= 0:
            out, self.buffer = self.buffer[:cut], self.buffer[cut + len(CLOSE):]
            self.state, self.trim = "answer", True
            return out
        keep = _partial_tail(self.buffer, CLOSE)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def _answer(self) -> str:
        if not self._trimmed():
            return ""
        out, self.buffer = self.buffer, ""
        return out

    def _trimmed(self) -> bool:
        """Drops a section's opening white space; False while there is nothing else yet."""
        if self.trim:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return False
            self.trim = False
        return True


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Verbatim(ThinkSplitter):
    """No thinking to split off: all of it is answer, as it came (a raw prompt's completion, where
    a `<think>` or leading space is the text itself)."""

    def feed(self, delta: str) -> tuple[str, str]:
        return "", delta

    def finish(self) -> tuple[str, str]:
        return "", ""
