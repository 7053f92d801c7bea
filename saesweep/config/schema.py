"""The config schema: typed dataclasses that the composed Hydra config must fit.

Hydra composes YAML freely; `validate` merges the result into these dataclasses so
that an unknown key or a wrong type fails before any model loads, naming the key.
The `sae` node's schema depends on `sae.architecture` (see saesweep.sae). Each number
and path field declares its domain beside it (`in_domain`, saesweep.config.domain);
`validate` checks them all in one pass, then the relations between keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saesweep.config.domain import Folder, Items, Range, TokenSpec, check_domains, in_domain
from saesweep.errors import UserError

# model.backend: who runs the LM (hook names differ: TransformerLens hook points or module paths).
MODEL_BACKENDS = ("transformer_lens", "hf")


@dataclass
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct.Q4_1"
    source: str = "embedded"
    backend: str = "transformer_lens"  # or "hf" (saesweep.lm.model)
    hook_point: str = "blocks.6.hook_resid_post"
    hook_point_out: Optional[str] = None
    dtype: str = "float32"
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)


SPECIAL_TOKEN_NAMES = ("bos", "eos", "sep")


@dataclass
class DatasetConfig:
    source: str = "embedded"
    path: str = "shakespeare"
    name: Optional[str] = None
    split: str = "train"
    column: str = "text"
    data_files: Optional[Any] = None
    streaming: bool = False
    is_tokenized: bool = False
    context_size: int = in_domain(128, Range(ge=2))  # a row predicts its next tokens: two at least
    prepend_bos: bool = True
    # SAELens's windowing tokens: "bos" | "eos" | "sep" | a token id | null (see saesweep.data.rows)
    begin_batch_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))
    begin_sequence_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))
    sequence_separator_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))
    shuffle: bool = True
    holdout_fraction: float = in_domain(0.05, Range(ge=0, lt=1))


WINDOW_TOKEN_KEYS = ("begin_batch_token", "begin_sequence_token", "sequence_separator_token")


def check_model(m: ModelConfig) -> None:
    """Model values that can be judged before anything loads (train, evaluate, pretokenize)."""
    if m.source not in ("embedded", "pretrained"):
        raise UserError("config key 'model.source': valid: embedded, pretrained")
    if m.backend not in MODEL_BACKENDS:
        raise UserError(f"config key 'model.backend': valid: {', '.join(MODEL_BACKENDS)}")


def check_dataset(d: DatasetConfig) -> None:
    """Dataset values that can be judged before any tokenizer loads."""
    if d.source not in ("embedded", "hf"):
        raise UserError("config key 'dataset.source': valid: embedded, hf")
    check_domains(d, "dataset.")


@dataclass
class ActivationsConfig:
    exclude_bos: bool = True
    batch_rows: int = in_domain(32, Range(gt=0))
    source: str = "live"
    cache_dir: Optional[str] = in_domain(None, Folder(null="<cache_dir>/activations"))
    cache_hooks: list[str] = field(default_factory=list)
    cache_tokens: Optional[int] = in_domain(None, Range(gt=0, null="training.total_tokens"))
    shard_mb: float = in_domain(32.0, Range(gt=0))


@dataclass
class BufferConfig:
    size_tokens: int = in_domain(65536, Range(gt=0))


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = in_domain(4e-4, Range(gt=0))
    betas: list[float] = in_domain([0.9, 0.999], Items(Range(ge=0, lt=1), length=2))
    eps: float = in_domain(1e-8, Range(gt=0))  # 0 divides 0 by 0 where a gradient stays 0
    weight_decay: float = in_domain(0.0, Range(ge=0))


@dataclass
class SchedulerConfig:
    name: str = "constant"
    warmup_steps: int = in_domain(0, Range(ge=0))
    final_lr_fraction: float = in_domain(0.1, Range(ge=0, le=1))
    decay_steps: int = in_domain(0, Range(ge=0))


# Where converted models and activation caches live (the top-level cache_dir of every command).
CACHE_ROOT = Folder(null="$SAESWEEP_CACHE_DIR, else ~/.cache/saesweep")

# numpy's seed is an unsigned 32-bit integer; torch's and random's take it too.
SEED = Range(ge=0, lt=2**32)


@dataclass
class TrainingConfig:
    total_tokens: int = in_domain(1_000_000, Range(gt=0))
    batch_size: int = in_domain(4096, Range(gt=0))
    seed: int = in_domain(42, SEED)
    device: str = "auto"
    grad_clip_norm: Optional[float] = in_domain(1.0, Range(gt=0, null="no clipping"))
    log_every: int = in_domain(10, Range(gt=0))
    dead_after_tokens: int = in_domain(200_000, Range(gt=0))
    checkpoint_every_tokens: int = in_domain(10_000_000, Range(ge=0))  # 0: only on signals and at the end
    resume: str = "auto"
    max_nonfinite_steps: int = in_domain(10, Range(gt=0))
    autocast: str = "none"
    compile: bool = False
    distributed: str = "none"  # none | ddp (saesweep.training.distributed)


@dataclass
class EvalConfig:
    # null: every held-out row of a finite dataset (a stream needs a count: its held-out head)
    rows: Optional[int] = in_domain(640, Range(gt=0, null="all"))
    ce_rows: int = in_domain(64, Range(ge=0))  # 0 skips the CE loss score
    batch_rows: int = in_domain(16, Range(gt=0))


@dataclass
class LoggerConfig:
    name: str = "none"
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    job_name: Optional[str] = None
    mode: Optional[str] = None


@dataclass
class TrainConfig:
    """Everything but `sae`, whose schema is chosen by architecture."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sae: Any = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cache_dir: Optional[str] = in_domain(None, CACHE_ROOT)
    objectives: list[str] = field(default_factory=lambda: ["fvu", "l0"])


