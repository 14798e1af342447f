"""Confab's benchmark: the five speed targets of the performance issue, on the embedded model.

    python bench/bench.py            # a few minutes on 2 cores
    -> bench/results/latest.json, bench/results/latest.png, and a table on stdout

1 overhead     tokens/s a client receives through the Gradio API, and through the OpenAI API, / the
               engine called directly (llama-cpp-python); a plain gr.ChatInterface over the same
               engine is the peer
2 long chat    time to first token at turn 10 / turn 1 of a conversation reaching ~2,000 tokens,
               llama.cpp and transformers, with and without the per-session KV cache
3 many users   8 concurrent sessions through the Gradio API: errors, p95 TTFT / single-user
               TTFT, aggregate tokens/s / single-user tokens/s
4 start-up     `python app.py` to the first streamed token; `python app.py --help`
5 the limit    decode tokens/s / (memory bandwidth / bytes of weights read per token)

Not a test: it measures and prints. Tests stay deterministic.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from backends import create  # noqa: E402
from backends.base import GenerationParams, Message  # noqa: E402
from backends.locate import embedded_gguf  # noqa: E402
from presets import load_model_presets  # noqa: E402

STORY = "Write a long, detailed story about a dragon who learns to read, with many chapters."
NEW_TOKENS = 256
TARGETS = {"overhead": 0.95, "long_chat": 1.5, "many_users_ttft": 8.0, "many_users_throughput": 1.0,
           "startup_s": 10.0, "help_s": 2.0}


# ---- helpers ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tokenizer():
    from llama_cpp import Llama

    return Llama(str(embedded_gguf()), n_ctx=256, vocab_only=True, verbose=False)


def tokens_of(text: str) -> int:
    return len(_tokenizer().tokenize(text.encode(), add_bos=False))


def gradio_stream(url: str, message: str, max_new_tokens: int = NEW_TOKENS, api: str = "/respond") -> dict:
    """One streamed reply through gradio_client: when each piece arrived, and the final text."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    if api == "/respond":
        job = client.submit(message=message, history=[], system_prompt="", do_sample=False,
                            max_new_tokens=max_new_tokens, repetition_penalty=1.0, api_name=api)
    else:
        job = client.submit(message=message, api_name=api)
    stamps, text = [], ""
    for update in job:
        new = _reply_text(update)
        if new and new != text:
            stamps.append(time.perf_counter() - start)
            text = new
    return {"ttft_s": stamps[0], "last_s": stamps[-1], "text": text, "tokens": tokens_of(text),
            "errors": 0}


