"""Benchmark: load time, time to first token and decode speed of each backend on the embedded model.

Prints a table and writes JSON (bench/results/latest.json). Not a test: it measures.
Run: python bench/bench.py [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import create  # noqa: E402
from backends.base import GenerationParams, Message  # noqa: E402
from presets import load_model_presets  # noqa: E402

PROMPT = [Message("user", "Write a long story about a dragon who learns to read.")]


def measure(preset: str, tokens: int, runs: int) -> dict:
    spec = load_model_presets()[preset]
    backend = create(spec)
    start = time.perf_counter()
    backend.load(spec)
    load_s = time.perf_counter() - start
    params = GenerationParams(do_sample=False, max_new_tokens=tokens, repetition_penalty=1.0)
    list(backend.stream(PROMPT, params.replace(max_new_tokens=8)))  # warm-up
    ttft, tps = [], []
    for _ in range(runs):
        if hasattr(backend, "llm"):
            backend.llm.reset()  # cold prompt each run: measure prefill, not the prefix cache
        last = list(backend.stream(PROMPT, params))[-1]
        ttft.append(last.usage.ttft_s)
        tps.append(last.usage.tokens_per_s)
    backend.unload()
    return {
        "preset": preset,
        "backend": spec.backend,
        "load_s": round(load_s, 3),
        "ttft_ms": round(statistics.median(ttft) * 1000, 1),
        "tokens_per_s": round(statistics.median(tps), 1),
        "new_tokens": tokens,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = ap.parse_args()
    rows = [measure(p, args.tokens, args.runs) for p in ("smollm2-llamacpp", "smollm2-transformers")]
    result = {
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'backend':<14}{'load s':>8}{'TTFT ms':>10}{'tok/s':>8}")
    for r in rows:
        print(f"{r['backend']:<14}{r['load_s']:>8.2f}{r['ttft_ms']:>10.1f}{r['tokens_per_s']:>8.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
