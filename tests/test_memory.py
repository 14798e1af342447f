"""Unloading gives the memory back: the process's RSS returns near its level before the load."""

import gc

import psutil
import pytest

from backends.manager import ModelManager
from presets import load_model_presets

pytestmark = pytest.mark.timeout(300)


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("preset", ["smollm2-transformers", "smollm2-llamacpp"])
def test_unload_returns_memory(preset):
    import torch  # noqa: F401 - imported first so the library itself is not counted as the model

    spec = load_model_presets()[preset]
    manager = ModelManager()
    manager.load(spec)  # warm: libraries, kernels and caches that stay for the process's life
    manager.unload()
    before = rss_mb()
    manager.load(spec)
    loaded = rss_mb()
    manager.unload()
    after = rss_mb()
    grown = loaded - before
    print(f"{preset}: before {before:.0f} MB, loaded {loaded:.0f} MB, after unload {after:.0f} MB")
    assert grown > 50, "the model should take visible memory"
    assert after - before < 0.2 * grown, f"unload kept {after - before:.0f} of {grown:.0f} MB"
