"""One SAE of a training group, with all that is its own.

A member has its own SAE, optimizer, scheduler, dead-latent counters, torch RNG,
metrics log, checkpoint and run dir; the group (saesweep.training.loop) hands every
member the same batches. A single run is a group of one.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from saesweep.activations.source import ActivationSource, run_hooks
from saesweep.atomic import atomic_write_text, stale_temps
from saesweep.config.domain import plain
from saesweep.config.schema import TrainConfig
from saesweep.errors import UserError
from saesweep.evaluation.held_out import evaluate
from saesweep.evaluation.metrics import explained_variance
from saesweep.sae import StepOutput, build_sae
from saesweep.sae_format.write import save_sae
from saesweep.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from saesweep.training.compiled import SAEStep
from saesweep.training.distributed import SINGLE, Ranks
from saesweep.training.metrics_log import MetricsLog, NullMetricsLog
from saesweep.training.optim import build_optimizer, build_scheduler
from saesweep.training.readback import to_host
from saesweep.training.run_record import (
    RESUME_MAY_CHANGE,
    RunRecord,
    config_differences,
    mark_claimed,
    schema_defaults,
    without_keys,
)

log = logging.getLogger(__name__)


def resumable_config(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its config: everything a resumption may not change."""
    return without_keys(plain(asdict(cfg)), RESUME_MAY_CHANGE)


def autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """A context factory: bf16 autocast on `device` if training.autocast asks for it."""
    return partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.training.autocast == "bf16")


def stream_position(checkpoint: dict[str, Any]) -> int:
    # Checkpoints of single runs written before groups existed count steps only; there
    # every batch was a step unless skipped.
    return checkpoint.get("batches", checkpoint["step"])


