"""Conversations as trees: many per person, each keeping every reply it was ever given.

A conversation is a tree of turns: a user turn holds one message, an assistant turn holds what
one reply left (its tool steps, its thinking, its text). Regenerate adds a sibling reply; editing
a past message adds a sibling user turn, so nothing is thrown away and earlier versions stay
reachable (the page shows ‹ 2/3 ›). The chat on screen is the path from the root to `end`.

A conversation is plain JSON data (dicts and lists) so it can live in the browser, in SQLite or
in an export unchanged; `from_data` checks one that came back from any of them, as hostile
input. Knows chat messages as dicts, not Gradio, engines or storage.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Iterable

from backends.base import ParamError

ROOT = "root"
TITLE_CHARS = 60  # a title is made from the first message: its first line, cut at a word
NEW_TITLE = "New chat"
Clean = Callable[[Any], list[dict[str, Any]]]  # raw chat messages -> checked ones (ui.chat.clean_history)


def new(system: str = "", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    return {"id": secrets.token_hex(8), "title": NEW_TITLE, "created": now, "updated": now,
            "system": system, "settings": dict(settings or {}),
            "nodes": {ROOT: _node(None, "root", [])}, "end": ROOT}


def _node(parent: str | None, role: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"parent": parent, "role": role, "messages": messages, "children": [], "pick": 0}


def path(conv: dict[str, Any]) -> list[str]:
    """The turns on screen, first to last (the root left out)."""
    nodes, out, at = conv["nodes"], [], conv["end"]
    while at != ROOT:
        out.append(at)
        at = nodes[at]["parent"]
    return out[::-1]


def messages(conv: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat on screen: the messages of every turn on the path."""
    return [m for nid in path(conv) for m in conv["nodes"][nid]["messages"]]


