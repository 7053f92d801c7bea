"""Training end to end in this process, on conftest's tiny random GPT-2: `python -m
saesweep.train` as its `cli()` with an argv, so the whole path runs (compose, validate, the
activation feed, the loop, eval, export, the run record) at a fraction of the embedded
model's cost. Every registered architecture trains and exports a dir SAELens loads with
eval.json's own L0 and EV; a run stopped by Ctrl-C resumes to the weights of one never
stopped; a grouped sweep's members equal their separate runs. The slow tier repeats these
as subprocesses on the embedded model (test_e2e, test_resume, test_group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
import yaml
from conftest import composed, ctrl_c_after_step, metrics_without_timing, run_in_process, sae_lens_l0_and_ev, weights

import saesweep.train
from saesweep.sae import ARCHITECTURES

RUN = [
    "training.total_tokens=4096",
    "training.batch_size=512",
    "buffer.size_tokens=2048",
    "training.log_every=2",
    "eval.rows=16",
    "eval.ce_rows=4",
    "eval.batch_rows=8",
    "activations.batch_rows=16",
    "sae.expansion_factor=4",
    "optimizer.lr=4e-3",
]


def arch_overrides(arch: str) -> list[str]:
    """The architecture, with k small enough for a 128-wide SAE where it has one."""
    fields = {f.name for f in dataclasses.fields(ARCHITECTURES[arch].config_class)}
    extra = ["sae.k=8"] if "k" in fields else []
    if "matryoshka_widths" in fields:
        extra.append("sae.matryoshka_widths=[32,64]")
    return [f"architecture={arch}", *extra]


def train(argv: list[str]) -> tuple[int, str]:
    return run_in_process(saesweep.train.cli, argv)


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tiny-runs")
    out = {}
    for arch in sorted(ARCHITECTURES):
        run_dir = root / arch
        code, output = train([*tiny_lm, *RUN, *arch_overrides(arch), f"hydra.run.dir={run_dir}"])
        assert code == 0, output[-3000:]
        out[arch] = run_dir
    return out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_into_a_complete_run_dir(runs, arch):
    run_dir = runs[arch]
    for name in (".hydra/config.yaml", "train.log", "metrics.jsonl", "eval.json", "sae/cfg.json"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoint.pt").exists()  # finished: the checkpoint is dead weight
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["tokens_trained"] == 4096
    for key in ("l0", "mse", "explained_variance", "ce_clean", "ce_sae", "ce_ablation", "ce_loss_score"):
        assert math.isfinite(result[key]), key
    assert 0 < result["l0"] <= 128
    assert result["ce_clean"] < result["ce_ablation"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sae_lens_loads_the_export_and_measures_eval_jsons_l0_and_ev(runs, arch, tiny_model):
    """SAELens's own encode/decode on the run's held-out rows give the L0 and EV that
    eval.json reports: the export and the metrics agree."""
    import yaml

    from saesweep.config.schema import validate
    from saesweep.data.rows import load_token_rows

    run_dir = runs[arch]
    cfg = validate(composed("train", yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())))
    model = tiny_model  # the runs' model
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed).eval_rows
    got = sae_lens_l0_and_ev(run_dir / "sae", model, cfg.model.hook_point, rows[: cfg.eval.rows])
    want = json.loads((run_dir / "eval.json").read_text())
    assert got["l0"] == pytest.approx(want["l0"], rel=1e-4)
    assert got["explained_variance"] == pytest.approx(want["explained_variance"], abs=1e-4)


def test_a_run_stopped_by_ctrl_c_resumes_to_the_uninterrupted_weights(runs, tiny_lm, tmp_path):
    """SIGINT after the third step: a checkpoint and exit 130; the rerun resumes and ends
    where the run that was never stopped ended (weights and every logged metric)."""
    straight = runs["batchtopk"]
    argv = [*tiny_lm, *RUN, *arch_overrides("batchtopk"), f"hydra.run.dir={tmp_path}"]
    with ctrl_c_after_step(3):
        code, output = train(argv)
    assert code == 130, output[-3000:]
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "eval.json").exists()

    code, output = train(argv)
    assert code == 0 and "resuming" in output, output[-3000:]
    want, got = weights(straight), weights(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    assert metrics_without_timing(tmp_path) == metrics_without_timing(straight)


def test_a_run_interrupted_before_keys_were_added_to_the_schema_resumes_after(runs, tiny_lm, tmp_path):
    """A run recorded by a version without activations.seqpos_slice and
    exclude_special_tokens (its .hydra/config.yaml and checkpoint lack them) resumes under
    this one at their defaults, to the uninterrupted weights; set otherwise, it is refused."""
    argv = [*tiny_lm, *RUN, *arch_overrides("batchtopk"), f"hydra.run.dir={tmp_path}"]
    with ctrl_c_after_step(3):
        code, output = train(argv)
    assert code == 130, output[-3000:]
    added = ("exclude_special_tokens", "seqpos_slice")
    record = tmp_path / ".hydra" / "config.yaml"
    config = yaml.safe_load(record.read_text())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in added:
        del config["activations"][key], checkpoint["config"]["activations"][key]
    record.write_text(yaml.safe_dump(config))
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    code, output = train([*argv, "activations.seqpos_slice=[1,null]"])
    assert code != 0 and "activations.seqpos_slice (None -> [1, None])" in output, output[-3000:]
    code, output = train(argv)
    assert code == 0 and "resuming" in output, output[-3000:]
    want, got = weights(runs["batchtopk"]), weights(tmp_path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_a_grouped_sweeps_members_equal_their_separate_runs(runs, tiny_lm, tmp_path):
    """hydra/launcher=grouped: one LM pass for both members, and one stacked model (TopK and
    BatchTopK stack together), each member ending bit for bit where its separate run ends."""
    sweep = tmp_path / "sweep"
    code, output = train(
        [
            "--multirun",
            "hydra/launcher=grouped",
            *tiny_lm,
            *RUN,
            "architecture=topk,batchtopk",
            "sae.k=8",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0, output[-3000:]
    assert "2 members train as one stacked TopKSAE + BatchTopKSAE: 0, 1" in output
    for member in (sweep / "0", sweep / "1"):
        arch = "batchtopk" if "architecture=batchtopk" in (member / ".hydra" / "overrides.yaml").read_text() else "topk"
        want, got = weights(runs[arch]), weights(member)
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (arch, name)
    assert "2 members: 2 done" in (sweep / "report.md").read_text()


def test_a_grouped_sweep_of_one_architecture_trains_as_a_stack_equal_to_separate_runs(runs, tiny_lm, tmp_path):
    """Two BatchTopK members of different k and lr share one stacked model; the k=8 one ends
    bit for bit where its separate run ended: weights, metrics and eval."""
    sweep = tmp_path / "sweep"
    code, output = train(
        [
            "--multirun",
            "hydra/launcher=grouped",
            *tiny_lm,
            *(o for o in RUN if not o.startswith("optimizer.lr=")),
            "architecture=batchtopk",
            "sae.k=8,16",
            "optimizer.lr=4e-3,1e-3",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0, output[-3000:]
    assert "4 members train as one stacked BatchTopKSAE: 0, 1, 2, 3" in output
    same = next(d for d in sweep.iterdir() if d.is_dir() and "sae.k=8\n" in _overrides(d) and "=0.004" in _overrides(d))
    want, got = weights(runs["batchtopk"]), weights(same)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert metrics_without_timing(same) == metrics_without_timing(runs["batchtopk"])
    eval_stack, eval_alone = (json.loads((d / "eval.json").read_text()) for d in (same, runs["batchtopk"]))
    assert eval_stack["explained_variance"] == eval_alone["explained_variance"]
    assert "4 members: 4 done" in (sweep / "report.md").read_text()


def _overrides(run_dir) -> str:
    import yaml

    return "".join(f"{o}\n" for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()))


# --- a group over hook points: one LM pass to the deepest hook, each member at its own ----

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"  # tiny_lm's two layers


def _eval(run_dir) -> dict:
    result = json.loads((run_dir / "eval.json").read_text())
    return {k: v for k, v in result.items() if k not in ("train_seconds", "tokens_per_second")}


def _same_run(got, want) -> None:
    """Bit for bit: weights, every logged metric, the evaluation."""
    w, g = weights(want), weights(got)
    assert w.keys() == g.keys()
    for name in w:
        assert torch.equal(g[name], w[name]), name
    assert metrics_without_timing(got) == metrics_without_timing(want)
    assert _eval(got) == _eval(want)


@contextlib.contextmanager
def lm_passes():
    """Counts the LM's activation passes by the hooks they were asked for (evaluation's
    SAE-independent parts forgotten first, so each run computes its own)."""
    from collections import Counter

    from saesweep.evaluation import held_out
    from saesweep.lm.tl_backend import HookedLM

    calls: Counter = Counter()
    run_to_hooks = HookedLM.run_to_hooks

    def counted(self, tokens, hooks):
        calls[tuple(hooks)] += 1
        return run_to_hooks(self, tokens, hooks)

    held_out._SHARED.clear()
    HookedLM.run_to_hooks = counted
    try:
        yield calls
    finally:
        HookedLM.run_to_hooks = run_to_hooks


BATCHTOPK = [*RUN, *arch_overrides("batchtopk")]


@pytest.fixture(scope="module")
def alone_at_h0(tiny_lm, tmp_path_factory):
    """The k=8 BatchTopK run at the first layer, trained alone, and the LM passes it took."""
    run_dir = tmp_path_factory.mktemp("alone-h0")
    with lm_passes() as calls:
        code, output = train([*tiny_lm, *BATCHTOPK, f"model.hook_point={H0}", f"hydra.run.dir={run_dir}"])
    assert code == 0, output[-3000:]
    return run_dir, calls


def _member(sweep, hook: str, k: int):
    found = [d for d in sweep.iterdir() if d.is_dir() and f"model.hook_point={hook}\n" in _overrides(d)]
    found = [d for d in found if f"sae.k={k}\n" in _overrides(d)]
    assert len(found) == 1, found
    return found[0]


def test_a_sweep_over_hooks_and_k_runs_the_lm_once_and_each_member_equals_its_separate_run(
    runs, alone_at_h0, tiny_lm, tmp_path
):
    """2 hooks x 2 k: one LM pass per chunk to the deeper hook feeds all four; the members at
    each hook stack (and only those); each k=8 member ends bit for bit where its separate run
    ended (weights, metrics, eval at its own hook), at the shallower hook too, where the group's
    LM ran further than its own run's."""
    alone, alone_calls = alone_at_h0
    sweep = tmp_path / "sweep"
    with lm_passes() as calls:
        code, output = train(
            [
                "--multirun",
                "hydra/launcher=grouped",
                *tiny_lm,
                *BATCHTOPK,
                f"model.hook_point={H0},{H1}",
                "sae.k=8,16",
                f"hydra.sweep.dir={sweep}",
            ]
        )
    assert code == 0, output[-3000:]
    assert f"one LM pass per chunk feeds hooks {H0}, {H1}" in output
    stacks = [line for line in output.splitlines() if "members train as one stacked BatchTopKSAE" in line]
    assert len(stacks) == 2 and all("2 members" in line for line in stacks), stacks
    # The training feed asked for both hooks at once, as often as the separate run asked for
    # its one (its evaluation's passes are the rest); evaluation ran once at each hook.
    assert set(calls) == {(H0, H1), (H0,), (H1,)}, calls
    assert calls[(H0, H1)] + calls[(H0,)] == alone_calls[(H0,)], (calls, alone_calls)
    assert calls[(H0, H1)] >= 3 and calls[(H0,)] == calls[(H1,)]
    _same_run(_member(sweep, H0, 8), alone)
    _same_run(_member(sweep, H1, 8), runs["batchtopk"])
    assert json.loads((_member(sweep, H0, 16) / "sae" / "cfg.json").read_text())["metadata"]["hook_name"] == H0
    assert "4 members: 4 done" in (sweep / "report.md").read_text()


