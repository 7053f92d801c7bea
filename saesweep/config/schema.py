"""The config schema: typed dataclasses that the composed Hydra config must fit.

Hydra composes YAML freely; `validate` merges the result into these dataclasses so
that an unknown key or a wrong type fails before any model loads, naming the key.
The `sae` node's schema depends on `sae.architecture` (see saesweep.sae).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    context_size: int = 128
    prepend_bos: bool = True
    # SAELens's windowing tokens: "bos" | "eos" | "sep" | a token id | null (see saesweep.data.rows)
    begin_batch_token: Optional[Any] = None
    begin_sequence_token: Optional[Any] = None
    sequence_separator_token: Optional[Any] = None
    shuffle: bool = True
    holdout_fraction: float = 0.05


SPECIAL_TOKEN_NAMES = ("bos", "eos", "sep")
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
    if d.context_size < 2:
        raise UserError("config key 'dataset.context_size': must be >= 2")
    if not 0 <= d.holdout_fraction < 1:
        raise UserError("config key 'dataset.holdout_fraction': must be in [0, 1)")
    for key in WINDOW_TOKEN_KEYS:
        value = getattr(d, key)
        is_id = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not (value is None or is_id or value in SPECIAL_TOKEN_NAMES):
            raise UserError(
                f"config key 'dataset.{key}': {value!r}; valid: "
                f"{', '.join(SPECIAL_TOKEN_NAMES)}, null, or a token id >= 0"
            )


@dataclass
class ActivationsConfig:
    exclude_bos: bool = True
    batch_rows: int = 32
    source: str = "live"
    cache_dir: Optional[str] = None
    cache_hooks: list[str] = field(default_factory=list)
    cache_tokens: Optional[int] = None
    shard_mb: float = 32.0


@dataclass
class BufferConfig:
    size_tokens: int = 65536


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    decay_steps: int = 0


@dataclass
class TrainingConfig:
    total_tokens: int = 1_000_000
    batch_size: int = 4096
    seed: int = 42
    device: str = "auto"
    grad_clip_norm: Optional[float] = 1.0
    log_every: int = 10
    dead_after_tokens: int = 200_000
    checkpoint_every_tokens: int = 10_000_000
    resume: str = "auto"
    max_nonfinite_steps: int = 10
    autocast: str = "none"
    compile: bool = False
    distributed: str = "none"  # none | ddp (saesweep.training.distributed)


@dataclass
class EvalConfig:
    rows: int = 640
    ce_rows: int = 64
    batch_rows: int = 16


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
    cache_dir: Optional[str] = None
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


def _check_values(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise UserError(f"config key '{key}': {msg}")

    t = cfg.training
    need(t.total_tokens > 0, "training.total_tokens", "must be > 0")
    need(t.batch_size > 0, "training.batch_size", "must be > 0")
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
    need(t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", "must be >= 1")
    need(t.autocast in AUTOCAST_DTYPES, "training.autocast", f"valid: {', '.join(AUTOCAST_DTYPES)}")
    need(t.distributed in DISTRIBUTED_MODES, "training.distributed", f"valid: {', '.join(DISTRIBUTED_MODES)}")
    need(t.checkpoint_every_tokens >= 0, "training.checkpoint_every_tokens", "must be >= 0 (0 = only on signals)")
    need(cfg.optimizer.lr > 0, "optimizer.lr", "must be > 0")
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
    a = cfg.activations
    need(a.source in ("live", "cache", "auto"), "activations.source", "valid: live, cache, auto")
    need(a.batch_rows > 0, "activations.batch_rows", "must be > 0")
    need(a.cache_tokens is None or a.cache_tokens > 0, "activations.cache_tokens", "must be > 0 or null")
    need(a.shard_mb > 0, "activations.shard_mb", "must be > 0")
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
    cfg.sae.check()


# --- python -m saesweep.evaluate ------------------------------------------------


@dataclass
class EvaluateModelConfig(ModelConfig):
    # null: the hook recorded in the SAE's cfg.json (metadata.hook_name).
    hook_point: Optional[str] = None


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the model and dataset groups of training, plus the SAE to measure."""

    sae_path: Optional[str] = None
    out_dir: Optional[str] = None  # null: the Hydra run dir
    device: str = "auto"
    seed: int = 42
    model: EvaluateModelConfig = field(default_factory=EvaluateModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache_dir: Optional[str] = None


def validate_evaluate(cfg: DictConfig) -> EvaluateConfig:
    """Check a composed conf/evaluate.yaml against EvaluateConfig, naming any bad key."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    typed: EvaluateConfig = _merge(EvaluateConfig, raw, "")

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise UserError(f"config key '{key}': {msg}")

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
    need(typed.eval.rows > 0, "eval.rows", "must be > 0")
    need(typed.eval.ce_rows >= 0, "eval.ce_rows", "must be >= 0 (0 skips the CE loss score)")
    need(typed.eval.batch_rows > 0, "eval.batch_rows", "must be > 0")
    check_model(typed.model)
    check_dataset(typed.dataset)
    return typed
