"""Every experiment file composes, and every member of its sweep composes and validates.

Members are expanded from `hydra.sweeper.params` the way Hydra's basic sweeper does (a
grid over the comma lists), composed with the compose API and checked with
`saesweep.config.schema.validate`: no model is loaded. The CLI is also run with `--cfg`, which
prints the composed config without training (Hydra 1.3 refuses `--cfg` together with
`--multirun`, so each member is printed as a single run).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import run_in_process
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import saesweep.train
from saesweep.config.schema import validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Experiments whose params are search spaces (interval/tag) for hydra/sweeper=pareto; the
# rest are grids for Hydra's basic sweeper.
SEARCHES = sorted(n for n in EXPERIMENTS if "interval(" in (CONF_DIR / "experiment" / f"{n}.yaml").read_text())
GRIDS = [n for n in EXPERIMENTS if n not in SEARCHES]


def compose_train(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def sweeper_params(name: str) -> dict[str, str]:
    cfg = compose_train([f"+experiment={name}"], hydra=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    assert params, f"experiment {name} sets no hydra.sweeper.params"
    return {str(k): str(v) for k, v in params.items()}


def members(name: str) -> list[list[str]]:
    """The override list of each sweep member: the grid over the params' comma lists.

    For a search, the corners of its space: each interval's bounds, each choice's options.
    """
    axes = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper_params(name).items()]):
        key = override.get_key_element()
        if override.is_interval_sweep():
            values = [override.value().start, override.value().end]
        elif override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.value()]
        axes.append([f"{key}={v}" for v in values])
    return [list(m) for m in itertools.product(*axes)]


def test_experiments_exist():
    assert {"k_sweep", "l1_sweep", "arch_compare"} <= set(GRIDS)
    assert {"l1_search", "lr_search"} <= set(SEARCHES)


@pytest.mark.parametrize("name", SEARCHES)
def test_search_space_is_one_optuna_understands(name):
    """Every param of a search experiment becomes an Optuna distribution; directions match objectives."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = compose_train(["hydra/sweeper=pareto", f"+experiment={name}"], hydra=True)
    params = sweeper_params(name)
    distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(distributions) == set(params) and not fixed
    direction = cfg.hydra.sweeper.direction
    directions = [direction] if isinstance(direction, str) else list(direction)
    assert len(directions) == len(cfg.objectives)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_every_member_validates(name):
    grid = members(name)
    assert len(grid) >= 2, f"{name}: a sweep of {len(grid)} member(s)"
    for overrides in grid:
        cfg = compose_train([f"+experiment={name}", *overrides])
        typed = validate(cfg)
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element()
            if not key.startswith(("+", "~")) and not (CONF_DIR / key).is_dir():  # a plain key, not a group
                assert OmegaConf.select(cfg, key) == override.value(), override.input_line
        assert typed.sae.architecture in ("standard", "topk", "batchtopk")


def test_k_sweep_is_batchtopk_over_k():
    ks = []
    for overrides in members("k_sweep"):
        typed = validate(compose_train(["+experiment=k_sweep", *overrides]))
        assert typed.sae.architecture == "batchtopk"
        ks.append(typed.sae.k)
    assert len(set(ks)) == len(ks) >= 3


def test_l1_sweep_is_standard_over_l1():
    l1s = []
    for overrides in members("l1_sweep"):
        typed = validate(compose_train(["+experiment=l1_sweep", *overrides]))
        assert typed.sae.architecture == "standard"
        l1s.append(typed.sae.l1_coefficient)
    assert len(set(l1s)) == len(l1s) >= 3


def test_arch_compare_matches_k_and_has_a_standard_arm():
    by_arch = {}
    for overrides in members("arch_compare"):
        typed = validate(compose_train(["+experiment=arch_compare", *overrides]))
        by_arch[typed.sae.architecture] = typed.sae
    assert set(by_arch) == {"topk", "batchtopk", "standard"}
    assert by_arch["topk"].k == by_arch["batchtopk"].k
    assert by_arch["standard"].l1_coefficient > 0


def test_command_line_replaces_a_grid_axis():
    """`+experiment=k_sweep sae.k=8,128`: the command line's list wins over the file's."""
    cfg = compose_train(["+experiment=k_sweep"], hydra=True)
    assert "sae.k" in cfg.hydra.sweeper.params
    # Hydra's basic sweeper keys its grid by override key, later (command line) wins.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(["sae.k=16,32,64", "sae.k=8,128"])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    assert batch == [["sae.k=8"], ["sae.k=128"]]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cli_prints_experiment_and_members(name):
    """`--cfg hydra` shows the sweep's params; `--cfg job` prints each member's config, whose
    values are the member's overrides."""
    code, out = run_in_process(saesweep.train.cli, [f"+experiment={name}", "--cfg", "hydra"])
    assert code == 0, out[-3000:]
    for key in sweeper_params(name):
        assert key in out
    for overrides in members(name):
        code, out = run_in_process(saesweep.train.cli, [f"+experiment={name}", *overrides, "--cfg", "job"])
        assert code == 0, (overrides, out[-3000:])
        printed = OmegaConf.create(out)
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element()
            if not key.startswith(("+", "~")) and not (CONF_DIR / key).is_dir():  # a plain key, not a group
                assert OmegaConf.select(printed, key) == override.value(), (override.input_line, out[:500])


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_presets_compose(launcher, target):
    cfg = compose_train([f"hydra/launcher={launcher}", "+experiment=k_sweep"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.nodes == 1 and cfg.hydra.launcher.tasks_per_node == 1
    if launcher == "slurm":
        # below 15 min every preemption counts as a timeout (see conf/hydra/launcher/slurm.yaml)
        assert cfg.hydra.launcher.timeout_min >= 15
    validate(compose_train([f"hydra/launcher={launcher}"]))  # the job config is unaffected