def _reply_text(update) -> str:
    if isinstance(update, str):
        return update
    chat = update[1] if isinstance(update, (list, tuple)) else update
    if not chat or chat[-1]["role"] != "assistant":
        return ""
    content = chat[-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def decode_rate(tokens: int, first_s: float, last_s: float) -> float:
    return (tokens - 1) / (last_s - first_s) if last_s > first_s else 0.0


# ---- 1: overhead -----------------------------------------------------------------------
def engine_direct(runs: int) -> dict:
    """llama-cpp-python's own streaming API on the same prompt, greedy: the engine itself."""
    from llama_cpp import Llama

    llm = Llama(str(embedded_gguf()), n_ctx=8192, n_threads=os.cpu_count(), verbose=False)
    results = []
    for _ in range(runs):
        llm.reset()
        start, stamps = time.perf_counter(), []
        for _piece in llm.create_chat_completion([{"role": "user", "content": STORY}], max_tokens=NEW_TOKENS,
                                                 temperature=0.0, repeat_penalty=1.0, stream=True):
            if _piece["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter() - start)
        results.append(decode_rate(len(stamps), stamps[0], stamps[-1]))
    llm.close()
    return {"tokens_per_s": statistics.median(results), "runs": runs}


def through_app(url: str, runs: int) -> dict:
    rates = []
    for _ in range(runs):
        r = gradio_stream(url, STORY)
        rates.append(decode_rate(r["tokens"], r["ttft_s"], r["last_s"]))
    return {"tokens_per_s": statistics.median(rates), "runs": runs}


def through_openai_api(url: str) -> float:
    """Decode tokens/s of one reply streamed from the app's /v1/chat/completions by the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")
    start, stamps, text = time.perf_counter(), [], ""
    stream = client.chat.completions.create(
        model="smollm2-llamacpp", messages=[{"role": "user", "content": STORY}], stream=True, temperature=0,
        max_tokens=NEW_TOKENS, extra_body={"repetition_penalty": 1.0})
    for event in stream:
        delta = event.choices[0].delta.content if event.choices else None
        if delta:
            stamps.append(time.perf_counter() - start)
            text += delta
    client.close()
    return decode_rate(tokens_of(text), stamps[0], stamps[-1])


def chat_interface_peer(runs: int) -> dict:
    """The peer most people start from: gr.ChatInterface over llama-cpp-python, as its docs show."""
    import gradio as gr
    from conftest import free_port
    from llama_cpp import Llama

    llm = Llama(str(embedded_gguf()), n_ctx=8192, n_threads=os.cpu_count(), verbose=False)

    def chat(message, history):
        messages = [*history, {"role": "user", "content": message}]
        text = ""
        for piece in llm.create_chat_completion(messages, max_tokens=NEW_TOKENS, temperature=0.0,
                                                repeat_penalty=1.0, stream=True):
            text += piece["choices"][0]["delta"].get("content", "") or ""
            yield text

    port = free_port()
    demo = gr.ChatInterface(chat, api_name="chat")
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        rates = []
        for _ in range(runs):
            llm.reset()
            r = gradio_stream(f"http://127.0.0.1:{port}", STORY, api="/chat")
            rates.append(decode_rate(r["tokens"], r["ttft_s"], r["last_s"]))
    finally:
        demo.close()
        llm.close()
    return {"tokens_per_s": statistics.median(rates), "runs": runs}


# ---- 2: long conversations -------------------------------------------------------------
def long_chat(preset: str, replies: list[str] | None = None, repeats: int = 1) -> dict:
    """Ten turns, each a ~100-token question and a ~100-token reply, reaching ~2,000 tokens.

    With `replies` given (the texts of an earlier run), every turn is read from scratch in a fresh
    session: what a chat without per-session KV reuse pays.
    """
    spec = load_model_presets()[preset]
    backend = create(spec)
    backend.load(spec)
    runs = [_conversation(backend, replies, run) for run in range(repeats)]
    backend.unload()
    runs.sort(key=lambda r: r["ratio"])
    median = runs[len(runs) // 2]  # one turn's TTFT is noisy here: repeat and keep the median run
    return {"preset": preset, **median, "ratios": [r["ratio"] for r in runs]}


def _conversation(backend, replies: list[str] | None, run: int) -> dict:
    if hasattr(backend, "engine"):
        backend.engine.forget_all()  # every run starts from an empty cache
    reuse = replies is None
    params = GenerationParams(do_sample=False, max_new_tokens=100 if reuse else 1, repetition_penalty=1.1)
    history: list[Message] = []
    turns, texts = [], []
    for turn in range(1, 11):
        history.append(Message("user", f"Run {run}, turn {turn}. " + "I am planning a sailing trip along the coast next "
                                       "summer with two friends and a small boat; " * 4 + "what should we do next?"))
        if not reuse and hasattr(backend, "engine"):
            backend.engine.forget_all()  # llama.cpp: forget every cache, as a chat without reuse would
        chunks = list(backend.stream(history, params, session_id=f"long-chat-{run}" if reuse else f"fresh-{run}-{turn}"))
        usage = chunks[-1].usage
        turns.append({"turn": turn, "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                      "ttft_ms": round(usage.ttft_s * 1000, 1)})
        texts.append("".join(c.text for c in chunks) if reuse else replies[turn - 1])
        history.append(Message("assistant", texts[-1]))
    return {"reuse": reuse, "turns": turns, "replies": texts,
            "ratio": round(turns[-1]["ttft_ms"] / turns[0]["ttft_ms"], 2)}


# ---- 3: many users ---------------------------------------------------------------------
def many_users(url: str, users: int = 8) -> dict:
    question = "Tell me a short story about {}, in about one hundred words."
    subjects = ["a lighthouse", "a fox", "the moon", "a baker", "a river", "a robot", "a violin", "a glacier"]
    # Two different subjects: asking the same thing twice would time the second from the prompt cache.
    single = [gradio_stream(url, question.format(subject), 128) for subject in ("a teapot", "a lantern")]
    single_ttft = statistics.median(r["ttft_s"] for r in single)
    single_rate = statistics.median(r["tokens"] / r["last_s"] for r in single)
    start = time.perf_counter()
    errors, results = 0, []
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        futures = [pool.submit(gradio_stream, url, question.format(subjects[i % len(subjects)]), 128)
                   for i in range(users)]
        for f in futures:
            try:
                results.append(f.result())
            except Exception:  # noqa: BLE001 - counted, not raised: an error is a result here
                errors += 1
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    aggregate = sum(r["tokens"] for r in results) / wall
    own = all(subjects[i % len(subjects)].split()[-1] in r["text"].lower() for i, r in enumerate(results))
    return {"users": users, "errors": errors, "single_ttft_ms": round(single_ttft * 1000),
            "p95_ttft_ms": round(p95 * 1000), "ttft_ratio": round(p95 / single_ttft, 2),
            "single_tokens_per_s": round(single_rate, 1), "aggregate_tokens_per_s": round(aggregate, 1),
            "throughput_ratio": round(aggregate / single_rate, 2), "replies_on_their_own_subject": own}


# ---- 4: start-up -----------------------------------------------------------------------
def startup() -> dict:
    import httpx
    from conftest import free_port

    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], check=True, capture_output=True)
    help_s = time.perf_counter() - start
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        serving_s = time.perf_counter() - start
        first = gradio_stream(f"http://127.0.0.1:{port}", "Hello!", 8)
        first_token_s = serving_s + first["ttft_s"]
    finally:
        proc.terminate()
        proc.wait(10)
    return {"help_s": round(help_s, 2), "serving_s": round(serving_s, 2), "first_token_s": round(first_token_s, 2)}


# ---- 5: against the physical limit -----------------------------------------------------
def memory_bandwidth_gbs() -> float:
    """Streaming read bandwidth: sum over a 1 GiB array, best of 5 (numpy uses one core here)."""
    import numpy as np

    data = np.ones(2**27, dtype=np.float64)  # 1 GiB
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def raw_llama_decode_rate(tokens: int = 128) -> float:
    """llama.cpp alone: single-token llama_decode calls, no sampling, no Python around them."""
    from backends.llamacpp_lib import Lib

    lib = Lib()
    model = lib.load_model(str(embedded_gguf()))
    ctx = lib.context(model, cells=1024, n_batch=64, sequences=1, threads=os.cpu_count())
    batch = ctx.batch()
    batch.add(0, list(range(100, 140)), 0, logits_last=True)
    ctx.decode(batch)
    start = time.perf_counter()
    for i in range(tokens):
        batch.reset()
        batch.add(0, [200 + i % 50], 40 + i, logits_last=True)
        ctx.decode(batch)
    rate = tokens / (time.perf_counter() - start)
    batch.close()
    ctx.close()
    model.close()
    return rate


def backend_numbers(preset: str) -> dict:
    """Decode tokens/s through the backend, and the bytes of weights each token reads."""
    spec = load_model_presets()[preset]
    backend = create(spec)
    backend.load(spec)
    params = GenerationParams(do_sample=False, max_new_tokens=128, repetition_penalty=1.0)
    list(backend.stream([Message("user", "Hi")], params.replace(max_new_tokens=4)))
    rates = [list(backend.stream([Message("user", STORY)], params))[-1].usage.tokens_per_s for _ in range(2)]
    if preset.endswith("transformers"):
        size = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    else:
        size = embedded_gguf().stat().st_size
    backend.unload()
    return {"tokens_per_s": max(rates), "bytes": size}


def physical_limit() -> dict:
    bandwidth = memory_bandwidth_gbs()
    out: dict = {"bandwidth_gbs": round(bandwidth, 1)}
    for name, preset in (("llamacpp", "smollm2-llamacpp"), ("transformers", "smollm2-transformers")):
        n = backend_numbers(preset)
        limit = bandwidth * 1e9 / n["bytes"]
        out[name] = {"tokens_per_s": round(n["tokens_per_s"], 1), "weights_mb": round(n["bytes"] / 1e6),
                     "limit_tokens_per_s": round(limit, 1), "fraction_of_limit": round(n["tokens_per_s"] / limit, 2)}
    raw = raw_llama_decode_rate()  # measured right after the backend, to share the machine's mood
    out["llamacpp"]["engine_alone_tokens_per_s"] = round(raw, 1)
    out["llamacpp"]["confab_share_of_engine"] = round(out["llamacpp"]["tokens_per_s"] / raw, 2)
    return out


# ---- running and reporting -------------------------------------------------------------
def overhead(runs: int) -> dict:
    """Decode tokens/s, measured in alternating rounds so that a slow moment of the machine hits
    every contender alike: llama-cpp-python's own API, Confab's backend in process, the launched
    app through its Gradio API and through its OpenAI API, and a plain gr.ChatInterface."""
    from conftest import RunningApp

    spec = load_model_presets()["smollm2-llamacpp"]
    backend = create(spec)
    backend.load(spec)
    params = GenerationParams(do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0)
    app = RunningApp()
    samples: dict[str, list[float]] = {"engine": [], "backend": [], "app": [], "openai": [], "chatinterface": []}
    try:
        for _ in range(runs):
            samples["engine"].append(engine_direct(1)["tokens_per_s"])
            samples["backend"].append(list(backend.stream([Message("user", STORY)], params))[-1].usage.tokens_per_s)
            samples["app"].append(through_app(app.url, 1)["tokens_per_s"])
            samples["openai"].append(through_openai_api(app.url))
            samples["chatinterface"].append(chat_interface_peer(1)["tokens_per_s"])
        many = many_users(app.url)
    finally:
        app.stop()
        backend.unload()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"overhead": {
        "engine_tokens_per_s": round(med["engine"], 1), "backend_tokens_per_s": round(med["backend"], 1),
        "confab_gradio_tokens_per_s": round(med["app"], 1), "chatinterface_tokens_per_s": round(med["chatinterface"], 1),
        "openai_api_tokens_per_s": round(med["openai"], 1), "openai_ratio": round(med["openai"] / med["engine"], 3),
        "ratio": round(med["app"] / med["engine"], 3), "ratio_to_backend": round(med["app"] / med["backend"], 3),
        "chatinterface_ratio": round(med["chatinterface"] / med["engine"], 3), "samples": samples,
    }, "many_users": many}


def run(quick: bool) -> dict:
    runs = 1 if quick else 3
    result: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                                "python": platform.python_version()}, "date": time.strftime("%Y-%m-%d")}
    print("1/5 overhead, 3/5 many users ...", flush=True)
    result.update(overhead(runs))
    print("2/5 long conversations ...", flush=True)
    result["long_chat"] = []
    for preset, repeats in (("smollm2-llamacpp", runs), ("smollm2-transformers", 1)):
        with_reuse = long_chat(preset, repeats=repeats)
        result["long_chat"] += [with_reuse, long_chat(preset, with_reuse["replies"])]
    print("4/5 start-up ...", flush=True)
    result["startup"] = startup()
    print("5/5 physical limit ...", flush=True)
    result["physical"] = physical_limit()
    result["targets"] = TARGETS
    return result


def table(r: dict) -> str:
    o, m, s, p = r["overhead"], r["many_users"], r["startup"], r["physical"]
    lc = {(x["preset"], x["reuse"]): x for x in r["long_chat"]}
    rows = [
        ("1 overhead: Gradio API / engine tok/s", f"{o['ratio']:.3f}", ">= 0.95",
         f"{o['confab_gradio_tokens_per_s']} / {o['engine_tokens_per_s']} tok/s (llama-cpp-python); "
         f"/ Confab's backend in process {o['ratio_to_backend']:.3f}; gr.ChatInterface {o['chatinterface_ratio']:.3f}"),
        ("1 overhead: OpenAI API / engine tok/s", f"{o['openai_ratio']:.3f}", ">= 0.95",
         f"{o['openai_api_tokens_per_s']} / {o['engine_tokens_per_s']} tok/s, openai client on /v1/chat/completions"),
    ]
    for preset, label in (("smollm2-llamacpp", "llama.cpp"), ("smollm2-transformers", "transformers")):
        on, off = lc[(preset, True)], lc[(preset, False)]
        rows.append((f"2 turn 10 / turn 1 TTFT, {label}", f"{on['ratio']:.2f}", "<= 1.5",
                     f"{on['turns'][0]['ttft_ms']} -> {on['turns'][-1]['ttft_ms']} ms at "
                     f"{on['turns'][-1]['prompt_tokens']} tokens (runs: {', '.join(map(str, on['ratios']))}); "
                     f"without reuse {off['ratio']:.2f}"))
    rows += [
        ("3 8 users: p95 TTFT / single", f"{m['ttft_ratio']:.2f}", "<= 8",
         f"{m['p95_ttft_ms']} / {m['single_ttft_ms']} ms, {m['errors']} errors"),
        ("3 8 users: aggregate / single tok/s", f"{m['throughput_ratio']:.2f}", ">= 1",
         f"{m['aggregate_tokens_per_s']} / {m['single_tokens_per_s']} tok/s"),
        ("4 start-up to first token", f"{s['first_token_s']:.2f} s", "<= 10 s", f"serving after {s['serving_s']} s"),
        ("4 --help", f"{s['help_s']:.2f} s", "<= 2 s", ""),
    ]
    for name in ("llamacpp", "transformers"):
        x = p[name]
        extra = (f"; llama_decode alone {x['engine_alone_tokens_per_s']} tok/s, Confab keeps "
                 f"{x['confab_share_of_engine']:.0%}" if "engine_alone_tokens_per_s" in x else "")
        rows.append((f"5 decode / bandwidth limit, {name}", f"{x['fraction_of_limit']:.2f}", "report",
                     f"{x['tokens_per_s']} of {x['limit_tokens_per_s']} tok/s ({x['weights_mb']} MB/token at "
                     f"{p['bandwidth_gbs']} GB/s){extra}"))
    out = ["| target | measured | goal | detail |", "| --- | ---: | --- | --- |"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lc = {(x["preset"], x["reuse"]): x for x in r["long_chat"]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    o = r["overhead"]
    axes[0].bar(["llama-cpp-\npython", "Confab\nbackend", "Confab\nGradio API", "Confab\nOpenAI API",
                 "gr.Chat-\nInterface"],
                [o["engine_tokens_per_s"], o["backend_tokens_per_s"], o["confab_gradio_tokens_per_s"],
                 o["openai_api_tokens_per_s"], o["chatinterface_tokens_per_s"]],
                color=["#999", "#fdba74", "#f97316", "#ea580c", "#60a5fa"])
    axes[0].set_title("Decode tokens/s a client receives")
    for preset, colour in (("smollm2-llamacpp", "#f97316"), ("smollm2-transformers", "#a855f7")):
        for reuse, style in ((True, "-"), (False, ":")):
            t = lc[(preset, reuse)]["turns"]
            axes[1].plot([x["prompt_tokens"] for x in t], [x["ttft_ms"] for x in t], style, color=colour, marker="o",
                         label=f"{preset.split('-')[1]}{'' if reuse else ' (no reuse)'}")
    axes[1].set_xlabel("prompt tokens (turns 1-10)")
    axes[1].set_ylabel("time to first token, ms")
    axes[1].set_title("Long conversation")
    axes[1].legend(fontsize=8)
    m = r["many_users"]
    axes[2].bar(["1 user", "8 users (aggregate)"], [m["single_tokens_per_s"], m["aggregate_tokens_per_s"]],
                color=["#999", "#f97316"])
    axes[2].set_title(f"Throughput; p95 TTFT {m['p95_ttft_ms']} ms vs {m['single_ttft_ms']} ms alone")
    fig.suptitle(f"Confab on SmolLM2-135M, {r['machine']['cpus']} CPU cores ({r['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description="Confab's speed benchmark (see the module docstring).")
    ap.add_argument("--quick", action="store_true", help="one run per measurement instead of three")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ap.add_argument("--readme", action="store_true", help="also put the table and chart in README.md")
    args = ap.parse_args()
    result = run(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    chart(result, args.out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if args.readme:
        update_readme(result, args.out.with_suffix(".png"))


def update_readme(result: dict, png: Path) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    m = result["machine"]
    block = (f"{start}\nLatest run: {result['date']}, {m['cpus']} CPU cores, {m['platform']}, Python {m['python']}.\n\n"
             f"{table(result)}\n\n![benchmark chart]({png.relative_to(ROOT)})\n{end}")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(head + block + tail)


if __name__ == "__main__":
    main()
