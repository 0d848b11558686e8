"""A bare `pytest` without a WebUI host stops with a clear message instead of passing by skipping everything."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ANIMA_WEBUI_URL", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_integration_tests_without_a_host_fail_loudly():
    run = _pytest("--collect-only", "tests/integration/test_generation.py")
    assert run.returncode != 0, run.stdout[-2000:]
    assert "ANIMA_WEBUI_URL is not set" in run.stdout + run.stderr
    assert "tests/run.sh" in run.stdout + run.stderr


def test_core_tests_alone_need_no_host():
    run = _pytest("--collect-only", "tests/core/test_names.py")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
