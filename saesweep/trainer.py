"""The training loop: one loop for every architecture, and for a group of SAEs.

A group is several SAEs that differ only in their own, optimizer and scheduler
settings: they share the LM, the token rows, the activation feed and the buffer, so
the LM runs once for all of them, while each member keeps its own SAE, optimizer,
scheduler, dead-latent counters, metrics log, checkpoint and run dir. A single run
is a group of one.

The SAE returns a dict of named loss terms; the loop sums them, steps the
optimizer, logs, and at the end evaluates on held-out rows and exports.

Under training.distributed=ddp this process is one rank of several (`Ranks`, see
saesweep.distributed): the same loop on its own share of the data and of each batch,
with the gradients and a step's decisions combined over the ranks; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
from tqdm import tqdm

from saesweep.activations import ActivationSource
from saesweep.allocator import keep_freed_memory
from saesweep.buffer import ActivationBuffer
from saesweep.cache import open_training_feed
from saesweep.checkpoint import CHECKPOINT_NAME, StopSignals, config_differences, load_checkpoint, save_checkpoints
from saesweep.config import TrainConfig
from saesweep.data import load_token_rows
from saesweep.distributed import SINGLE, Ranks
from saesweep.errors import UserError
from saesweep.evals import evaluate, shared_key
from saesweep.atomic import atomic_write_text
from saesweep.export import save_sae
from saesweep.metrics import explained_variance
from saesweep.metrics_log import MetricsLog, NullMetricsLog
from saesweep.models import check_hook, load_model
from saesweep.optim import build_optimizer, build_scheduler
from saesweep.sae import build_sae

log = logging.getLogger(__name__)

# What train_group gives back per member: its eval result, or the exception that stopped it.
Outcome = Union[dict[str, Any], Exception]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, ranks: Ranks = SINGLE) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'training.device': {name!r} but no CUDA GPU is visible; use auto or cpu")
    return ranks.device(name)


# Keys that may change between an interrupted run and its resumption (the number of
# processes may not: Member checks it).
RESUME_MAY_CHANGE = {"training.resume", "training.checkpoint_every_tokens", "training.log_every",
                     "training.device", "training.compile", "training.distributed", "training.max_nonfinite_steps",
                     "eval", "cache_dir", "logger", "objectives", "activations.cache_dir", "activations.shard_mb"}


def resumable_config(cfg: TrainConfig) -> dict[str, Any]:
    flat = asdict(cfg)
    for key in RESUME_MAY_CHANGE:
        section, _, name = key.partition(".")
        if name:
            flat[section].pop(name, None)
        else:
            flat.pop(section, None)
    return flat


def load_model_checked(cfg: TrainConfig, device: torch.device) -> Any:
    keep_freed_memory()  # before the model and the step's big temporaries are allocated
    model = load_model(cfg.model, device, cfg.cache_dir)
    check_hook(model, cfg.model.hook_point, "model.hook_point")
    if cfg.model.hook_point_out is not None:
        check_hook(model, cfg.model.hook_point_out, "model.hook_point_out")
        layer_in, layer_out = model.hook_layer(cfg.model.hook_point), model.hook_layer(cfg.model.hook_point_out)
        if layer_in is not None and layer_out is not None and layer_out < layer_in:
            raise UserError(
                f"config key 'model.hook_point_out': {cfg.model.hook_point_out} comes before the input hook "
                f"{cfg.model.hook_point}; a transcoder maps an earlier hook to a later one"
            )
    if cfg.dataset.context_size > model.cfg.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
    return model


def train(cfg: TrainConfig, run_dir: Path, ranks: Ranks = SINGLE) -> dict[str, Any]:
    """Train one SAE into run_dir (a group of one); its eval result ({} on ranks other than 0)."""
    outcome = train_group([cfg], [Path(run_dir)], ranks=ranks)[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def train_group(cfgs: list[TrainConfig], run_dirs: list[Path], resume_hint: str | None = None,
                ranks: Ranks = SINGLE) -> list[Outcome]:
    """Train one SAE per config on one shared activation stream, each into its own run dir.

    The configs must agree on everything but sae, optimizer, scheduler, objectives and
    logger (the grouped launcher checks that). A member that fails (bad checkpoint,
    divergence, an error in its step) gets its exception as outcome; the others go on.
    Members whose checkpoints are at different points of the stream (a member added to
    the sweep, a crash between two checkpoint renames) are trained one subgroup after
    another, so each resumes exactly. `resume_hint` says how to rerun, for the stop message.
    With several `ranks` (training.distributed=ddp) this process is one of them: one member only.
    """
    if ranks.active and len(cfgs) > 1:
        raise UserError("config key 'training.distributed': ddp trains one run per job; a group of "
                        f"{len(cfgs)} (hydra/launcher=grouped) is not supported")
    run_dirs = [Path(d) for d in run_dirs]
    resume_hint = resume_hint or f"hydra.run.dir={run_dirs[0]}"
    outcomes: list[Outcome | None] = [None] * len(cfgs)
    subgroups: dict[int | None, list[Member]] = {}  # by checkpoint position; None: not started
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        try:
            finished = finished_result(cfg, run_dir)
            if finished is not None:
                outcomes[i] = finished
                continue
            member = Member(i, cfg, run_dir, named=len(cfgs) > 1, ranks=ranks)
        except UserError as e:
            outcomes[i] = e
            continue
        subgroups.setdefault(member.position, []).append(member)
    if not subgroups:
        return outcomes  # type: ignore[return-value]

    cfg = next(iter(subgroups.values()))[0].cfg  # what the members share
    seed_everything(cfg.training.seed)
    device = resolve_device(cfg.training.device, ranks)
    model = load_model_checked(cfg, device)
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed,
                           total_tokens=cfg.training.total_tokens)
    source = ActivationSource(model, cfg.model.hook_point, cfg.model.hook_point_out, cfg.activations.exclude_bos)
    for members in subgroups.values():
        for member, outcome in zip(members, train_together(members, model, source, rows, device, resume_hint)):
            outcomes[member.index] = outcome
    return outcomes  # type: ignore[return-value]


def finished_result(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    if cfg.training.resume != "never" and (run_dir / "eval.json").exists():
        log.info("%s has finished already (eval.json); nothing to do", run_dir)
        return json.loads((run_dir / "eval.json").read_text())
    return None


def train_together(members: list[Member], model: Any, source: ActivationSource, rows: Any,
                   device: torch.device, resume_hint: str) -> list[Outcome]:
    """The loop: members at the same point of the same activation stream, one batch each step.

    Under DDP each rank runs it on its own share of the stream and of every batch."""
    cfg, checkpoint, ranks = members[0].cfg, members[0].checkpoint, members[0].ranks
    stream = rank_stream(checkpoint, ranks.rank)  # this rank's feed position and buffer
    # Live LM pass or the shared cache; either way the buffer gets chunks of activations.
    feed = open_training_feed(cfg, model, source, rows, stream, ranks)
    batch_size, every = cfg.training.batch_size, cfg.training.checkpoint_every_tokens
    total_steps = cfg.training.total_tokens // batch_size
    local_batch = batch_size // ranks.world  # divisible: checked when the ranks joined
    buffer = ActivationBuffer(
        feed,
        capacity=max(2 * local_batch, cfg.buffer.size_tokens),
        batch_size=local_batch,
        device=device,
        generator=torch.Generator().manual_seed(cfg.training.seed),
        limit=total_steps * local_batch,  # every step reads one batch; pull no more than that
    )
    # The LM runs inside the buffer's refills, so its forward is under autocast there too.
    amp = autocast(cfg, device)

    segment_start = time.perf_counter()  # throughput counts every LM pass, the first fill included
    if checkpoint is None:
        batches, elapsed_before = 0, 0.0  # batches drawn from the buffer: the stream position
        with amp():
            first = buffer.sample()
        for member in members:
            member.start(source, device, total_steps, first)
    else:
        batches, elapsed_before = stream_position(checkpoint), checkpoint["elapsed"]
        buffer.load_state_dict(stream["buffer"])
        for member in members:
            member.start(source, device, total_steps)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - segment_start

    # Fault injection for the crash tests: SAESWEEP_CRASH_AT_STEP=N is a SIGKILL after step N
    # (and its checkpoint, if one is due); N:checkpoint kills half-way through writing it.
    crash_step, _, crash_where = os.environ.get("SAESWEEP_CRASH_AT_STEP", "0").partition(":")
    crash_at = int(crash_step)

    def save(to_save: list[Member]) -> None:
        own = {**feed.state_dict(), "buffer": buffer.state_dict()}
        streams = ranks.gather(own)  # rank 0 writes every rank's stream state
        if not ranks.is_main:
            return
        shared = {"batches": batches, "elapsed": elapsed(), **own}
        if ranks.active:
            shared.update(world_size=ranks.world, rank_streams=streams[1:])
        write = _die_mid_write if batches == crash_at and crash_where == "checkpoint" else torch.save
        save_checkpoints({m.run_dir / CHECKPOINT_NAME: m.state(shared) for m in to_save}, write)

    log.info("training %d SAE(s) (%s) d_in=%d for %d steps of %d tokens on %s%s", len(members),
             ", ".join(f"{m.cfg.sae.architecture} d_sae={m.sae.d_sae}" for m in members),
             source.d_in, total_steps, batch_size, device,
             f" x {ranks.world} ranks of {local_batch}" if ranks.active else "")
    # The bar is closed however the loop ends, so an error message starts on its own line.
    with StopSignals() as stop, tqdm(total=total_steps, initial=min(m.step for m in members), desc="train",
                                     unit="step", dynamic_ncols=True, disable=not ranks.is_main) as progress:
        while training := [m for m in members if m.error is None and m.step < total_steps]:
            with amp():
                batch = buffer.next_batch()
            batches += 1
            for member in training:
                member.train_step(batch[0], batch[-1], elapsed)
                if member.error is not None:
                    save([member])  # its last good state: bad steps were never applied
            # L0 is known from the first logging step on (it costs a host sync to read). The
            # bar redraws at most every 0.1 s (in update), not at every step's postfix.
            known = not all(math.isnan(m.last_l0) for m in members)
            progress.set_postfix(tok_s=f"{batches * batch_size / elapsed():.0f}", refresh=False,
                                 **({"L0": "/".join(f"{m.last_l0:.1f}" for m in members)} if known else {}))
            progress.update(min(m.step for m in training) - progress.n)

            crossed = every > 0 and (batches * batch_size) // every > ((batches - 1) * batch_size) // every
            healthy = [m for m in members if m.error is None]
            done = all(m.step == total_steps for m in healthy)
            # A signal reaches the ranks at different steps: all act on it at the same one.
            stopping = ranks.max_int(stop.received or 0) if ranks.active else stop.received
            if crossed or stopping or done:
                save(healthy)
            if batches == crash_at and not crash_where:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                stop.received = stop.received or stopping  # a rank not signalled itself acts on another's
                if stop.received == signal.SIGINT and ranks.is_main:
                    # Ctrl-C is a person who wants to look at what they have; a preempted
                    # job (USR2/TERM) has seconds left and only needs the checkpoint.
                    for member in healthy:
                        member.export_partial(buffer.sample()[0])
                log.warning("stopping on signal %d at step %d; checkpoint saved%s. To resume, rerun the "
                            "same command with %s", stop.received, batches,
                            " and the SAE so far in sae/" if stop.received == signal.SIGINT else "", resume_hint)
                stop.resend()
                ranks.follow_main(f"stopped on signal {stopping}")  # DDP: go on only if rank 0 does

    train_seconds = elapsed()
    if not ranks.is_main:
        ranks.barrier()  # rank 0 evaluates and writes the run's results
        return [m.error if m.error is not None else {} for m in members]
    log.info("trained on %d tokens in %.1f s; evaluating on held-out rows", total_steps * batch_size, train_seconds)
    # Members (of this group, or of a sweep run one after another in this process) share
    # the evaluation's SAE-independent parts: held-out activations, clean and ablated CE.
    eval_key = shared_key(cfg.model, source.hooks, cfg.activations.exclude_bos, rows.eval_rows, cfg.eval.batch_rows)
    outcomes: list[Outcome] = []
    for member in members:
        if member.error is None:
            member.finish(source, rows, buffer.sample()[0], train_seconds, feed.name, eval_key)
        outcomes.append(member.error if member.error is not None else member.result)
    ranks.barrier()
    return outcomes


def autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """A context factory: bf16 autocast on `device` if training.autocast asks for it."""
    return partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.training.autocast == "bf16")


def rank_stream(checkpoint: dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    """A rank's own part of a checkpoint: feed position and buffer (rank 0's sit at the top
    level, as in a single process's checkpoint)."""
    if checkpoint is None or rank == 0:
        return checkpoint
    return checkpoint["rank_streams"][rank - 1]