def test_a_sweep_over_hooks_builds_one_cache_that_serves_its_members(alone_at_h0, tiny_lm, tmp_path):
    """activations.source=cache: the group builds one cache holding both hooks; a separate run
    that asks for the same hooks (activations.cache_hooks) hits it and trains to the group
    member's weights, and reads the same tokens as the live run (one shard)."""
    cache = [f"activations.cache_dir={tmp_path / 'acts'}", "activations.source=cache"]
    sweep = tmp_path / "sweep"
    code, output = train(
        [
            "--multirun",
            "hydra/launcher=grouped",
            *tiny_lm,
            *BATCHTOPK,
            *cache,
            f"model.hook_point={H0},{H1}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0, output[-3000:]
    assert output.count("building activation cache") == 1 and f"hooks {H0}, {H1}" in output, output[-3000:]
    assert len(list((tmp_path / "acts").iterdir())) == 1
    run_dir = tmp_path / "alone"
    code, output = train(
        [
            *tiny_lm,
            *BATCHTOPK,
            *cache,
            f"model.hook_point={H0}",
            f"activations.cache_hooks=[{H1}]",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert code == 0 and "cache hit" in output and "building" not in output, output[-3000:]
    _same_run(_member(sweep, H0, 8), run_dir)
    # No activation is read but through the cache's manifest key.
    assert _eval(run_dir)["activation_source"].startswith("cache:")


def test_a_group_over_hooks_stopped_by_ctrl_c_resumes_each_member_exactly(alone_at_h0, tiny_lm, tmp_path):
    """The checkpoint holds the feed's hooks and its buffer's column per hook: the rerun
    resumes both members on that feed, and the first-layer member ends where its separate
    run ended."""
    argv = [
        "--multirun",
        "hydra/launcher=grouped",
        *tiny_lm,
        *BATCHTOPK,
        f"model.hook_point={H0},{H1}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    with ctrl_c_after_step(2 * 3):  # three batches: each member steps alone (one per hook)
        code, output = train(argv)
    assert code == 130, output[-3000:]
    checkpoint = torch.load(_member(tmp_path / "sweep", H0, 8) / "checkpoint.pt", weights_only=False)
    assert checkpoint["hooks"] == [H0, H1] and len(checkpoint["buffer"]["columns"]) == 2
    code, output = train(argv)
    assert code == 0 and output.count("resuming") >= 2, output[-3000:]
    _same_run(_member(tmp_path / "sweep", H0, 8), alone_at_h0[0])
