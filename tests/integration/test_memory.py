"""Memory: generations with the context switching between requests do not grow the WebUI process beyond a
small bound, and each context file is read once (not once per generation).

Measured as the host's own figure (``/sdapi/v1/memory``: the process RSS) after a warm-up, at 64 px and 1 step.
The default run makes 40 generations (~30 s on 2 CPU cores); ``ANIMA_SLOW=1`` makes the full 200 and, as a
control, 200 without any context, and reports both (about 5 minutes).
"""

from __future__ import annotations

import os
import time

from tests.integration import webui_client as client

SLOW = bool(os.environ.get("ANIMA_SLOW"))
GENERATIONS = int(os.environ.get("ANIMA_MEMORY_GENERATIONS", "200" if SLOW else "40"))
BOUND_MB = 64.0


def _rss_mb() -> float:
    return client.get("/sdapi/v1/memory").json()["ram"]["used"] / 2**20


def _run(kinds: list, count: int) -> tuple[float, float]:
    """RSS growth (MiB) and seconds for `count` requests cycling through `kinds`."""
    before, started = _rss_mb(), time.time()
    for i in range(count):
        kinds[i % len(kinds)](i)
    return _rss_mb() - before, time.time() - started


def test_switching_contexts_does_not_grow_memory(ctx):
    names = [ctx["name"], client.create_context("itest_mem_b", seed=11)["name"],
             client.create_context("itest_mem_c", seed=12, n_tokens=8)["name"]]
    kinds = [
        lambda i: client.txt2img(f"a dog <anima:{names[i % 3]}:1>", steps=1, seed=i),
        lambda i: client.txt2img("a dog", steps=1, seed=i, anima_args=[True, names[(i + 1) % 3], 0.8, "negative", 0, 1, ""]),
        lambda i: client.txt2img(f"a dog <anima:{names[i % 3]}:0.5>", steps=1, seed=i,
                                 anima_args=[{"units": [{"name": names[(i + 2) % 3], "weights": "fine"}]}]),
        lambda i: client.txt2img("a dog", steps=1, seed=i),
    ]
    _run(kinds, 12)  # warm-up: every kind of request once with every context, allocator pools filled
    loads_before = client.status()["context_loads"]
    growth, seconds = _run(kinds, GENERATIONS)
    loads = client.status()["context_loads"] - loads_before
    report = (f"\nreliability: {GENERATIONS} generations switching 3 contexts in {seconds:.0f} s: RSS {growth:+.1f} MiB, "
              f"context files read {loads} times")
    if SLOW:
        control, _ = _run([lambda i: client.txt2img("a dog", steps=1, seed=i)], GENERATIONS)
        report += f"; control without contexts: RSS {control:+.1f} MiB"
    print(report)
    assert loads == 0, "the warm-up loaded every context: none should be read again"
    assert growth < BOUND_MB, f"RSS grew by {growth:.1f} MiB over {GENERATIONS} generations"
    assert client.status()["hooks_installed"] == 0
