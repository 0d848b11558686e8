"""Baseline images rendered by a WebUI *without* the extension, to compare byte for byte with one that has it.

    python -m tests.integration.baseline DIR     (with ANIMA_WEBUI_URL pointing at the extension-less host)
"""

from __future__ import annotations

import json
import os
import sys

CASES: dict[str, dict] = {
    "euler_a": {"prompt": "a photo of a dog", "steps": 4, "width": 64, "height": 64, "seed": 1234,
                "sampler_name": "Euler a"},
    "batch2_dpm": {"prompt": "a cat AND a hat", "negative_prompt": "blurry", "steps": 5, "width": 64,
                   "height": 64, "seed": 77, "batch_size": 2, "sampler_name": "DPM++ 2M"},
    "ddim_hires": {"prompt": "a house", "steps": 4, "width": 64, "height": 64, "seed": 5, "sampler_name": "DDIM",
                   "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5},
}


def load(directory: str, name: str) -> list[str]:
    with open(os.path.join(directory, name + ".json"), encoding="utf8") as f:
        return json.load(f)


def main(directory: str) -> None:
    from tests.integration import webui_client as client

    os.makedirs(directory, exist_ok=True)
    for name, body in CASES.items():
        r = client.post("/sdapi/v1/txt2img", body)
        r.raise_for_status()
        with open(os.path.join(directory, name + ".json"), "w", encoding="utf8") as f:
            json.dump(r.json()["images"], f)
    print(f"baseline: {len(CASES)} cases written to {directory}")


if __name__ == "__main__":
    main(sys.argv[1])
