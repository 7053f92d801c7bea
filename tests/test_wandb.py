"""logger=wandb in offline mode: the run's W&B file holds the training metrics and the eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow  # end-to-end CLI runs


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framing (32 KiB blocks,
    each record chunk led by crc32, length and type) around protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    return [pb.Record.FromString(r) for r in records]


def test_wandb_offline_run_holds_metrics_and_eval(tiny_lm, tmp_path):
    proc = run_cli(
        "saesweep.train",
        *tiny_lm,
        *TINY_RUN,
        "sae.k=16",
        "logger=wandb",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    records = read_wandb_records(next(runs[0].glob("*.wandb")))

    def key(item) -> str:  # newer clients fill nested_key instead of key
        return item.key or "/".join(item.nested_key)

    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h.step.num for h in history]
    history = [{key(item): json.loads(item.value_json) for item in h.item} for h in history]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [m["step"] for m in logged]
    assert [h["l0"] for h in history] == [m["l0"] for m in logged]
    assert [h["explained_variance"] for h in history] == [m["explained_variance"] for m in logged]

    summary = {
        key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    result = json.loads((tmp_path / "eval.json").read_text())
    assert summary["eval/explained_variance"] == result["explained_variance"]
    assert summary["eval/ce_loss_score"] == result["ce_loss_score"]

    # SAELens's feature-density histogram: every latent counted, in 50 bins.
    density = summary["eval/log10_feature_density"]
    assert density["_type"] == "histogram" and len(density["values"]) == 50
    assert sum(density["values"]) == json.loads((tmp_path / "sae" / "cfg.json").read_text())["d_sae"]

    # The exported SAE as a model artifact, its files those of sae/, eval.json as its metadata.
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and artifact.name.startswith("sae-") and "final" in artifact.aliases
    files = {entry.path for entry in artifact.manifest.contents}
    assert files == {p.name for p in (tmp_path / "sae").iterdir()}, files
    assert json.loads(artifact.metadata)["explained_variance"] == result["explained_variance"]

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["sae"]["architecture"] == "batchtopk"
