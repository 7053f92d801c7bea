"""Adding an architecture is one module and one YAML: a toy one, defined in this file alone,
registers itself with a decorator, composes from its own YAML, trains in-process on a tiny
random model, exports in SAELens's format and is read back and evaluated the same."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import composed
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from saesweep.cli import one_line
from saesweep.config.domain import Range, in_domain
from saesweep.config.schema import validate, validate_evaluate
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES, SAE, SAEConfig, build_sae, register_architecture
from saesweep.sae.registry import SAE_SCHEMA_GROUP
from saesweep.training.distributed import rank_rule

NAME = "toy_relu"


@dataclass
class ToyReLUConfig(SAEConfig):
    architecture: str = NAME
    toy_l1: float = in_domain(1.0, Range(ge=0))  # L1 on the codes, unweighted


def define_toy() -> type[SAE]:
    """The whole architecture: what a new module in saesweep/sae/ would hold."""

    @register_architecture(NAME)
    class ToyReLUSAE(SAE):
        config_class = ToyReLUConfig
        rank_combine = {**SAE.rank_combine, "steps_taken": "max"}
        export_architecture = "standard"  # ReLU(x W_enc + b_enc): SAELens's standard SAE

        def __init__(self, cfg: ToyReLUConfig, d_in: int, d_out: int | None = None):
            super().__init__(cfg, d_in, d_out)
            self.register_buffer("steps_taken", torch.tensor(0))

        def loss_terms(self, pre: torch.Tensor, acts: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return {"toy_l1": self.cfg.toy_l1 * acts.abs().sum(-1).mean()}

        @torch.no_grad()
        def after_step(self, applied: torch.Tensor | None = None) -> None:
            super().after_step(applied)  # `applied`: false on a skipped non-finite step, kept on the device
            self.steps_taken += 1 if applied is None else applied.long()

    return ToyReLUSAE


# The architecture's one YAML; Hydra finds it through hydra.searchpath, as a user's own conf/ would be.
TOY_YAML = f"""# @package sae
defaults:
  - /{SAE_SCHEMA_GROUP}/{NAME}@_here_
  - _self_

toy_l1: 0.5   # what this option changes from the schema
"""


@pytest.fixture
def toy(tmp_path):
    cls = define_toy()
    (tmp_path / "conf" / "architecture").mkdir(parents=True)
    (tmp_path / "conf" / "architecture" / f"{NAME}.yaml").write_text(TOY_YAML)
    yield cls, tmp_path / "conf"
    # Leave the registry and Hydra's store as the other tests expect them.
    ARCHITECTURES.pop(NAME)
    ConfigStore.instance().repo["schema"]["sae"].pop(f"{NAME}.yaml")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random two-layer Llama of width 16 with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from saesweep.config.schema import ModelConfig
    from saesweep.lm.model import embedded_model_dir

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer = Path(embedded_model_dir(ModelConfig().name, None))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A few hundred short documents: tokenizing Shakespeare would take most of the test."""
    import random

    words = "the a king queen sword crown night day speaks runs falls rises and of to in".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tiny_data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(300)))
    return path


def model_and_data(model_dir: Path, data: Path) -> list[str]:
    return [
        "model.source=pretrained",
        f"model.name={model_dir}",
        "model.backend=hf",
        "model.hook_point=model.layers.0",
        "dataset.source=hf",
        "dataset.path=json",
        f"dataset.data_files={data}",
        "dataset.context_size=32",
        "eval.rows=8",
        "eval.ce_rows=2",
        "eval.batch_rows=4",
        "activations.batch_rows=8",
    ]


def test_a_toy_architecture_trains_exports_and_reloads(toy, tiny_model, tiny_data, tmp_path):
    cls, conf = toy
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        f"architecture={NAME}",
        *model_and_data(tiny_model, tiny_data),
        "training.total_tokens=2048",
        "training.batch_size=256",
        "buffer.size_tokens=1024",
        "training.log_every=1",
        "training.device=cpu",
        "sae.expansion_factor=2",
    ]
    typed = validate(composed("train", overrides))
    assert type(typed.sae) is ToyReLUConfig and typed.sae.toy_l1 == 0.5  # schema + its YAML

    from saesweep.training.loop import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(typed, run_dir)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 8 and all("loss/toy_l1" in row for row in logged)  # 2048 / 256 steps, its own loss
    saved = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == "standard" and saved["metadata"]["training_architecture"] == NAME

    from saesweep.evaluate import run_evaluation

    evaluated = validate_evaluate(
        composed("evaluate", [f"sae_path={run_dir / 'sae'}", *model_and_data(tiny_model, tiny_data), "device=cpu"])
    )
    again = run_evaluation(evaluated, tmp_path / "evaluated")
    for key in ("l0", "explained_variance", "mse", "dead_fraction"):
        assert again[key] == pytest.approx(result[key], rel=1e-4, abs=1e-6), key


def test_a_toy_architecture_declares_its_rank_rules_and_its_domains(toy):
    cls, conf = toy
    sae = build_sae(ToyReLUConfig(d_sae=8), d_in=4)
    assert isinstance(sae, cls)
    assert {name: rank_rule(sae, name) for name, _ in sae.named_buffers()} == {
        "input_scale": "once",
        "target_scale": "once",
        "steps_taken": "max",
    }
    with pytest.raises(UserError, match=r"^config key 'sae.toy_l1': must be >= 0, got -1.0$"):
        validate(composed("train", [f"hydra.searchpath=[file://{conf}]", f"architecture={NAME}", "sae.toy_l1=-1"]))
    with pytest.raises(ConfigCompositionException) as refused:
        composed("train", [f"hydra.searchpath=[file://{conf}]", f"architecture={NAME}", "sae.k=3"])
    assert "architectures with it: batchtopk, matryoshka_batchtopk, topk" in one_line(refused.value)


def test_registration_refuses_a_mismatched_name_an_unknown_rule_and_a_second_class():
    with pytest.raises(TypeError, match="says architecture 'toy_relu'"):
        register_architecture("other_name")(type("Wrong", (SAE,), {"config_class": ToyReLUConfig}))
    with pytest.raises(TypeError, match="no rule"):
        register_architecture(NAME)(
            type("BadRule", (SAE,), {"config_class": ToyReLUConfig, "rank_combine": {"x": "median"}})
        )
    with pytest.raises(TypeError, match="registered already"):
        register_architecture("topk")(type("Another", (SAE,), {"config_class": ARCHITECTURES["topk"].config_class}))
    assert NAME not in ARCHITECTURES