class Member:
    """One SAE of a group, with all that is its own: optimizer, scheduler, counters,
    torch RNG (so its init and any random op match a separate run), log and run dir."""

    def __init__(
        self,
        index: int,
        cfg: TrainConfig,
        run_dir: Path,
        named: bool,
        ranks: Ranks = SINGLE,
        record: RunRecord | None = None,
    ):
        """Accept the run dir for this config, or raise a UserError that says why not;
        nothing in the run dir is written until `start`."""
        self.index, self.cfg, self.run_dir, self.named, self.ranks = index, cfg, run_dir, named, ranks
        self.log = MemberLog(log, run_dir, named)
        self.record = record
        self.recorded = record.check(run_dir, finished=False, resume=cfg.training.resume) if record else None
        self.checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME) if cfg.training.resume != "never" else None
        if self.checkpoint is not None and cfg.training.resume != "force":
            current = resumable_config(cfg)
            changed = config_differences(self.checkpoint["config"], current, defaults=schema_defaults(current))
            if changed:
                raise UserError(
                    f"run dir {run_dir} holds a checkpoint of a different config: {'; '.join(changed)}. "
                    "Use a new run dir, or training.resume=force to continue anyway"
                )
        # Each rank's share of the stream is in the checkpoint; another number of ranks
        # would need them split or merged, which cannot continue exactly.
        saved_world = self.checkpoint.get("world_size", 1) if self.checkpoint is not None else ranks.world
        if saved_world != ranks.world:
            raise UserError(
                f"config key 'training.distributed': run dir {run_dir} holds a checkpoint of {saved_world} "
                f"process(es), this run has {ranks.world}; resume it with {saved_world} (torchrun "
                "--nproc_per_node or SLURM tasks), or use a new run dir"
            )
        self.position = stream_position(self.checkpoint) if self.checkpoint is not None else None
        # Its own hooks ([input] or [input, target]); the feed's columns may hold more (a group
        # over hooks reads them all from one LM pass): `columns` says where its own are.
        self.hooks = run_hooks(cfg.model.hook_point, cfg.model.hook_point_out)
        self.columns = (0, len(self.hooks) - 1)
        # The feed's hooks when it was checkpointed (the buffer holds a column for each): a
        # member resumes with the members that share them. A checkpoint from before groups
        # over hooks holds the member's own.
        self.feed_hooks = tuple(self.checkpoint.get("hooks", self.hooks)) if self.checkpoint is not None else None
        self.error: Exception | None = None
        self.result: dict[str, Any] = {}
        self.last_l0 = float("nan")
        self.stacked = False  # trains in a stack (saesweep.training.stacked): its tensors are views

    def stack_key(self) -> tuple[Any, ...] | None:
        """Members with equal keys can train as one stacked model; None: this one steps alone
        (an architecture with no stacked maths, DDP, or an optimizer with no fused kernel, which
        the stack's per-member skip relies on). Compiled members stack too: the stack's step
        is compiled instead (the key holds the setting, so compiled and eager never mix)."""
        if self.ranks.active or not self.optimizer.defaults.get("fused"):
            return None
        key = self.sae.stack_key()
        # A stack takes one batch: members at other hooks train on other activations.
        return (
            None
            if key is None
            else (key, tuple(self.hooks), self.sae.W_enc.device, self.sae.W_enc.dtype, self.cfg.training.compile)
        )

    def own(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target): this member's columns of the feed's batch."""
        return batch[self.columns[0]], batch[self.columns[1]]

    def start(
        self,
        source: ActivationSource,
        device: torch.device,
        total_steps: int,
        first: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """Build the SAE and its optimizer: fitted to the first fill, or as checkpointed."""
        cfg, checkpoint = self.cfg, self.checkpoint
        # Seeded here, per member, so each SAE starts as it would in a separate run.
        torch.manual_seed(cfg.training.seed)
        transcoder = cfg.model.hook_point_out not in (None, cfg.model.hook_point)
        self.sae = build_sae(cfg.sae, source.d_in, source.d_out, transcoder).to(device)
        self.forward = self.sae  # the training forward (tests wrap it)
        self.amp = autocast(cfg, device)
        self.optimizer = build_optimizer(self.sae.param_groups(), cfg.optimizer)
        # Forward, losses and backward: compiled with training.compile (an eager fallback).
        self.sae_step = SAEStep(
            self.forward_loss,
            partial(self.optimizer.zero_grad, set_to_none=True),
            self.sae,
            device,
            cfg.training.compile,
            f"the SAE step of {self.run_dir.name if self.named else 'the run'}",
        )
        self.scheduler = build_scheduler(self.optimizer, total_steps, cfg.scheduler)
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        # Consecutive skipped steps, counted on the device; the host learns them in `read_back`.
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)
        main = self.ranks.is_main  # the one rank that writes the run dir
        if main:
            self.claim_run_dir()
        if checkpoint is None:
            self.step = 0
            if main:
                truncate_metrics(self.run_dir / "metrics.jsonl", 0)  # lines of a run killed before its first checkpoint
            self.sae.fit_to_data(first[0], first[-1])
            self.rng_state = torch.get_rng_state()
        else:
            self.step = checkpoint["step"]
            self.sae.load_state_dict(checkpoint["sae"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.tokens_since_fired.copy_(checkpoint["tokens_since_fired"])
            self.rng_state = checkpoint["torch_rng"]
            if main:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            self.log.info("resuming %s from step %d of %d", self.run_dir, self.step, total_steps)
            self.checkpoint = None  # the buffer copy in it is large
        self.total_steps = total_steps
        # What the host knows for sure: the step and the skipped-in-a-row count at the last
        # read, and per step since then [applied, loss, gradient norm] on the device.
        self.read_step, self.read_nonfinite = self.step, 0
        self.pending: list[torch.Tensor] = []
        self.due: dict[str, torch.Tensor] | None = None  # a logging step's metrics, until `read_back`
        self.ranks.broadcast_module(self.sae)  # DDP: every replica starts as rank 0's
        self.ranks.check_state(self.sae)
        self.metrics = MetricsLog(self.run_dir, cfg.logger, cfg) if main else NullMetricsLog()
        self.sae.train()

    def claim_run_dir(self) -> None:
        """The run dir is this run's from here on (it was accepted in __init__): its record
        of the config, no leftovers of interrupted checkpoint writes, and on a fresh start
        over an old run (training.resume=never) no eval.json saying it has finished."""
        resuming = self.checkpoint is not None
        mark_claimed(self.run_dir)
        for stale in stale_temps(self.run_dir / CHECKPOINT_NAME):
            stale.unlink(missing_ok=True)
        if not resuming:
            (self.run_dir / "eval.json").unlink(missing_ok=True)
        if self.record is not None:
            self.record.write(self.run_dir, self.recorded, resuming)

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        torch.set_rng_state(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """One optimizer step on this batch, or a skipped one; any error ends this member only."""
        try:
            with self.own_rng(), self.ranks.running_state(self.sae):
                self._step(x, target)
        except Exception as e:
            self.fail(e)
            self.metrics.close()

    def fail(self, error: Exception) -> None:
        """Record what ended this member. A single run's caller reports it; in a group the
        others go on, so say it now, in this member's log."""
        self.error = error
        if self.named:
            self.log.error("%s: %s", type(error).__name__, error, exc_info=not isinstance(error, UserError))

    def _step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """One step that reads nothing back from the device; on a logging step it leaves its
        metrics in `due`, for the group's `read_back`."""
        cfg, sae = self.cfg, self.sae
        out, loss = self.sae_step(x, target, self.step)
        self.ranks.average_gradients(sae)  # DDP: every replica steps on the global batch's gradient
        # With no clipping the max norm is inf: the gradients stay as they are, but we
        # still get their norm for the finiteness check below.
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.training.grad_clip_norm or float("inf"))
        # A non-finite step is skipped on the device (`skip_decision`); the host learns of it
        # at the next logging step (`read_back`). Under DDP a step is skipped on every rank or on none.
        finite = self.ranks.all_true(torch.isfinite(loss.detach() + grad_norm))
        applied, self.nonfinite = skip_decision(finite, self.nonfinite, cfg.training.max_nonfinite_steps)
        self._optimizer_step(applied)
        self.scheduler.step()  # as if applied; `caught_up` winds it back over skipped steps
        sae.after_step(applied)
        # Fired anywhere in the global batch of len(x) x world tokens.
        fired = self.ranks.any(out.fired)
        self.tokens_since_fired = since_fired(self.tokens_since_fired, fired, applied, len(x) * self.ranks.world)
        if self.stepped(torch.stack([applied, loss.detach(), grad_norm])):
            self.measure(out, target)

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor, step: int) -> tuple[StepOutput, torch.Tensor]:
        """The training forward and its summed loss (what training.compile compiles)."""
        with self.amp():
            out = self.forward(x, target, step)
            return out, sum(out.losses.values())

    def stepped(self, record: torch.Tensor) -> bool:
        """Count a step taken on the device (`record`: [applied, loss, gradient norm]); whether
        it is a logging step, whose metrics `measure` must leave for `read_back`."""
        self.step += 1
        self.pending.append(record)
        return self.step % self.cfg.training.log_every == 0 or self.step == self.total_steps

    def measure(self, out: StepOutput, target: torch.Tensor) -> None:
        """A logging step's metrics, from `out` (this member's pass), kept on the device."""
        # Copies: a compiled step's outputs may be overwritten by the next (CUDA graphs).
        losses = {k: v.detach().clone() for k, v in out.losses.items()}
        self.due = {
            "loss": sum(losses.values()),
            **{f"loss/{k}": v for k, v in losses.items()},
            "l0": out.l0.clone(),
            "explained_variance": explained_variance(target, out.recon.detach()),
            "dead_features": (self.tokens_since_fired >= self.cfg.training.dead_after_tokens).sum(),
        }

    def _optimizer_step(self, applied: torch.Tensor) -> None:
        if self.optimizer.defaults.get("fused"):
            # The fused kernel leaves parameters, moments and step count alone where found_inf is 1.
            self.optimizer.found_inf = (~applied).float()
            self.optimizer.step()
        elif applied:  # no fused kernel on this device: the host decides (a sync)
            self.optimizer.step()

    def read_request(self) -> torch.Tensor:
        """What the host must learn (see `caught_up`), as one tensor on the device."""
        parts = [torch.stack(self.pending).flatten()]
        if self.due is not None:
            parts.append(torch.stack(list(self.due.values())))  # promoted to float64, EV's dtype
        return torch.cat(parts)  # cat promotes too

    def caught_up(self, values: list[float], elapsed: Callable[[], float]) -> None:
        """Take the host's copy of `read_request`: the steps the device skipped (each warned
        about, as it happened), hence the true step count, and on a logging step the metrics,
        logged if that step was applied. Raises the divergence error once
        max_nonfinite_steps were skipped in a row."""
        cfg, measured = self.cfg, self.due
        steps = [values[i : i + 3] for i in range(0, 3 * len(self.pending), 3)]
        self.pending, self.due = [], None
        step, nonfinite = self.read_step, self.read_nonfinite
        for applied, loss, grad_norm in steps:
            if applied:
                step, nonfinite = step + 1, 0
                continue
            nonfinite += 1
            self.log.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                step,
                loss,
                grad_norm,
                nonfinite,
            )
            if nonfinite >= cfg.training.max_nonfinite_steps:
                self.step = step  # the device took no step after this one
                raise UserError(
                    f"training diverged: {nonfinite} steps in a row had a non-finite loss or gradient "
                    f"(at step {step}); the last good state is in {self.run_dir / CHECKPOINT_NAME}. Lower "
                    "optimizer.lr or set training.grad_clip_norm, then rerun with training.resume=force"
                )
        if step != self.step:  # skipped steps are made up: the schedule goes back to the true step
            self.scheduler.last_epoch = step - 1
            self.scheduler.step()
        self.step, self.read_step, self.read_nonfinite = step, step, nonfinite
        logging_step = step % cfg.training.log_every == 0 or step == self.total_steps
        if measured is None or not steps[-1][0] or not logging_step:
            return
        tokens = step * cfg.training.batch_size
        host = dict(zip(measured, values[3 * len(steps) :]))
        dead = int(host.pop("dead_features"))
        measured_here = self.ranks.mean(host)  # DDP: over the ranks' shares of the batch
        self.last_l0 = measured_here["l0"]
        self.metrics.log(
            {
                "step": step,
                "tokens": tokens,
                "lr": self.scheduler.get_last_lr()[0],
                **measured_here,
                "dead_features": dead,
                "tokens_per_second": tokens / elapsed(),
            }
        )

    def state(self, shared: dict[str, Any]) -> dict[str, Any]:
        """This member's checkpoint: the shared stream state plus its own; a single run's format."""
        return {
            "config": resumable_config(self.cfg),
            "step": self.step,
            **shared,  # stream position (batches, feed position, buffer) and elapsed time
            # A stacked member's tensors are views of the stack's: torch.save would write all of it.
            "sae": {k: v.clone() for k, v in self.sae.state_dict().items()} if self.stacked else self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.clone() if self.stacked else self.tokens_since_fired,
            "torch_rng": self.rng_state,
        }

    def export_partial(self, sample: torch.Tensor) -> None:
        with self.own_rng():
            self.sae.calibrate(sample)
        save_sae(
            self.sae,
            self.run_dir / "sae",
            {**sae_metadata(self.cfg), "partial": True, "tokens_trained": self.step * self.cfg.training.batch_size},
        )

    def finish(
        self,
        source: ActivationSource,
        rows: Any,
        sample: torch.Tensor,
        train_seconds: float,
        feed_name: str,
        shared: str | None = None,
    ) -> None:
        """Calibrate, evaluate on held-out rows, export; eval.json last, as it marks the run finished."""
        cfg = self.cfg
        try:
            with self.own_rng():
                self.sae.calibrate(sample)
                result = evaluate(
                    self.sae, source, rows.eval_rows, cfg.eval.rows, cfg.eval.ce_rows, cfg.eval.batch_rows, shared
                )
            tokens_trained = self.step * cfg.training.batch_size
            result.update(
                tokens_trained=tokens_trained,
                train_seconds=train_seconds,
                tokens_per_second=tokens_trained / train_seconds,
                bos_excluded=cfg.activations.exclude_bos,
                activation_source=feed_name,
            )
            log10_rate = result.log10_firing_rate()
            save_sae(self.sae, self.run_dir / "sae", sae_metadata(cfg), sparsity=log10_rate)
            self.metrics.final(result, log10_rate, self.run_dir / "sae")
            self.metrics.close()
            atomic_write_text(self.run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        except Exception as e:
            self.fail(e)
            return
        # eval.json now marks the run finished; the checkpoint (buffer included) is dead weight.
        (self.run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        self.result = result


def skip_decision(
    finite: torch.Tensor, nonfinite: torch.Tensor, max_nonfinite: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(applied, skipped in a row after this step), per member (any shape), on the device.

    A NaN/Inf step would poison Adam's moments for good: it is skipped. A member with
    max_nonfinite skipped in a row has diverged: it changes nothing more until the host
    sees that (`Member.caught_up`) and ends it."""
    applied = finite & (nonfinite < max_nonfinite)
    return applied, torch.where(applied, 0, nonfinite + 1)


def since_fired(counts: torch.Tensor, fired: torch.Tensor, applied: torch.Tensor, tokens: int) -> torch.Tensor:
    """Tokens since each latent last fired ([..., d_sae]), after a step of `tokens` tokens that
    counts only where `applied` ([...]) is true."""
    grown = torch.where(fired, 0, counts + tokens)
    return torch.where(applied.unsqueeze(-1), grown, counts)


def read_back(members: list[Member], elapsed: Callable[[], float], everything: bool = False) -> list[Member]:
    """The group's one transfer from the device: for the members on a logging step, or with
    `everything` (before a checkpoint) for all with steps the host has not seen. A member
    found diverged fails (its state is the last good one: the device applied nothing since);
    those are returned."""
    asking = [m for m in members if m.error is None and (m.due is not None or (everything and m.pending))]
    if not asking:
        return []
    requests = [m.read_request() for m in asking]
    values = to_host(torch.cat(requests))
    failed, start = [], 0
    for member, request in zip(asking, requests):
        try:
            member.caught_up(values[start : start + request.numel()], elapsed)
        except Exception as e:
            member.fail(e)
            member.metrics.close()
            failed.append(member)
        start += request.numel()
    return failed


class MemberLog(logging.LoggerAdapter):
    """Tags a member's log records with its run dir (the grouped launcher routes them to
    that member's log file only) and, in a group, prefixes them with the member's dir name."""

    def __init__(self, logger: logging.Logger, run_dir: Path, named: bool):
        super().__init__(logger, {"run_dir": str(run_dir)})
        self.prefix = f"[{run_dir.name}] " if named else ""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.prefix}{msg}", {**kwargs, "extra": self.extra}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from; they will be logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def sae_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """What SAELens keeps in cfg.json's metadata, so users can find the activations again."""
    return {
        "model_name": cfg.model.name,
        "hook_name": cfg.model.hook_point,
        "hook_name_out": cfg.model.hook_point_out,
        "hook_head_index": None,
        "context_size": cfg.dataset.context_size,
        "prepend_bos": cfg.dataset.prepend_bos,
        "exclude_bos": cfg.activations.exclude_bos,
        "dataset_path": cfg.dataset.path,
        "model_from_pretrained_kwargs": dict(cfg.model.from_pretrained_kwargs),
        # SAELens's name for what the hook names refer to: module paths of the HF model,
        # or TransformerLens hook points.
        "model_class_name": "AutoModelForCausalLM" if cfg.model.backend == "hf" else "HookedTransformer",
        "seqpos_slice": list(cfg.activations.seqpos_slice),
        "exclude_special_tokens": cfg.activations.exclude_special_tokens,
    }
