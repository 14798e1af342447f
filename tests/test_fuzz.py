"""Bad input never crashes the server: a bounded fuzz of malformed requests to the OpenAI API and
of malformed payloads to the page's events (Gradio's own wire protocol, as a script would send
them). Every one gets a 4xx (API) or an error with a message (page); none gets a 5xx; the
server answers normally afterwards."""

import itertools
import json
import uuid

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)
OK_MESSAGES = [{"role": "user", "content": "Hi"}]
DEEP = "[" * 80 + "]" * 80


def api_cases() -> list[tuple[str, bytes]]:
    """(label, body) pairs; each is malformed in one way."""
    raw = [("not json", b"{nope"), ("empty", b""), ("bad utf-8", b'{"messages": "\xff\xfe"}'),
           ("deep", ('{"messages": ' + DEEP + "}").encode()), ("huge number", b'{"max_tokens": 1' + b"0" * 5000 + b"}")]
    bodies: list[tuple[str, object]] = [(f"top-level {v!r}", v) for v in ([], 1, "x", None, True, {})]
    base = {"model": "smollm2-llamacpp", "messages": OK_MESSAGES, "max_tokens": 1}
    fields = {
        "messages": [None, "hi", 5, [], {}, [1], ["x"], [None], [[]], [{"content": "hi"}], [{"role": "user"}] * 0,
                     [{"role": "system", "content": "only a system prompt"}],
                     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     [{"role": "hacker", "content": "x"}], [{"role": 5, "content": "x"}],
                     [{"role": "function", "content": "x"}], [{"role": None, "content": "x"}]],
        "model": [5, None, [], {}, "no-such-model", "\ud800"],
        "stream": ["yes", 2, [], {}],
        "max_tokens": [0, -1, "x", 1e20, 10**30, 1.5, [], 100_000],
        "max_completion_tokens": [0, -5, "many"],
        "temperature": [-1, "hot", 1e400, [], {}, -1e400],
        "top_p": [0, 2, -1, "x"],
        "top_k": [-5, 1.5, "x", 10**20],
        "min_p": [1, -0.5, "x"],
        "repetition_penalty": [0, -1, "x"],
        "seed": [-1, 2**64, "x", 1.5, []],
        "stop": [5, [1], [None], ["x"] * 100, "x" * 5000, {}, [["a"]]],
        "n": [0, 2, "x", -1],
        "stream_options": ["x", [], 5],
        "tools": [[{"type": "function", "function": {"name": "f"}}], "x"],
    }
    for name, values in fields.items():
        bodies += [(f"{name}={v!r:.40}", {**base, name: v}) for v in values]
    contents = [5, {}, [1], [None], [{"type": "text"}], [{"type": "text", "text": 5}], [{"type": "text", "text": None}],
                [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], [{"type": None}],
                [{"text": "no type"}], [[{"type": "text", "text": "nested"}]], "\ud800", "x" * 100_001,
                [{"type": "text", "text": "x" * 100_001}]]
    for where, content in itertools.product(("first", "last"), contents):
        messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        messages[0 if where == "first" else -1]["content"] = content
        bodies.append((f"{where} content {content!r:.40}", {**base, "messages": messages}))
    bodies += [("too many messages", {**base, "messages": OK_MESSAGES * 1001})]
    # Each object body also streamed: a streamed request must be refused before its stream starts.
    bodies += [(label + " +stream", {**body, "stream": True}) for label, body in bodies
               if isinstance(body, dict) and "stream" not in body and body]
    encoded = [(label, json.dumps(body).encode()) for label, body in bodies]
    # The same bodies with a lone surrogate escape in every string: the door repairs them.
    encoded += [(label + " +surrogate", body.replace(b'"Hi"', b'"Hi \\udc00"')) for label, body in encoded
                if b'"Hi"' in body]
    return raw + encoded


def test_malformed_api_requests_get_4xx_with_a_message(app):
    cases = api_cases()
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    with httpx.Client(base_url=app.url, timeout=60) as client:
        for label, body in cases:
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (label, r.status_code, r.text[:300])
            if r.status_code == 200:
                accepted.append(label)
            if r.status_code >= 400:
                error = r.json()["error"]
                assert error["message"] and error["code"] == r.status_code, label
        assert client.post("/v1/chat/completions", json={"messages": OK_MESSAGES, "max_tokens": 2}).status_code == 200
    print(f"\nAPI fuzz: {len(cases)} requests, statuses {dict(sorted(statuses.items()))}; accepted: {accepted}")
    assert len(cases) >= 250 and statuses.get(200, 0) < len(cases) // 4


