"""docs/from_saelens.md, the SAELens-to-saesweep table, stays true: every override it gives
composes and validates, and it names every training field of the installed sae-lens."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import REPO
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_config import compose_train

from saesweep.config.schema import validate

TABLE = REPO / "docs" / "from_saelens.md"


def rows() -> list[tuple[list[str], list[str]]]:
    """(SAELens fields, saesweep cell items) for each table row."""
    out = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        out.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])))
    return out


def override_sets() -> list[list[str]]:
    """Each backticked item of the middle column, split into its overrides (an item may
    carry an architecture=... its sae.* keys need). Hydra's own keys are not the schema's."""
    sets = []
    for _, items in rows():
        for item in items:
            overrides = [o for o in item.split() if not o.startswith("hydra.")]
            if overrides:
                sets.append(overrides)
    return sets


@pytest.mark.parametrize("overrides", override_sets(), ids=" ".join)
def test_every_override_in_the_table_composes_and_validates(overrides):
    parsed = OverridesParser.create().parse_overrides(overrides)
    cfg = compose_train(overrides)
    validate(cfg)
    for override in parsed:
        key = override.key_or_group
        if "." not in key:  # a group (architecture=...): it composed
            continue
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else getattr(got, "value", got)
        assert got == override.value(), f"{override.input_line}: the config holds {got!r}"


def saelens_fields() -> set[str]:
    sae_lens = pytest.importorskip("sae_lens")
    classes = [sae_lens.LanguageModelSAERunnerConfig, sae_lens.LoggingConfig]
    classes += [getattr(sae_lens, n) for n in dir(sae_lens) if n.endswith("TrainingSAEConfig")]
    return {f.name for c in classes for f in dataclasses.fields(c)}


def test_the_table_names_every_field_of_the_installed_sae_lens():
    named = {name for names, _ in rows() for name in names}
    missing = sorted(saelens_fields() - named)
    assert not missing, f"{TABLE.name} lacks these SAELens fields: {missing}"
    unknown = sorted(named - saelens_fields())
    assert not unknown, f"{TABLE.name} names fields sae-lens does not have: {unknown}"


def test_the_table_is_read_whole():
    # A parsing slip (a row split by a stray |) would quietly drop rows from both tests above.
    assert len(rows()) == sum(1 for line in TABLE.read_text().splitlines() if line.startswith("| `"))
    assert len(override_sets()) > 50
