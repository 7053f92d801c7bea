"""hydra/launcher=slurm_grouped: the sweep partitioned into SLURM jobs that share an LM pass.

The plan (saesweep.sweep.jobs) and the preset's composition are tested here without a
cluster; the cluster tests (SAESWEEP_SLURM=1, see tests/test_slurm.py) run real sweeps.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import CONF_DIR

from saesweep.sweep.jobs import (
    GB,
    PlanError,
    PlannedMember,
    buffer_bytes,
    job_bytes,
    lm_bytes,
    plan_jobs,
    plan_record,
    plan_text,
    sae_bytes,
)


def member(number, shared="a", hook="blocks.1", member_bytes=GB, buffer=GB, overrides=None):
    return PlannedMember(number, tuple(overrides or [f"sae.k={number}"]), shared, hook, member_bytes, buffer)


def test_memory_estimates_by_hand():
    # d_in 2, d_sae 3: params 2*2*3 + 3 + 2 = 17; 4 copies + a batch of 5 x 3 three times.
    assert sae_bytes(2, 3, 5) == 4 * (4 * 17 + 3 * 5 * 3)
    # The buffer holds at least two batches.
    assert buffer_bytes(10, 2, 3) == 4 * 10 * 3 and buffer_bytes(10, 8, 3) == 4 * 16 * 3
    # The LM once, a buffer per hook point, every member.
    members = [member(0, hook="h1"), member(1, hook="h1"), member(2, hook="h2", buffer=2 * GB)]
    assert job_bytes(members, 5 * GB) == 5 * GB + 1 * GB + 2 * GB + 3 * GB
    # GPT-2-like config: 2 layers of d 4 (MLP 16), vocab 10, tied embeddings, fp32.
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 4, "vocab_size": 10}
    assert lm_bytes(gpt2, 4) == 4 * (2 * (4 * 16 + 2 * 4 * 16) + 10 * 4)
    llama = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4, "intermediate_size": 8}
    assert lm_bytes({**llama, "vocab_size": 10, "tie_word_embeddings": False}, 2) == 2 * (4 * 16 + 3 * 4 * 8 + 2 * 40)
    assert lm_bytes({"n_layer": 2}, 4) == 0  # says too little: unknown


def test_members_that_may_share_an_lm_pass_share_a_job():
    members = [member(0), member(1, shared="b"), member(2), member(3, shared="b")]
    jobs = plan_jobs(members, members_per_job=None, device_memory_bytes=None, lm_bytes=0)
    assert [j.numbers for j in jobs] == [[0, 2], [1, 3]]
    assert [j.group for j in jobs] == [0, 1]
    assert "group 0 (2 member(s) that may share one LM pass)" in jobs[0].why


def test_members_per_job_splits_a_group_in_sweep_order():
    members = [member(i) for i in range(7)]
    jobs = plan_jobs(members, members_per_job=3, device_memory_bytes=None, lm_bytes=0)
    assert [j.numbers for j in jobs] == [[0, 1, 2], [3, 4, 5], [6]]
    assert "split into 3 jobs by members_per_job=3" in jobs[0].why
    assert jobs[0].why.endswith("full by members_per_job") and "full by" not in jobs[2].why


def test_device_memory_splits_a_group_and_counts_the_lm_and_each_hook_buffer_once():
    # LM 4 GB; each member 1 GB plus its hook's 1 GB buffer. Budget 8 GB:
    # one hook: 4 + 1 + 3 x 1 = 8 fits three; two hooks in a job cost a second buffer.
    same_hook = [member(i) for i in range(5)]
    jobs = plan_jobs(same_hook, members_per_job=None, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1, 2], [3, 4]]
    assert [j.device_bytes for j in jobs] == [8 * GB, 7 * GB]
    assert "device_memory_gb=8" in jobs[0].why and jobs[0].why.endswith("full by device_memory_gb")
    two_hooks = [member(0, hook="h1"), member(1, hook="h2"), member(2, hook="h1")]
    jobs = plan_jobs(two_hooks, members_per_job=None, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1], [2]]  # 4 + 2 buffers + 2 members = 8
    # Both limits: whichever is hit first.
    jobs = plan_jobs(same_hook, members_per_job=2, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1], [2, 3], [4]]


def test_the_plan_is_deterministic_and_records_every_member():
    members = [member(i, shared="ab"[i % 2]) for i in range(6)]
    first = plan_jobs(members, 2, 100 * GB, GB)
    again = plan_jobs(list(members), 2, 100 * GB, GB)
    assert [(j.numbers, j.why) for j in first] == [(j.numbers, j.why) for j in again]
    record = plan_record(first, [member(9)], array_parallelism=16)
    assert [m["member"] for m in record["members"]] == [0, 1, 2, 3, 4, 5, 9]
    assert {m["member"]: m["job"] for m in record["members"]} == {0: 0, 2: 0, 4: 1, 1: 2, 3: 2, 5: 3, 9: None}
    assert record["finished"] == [9] and json.loads(json.dumps(record)) == record
    text = plan_text(first, [member(9)])
    assert text.splitlines()[0] == "slurm_grouped plan: 6 member(s) in 4 job(s)"
    assert "  job 1: members 4 - group 0" in text and "    #4 : sae.k=4" in text
    assert "finished already (eval.json), not submitted: 9" in text


def test_settings_no_plan_can_meet_name_the_key_and_the_member():
    with pytest.raises(PlanError, match=r"'hydra.launcher.members_per_job': must be >= 1.*got 0"):
        plan_jobs([member(0)], 0, None, 0)
    with pytest.raises(PlanError, match=r"'hydra.launcher.device_memory_gb': must be > 0"):
        plan_jobs([member(0)], None, -GB, 0)
    big = member(3, member_bytes=6 * GB, overrides=["sae.expansion_factor=256"])
    with pytest.raises(PlanError) as e:
        plan_jobs([member(0), big], None, 8 * GB, 2 * GB)
    message = str(e.value)
    assert "member 3 (sae.expansion_factor=256) needs an estimated 9.00 GB alone" in message
    assert "LM 2.00 GB" in message and "device_memory_gb=8" in message


def compose_launcher(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm_grouped", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_the_preset_is_slurm_yaml_plus_the_grouped_launchers_rules(tmp_path):
    from hydra_plugins.saesweep_grouped_launcher.grouped_launcher import GroupedLauncherConf

    launcher = compose_launcher(tmp_path, "hydra.launcher.members_per_job=3")
    assert launcher["_target_"].startswith("hydra_plugins.saesweep_slurm_grouped_launcher.")
    assert launcher["may_differ"] == GroupedLauncherConf().may_differ
    assert launcher["members_per_job"] == 3 and launcher["device_memory_gb"] is None
    assert launcher["array_parallelism"] == 16 and launcher["timeout_min"] == 120


# ------------------------------------------------------------------------- on the cluster

PARTITION = os.environ.get("SAESWEEP_SLURM_PARTITION", "debug")
ON_CLUSTER = os.environ.get("SAESWEEP_SLURM") == "1"
LAUNCHER = [
    "hydra/launcher=slurm_grouped",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.gpus_per_node=null",
]
TIMEOUT_S = 900
