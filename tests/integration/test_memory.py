"""Memory: generations with the context switching between requests do not grow the WebUI process beyond a
small bound, and each context file is read once (not once per generation).

Measured as the host's own figure (``/sdapi/v1/memory``: the process RSS) after a warm-up, at 64 px and 1 step.
The bound is on the growth per generation over the second half of the run, when allocator pools have filled:
the README's runs grew 0.08 MiB per generation over 200 and not at all over the last 250 of 400; a context
kept per request (0.2 MiB each here) or a leaked hook would exceed it. The default run makes 60 generations
(~45 s on 2 CPU cores); ``ANIMA_SLOW=1`` makes 200 and, as a control, 200 without any context (about 5 minutes).
"""

from __future__ import annotations

import os
import time

from tests.integration import webui_client as client

SLOW = bool(os.environ.get("ANIMA_SLOW"))
GENERATIONS = int(os.environ.get("ANIMA_MEMORY_GENERATIONS", "200" if SLOW else "60"))
PER_GENERATION_MB = 0.2  # over the second half; measured 0.03-0.12 on the 2-core machine


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
    half = GENERATIONS // 2
    first, first_seconds = _run(kinds, half)
    second, second_seconds = _run(kinds, GENERATIONS - half)
    per_generation = second / (GENERATIONS - half)
    loads = client.status()["context_loads"] - loads_before
    report = (f"\nreliability: {GENERATIONS} generations switching 3 contexts in {first_seconds + second_seconds:.0f} s: "
              f"RSS {first + second:+.1f} MiB ({first:+.1f} then {second:+.1f}: {per_generation:+.3f} MiB per generation "
              f"over the second half), context files read {loads} times")
    if SLOW:
        control, _ = _run([lambda i: client.txt2img("a dog", steps=1, seed=i)], GENERATIONS)
        report += f"; control without contexts: RSS {control:+.1f} MiB"
    print(report)
    assert loads == 0, "the warm-up loaded every context: none should be read again"
    assert per_generation <= PER_GENERATION_MB, f"RSS grew {per_generation:.3f} MiB per generation over the second half"
    assert client.status()["hooks_installed"] == 0