# ---- the page's events, as Gradio's wire protocol carries them --------------------------------
def page_event(client: httpx.Client, fn_index: int, data: list, event_data: object = None) -> dict:
    """Join an event and read its stream until it completes: the completion message."""
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data,
                       "trigger_id": None})  # ASCII: lone surrogates travel as \ud800 escapes, as a browser sends them
    join = client.post("/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    if join.status_code != 200:
        return {"http": join.status_code, "text": join.text}
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    return {"http": 0, "text": "stream ended without completing"}


def test_malformed_page_payloads_get_a_message(app):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        config = client.get("/config").json()
        fn = {d.get("api_name"): (d["id"], len(d["inputs"])) for d in config["dependencies"] if d.get("api_name")}
        respond, n_inputs = fn["respond"]
        # The last input is the session's conversations (server-side state: what a request sends
        # there is never read).
        good = ["Say hi.", [], "", 0.2, 0.9, 40, 0.0, 4, 1.0, False, -1, "", "default", True, None]
        assert len(good) == n_inputs
        variants = {
            0: [None, 5, [], {"a": 1}, "x" * 100_001, "\ud800 hi"],
            1: ["str", 5, [1, 2], [{"role": "user"}], [{"role": "user", "content": 5}],
                [{"role": "hacker", "content": [{"type": "text", "text": "x"}]}], [None], [[[[[]]]]],
                [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * 1001],
            2: [5, ["x"], "x" * 100_001],
            3: ["hot", -1, 1e308, None, [], True],
            5: [0, "many", -3, 10**9],
            7: ["x", 10**6],
            10: [-5, "x", 2**70, 1.5],
            11: [5, ["x"] * 50, "x" * 5000],
            12: ["maybe", 5, ["on"]],
        }
        cases = [(f"respond[{i}]={v!r:.30}", respond, [*good[:i], v, *good[i + 1:]])
                 for i, values in variants.items() for v in values]
        for name in ("undo", "export", "regenerate", "continue"):
            index, n = fn[name]
            for history in ("str", 5, [None], [{"role": "user", "content": 5}], [[{"deep": [[[]]]}]]):
                data = {"undo": [history, "", None], "export": [history, ""]}.get(name, [history, "", None, *good[3:14], "send-1"])
                assert len(data) == n, name
                cases.append((f"{name} history={history!r:.30}", index, data))
        index, n = fn["import"]
        for file in (None, "x", {"path": "/etc/passwd"}, {"path": "../../etc/passwd", "meta": {"_type": "gradio.FileData"}}):
            cases.append((f"import {file!r:.40}", index, [file, None]))
        cases += conversation_cases(config)
        # The message box's files: only what this page uploaded to Gradio's upload folder is read.
        box, n = by_trigger(config, "chat-input", "submit")
        for files in ([{"path": "/etc/passwd"}], [{"path": "../../etc/passwd", "meta": {"_type": "gradio.FileData"}}],
                      "x", [5], [{"path": "/tmp"}] * 40, [{"orig_name": "a.png"}]):
            cases.append((f"box files={files!r:.40}", box, [{"text": "read it", "files": files}, *good[1:], "s"]))
        cases += [(f"box {v!r:.30}", box, [v, *good[1:], "s"]) for v in ({"text": 5}, {"files": {}}, "plain", [1])]
        assert n == len(good) + 1  # the page names each Send (its last input), for a Stop before it begins
        cases += [(f"box send id {v!r:.30}", box, [{"text": "hi", "files": []}, *good[1:], v])
                  for v in (5, None, ["a"], "x" * 100_000, "\ud800", {"a": 1})]
        stop, n = by_trigger(config, "stop", "click")
        cases += [(f"stop {v!r:.30}", stop, [v]) for v in (5, None, ["a"], "x" * 100_000, "\ud800", "")]
        index, n = fn["load"]
        for values in ([None, None, None], [5, [], {}], ["no-such-preset", "", "llamacpp"]):
            cases.append((f"load {values!r:.40}", index, values))
        outcomes = {"ok": 0, "refused": 0}
        for label, index, data, *event_data in cases:
            done = page_event(client, index, data, *event_data)
            assert "http" not in done or done["http"] < 500, (label, done)
            if done.get("success") is False:
                message = done["output"].get("error")
                assert message, (label, done)  # a message, not Gradio's "error without details"
                outcomes["refused"] += 1
            else:
                outcomes["ok"] += 1
        # Still serving: a normal message gets a normal reply.
        assert page_event(client, respond, good)["success"] is True
    print(f"\npage fuzz: {len(cases)} payloads, {outcomes}")
    assert len(cases) >= 50 and outcomes["refused"] >= len(cases) // 2


def by_trigger(config: dict, elem_id: str, event: str) -> tuple[int, int]:
    """(fn_index, number of inputs) of the event an element fires (private events have no api_name)."""
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id}
    for dep in config["dependencies"]:
        if any(target[0] in ids and target[1] == event for target in dep["targets"]):
            return dep["id"], len(dep["inputs"])
    raise AssertionError(f"no {event} event on #{elem_id}")


def conversation_cases(config: dict) -> list[tuple]:
    """The sidebar's events, which take raw ids and titles from the page (the session's
    conversations themselves are server-side state, so a request cannot send them)."""
    junk = [None, 5, [], {}, ["a"], "nope", "root", "x" * 200_000, "\ud800"]
    cases: list[tuple] = []
    for elem_id, event, build in [
        ("rename-chat", "click", lambda v: [None, v, v]),
        ("conversations", "input", lambda v: [None, v, v]),
        ("versions", "input", lambda v: [None, v]),
        ("search-chats", "change", lambda v: [None, v]),
        ("delete-confirm", "click", lambda v: [None, v]),
        ("new-chat", "click", lambda v: [None]),
    ]:
        index, n = by_trigger(config, elem_id, event)
        cases += [(f"#{elem_id} {event} {v!r:.30}", index, build(v)) for v in junk]
        assert len(build(None)) == n, elem_id
    index, _ = by_trigger(config, "chatbot", "option_select")
    cases += [(f"option_select {v!r:.30}", index, [None], {"index": 0, "value": v}) for v in junk]
    cases += [("option_select no value", index, [None], {"nothing": 1})]
    return cases
