"""Fair under load, and what is already won, in one run: Confab beside its peers on the embedded model.

    python bench/fairness.py [--llama-server PATH] [--seconds 40] [--flood 8] [--readme]
    -> bench/results/fairness.json and a table on stdout (and in README.md with --readme)

Every server is started at the start (and its CPU use while idle measured, all of them idle) and
measured in turn (the others sit idle) through the
streaming OpenAI-compatible API, greedy:
1. single stream: decode tokens/s of one 256-token reply, in interleaved rounds with
   llama-cpp-python's own API in process (the raw engine), so a slow moment of the machine hits
   every contender alike;
2. 8 users: 8 streams of 128 tokens at once: aggregate tokens/s and p95 time to first token;
3. a long chat: 10 turns reaching ~2,000 tokens: time to first token at turn 10 / turn 1; and
   the decode rate of a reply after a ~2,000-token prompt;
4. the noisy neighbour: four heavy clients send ~4,000-token prompts back to back while one
   light client asks a short question every 3 s: the light question's time to first token (p50 /
   p95 / max), and the heavy clients' prompt tokens read per second with the light client and
   (Confab) without it. Each heavy prompt starts with its own number, so no server can answer
   it from a cache of the others;
5. the flood (Confab): 8 conversations of 1,000 messages each at once (each fills the context),
   and a short question 5 s later: each must be answered or refused with a 4xx that says why
   (never a 500), and the question answered at once;
6. transformers, which runs one reply at a time (in process, the embedded model through the
   manager): a short question asked while one ~4,000-token prompt is answered and another waits,
   with the engine sharing its thread a slice at a time (`[engine] replies = 4`, the default)
   and without (`replies = 1`: the manager's shortest-first line only); and what the slices
   cost one reply alone (first token of the long prompt, decode tok/s). `--transformers-only`
   runs this part alone.
The peers: llama-cpp-python's `llama_cpp.server`, and, given `--llama-server`, llama.cpp's own C++
server (8 slots, a unified KV cache of 16k cells, like Confab's engine). A peer that fails a
request has its error texts kept in the JSON.

Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from backends.locate import embedded_gguf  # noqa: E402
from bench import STORY, decode_rate, engine_direct, tokens_of  # noqa: E402 - bench/bench.py, beside this file

PARAGRAPH = ("The harbour town kept its records in a long ledger: ships in and out, the weather, the price of "
             "salt and rope, and who owed whom. Clerk {n} copied page {n} twice, once for the mayor and once "
             "for the archive, and wrote the tide tables beside them. ")
HEAVY_CLIENTS = 4
LIGHT_EVERY_S = 3.0
QUESTION = "What is the capital of France? One word."
SINGLE_TOKENS = 256
USERS, USER_TOKENS = 8, 128
SUBJECTS = ["a lighthouse", "a fox", "the moon", "a baker", "a river", "a robot", "a violin", "a glacier"]
TARGETS = {"single_vs_engine": 0.95, "many_vs_llama_server": 1.0, "long_chat": 1.5, "light_p95_s": 1.0,
           "light_vs_llama_server": 10.0, "heavy_ratio": 0.8, "flood_small_ttft_s": 2.0}


def heavy_prompt(n: int, paragraphs: int = 62) -> str:
    """~4,000 tokens of the embedded model, unique from its first line."""
    return f"Document {n} ({random.random():.6f}).\n" + "".join(PARAGRAPH.format(n=f"{n}-{i}")
                                                             for i in range(paragraphs)) + "\nSummarise it."


MODEL = {}  # the model id each server names (Confab checks it)


def _content(data: str) -> str:
    """The reply's text in a streamed event (not the role, not an empty delta, not [DONE])."""
    try:
        event = json.loads(data)
    except ValueError:
        return ""
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def stream(url: str, content: str | list[dict], max_tokens: int, timeout: float = 600) -> dict:
    """One streamed chat completion, greedy: when the first and last text came, the text, and
    whether it ended well (an error keeps what the server said)."""
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    body = {"model": MODEL.get(url, "any"), "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "repeat_penalty": 1.0}
    start = time.perf_counter()
    first = last = None
    text = ""
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                return {"ok": False, "status": r.status_code, "error": r.text[:300]}
            for line in r.iter_lines():
                piece = _content(line[5:]) if line.startswith("data:") else ""
                if piece:
                    last = time.perf_counter() - start
                    first = last if first is None else first
                    text += piece
    except httpx.HTTPError as e:  # counted as an error of the server under test
        return {"ok": False, "error": repr(e)[:300]}
    return {"ok": first is not None, "ttft_s": first, "last_s": last, "total_s": time.perf_counter() - start,
            "text": text, **({} if first is not None else {"error": "the reply had no text"})}


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


# ---- 1-3: steady load ------------------------------------------------------------------------
def single(servers: dict[str, "Server"], rounds: int) -> dict:
    """Decode tokens/s of one reply, each round: the raw engine in process, then every server."""
    samples: dict[str, list[float]] = {"engine": [], **{name: [] for name in servers}}
    for _ in range(rounds):
        samples["engine"].append(engine_direct(1)["tokens_per_s"])
        for name, server in servers.items():
            r = stream(server.url, STORY, SINGLE_TOKENS)
            if r["ok"]:
                samples[name].append(decode_rate(tokens_of(r["text"]), r["ttft_s"], r["last_s"]))
    return {name: {"tokens_per_s": round(statistics.median(v), 1) if v else None,
                   "samples": [round(x, 1) for x in v]} for name, v in samples.items()}


def many(url: str) -> dict:
    """USERS streams at once, each on its own subject: aggregate tokens/s and p95 TTFT."""
    question = "Tell me a short story about {}, in about one hundred words."
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(USERS) as pool:
        results = list(pool.map(lambda i: stream(url, question.format(SUBJECTS[i % len(SUBJECTS)]), USER_TOKENS),
                                range(USERS)))
    wall = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    return {"users": USERS, "errors": len(results) - len(done),
            "error_texts": [r["error"] for r in results if not r["ok"]][:3],
            "aggregate_tokens_per_s": round(sum(tokens_of(r["text"]) for r in done) / wall, 1),
            "p95_ttft_s": round(_p95([r["ttft_s"] for r in done]), 2) if done else None}


def long_chat(url: str) -> dict:
    """Ten turns, each a ~100-token question and a reply of up to 100 tokens (~2,000 tokens at
    turn 10): time to first token at turn 10 / turn 1 (a server that keeps the conversation's
    cache reads only the new turn)."""
    run = random.random()
    messages: list[dict] = []
    turns = []
    for turn in range(1, 11):
        messages.append({"role": "user", "content": f"Run {run:.6f}, turn {turn}. " + "I am planning a sailing "
                         "trip along the coast next summer with two friends and a small boat; " * 4
                         + "what should we do next?"})
        r = stream(url, messages, 100)
        if not r["ok"]:
            return {"error": r["error"], "turns_ms": turns}
        turns.append(round(r["ttft_s"] * 1000))
        messages.append({"role": "assistant", "content": r["text"]})
    return {"turns_ms": turns, "ratio": round(turns[-1] / turns[0], 2)}


def long_decode(url: str, runs: int = 3) -> dict:
    """Decode tokens/s of a 128-token reply after a ~2,000-token prompt (median of `runs`): what a
    long conversation's replies stream at, where attention reads the whole context every token."""
    rates = []
    for _ in range(runs):
        r = stream(url, heavy_prompt(random.randrange(10**6), paragraphs=30) + " In detail, please.", 128)
        if r["ok"] and r["last_s"] > r["ttft_s"]:
            rates.append(decode_rate(tokens_of(r["text"]), r["ttft_s"], r["last_s"]))
    return {"tokens_per_s": round(statistics.median(rates), 1) if rates else None, "samples": [round(x, 1) for x in rates]}


def idle_cpu(servers: dict[str, "Server"], seconds: float = 5.0) -> dict[str, float]:
    """Each server's CPU while nobody asks anything, in % of one core (all of them idle at once:
    what an idle server takes from whatever else runs on the machine)."""
    def used(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    before = {name: used(s.proc.pid) for name, s in servers.items()}
    time.sleep(seconds)
    return {name: round(100 * (used(s.proc.pid) - before[name]) / seconds, 1) for name, s in servers.items()}


# ---- 4: the noisy neighbour ------------------------------------------------------------------
def load(url: str, seconds: float, light: bool, prompt_tokens: int) -> dict:
    """Heavy clients back to back for `seconds` (and the light one, if `light`)."""
    stop = time.perf_counter() + seconds
    heavy_done, light_ttft, errors = [], [], []
    lock = threading.Lock()

    def heavy(lane: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            n += 1
            r = stream(url, heavy_prompt(lane * 1000 + n), 8)
            with lock:
                (heavy_done if r["ok"] else errors).append(r)

    def light_client() -> None:
        time.sleep(LIGHT_EVERY_S)  # the heavy prompts are being read by then
        k = 0
        while time.perf_counter() < stop:
            asked, k = time.perf_counter(), k + 1
            r = stream(url, f"Question {k}. {QUESTION}", 8)  # a new question: nothing of it is cached
            with lock:
                (light_ttft if r["ok"] else errors).append(r["ttft_s"] if r["ok"] else r)
            time.sleep(max(0.0, LIGHT_EVERY_S - (time.perf_counter() - asked)))

    threads = [threading.Thread(target=heavy, args=(i,)) for i in range(HEAVY_CLIENTS)]
    if light:
        threads.append(threading.Thread(target=light_client))
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = {"heavy_replies": len(heavy_done), "heavy_prompt_tokens_per_s": round(len(heavy_done) * prompt_tokens / wall),
           "errors": len(errors), "error_texts": sorted({e.get("error", "") for e in errors})[:3],
           "wall_s": round(wall, 1)}
    if light and light_ttft:
        ttfts = sorted(light_ttft)
        out.update(light_n=len(ttfts), light_ttft_p50_s=round(statistics.median(ttfts), 2),
                   light_ttft_p95_s=round(_p95(ttfts), 2), light_ttft_max_s=round(ttfts[-1], 2))
    return out


# ---- 5: the flood --------------------------------------------------------------------------
def flood(url: str, requests: int = 8, messages: int = 1000) -> dict:
    """`requests` conversations of `messages` messages each, all at once (each fills the context),
    and a short question 5 s later: how each ended (answered, refused with a 4xx that says why,
    or failed) and the short question's time to first token."""
    def conversation(lane: int) -> list[dict]:
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Lane {lane}, message {i}: noted."}
                 for i in range(messages - 2)]
        return [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "Sum it up."}]

    results: list[dict] = []
    lock = threading.Lock()

    def send(lane: int) -> None:
        body = {"model": MODEL.get(url, "any"), "messages": conversation(lane), "max_tokens": 8, "temperature": 0}
        start = time.perf_counter()
        try:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
            out = {"status": r.status_code, "s": round(time.perf_counter() - start, 1)}
            if r.status_code != 200:
                out["error"] = r.text[:300]
        except httpx.HTTPError as e:
            out = {"status": None, "error": repr(e)[:300]}
        with lock:
            results.append(out)

    threads = [threading.Thread(target=send, args=(lane,)) for lane in range(requests)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(5.0)
    small = stream(url, f"Question 0. {QUESTION}", 8)
    for t in threads:
        t.join()
    statuses = [r["status"] for r in results]
    return {"requests": requests, "messages": messages, "answered": statuses.count(200),
            "refused_4xx": sum(1 for s in statuses if s and 400 <= s < 500),
            "errors": sum(1 for s in statuses if not s or s >= 500),
            "small_ttft_s": round(small["ttft_s"], 2) if small.get("ok") else None,
            "wall_s": round(time.perf_counter() - start, 1),
            "examples": [r for r in results if r["status"] != 200][:3]}


# ---- the servers -----------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def start(name: str, llama_server: str | None) -> Server:
    from conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gguf = str(embedded_gguf())
    threads = str(len(os.sched_getaffinity(0)))
    command = {
        "confab": [sys.executable, str(ROOT / "app.py"), "--port", str(port)],
        "llama_cpp.server": [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                             "--n_ctx", "16384", "--n_threads", threads],
        "llama-server": [llama_server or "", "-m", gguf, "--port", str(port), "-c", "16384", "-np", "8",
                         "-t", threads, "--kv-unified"],
    }[name]
    env = {**os.environ, "CONFAB_STATE_DIR": f"/tmp/confab-fairness-{port}", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    server = Server(name, url, proc)
    try:
        wait_ready(url, proc)
        MODEL[url] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        stream(url, f"Hello {random.random()}", 4)  # warm, as nobody of the load
    except BaseException:
        server.stop()
        raise
    return server


# ---- 6: transformers, one reply at a time --------------------------------------------------
def transformers_part(replies: int, long_tokens: int = 32, short_tokens: int = 16) -> dict:
    """The embedded model in transformers through the manager, with `[engine] replies` set."""
    from backends.base import Chunk, GenerationParams, Message
    from backends.manager import ModelManager
    from presets import load_model_presets

    spec = load_model_presets()["smollm2-transformers"]
    manager = ModelManager()
    manager.load(spec.replace(engine={**spec.engine, "replies": replies}))
    times: dict[str, dict] = {}

    def ask(name: str, text: str, tokens: int) -> None:
        start, first, n = time.perf_counter(), None, 0
        params = GenerationParams(do_sample=False, max_new_tokens=tokens, repetition_penalty=1.0)
        for event in manager.stream([Message("user", text)], params, session_id=name):
            if isinstance(event, Chunk) and event.text:
                first = first or time.perf_counter()
            if isinstance(event, Chunk) and event.usage:
                n = event.usage.completion_tokens or n
        end = time.perf_counter()
        times[name] = {"ttft_s": round(first - start, 2), "total_s": round(end - start, 2),
                       "decode_tokens_per_s": round((n - 1) / (end - first), 1) if n > 1 else None}

    try:
        ask("warm", QUESTION, 4)
        ask("alone", heavy_prompt(100), long_tokens)
        threads = [threading.Thread(target=ask, args=(f"long{i}", heavy_prompt(101 + i), long_tokens)) for i in range(2)]
        threads.append(threading.Thread(target=ask, args=("short", QUESTION, short_tokens)))
        for i, t in enumerate(threads):
            t.start()
            time.sleep([0.2, 1.0, 0][i])  # the second long one 0.2 s after the first, the question 1 s later
        for t in threads:
            t.join()
    finally:
        manager.unload()
    return {"replies": replies, "alone": times["alone"], "short": times["short"],
            "longs_total_s": [times["long0"]["total_s"], times["long1"]["total_s"]]}


def transformers_run() -> dict:
    print("6 transformers: a short question beside two long prompts, sliced and one at a time ...", flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0)), "prompt_tokens": tokens_of(heavy_prompt(0)),
            "sliced": transformers_part(4), "one_at_a_time": transformers_part(1)}


def run(names: list[str], llama_server: str | None, seconds: float, rounds: int, flood_requests: int,
        out: Path) -> dict:
    prompt_tokens = tokens_of(heavy_prompt(0))
    result: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
                    "date": time.strftime("%Y-%m-%d"), "heavy_prompt_tokens": prompt_tokens, "seconds": seconds,
                    "servers": {}, "targets": TARGETS}
    servers: dict[str, Server] = {}

    def save() -> None:  # after each part: a later failure keeps what was measured
        out.write_text(json.dumps(result, indent=2))

    try:
        for name in names:
            print(f"starting {name} ...", flush=True)
            try:
                servers[name] = start(name, llama_server)
                result["servers"][name] = {}
            except (RuntimeError, TimeoutError, httpx.HTTPError) as e:  # a peer that would not run: said, not fatal
                print(f"  {name} did not run: {e}", flush=True)
                result["servers"][name] = {"failed": str(e)[:300]}
        time.sleep(2)  # past their start-up's last work
        for name, percent in idle_cpu(servers).items():
            result["servers"][name]["idle_cpu_percent"] = percent
        print(f"1 single stream, {rounds} interleaved rounds ...", flush=True)
        steady = single(servers, rounds)
        result["engine"] = steady.pop("engine")
        for name, server in servers.items():
            x = result["servers"][name]
            x["single"] = steady[name]
            print(f"2-3 {name}: 8 users, a long chat, decoding after a long prompt ...", flush=True)
            x["many"] = many(server.url)
            x["long_decode"] = long_decode(server.url)
            chats = sorted((long_chat(server.url) for _ in range(rounds)), key=lambda c: c.get("ratio", float("inf")))
            x["long_chat"] = {**chats[len(chats) // 2], "ratios": [c.get("ratio") for c in chats]}  # the median run
            save()
        for name, server in servers.items():
            x = result["servers"][name]
            print(f"4 {name}: the noisy neighbour ({seconds:.0f} s{' twice' if name == 'confab' else ''}) ...",
                  flush=True)
            if name == "confab":  # the heavy clients' ratio is Confab's target
                x["alone"] = load(server.url, seconds, False, prompt_tokens)
            x["with_light"] = load(server.url, seconds, True, prompt_tokens)
            if "alone" in x:
                x["heavy_ratio"] = round(x["with_light"]["heavy_prompt_tokens_per_s"]
                                         / max(1, x["alone"]["heavy_prompt_tokens_per_s"]), 2)
            save()
        if flood_requests and "confab" in servers:
            # The target is Confab's; the peers, which do not trim a conversation to the context,
            # would read ~15k tokens a request: half an hour on 2 cores.
            print(f"5 confab: {flood_requests} x 1,000 messages ...", flush=True)
            result["servers"]["confab"]["flood"] = flood(servers["confab"].url, flood_requests)
    finally:
        for server in servers.values():
            server.stop()
    save()
    result["transformers"] = transformers_run()  # alone on the machine: every server has stopped
    save()
    return result


# ---- reporting -------------------------------------------------------------------------------
def _ran(r: dict) -> dict[str, dict]:
    return {name: x for name, x in r["servers"].items() if "failed" not in x}


def table(r: dict) -> str:
    """One row per measure, one column per server; the goal is Confab's."""
    servers = _ran(r)
    names = list(servers)
    engine = r.get("engine", {}).get("tokens_per_s")

    def cell(x: dict, what: str) -> str:
        if what == "single":
            s = x.get("single", {}).get("tokens_per_s")
            return "no reply" if s is None else f"{s}" + (f" ({s / engine:.2f} of the engine)" if engine else "")
        if what == "many":
            m = x.get("many", {})
            return f"{m.get('aggregate_tokens_per_s')} / {m.get('p95_ttft_s')} s" + (
                f", {m['errors']} errors" if m.get("errors") else "")
        if what == "long":
            lc = x.get("long_chat", {})
            return (f"{lc['ratio']:.2f} ({lc['turns_ms'][0]} -> {lc['turns_ms'][-1]} ms; runs "
                    f"{', '.join(map(str, lc.get('ratios', [])))})" if "ratio" in lc
                    else f"failed: {lc.get('error', '')[:60]}")
        if what == "long_decode":
            return str(x.get("long_decode", {}).get("tokens_per_s"))
        if what == "idle":
            return f"{x.get('idle_cpu_percent')}%"
        w = x.get("with_light", {})
        if what == "light":
            return (f"{w['light_ttft_p50_s']} / {w['light_ttft_p95_s']} / {w['light_ttft_max_s']} s"
                    f" ({w['light_n']} answered)" if "light_ttft_p50_s" in w else "no answer")
        if what == "heavy":
            alone = (f" (alone {x['alone']['heavy_prompt_tokens_per_s']:,}: ratio {x['heavy_ratio']:.2f})"
                     if "alone" in x else "")
            return f"{w.get('heavy_prompt_tokens_per_s', 0):,}{alone}"
        return str(w.get("errors", ""))

    rows = [
        ("single-stream decode tok/s, 1 reply of 256 tokens" + (f" (llama-cpp-python in process: {engine})" if engine else ""),
         f">= {TARGETS['single_vs_engine']} of the engine", "single"),
        (f"{USERS} users at once: aggregate tok/s / p95 first token", "aggregate >= llama-server's", "many"),
        ("a 10-turn chat: first token at turn 10 / turn 1", f"<= {TARGETS['long_chat']}", "long"),
        ("decode tok/s of a 128-token reply after a ~2,000-token prompt", "", "long_decode"),
        (f"noisy neighbour: a short question's first token p50 / p95 / max, {HEAVY_CLIENTS} heavy clients",
         f"p95 <= {TARGETS['light_p95_s']:.0f} s, >= 10x better than llama-server", "light"),
        ("noisy neighbour: heavy clients' prompt tok/s with the light one",
         f">= {TARGETS['heavy_ratio']} of alone", "heavy"),
        ("noisy neighbour: failed requests", "0", "errors"),
        ("CPU while idle, % of one core (5 s)", "", "idle"),
    ]
    out = ["| measure | goal (Confab) | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    out += [f"| {label} | {goal} | " + " | ".join(cell(servers[n], what) for n in names) + " |" for label, goal, what in rows]
    f = servers.get("confab", {}).get("flood")
    if f:
        ttft = f"{f['small_ttft_s']} s" if f["small_ttft_s"] is not None else "no answer"
        out += ["", f"Flood (Confab): {f['requests']} conversations of {f['messages']:,} messages at once: "
                    f"{f['answered']} answered, {f['refused_4xx']} refused with a 4xx, {f['errors']} errors, in "
                    f"{f['wall_s']} s; a short question 5 s in got its first token in {ttft} (goal: 0 errors, "
                    f"<= {TARGETS['flood_small_ttft_s']:.0f} s)."]
    t = r.get("transformers")
    if t:
        out += ["", transformers_table(t)]
    verdicts = verdict(r)
    if verdicts:
        out += ["", "Targets: " + "; ".join(f"{k} {'met' if ok else 'MISSED'} ({why})" for k, (ok, why) in verdicts.items()) + "."]
    failed = {n: x["failed"] for n, x in r["servers"].items() if "failed" in x}
    for name, why in failed.items():
        out.append(f"\n{name} did not run: {why[:200]}")
    texts = {n: x.get("with_light", {}).get("error_texts") or x.get("many", {}).get("error_texts")
             for n, x in servers.items()}
    for name, errs in texts.items():
        if errs:
            out.append(f"\n{name}'s errors (examples): " + " | ".join(e[:150] for e in errs))
    return "\n".join(out)


def transformers_table(t: dict) -> str:
    s, o = t["sliced"], t["one_at_a_time"]
    return "\n".join([
        f"Transformers (one reply at a time; in process, the embedded model; {t['date']}, {t['cpus']} cores): a short "
        f"question asked 1 s after two ~{t['prompt_tokens']:,}-token prompts", "",
        "| | sliced (`replies = 4`) | one at a time (`replies = 1`) |", "| --- | --- | --- |",
        f"| the short question's first token | {s['short']['ttft_s']} s | {o['short']['ttft_s']} s |",
        f"| the two long replies done after | {' / '.join(map(str, s['longs_total_s']))} s | "
        f"{' / '.join(map(str, o['longs_total_s']))} s |",
        f"| one long prompt alone: first token / decode tok/s | {s['alone']['ttft_s']} s / "
        f"{s['alone']['decode_tokens_per_s']} | {o['alone']['ttft_s']} s / {o['alone']['decode_tokens_per_s']} |"])


def verdict(r: dict) -> dict[str, tuple[bool, str]]:
    """Confab's targets, each met or not, with the figures it was judged on."""
    servers = _ran(r)
    c, ls, out = servers.get("confab"), servers.get("llama-server"), {}
    if not c:
        return out
    engine, single_ = r.get("engine", {}).get("tokens_per_s"), c.get("single", {}).get("tokens_per_s")
    if engine and single_:
        theirs = (ls or {}).get("single", {}).get("tokens_per_s")
        out["single stream"] = (single_ / engine >= TARGETS["single_vs_engine"], f"{single_ / engine:.2f} of the engine"
                                + (f", {single_ / theirs:.2f} of llama-server" if theirs else ""))
    if ls and ls.get("many", {}).get("aggregate_tokens_per_s"):
        a, b = c["many"]["aggregate_tokens_per_s"], ls["many"]["aggregate_tokens_per_s"]
        out["8 users"] = (a >= b and not c["many"]["errors"], f"{a} vs {b} tok/s")
    if "ratio" in c.get("long_chat", {}):
        out["long chat"] = (c["long_chat"]["ratio"] <= TARGETS["long_chat"], f"{c['long_chat']['ratio']:.2f}")
    w = c.get("with_light", {})
    if "light_ttft_p95_s" in w:
        p95 = w["light_ttft_p95_s"]
        theirs = ls.get("with_light", {}) if ls else {}
        # A peer that answered no light question within the run is at least as slow as the run.
        their_p95 = theirs.get("light_ttft_p95_s", r["seconds"]) if ls else None
        better = their_p95 / p95 if their_p95 else None
        ok = p95 <= TARGETS["light_p95_s"] and (better is None or better >= TARGETS["light_vs_llama_server"])
        out["noisy neighbour"] = (ok, f"p95 {p95} s" + (f", {better:.1f}x llama-server's" if better else ""))
    if "heavy_ratio" in c:
        out["heavy clients"] = (c["heavy_ratio"] >= TARGETS["heavy_ratio"] and not w.get("errors"),
                                f"ratio {c['heavy_ratio']:.2f}, {w.get('errors', 0)} errors")
    f = c.get("flood")
    if f:
        small = f["small_ttft_s"]
        out["flood"] = (not f["errors"] and small is not None and small <= TARGETS["flood_small_ttft_s"],
                        f"{f['errors']} errors, short question {small} s")
    return out


def update_readme(r: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- fairness:start -->", "<!-- fairness:end -->"
    m = r["machine"]
    block = (f"{begin}\nLatest run: {r['date']}, {m['cpus']} CPU cores ({m['platform']}), embedded model, "
             f"{r['seconds']:.0f} s of load each; llama-server built from the vendored source as above (8 slots, "
             f"unified KV of 16k cells, like Confab's engine).\n\n{table(r)}\n{end}")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(head + block + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description="Confab beside its peers under load (see the module docstring).")
    ap.add_argument("--seconds", type=float, default=40.0, help="how long each noisy-neighbour load runs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the single-stream measure")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server binary, to compare with it too")
    ap.add_argument("--skip-peers", action="store_true", help="Confab only")
    ap.add_argument("--flood", type=int, default=8, metavar="N",
                    help="then (Confab only) N conversations of 1,000 messages at once, and a short question (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    ap.add_argument("--readme", action="store_true", help="also put the table in README.md")
    ap.add_argument("--transformers-only", action="store_true",
                    help="only part 6 (transformers), merged into the JSON of the last run")
    args = ap.parse_args()
    # A `timeout` or Ctrl-C still stops the servers this started (run()'s `finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = ["confab"] + ([] if args.skip_peers else ["llama_cpp.server"]) + (["llama-server"] if args.llama_server else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.transformers_only:
        result = json.loads(args.out.read_text()) if args.out.exists() else {"servers": {}, "seconds": args.seconds}
        result["transformers"] = transformers_run()
        args.out.write_text(json.dumps(result, indent=2))
        print(transformers_table(result["transformers"]))
        if args.readme and "machine" in result:
            update_readme(result)
        return
    result = run(names, args.llama_server, args.seconds, args.rounds, args.flood, args.out)
    print(table(result))
    print(f"wrote {args.out}")
    if args.readme:
        update_readme(result)


if __name__ == "__main__":
    main()
