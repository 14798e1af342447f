"""Fair under load: the "noisy neighbour" scenario, Confab beside its peers, on the embedded model.

    python bench/fairness.py [--llama-server PATH] [--seconds 40] [--flood 8]
    -> bench/results/fairness.json and a table on stdout

Four heavy clients send ~4,000-token prompts back to back while one light client asks a short
question every 3 s, all through the OpenAI-compatible streaming API. Measured: the light
question's time to first token (p50 / p95 / max), and the heavy clients' prompt tokens read per
second with the light client and without it. The same load runs against llama-cpp-python's
`llama_cpp.server` and, given `--llama-server`, llama.cpp's own C++ server (8 slots, a unified KV
cache of 16k cells, like Confab's engine). Each heavy prompt starts with its own number, so no
server can answer it from a cache of the others. Then the flood: 8 conversations of 1,000
messages each at once (each fills the context), and a short question 5 s later: each must be
answered or refused with a 4xx that says why (never a 500), and the question answered at once.

Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from backends.locate import embedded_gguf  # noqa: E402

PARAGRAPH = ("The harbour town kept its records in a long ledger: ships in and out, the weather, the price of "
             "salt and rope, and who owed whom. Clerk {n} copied page {n} twice, once for the mayor and once "
             "for the archive, and wrote the tide tables beside them. ")
HEAVY_CLIENTS = 4
LIGHT_EVERY_S = 3.0
QUESTION = "What is the capital of France? One word."


def heavy_prompt(n: int, paragraphs: int = 62) -> str:
    """~4,000 tokens of the embedded model, unique from its first line."""
    return f"Document {n} ({random.random():.6f}).\n" + "".join(PARAGRAPH.format(n=f"{n}-{i}")
                                                             for i in range(paragraphs)) + "\nSummarise it."


MODEL = {}  # the model id each server names (Confab checks it)


def _says_something(data: str) -> bool:
    """Whether a streamed event carries text of the reply (not the role, not an empty delta)."""
    try:
        event = json.loads(data)
    except ValueError:
        return False  # [DONE]
    choices = event.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def stream(url: str, content: str, max_tokens: int, timeout: float = 600) -> dict:
    """One streamed chat completion: time to first content, and whether it ended well."""
    body = {"model": MODEL.get(url, "any"), "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    first = None
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                return {"ok": False, "status": r.status_code, "error": r.text[:200]}
            for line in r.iter_lines():
                if first is None and line.startswith("data:") and _says_something(line[5:]):
                    first = time.perf_counter() - start
    except httpx.HTTPError as e:  # counted as an error of the server under test
        return {"ok": False, "error": repr(e)[:200]}
    return {"ok": first is not None, "ttft_s": first, "total_s": time.perf_counter() - start}


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
           "errors": len(errors), "wall_s": round(wall, 1)}
    if light and light_ttft:
        ttfts = sorted(light_ttft)
        out.update(light_n=len(ttfts), light_ttft_p50_s=round(statistics.median(ttfts), 2),
                   light_ttft_p95_s=round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 2),
                   light_ttft_max_s=round(ttfts[-1], 2))
    return out


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


def serve(name: str, seconds: float, prompt_tokens: int, llama_server: str | None, flood_requests: int = 0) -> dict:
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
    try:
        wait_ready(url, proc)
        MODEL[url] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        stream(url, f"Hello {random.random()}", 4)  # warm, as nobody of the load
        result = {"alone": load(url, seconds, False, prompt_tokens)} if name == "confab" else {}
        result["with_light"] = load(url, seconds, True, prompt_tokens)
        if flood_requests and name == "confab":  # the target is Confab's; the peers, which do not trim a
            # conversation to the context, would read ~15k tokens a request: half an hour on 2 cores
            print(f"  {name}: {flood_requests} x 1,000 messages ...", flush=True)
            result["flood"] = flood(url, flood_requests)
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(r: dict) -> str:
    rows = ["| server | light TTFT p50 / p95 / max | heavy prompt tok/s with light (alone) | errors |",
            "| --- | --- | --- | ---: |"]
    for name, x in r["servers"].items():
        if "failed" in x:
            rows.append(f"| {name} | did not run: {x['failed'][:80]} | | |")
            continue
        w = x["with_light"]
        alone = f" ({x['alone']['heavy_prompt_tokens_per_s']:,}, ratio {x['heavy_ratio']:.2f})" if "alone" in x else ""
        ttft = (f"{w['light_ttft_p50_s']} / {w['light_ttft_p95_s']} / {w['light_ttft_max_s']} s"
                if "light_ttft_p50_s" in w else "no answer")
        rows.append(f"| {name} | {ttft} | {w['heavy_prompt_tokens_per_s']:,}{alone} | {w['errors']} |")
    floods = [(name, x["flood"]) for name, x in r["servers"].items() if "flood" in x]
    if floods:
        rows += ["", "| server | 8 x 1,000 messages at once: answered / refused (4xx) / errors | a short question meanwhile: first token |",
                 "| --- | --- | --- |"]
        for name, f in floods:
            ttft = f"{f['small_ttft_s']} s" if f["small_ttft_s"] is not None else "no answer"
            rows.append(f"| {name} | {f['answered']} / {f['refused_4xx']} / {f['errors']} (in {f['wall_s']} s) | {ttft} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description="The noisy-neighbour benchmark (see the module docstring).")
    ap.add_argument("--seconds", type=float, default=40.0, help="how long each load runs")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server binary, to compare with it too")
    ap.add_argument("--skip-peers", action="store_true", help="Confab only")
    ap.add_argument("--flood", type=int, default=8, metavar="N",
                    help="then (Confab only) N conversations of 1,000 messages at once, and a short question (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    args = ap.parse_args()
    from bench import tokens_of  # bench/bench.py, beside this file

    prompt_tokens = tokens_of(heavy_prompt(0))
    names = ["confab"] + ([] if args.skip_peers else ["llama_cpp.server"]) + (["llama-server"] if args.llama_server else [])
    result = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d"), "heavy_prompt_tokens": prompt_tokens, "seconds": args.seconds,
              "servers": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name} ...", flush=True)
        try:
            x = serve(name, args.seconds, prompt_tokens, args.llama_server, args.flood)
        except (RuntimeError, TimeoutError, httpx.HTTPError) as e:  # a peer that would not run: said, not fatal
            print(f"  {name} did not run: {e}", flush=True)
            result["servers"][name] = {"failed": str(e)[:300]}
            continue
        if "alone" in x:
            x["heavy_ratio"] = round(x["with_light"]["heavy_prompt_tokens_per_s"]
                                     / max(1, x["alone"]["heavy_prompt_tokens_per_s"]), 2)
        result["servers"][name] = x
        args.out.write_text(json.dumps(result, indent=2))  # after each server: a later failure keeps it
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
