"""`python -m saesweep.upload`: the staged hub layout (offline), and a failed push."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import run_cli

from saesweep.sae import build_sae
from saesweep.sae.topk import TopKSAEConfig
from saesweep.sae_format.write import save_sae
from saesweep.upload import Run, assign_sae_ids

HOOK = "blocks.6.hook_resid_post"


def fake_run(run_dir: Path, k: int, overrides: list[str], seed: int = 0) -> Path:
    """A finished run dir as training leaves it: .hydra/overrides.yaml, sae/ (via the real
    export, sparsity included) and eval.json. Tiny, so no LM is needed."""
    torch.manual_seed(seed)
    sae = build_sae(TopKSAEConfig(d_sae=32, k=k), d_in=16)
    sparsity = torch.log10(torch.rand(32).clamp_min(1e-10))
    save_sae(
        sae,
        run_dir / "sae",
        {"model_name": "SmolLM2-135M-Instruct.Q4_1", "hook_name": HOOK, "dataset_path": "shakespeare"},
        sparsity=sparsity,
    )
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "eval.json").write_text(
        json.dumps(
            {
                "l0": float(k),
                "explained_variance": 0.5 + k / 100,
                "ce_loss_score": 0.9,
                "dead_fraction": 0.0,
                "dead_window_tokens": 3047,
                "bos_excluded": True,
                "tokens_trained": 8192,
            }
        )
    )
    return run_dir


def staged_files(stage: Path) -> list[str]:
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())


def dry_run(target: Path, stage: Path, cwd: Path):
    return run_cli(
        "saesweep.upload",
        str(target),
        "--repo-id",
        "someone/smollm2-saes",
        "--stage-dir",
        str(stage),
        "--dry-run",
        cwd=cwd,
    )


def test_dry_run_stages_one_run_under_its_hook_name(tmp_path):
    run = fake_run(tmp_path / "outputs" / "2026-11-23" / "12-00-00", k=8, overrides=["sae.k=8"])
    proc = dry_run(run, tmp_path / "stage", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stage = tmp_path / "stage"
    assert staged_files(stage) == sorted(
        [
            "README.md",
            "pretrained_saes.yaml",
            *(
                f"{HOOK}/{name}"
                for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json")
            ),
        ]
    )
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (stage / HOOK / name).read_bytes() == (run / "sae" / name).read_bytes()
    card = (stage / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    assert f'SAE.from_pretrained("someone/smollm2-saes", "{HOOK}")' in card
    assert f"| `{HOOK}` | topk | 32 | 8 | 0.58 |" in card  # the eval.json metrics, in the table
    release = yaml.safe_load((stage / "pretrained_saes.yaml").read_text())
    assert release == {
        "smollm2-saes": {
            "repo_id": "someone/smollm2-saes",
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "saes": [{"id": HOOK, "path": HOOK, "l0": 8.0, "variance_explained": 0.58}],
        }
    }
    assert "nothing pushed" in proc.stdout


def test_dry_run_stages_a_sweep_with_ids_from_the_differing_overrides(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-23" / "12-00-00"
    common = ["training.total_tokens=8192", "architecture=topk"]
    fake_run(sweep / "0", k=8, overrides=[*common, "sae.k=8"], seed=0)
    fake_run(sweep / "1", k=16, overrides=[*common, "sae.k=16"], seed=1)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a member that never finished
    proc = dry_run(sweep.parent.parent, tmp_path / "stage", tmp_path)  # the whole multirun/ tree
    assert proc.returncode == 0, proc.stderr[-2000:]
    stage = tmp_path / "stage"
    folders = sorted(p.name for p in stage.iterdir() if p.is_dir())
    assert folders == [f"{HOOK}__sae.k-16", f"{HOOK}__sae.k-8"]
    assert (stage / f"{HOOK}__sae.k-16" / "sae_weights.safetensors").read_bytes() == (
        sweep / "1" / "sae" / "sae_weights.safetensors"
    ).read_bytes()
    assert "skipping 1 unfinished" in proc.stderr
    ids = [s["id"] for s in yaml.safe_load((stage / "pretrained_saes.yaml").read_text())["smollm2-saes"]["saes"]]
    assert ids == [f"{HOOK}__sae.k-8", f"{HOOK}__sae.k-16"]  # member order


def test_sae_lens_hub_loader_reads_the_staged_layout(tmp_path):
    """SAE.from_pretrained(repo_id, sae_id), with the hub download pointed at the staged folder."""
    from sae_lens import SAE as LensSAE

    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", k=4, overrides=["sae.k=4"])
    fake_run(sweep / "1", k=6, overrides=["sae.k=6"], seed=1)
    assert dry_run(sweep, tmp_path / "stage", tmp_path).returncode == 0

    def download(repo_id: str, filename: str, **kwargs) -> str:
        assert repo_id == "someone/smollm2-saes"
        path = tmp_path / "stage" / filename
        if not path.exists():
            from huggingface_hub.utils import EntryNotFoundError

            raise EntryNotFoundError(filename)
        return str(path)

    with mock.patch("sae_lens.loading.pretrained_sae_loaders.hf_hub_download", side_effect=download):
        sae, cfg, sparsity = LensSAE.from_pretrained_with_cfg_and_sparsity("someone/smollm2-saes", f"{HOOK}__sae.k-6")
    assert sae.cfg.k == 6 and cfg["metadata"]["hook_name"] == HOOK
    from safetensors.torch import load_file

    assert torch.equal(sparsity, load_file(str(sweep / "1" / "sae" / "sparsity.safetensors"))["sparsity"])


def test_ids_stay_unique_when_runs_share_their_overrides(tmp_path):
    runs = [Run(tmp_path / name, {"metadata": {"hook_name": HOOK}}, {}, {"sae.k": "8"}) for name in ("0", "1")]
    runs.append(Run(tmp_path / "2", {"metadata": {"hook_name": "blocks.3.hook_resid_post"}}, {}, None))
    assign_sae_ids(runs)
    assert [r.sae_id for r in runs] == [f"{HOOK}__run-0", f"{HOOK}__run-1", "blocks.3.hook_resid_post"]


@pytest.mark.parametrize(
    "case,needle",
    [
        ("bad_repo_id", "--repo-id 'no-slash'"),
        ("nothing_finished", "no finished runs"),
        ("stage_not_empty", "not empty"),
        ("broken_sae", "sae_weights.safetensors"),
        ("sparsity_wrong_width", "sparsity.safetensors: tensor 'sparsity' has shape [5]"),
    ],
)
def test_bad_input_gives_one_line_error(case, needle, tmp_path):
    run = fake_run(tmp_path / "run", k=4, overrides=[])
    stage = tmp_path / "stage"
    repo = "someone/x"
    if case == "bad_repo_id":
        repo = "no-slash"
    elif case == "nothing_finished":
        (run / "eval.json").unlink()
    elif case == "stage_not_empty":
        stage.mkdir()
        (stage / "old.txt").write_text("x")
    elif case == "broken_sae":
        weights = run / "sae" / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "sparsity_wrong_width":
        from safetensors.torch import save_file

        save_file({"sparsity": torch.zeros(5)}, str(run / "sae" / "sparsity.safetensors"))
    proc = run_cli("saesweep.upload", str(run), "--repo-id", repo, "--stage-dir", str(stage), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_without_a_reachable_hub_fails_in_one_line(tmp_path):
    """The real push call, against an endpoint nothing listens on: one line, staged files kept."""
    run = fake_run(tmp_path / "run", k=4, overrides=[])
    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_TOKEN": "hf_not_a_real_token",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    proc = run_cli(
        "saesweep.upload",
        str(run),
        "--repo-id",
        "someone/x",
        "--stage-dir",
        str(tmp_path / "stage"),
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pushing to hub repo someone/x failed" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "stage" / HOOK / "sae_weights.safetensors").exists()


def test_a_run_exported_before_sparsity_existed_is_staged_without_it(tmp_path):
    run = fake_run(tmp_path / "run", k=4, overrides=[])
    (run / "sae" / "sparsity.safetensors").unlink()
    proc = dry_run(run, tmp_path / "stage", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "stage" / HOOK).iterdir()) == [
        "cfg.json",
        "eval.json",
        "sae_weights.safetensors",
    ]
    assert "has no sparsity.safetensors" in proc.stderr
