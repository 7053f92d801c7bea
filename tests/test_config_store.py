"""One source of defaults: the schema's dataclasses are Hydra's base configs, the YAML files
carry only what differs from them, and closed choices are Enums that OmegaConf checks."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONF_DIR, composed
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from saesweep.cli import one_line
from saesweep.config.domain import Choice, check_domains, choice_fields
from saesweep.config.schema import (
    DatasetConfig,
    EvaluateConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    PretokenizeConfig,
    Resume,
    SchedulerConfig,
    TrainConfig,
    validate,
)
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES


def defaults_of(cls: type) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cls), enum_to_str=True)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


# --- the YAML carries only what differs from the schema -----------------------------------------

GROUP_SCHEMAS = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "logger": LoggerConfig,
    **{f"architecture/{name}": arch.config_class for name, arch in ARCHITECTURES.items()},
}
ROOT_SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "pretokenize": PretokenizeConfig}
# A value equal to the schema's that is there to override a group option, not the schema.
OVERRIDES_OF_A_GROUP = {("evaluate", "model.hook_point")}  # the SAE's own hook, whatever the model option says


def yaml_files() -> list[tuple[str, Path, type]]:
    files = [(name, CONF_DIR / f"{name}.yaml", cls) for name, cls in ROOT_SCHEMAS.items()]
    for group, cls in GROUP_SCHEMAS.items():
        if group.startswith("architecture/"):
            files.append((group, CONF_DIR / f"{group}.yaml", cls))
        else:
            files += [(f"{group}/{p.stem}", p, cls) for p in sorted((CONF_DIR / group).glob("*.yaml"))]
    return files


@pytest.mark.parametrize("name, path, schema", yaml_files(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_yaml_file_sets_only_what_differs_from_the_schema(name, path, schema):
    own = OmegaConf.to_container(OmegaConf.load(path)) or {}
    own = {k: v for k, v in own.items() if k not in ("defaults", "hydra")}
    default = leaves(defaults_of(schema))
    repeated = [
        key
        for key, value in leaves(own).items()
        if key in default and default[key] == value and (name, key) not in OVERRIDES_OF_A_GROUP
    ]
    assert not repeated, f"conf/{name}.yaml repeats the schema's defaults of {repeated}"
    unknown = [key for key in leaves(own) if key not in default and not key.startswith("model.")]
    assert not unknown, f"conf/{name}.yaml sets keys its schema lacks: {unknown}"


def test_drift_fixed_normalisation_and_architecture_come_from_one_place():
    for arch in ARCHITECTURES:
        typed = validate(composed("train", [f"architecture={arch}"]))
        assert typed.sae.normalize_activations == "expected_average_only_in"
        assert typed.sae.architecture == arch == ARCHITECTURES[arch].config_class().architecture
    assert validate(composed("train", [])).sae.architecture == "batchtopk"  # train.yaml's defaults list


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_composed_config_shows_every_schema_key(arch):
    """What `--cfg job` prints: every key of the schema, the chosen architecture's included."""
    cfg = composed("train", [f"architecture={arch}"])
    shown = set(leaves(OmegaConf.to_container(cfg)))
    schema = {k for k in leaves(defaults_of(TrainConfig)) if k != "sae"}
    schema |= {f"sae.{k}" for k in leaves(defaults_of(ARCHITECTURES[arch].config_class))}
    assert shown >= schema and not {k for k in shown - schema if not k.startswith("model.from_pretrained_kwargs")}


def test_evaluate_and_pretokenize_compose_to_their_schema():
    for name, cls in (("evaluate", EvaluateConfig), ("pretokenize", PretokenizeConfig)):
        cfg = composed(name, [])
        assert set(leaves(OmegaConf.to_container(cfg))) == set(leaves(defaults_of(cls)))


# --- closed choices -------------------------------------------------------------------------------


def choice_keys() -> list[tuple[str, type[Choice], list[str]]]:
    """(dotted key, its Choice, overrides that make the key exist) for every closed choice;
    the key ends with [] for a list of them."""
    found: dict[str, tuple[type[Choice], list[str]]] = {}

    def walk(cls: type, prefix: str, extra: list[str]) -> None:
        choices = choice_fields(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f.name in choices:
                found.setdefault(
                    key + ("[]" if f.default_factory is not dataclasses.MISSING else ""), (choices[f.name], extra)
                )
            elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                walk(type(f.default_factory()), f"{key}.", extra)

    walk(TrainConfig, "", [])
    for name, arch in sorted(ARCHITECTURES.items()):
        walk(arch.config_class, "sae.", [f"architecture={name}"])
    return [(key, choice, extra) for key, (choice, extra) in found.items()]


@pytest.mark.parametrize("key, choice, extra", choice_keys(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_value_outside_a_closed_choice_is_one_line_naming_the_valid_ones(key, choice, extra):
    key, is_list = key.removesuffix("[]"), key.endswith("[]")

    def override(value: str) -> str:
        return f"{key}=[{value}]" if is_list else f"{key}={value}"

    with pytest.raises(ConfigCompositionException) as refused:
        composed("train", [*extra, override("zz")])
    assert one_line(refused.value) == f"config key '{key}': valid: {', '.join(choice.names())}; got 'zz'"
    for value in choice.names():  # and each valid one composes
        assert composed("train", [*extra, override(value)]) is not None


def test_a_choice_is_its_plain_string_for_the_code_and_the_checkpoint():
    typed = validate(composed("train", ["training.resume=never", "optimizer=adamw"]))
    assert typed.training.resume == "never" and isinstance(typed.training.resume, Resume)
    assert f"{typed.training.resume}" == "never" and repr(typed.training.resume) == "'never'"
    assert {"adamw": 1}[typed.optimizer.name] == 1
    from saesweep.training.member import resumable_config

    saved = io.BytesIO()
    torch.save({"config": resumable_config(typed)}, saved)
    saved.seek(0)
    config = torch.load(saved, weights_only=True)["config"]  # as saesweep.training.checkpoint loads it
    assert config["optimizer"]["name"] == "adamw" and type(config["optimizer"]["name"]) is str
    assert type(config["sae"]["normalize_activations"]) is str
    assert pickle.loads(pickle.dumps(Resume.force)) == "force"


def test_a_config_built_in_python_has_its_choices_checked_too():
    from saesweep.sae.topk import TopKSAEConfig

    with pytest.raises(UserError, match=r"^config key 'sae.k_schedule_type': valid: linear, exponential; got 'cos'$"):
        check_domains(TopKSAEConfig(k_schedule_type="cos"), "sae.")
    check_domains(TopKSAEConfig(k_schedule_type="exponential"), "sae.")


def test_every_choice_is_spelt_as_its_name():
    """OmegaConf reads a choice by its member's name; code compares the value."""
    for cls in {c for _, c, _ in choice_keys()}:
        assert all(m.name == m.value for m in cls), cls