# training.autocast: the dtype of the LM's and the SAE's matrix products (none = as loaded).
AUTOCAST_DTYPES = ("none", "bf16")

# training.distributed: one process, or data-parallel ranks (torchrun / SLURM tasks).
DISTRIBUTED_MODES = ("none", "ddp")

# eval.json metrics a run can return to an optimising sweeper; fvu = 1 - explained_variance.
OBJECTIVES = ("fvu", "l0", "mse", "explained_variance", "ce_loss_score", "ce_sae", "dead_fraction")


def objective_values(result: dict[str, Any], names: list[str]) -> float | list[float]:
    """The values of `names` in a run's eval result: one float, or a list for several."""
    values = [1.0 - result["explained_variance"] if n == "fvu" else float(result[n]) for n in names]
    return values[0] if len(values) == 1 else values


def _merge(schema: Any, node: Any, where: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        key = f"{where}.{key}" if where and key else (key or where)
        reason = str(e).splitlines()[0]
        raise UserError(f"config key '{key}': {reason}") from None


def validate(cfg: DictConfig) -> TrainConfig:
    """Check the composed config against the schema; return typed dataclasses."""
    from saesweep.sae import ARCHITECTURES  # the registry decides the sae schema

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    sae_node = raw.pop("sae", None) or {}
    arch = sae_node.get("architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"config key 'sae.architecture': unknown architecture {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))}"
        )
    typed: TrainConfig = _merge(TrainConfig, raw, "")
    typed.sae = _merge(ARCHITECTURES[arch].config_class, sae_node, "sae")
    _check_values(typed)
    return typed


def need(ok: bool, key: str, msg: str) -> None:
    """Refuse `key` with `msg` unless `ok`: for what a single field's domain cannot say."""
    if not ok:
        raise UserError(f"config key '{key}': {msg}")


def check_held_out(e: EvalConfig, d: DatasetConfig) -> None:
    """eval.rows=null (all held-out rows) needs a finite dataset: a stream holds out its head."""
    need(
        e.rows is not None or not d.streaming,
        "eval.rows",
        "must be > 0 when dataset.streaming=true (the stream's first eval.rows rows are held out), got null",
    )


def _check_values(cfg: TrainConfig) -> None:
    check_domains(cfg)  # every field's own domain, the sae node's included
    t = cfg.training
    need(
        t.total_tokens >= t.batch_size,
        "training.total_tokens",
        f"{t.total_tokens} is less than one batch (training.batch_size={t.batch_size})",
    )
    need(
        cfg.buffer.size_tokens >= 2 * t.batch_size,
        "buffer.size_tokens",
        f"{cfg.buffer.size_tokens} must hold at least two batches (2 x {t.batch_size})",
    )
    need(t.resume in ("auto", "never", "force"), "training.resume", "valid: auto, never, force")
    need(t.autocast in AUTOCAST_DTYPES, "training.autocast", f"valid: {', '.join(AUTOCAST_DTYPES)}")
    need(t.distributed in DISTRIBUTED_MODES, "training.distributed", f"valid: {', '.join(DISTRIBUTED_MODES)}")
    need(cfg.logger.name in ("none", "wandb"), "logger.name", "valid: none, wandb")
    need(
        cfg.logger.mode in (None, "online", "offline", "disabled"),
        "logger.mode",
        "valid: online, offline, disabled, null",
    )
    need(cfg.optimizer.name in ("adam", "adamw"), "optimizer.name", "valid: adam, adamw")
    need(
        cfg.scheduler.name in ("constant", "cosine", "warmup_decay"),
        "scheduler.name",
        "valid: constant, cosine, warmup_decay",
    )
    check_model(cfg.model)
    check_dataset(cfg.dataset)
    check_held_out(cfg.eval, cfg.dataset)
    a = cfg.activations
    need(a.source in ("live", "cache", "auto"), "activations.source", "valid: live, cache, auto")
    need(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        "training.device",
        "valid: auto, cpu, cuda, cuda:N",
    )
    bad = [name for name in cfg.objectives if name not in OBJECTIVES]
    need(
        bool(cfg.objectives) and not bad,
        "objectives",
        f"unknown {bad}; valid: {', '.join(OBJECTIVES)}" if bad else "needs at least one name",
    )
    cfg.sae.check_relations()


# --- python -m saesweep.evaluate ------------------------------------------------


@dataclass
class EvaluateModelConfig(ModelConfig):
    # null: the hook recorded in the SAE's cfg.json (metadata.hook_name).
    hook_point: Optional[str] = None


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the model and dataset groups of training, plus the SAE to measure."""

    sae_path: Optional[str] = in_domain(None, Folder(read=True))
    out_dir: Optional[str] = in_domain(None, Folder(null="the Hydra run dir"))
    device: str = "auto"
    seed: int = in_domain(42, SEED)
    model: EvaluateModelConfig = field(default_factory=EvaluateModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache_dir: Optional[str] = in_domain(None, CACHE_ROOT)


def validate_evaluate(cfg: DictConfig) -> EvaluateConfig:
    """Check a composed conf/evaluate.yaml against EvaluateConfig, naming any bad key."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    typed: EvaluateConfig = _merge(EvaluateConfig, raw, "")
    need(
        bool(typed.sae_path),
        "sae_path",
        "missing; give the SAE directory: python -m saesweep.evaluate sae_path=PATH (or PATH as the first argument)",
    )
    need(
        typed.device == "auto" or typed.device == "cpu" or typed.device.startswith("cuda"),
        "device",
        "valid: auto, cpu, cuda, cuda:N",
    )
    check_model(typed.model)
    check_dataset(typed.dataset)
    check_domains(typed)
    check_held_out(typed.eval, typed.dataset)
    return typed
