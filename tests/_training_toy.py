"""A toy preference set and config for the training tests (token-id records: no tokenizer needed).

Chosen responses count up 10, 11, ..., 19, 10, ...; rejected ones are random tokens in [300, 500):
a tiny Llama learns to prefer the chosen pattern within a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tracealign_jax.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write_toy_preferences(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = rng.integers(20, 200, size=int(rng.integers(4, 12))).tolist()
            chosen = [10 + (j % 10) for j in range(int(rng.integers(4, 10)))]
            rejected = rng.integers(300, 500, size=int(rng.integers(4, 10))).tolist()
            f.write(json.dumps({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}) + "\n")
    return path


def toy_config(data_path: Path, out_dir: Path, *overrides: str) -> Config:
    base = [
        f"data.train_path={data_path}",
        f"train.output_dir={out_dir}",
        "data.max_prompt_len=16",
        "data.max_response_len=16",
        "data.buckets=[32]",
        "train.learning_rate=3e-3",
        "train.warmup_steps=0",
        "checkpoint.async_save=false",
    ]
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", base + list(overrides))
