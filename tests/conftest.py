"""Shared fixtures. End-to-end tests run the real CLI on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import saesweep.config.schema  # noqa: F401  (gives Hydra the schema conf/*.yaml extend, for tests that compose)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

# Small enough for 2 CPU cores, large enough to exercise buffer refills.
TINY_RUN = [
    "training.total_tokens=8192",
    "training.batch_size=1024",
    "buffer.size_tokens=4096",
    "training.log_every=2",
    "eval.rows=24",
    "eval.ce_rows=4",
    "eval.batch_rows=8",
    "activations.batch_rows=16",
    "sae.expansion_factor=2",
    "optimizer.lr=4e-3",
]


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until_training(proc: subprocess.Popen, metrics: Path, timeout: float = 600) -> None:
    """Return once a run's first metrics line is written (it is in the training loop);
    fail if the process ends first or the timeout passes."""
    import time

    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started training"
        time.sleep(0.2)


def weights(run_dir: Path) -> dict:
    """A finished run's exported SAE tensors."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "sae" / "sae_weights.safetensors"))


def metrics_without_timing(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field, for comparing interrupted and straight runs."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def train_a_few_steps(sae, x, target=None, steps: int = 5, lr: float = 1e-2) -> None:
    """Fit scaling, take a few Adam steps, calibrate, switch to eval: an SAE worth exporting."""
    import torch

    target = x if target is None else target
    sae.fit_to_data(x, target)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for step in range(steps):
        out = sae(x, target, step)
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        optimizer.step()
        sae.after_step()
    sae.calibrate(x)
    sae.eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model as a HookedTransformer (converted once per cache)."""
    import torch

    from saesweep.config.schema import ModelConfig
    from saesweep.lm.model import load_model

    return load_model(ModelConfig(), torch.device("cpu"), None)