def stream_position(checkpoint: dict[str, Any]) -> int:
    # Checkpoints of single runs written before groups existed count steps only; there
    # every batch was a step unless skipped.
    return checkpoint.get("batches", checkpoint["step"])


class Member:
    """One SAE of a group, with all that is its own: optimizer, scheduler, counters,
    torch RNG (so its init and any random op match a separate run), log and run dir."""

    def __init__(self, index: int, cfg: TrainConfig, run_dir: Path, named: bool, ranks: Ranks = SINGLE):
        self.index, self.cfg, self.run_dir, self.named, self.ranks = index, cfg, run_dir, named, ranks
        self.log = MemberLog(log, run_dir, named)
        self.checkpoint = (load_checkpoint(run_dir / CHECKPOINT_NAME, clean=ranks.is_main)
                           if cfg.training.resume != "never" else None)
        if self.checkpoint is not None and cfg.training.resume != "force":
            changed = config_differences(self.checkpoint["config"], resumable_config(cfg))
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
        self.error: Exception | None = None
        self.result: dict[str, Any] = {}
        self.last_l0 = float("nan")

    def start(self, source: ActivationSource, device: torch.device, total_steps: int,
              first: tuple[torch.Tensor, ...] | None = None) -> None:
        """Build the SAE and its optimizer: fitted to the first fill, or as checkpointed."""
        cfg, checkpoint = self.cfg, self.checkpoint
        # Seeded here, per member, so each SAE starts as it would in a separate run.
        torch.manual_seed(cfg.training.seed)
        transcoder = cfg.model.hook_point_out not in (None, cfg.model.hook_point)
        self.sae = build_sae(cfg.sae, source.d_in, source.d_out, transcoder).to(device)
        # The training forward; compiled, it shares the SAE's parameters and state.
        self.forward = torch.compile(self.sae) if cfg.training.compile else self.sae
        self.amp = autocast(cfg, device)
        self.optimizer = build_optimizer(self.sae.param_groups(), cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, total_steps, cfg.scheduler)
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.nonfinite = 0  # consecutive skipped steps
        main = self.ranks.is_main  # the one rank that writes the run dir
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
        self.ranks.broadcast_module(self.sae)  # DDP: every replica starts as rank 0's
        self.ranks.check_state(self.sae)
        self.metrics = MetricsLog(self.run_dir, cfg.logger, cfg) if main else NullMetricsLog()
        self.sae.train()

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        torch.set_rng_state(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()

    def train_step(self, x: torch.Tensor, target: torch.Tensor, elapsed: Callable[[], float]) -> None:
        """One optimizer step on this batch, or a skipped one; any error ends this member only."""
        try:
            with self.own_rng(), self.ranks.running_state(self.sae):
                self._step(x, target, elapsed)
        except Exception as e:
            self.fail(e)
            self.metrics.close()

    def fail(self, error: Exception) -> None:
        """Record what ended this member. A single run's caller reports it; in a group the
        others go on, so say it now, in this member's log."""
        self.error = error
        if self.named:
            self.log.error("%s: %s", type(error).__name__, error, exc_info=not isinstance(error, UserError))

    def _step(self, x: torch.Tensor, target: torch.Tensor, elapsed: Callable[[], float]) -> None:
        cfg, sae = self.cfg, self.sae
        with self.amp():
            out = self.forward(x, target, self.step)
            loss = sum(out.losses.values())

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ranks.average_gradients(sae)  # DDP: every replica steps on the global batch's gradient
        # With no clipping the max norm is inf: the gradients stay as they are, but we
        # still get their norm for the finiteness check below.
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.training.grad_clip_norm or float("inf"))
        # One host sync per step: a NaN/Inf step would poison Adam's moments for good.
        # Under DDP a step is skipped on every rank or on none.
        if not self.ranks.all_true(torch.isfinite(loss.detach() + grad_norm)):
            self.nonfinite += 1
            self.log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                             self.step, float(loss.detach()), float(grad_norm), self.nonfinite)
            if self.nonfinite >= cfg.training.max_nonfinite_steps:
                raise UserError(
                    f"training diverged: {self.nonfinite} steps in a row had a non-finite loss or gradient "
                    f"(at step {self.step}); the last good state is in {self.run_dir / CHECKPOINT_NAME}. Lower "
                    "optimizer.lr or set training.grad_clip_norm, then rerun with training.resume=force"
                )
            return
        self.nonfinite = 0
        self.optimizer.step()
        self.scheduler.step()
        sae.after_step()
        # Fired anywhere in the global batch of len(x) x world tokens.
        fired = self.ranks.any(out.fired)
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + len(x) * self.ranks.world)
        self.step += 1

        total_steps = cfg.training.total_tokens // cfg.training.batch_size
        if self.step % cfg.training.log_every == 0 or self.step == total_steps:
            tokens = self.step * cfg.training.batch_size
            measured = self.ranks.mean({  # DDP: over the ranks' shares of the batch
                "loss": float(loss.detach()),
                **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                "l0": float(out.l0),
                "explained_variance": explained_variance(target, out.recon.detach()),
            })
            self.last_l0 = measured["l0"]
            self.metrics.log({
                "step": self.step,
                "tokens": tokens,
                "lr": self.scheduler.get_last_lr()[0],
                **measured,
                "dead_features": int((self.tokens_since_fired >= cfg.training.dead_after_tokens).sum()),
                "tokens_per_second": tokens / elapsed(),
            })

    def state(self, shared: dict[str, Any]) -> dict[str, Any]:
        """This member's checkpoint: the shared stream state plus its own; a single run's format."""
        return {
            "config": resumable_config(self.cfg),
            "step": self.step,
            **shared,  # stream position (batches, feed position, buffer) and elapsed time
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "torch_rng": self.rng_state,
        }

    def export_partial(self, sample: torch.Tensor) -> None:
        with self.own_rng():
            self.sae.calibrate(sample)
        save_sae(self.sae, self.run_dir / "sae", {**sae_metadata(self.cfg), "partial": True,
                                                  "tokens_trained": self.step * self.cfg.training.batch_size})

    def finish(self, source: ActivationSource, rows: Any, sample: torch.Tensor, train_seconds: float,
               feed_name: str, shared: str | None = None) -> None:
        """Calibrate, evaluate on held-out rows, export; eval.json last, as it marks the run finished."""
        cfg = self.cfg
        try:
            with self.own_rng():
                self.sae.calibrate(sample)
                result = evaluate(self.sae, source, rows.eval_rows, cfg.eval.rows, cfg.eval.ce_rows,
                                  cfg.eval.batch_rows, shared)
            tokens_trained = self.step * cfg.training.batch_size
            result.update(
                tokens_trained=tokens_trained,
                train_seconds=train_seconds,
                tokens_per_second=tokens_trained / train_seconds,
                bos_excluded=cfg.activations.exclude_bos,
                activation_source=feed_name,
            )
            self.metrics.final(result)
            self.metrics.close()
            save_sae(self.sae, self.run_dir / "sae", sae_metadata(cfg), sparsity=result.log10_firing_rate())
            atomic_write_text(self.run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        except Exception as e:
            self.fail(e)
            return
        # eval.json now marks the run finished; the checkpoint (buffer included) is dead weight.
        (self.run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        self.result = result


class MemberLog(logging.LoggerAdapter):
    """Tags a member's log records with its run dir (the grouped launcher routes them to
    that member's log file only) and, in a group, prefixes them with the member's dir name."""

    def __init__(self, logger: logging.Logger, run_dir: Path, named: bool):
        super().__init__(logger, {"run_dir": str(run_dir)})
        self.prefix = f"[{run_dir.name}] " if named else ""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.prefix}{msg}", {**kwargs, "extra": self.extra}


def _die_mid_write(state: dict[str, Any], tmp: Path) -> None:
    torch.save(state, tmp)
    os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


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
        "seqpos_slice": [None],
    }