def turns(history: Iterable[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """A flat chat -> turns: each user message is one, a run of assistant messages is one."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for m in history:
        if m["role"] == "assistant" and out and out[-1][0] == "assistant":
            out[-1][1].append(m)
        else:
            out.append((m["role"], [m]))
    return out


def follow(conv: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """Make `history` the chat on screen: walk the tree along it, reusing the turns that match
    and adding the rest as new branches (nothing is removed). Returns the new end."""
    nodes, at = conv["nodes"], ROOT
    for role, msgs in turns(history):
        node = nodes[at]
        same = [i for i, c in enumerate(node["children"]) if _same(nodes[c], role, msgs)]
        if same:
            node["pick"] = node["pick"] if node["pick"] in same else same[-1]
        else:
            child = secrets.token_hex(6)
            nodes[child] = _node(at, role, [dict(m) for m in msgs])
            node["children"].append(child)
            node["pick"] = len(node["children"]) - 1
        at = node["children"][node["pick"]]
    conv["end"] = at
    _retitle(conv)
    return at


def _same(node: dict[str, Any], role: str, msgs: list[dict[str, Any]]) -> bool:
    return node["role"] == role and [_key(m) for m in node["messages"]] == [_key(m) for m in msgs]


def _key(m: dict[str, Any]) -> tuple:
    meta = m.get("metadata") or {}
    files = tuple(a.get("id") for a in m.get("attached") or () if isinstance(a, dict))
    return m["role"], m.get("content"), meta.get("id"), meta.get("title"), files


def add_reply(conv: dict[str, Any], messages_: list[dict[str, Any]] | None = None) -> str:
    """A new reply after the end of the chat (beside any earlier replies there), shown."""
    nodes, at = conv["nodes"], conv["end"]
    child = secrets.token_hex(6)
    nodes[child] = _node(at, "assistant", list(messages_ or []))
    nodes[at]["children"].append(child)
    nodes[at]["pick"] = len(nodes[at]["children"]) - 1
    conv["end"] = child
    touch(conv)
    return child


def set_messages(conv: dict[str, Any], nid: str, messages_: list[dict[str, Any]]) -> None:
    """What a reply left so far (it is written as it streams, so a crash keeps most of it)."""
    if nid in conv["nodes"]:
        conv["nodes"][nid]["messages"] = [dict(m) for m in messages_]
        touch(conv)


def remove(conv: dict[str, Any], nid: str) -> None:
    """Remove a turn and everything after it (Undo); the chat then ends before it."""
    nodes = conv["nodes"]
    parent = nodes[nid]["parent"]
    siblings = nodes[parent]["children"]
    siblings.remove(nid)
    nodes[parent]["pick"] = max(0, min(nodes[parent]["pick"], len(siblings) - 1))
    stack = [nid]
    while stack:
        stack.extend(nodes.pop(stack.pop())["children"])
    if conv["end"] not in nodes:
        conv["end"] = parent
    touch(conv)


def clear(conv: dict[str, Any]) -> None:
    conv["nodes"] = {ROOT: _node(None, "root", [])}
    conv["end"] = ROOT
    conv["title"] = NEW_TITLE
    touch(conv)


def switch(conv: dict[str, Any], nid: str, step: int) -> bool:
    """Show the previous (-1) or next (+1) version of a turn. False when there is none."""
    nodes = conv["nodes"]
    if nid not in nodes or nid == ROOT:
        return False
    siblings = nodes[nodes[nid]["parent"]]["children"]
    i = siblings.index(nid) + step
    if not 0 <= i < len(siblings):
        return False
    show(conv, siblings[i])
    return True


def show(conv: dict[str, Any], nid: str) -> None:
    """Show a version of a turn, and the chat that followed it as it was last shown."""
    nodes = conv["nodes"]
    at = nid
    while at != ROOT:  # every turn above it picks the way to it
        parent = nodes[at]["parent"]
        nodes[parent]["pick"] = nodes[parent]["children"].index(at)
        at = parent
    at = nid
    while nodes[at]["children"]:
        at = nodes[at]["children"][nodes[at]["pick"]]
    conv["end"] = at
    touch(conv)


def versions(conv: dict[str, Any], nid: str) -> tuple[int, int]:
    """(which, of how many) versions of a turn: (1, 1) when it has no others."""
    nodes = conv["nodes"]
    siblings = nodes[nodes[nid]["parent"]]["children"]
    return siblings.index(nid) + 1, len(siblings)


def forks(conv: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    """The turns on screen that have other versions: (turn, index of its first message in the
    chat, which version, of how many)."""
    out, index = [], 0
    for nid in path(conv):
        n, of = versions(conv, nid)
        if of > 1:
            out.append((nid, index, n, of))
        index += len(conv["nodes"][nid]["messages"])
    return out


def title_from(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) <= TITLE_CHARS:
        return line or NEW_TITLE
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut if len(cut) > TITLE_CHARS // 2 else line[:TITLE_CHARS]).rstrip(" ,.;:") + "…"


def _retitle(conv: dict[str, Any]) -> None:
    """A new chat takes its title from its first message (no model call needed)."""
    if conv["title"] == NEW_TITLE:
        first = next((m for m in messages(conv) if m["role"] == "user"), None)
        if first is not None:
            conv["title"] = title_from(str(first.get("content") or ""))
    touch(conv)


def rename(conv: dict[str, Any], title: str) -> None:
    title = " ".join(str(title).split())
    if not title:
        raise ParamError("A title cannot be empty.")
    conv["title"] = title[:120]
    touch(conv)


def touch(conv: dict[str, Any]) -> None:
    conv["updated"] = time.time()


def newest_first(convs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(convs, key=lambda c: c["updated"], reverse=True)


def size(conv: dict[str, Any]) -> int:
    """Messages held, in every version (what the server's message limit counts)."""
    return sum(len(n["messages"]) for n in conv["nodes"].values())


# ---- data that came back (from a browser, a database or a file): hostile until checked ----

def from_data(data: Any, clean: Clean, max_messages: int) -> dict[str, Any]:
    """A conversation as stored, checked: the tree is rebuilt from parent links (cycles, missing
    parents and unknown fields dropped), each turn's messages go through `clean`, and it may hold
    at most `max_messages` messages in all. Raises ParamError for what cannot be read at all."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise ParamError("A saved conversation is not a dict with nodes.")
    raw = data["nodes"]
    conv = new(system=_str(data.get("system")), settings=data.get("settings") if isinstance(data.get("settings"), dict)
               else {})
    conv["id"] = _ident(data.get("id")) or conv["id"]
    conv["title"] = _str(data.get("title"))[:120] or NEW_TITLE
    for key in ("created", "updated"):
        if isinstance(data.get(key), (int, float)):
            conv[key] = float(data[key])
    budget = [max_messages]
    _adopt(conv, raw, ROOT, ROOT, clean, budget, depth=0)
    end = data.get("end")
    conv["end"] = end if isinstance(end, str) and end in conv["nodes"] else _last(conv)
    return conv


def _adopt(conv, raw, src: str, dst: str, clean: Clean, budget: list[int], depth: int) -> None:
    """Copy the children of raw[src] under conv's dst, breadth-first by child order, checked.
    Iterative: a chain of a thousand turns must not hit Python's recursion limit."""
    stack = [(src, dst)]
    seen = {ROOT}
    while stack:
        s, d = stack.pop()
        node = raw.get(s) if isinstance(raw.get(s), dict) else {}
        kids = node.get("children") if isinstance(node.get("children"), list) else []
        for kid in kids:
            item = raw.get(kid) if isinstance(kid, str) else None
            if kid in seen or not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
                continue
            seen.add(kid)
            msgs = [m for m in clean(item.get("messages")) if m["role"] == item["role"]]
            if not msgs or len(msgs) > budget[0]:
                continue
            budget[0] -= len(msgs)
            ident = _ident(kid) or secrets.token_hex(6)
            conv["nodes"][ident] = _node(d, item["role"], msgs)
            if item.get("finish") == "length":
                conv["nodes"][ident]["finish"] = "length"  # the page offers Continue
            conv["nodes"][d]["children"].append(ident)
            stack.append((kid, ident))
        pick = node.get("pick")
        if isinstance(pick, int) and 0 <= pick < len(conv["nodes"][d]["children"]):
            conv["nodes"][d]["pick"] = pick


def _last(conv: dict[str, Any]) -> str:
    at, nodes = ROOT, conv["nodes"]
    while nodes[at]["children"]:
        at = nodes[at]["children"][nodes[at]["pick"]]
    return at


def from_history(history: list[dict[str, Any]], system: str = "", title: str | None = None) -> dict[str, Any]:
    """A conversation holding one chat (an import of plain messages, a chat saved before trees)."""
    conv = new(system=system)
    if title:
        conv["title"] = title
    follow(conv, history)
    return conv


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ident(value: Any) -> str | None:
    """An id kept from stored data: short and plain (it is used as a key and in the page)."""
    if isinstance(value, str) and 0 < len(value) <= 32 and value.isalnum() and value != ROOT:
        return value
    return None
