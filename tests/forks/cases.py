"""Baseline cases for the forks: rendered by the fork WITHOUT the extension (``python -m tests.forks.cases DIR``),
then compared byte for byte by the fork WITH it (test_identical_to_the_fork_without_the_extension)."""

from __future__ import annotations

import sys

from tests.integration import baseline

CASES: dict[str, dict] = {
    "euler_a": baseline.CASES["euler_a"],
    "batch2_dpm": baseline.CASES["batch2_dpm"],
    # Forge's txt2img API fails on hires without hr_additional_modules (None is not iterable); reForge ignores it
    "ddim_hires": {**baseline.CASES["ddim_hires"], "hr_additional_modules": ["Use same choices"]},
    "euler_cfg4": {"prompt": "a boat", "steps": 3, "width": 64, "height": 64, "seed": 8, "sampler_name": "Euler",
                     "cfg_scale": 4},
}

if __name__ == "__main__":
    baseline.CASES.clear()
    baseline.CASES.update(CASES)
    baseline.main(sys.argv[1])
