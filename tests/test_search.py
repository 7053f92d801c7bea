"""An Optuna search (hydra/sweeper=pareto) runs real trials that the sweep report reads."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow  # end-to-end CLI runs


def test_l1_search_runs_trials_and_reports_the_pareto_front(tiny_lm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        "saesweep.train",
        "--multirun",
        "+experiment=l1_search",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.population_size=2",
        *tiny_lm,
        *TINY_RUN,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    values = []
    for member in ("0", "1"):
        overrides = yaml.safe_load((sweep_dir / member / ".hydra" / "overrides.yaml").read_text())
        l1 = float(next(o for o in overrides if o.startswith("sae.l1_coefficient=")).split("=")[1])
        assert 0.3 <= l1 <= 30, overrides  # sampled from the experiment's interval
        result = json.loads((sweep_dir / member / "eval.json").read_text())
        values.append([1 - result["explained_variance"], result["l0"]])

    # The run returned (fvu, l0) to Optuna: its Pareto solutions are trials' eval values.
    solutions = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(s["values"] in values for s in solutions), (solutions, values)
    report = (sweep_dir / "report.md").read_text()
    assert "2 members: 2 done" in report and "sae.l1_coefficient" in report, report
    assert (sweep_dir / "pareto.png").stat().st_size > 0
