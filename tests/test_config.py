"""Every config group option composes and validates; bad keys and types are refused by name."""

from __future__ import annotations

import re

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from saesweep.cli import one_line
from saesweep.config.schema import validate
from saesweep.errors import UserError

GROUPS = ["model", "dataset", "architecture", "optimizer", "scheduler"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def refusal(overrides: list[str]) -> str:
    """The line a user sees: the schema refuses types and choices as Hydra composes, values in validate."""
    try:
        validate(compose_train(overrides))
    except (UserError, ConfigCompositionException) as e:
        return one_line(e)
    pytest.fail(f"accepted {overrides}")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    typed = validate(compose_train([f"{group}={option}"]))
    if group == "architecture":
        assert typed.sae.architecture == option
    elif group in ("optimizer", "scheduler"):
        assert getattr(typed, group).name == option


def test_the_readme_names_every_group_option():
    # The README's list of config groups is how a user learns what `group=option` can take;
    # it had fallen behind conf/ once (gated, jumprelu and matryoshka were missing).
    readme = (CONF_DIR.parent / "README.md").read_text()
    listing = readme[readme.index("Config groups live in") :].split("\n\n")[0]
    missing = [f"{g}={o}" for g in GROUPS for o in options(g) if f"`{o}`" not in listing]
    assert not missing, f"README's config-group list lacks {missing}"


def test_architecture_group_fills_sae_node_and_accepts_its_knobs():
    typed = validate(compose_train(["architecture=batchtopk", "sae.k=64"]))
    assert typed.sae.architecture == "batchtopk" and typed.sae.k == 64


def test_unknown_key_is_named():
    assert "'sae.kk'" in refusal(["+sae.kk=3"])
    assert "'training.bach_size'" in refusal(["+training.bach_size=3"])


def test_wrong_type_is_named():
    assert re.match(r"config key 'training\.batch_size'.*abc", refusal(["training.batch_size=abc"]))


@pytest.mark.parametrize(
    "override,key",
    [
        ("sae.k=0", "sae.k"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("training.total_tokens=100", "training.total_tokens"),
        ("buffer.size_tokens=4096", "buffer.size_tokens"),
        ("training.device=tpu", "training.device"),
        ("training.autocast=fp16", "training.autocast"),
    ],
)
def test_bad_values_are_named(override, key):
    assert f"config key '{key}'" in refusal([override])


def test_width_needs_d_sae_or_expansion_factor():
    with pytest.raises(UserError, match="sae.d_sae"):
        validate(compose_train(["sae.d_sae=null", "sae.expansion_factor=null"]))
