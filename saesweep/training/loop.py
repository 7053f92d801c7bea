"""The training loop: one loop for every architecture, and for a group of SAEs.

A group is several SAEs that differ only in their own, optimizer and scheduler
settings and their hook points: they share the LM, the token rows, the activation feed
and the buffer, so the LM runs once for all of them (to the deepest hook; the buffer holds
a column per hook, shuffled together, and each member reads its own), while each member keeps its own SAE, optimizer,
scheduler, dead-latent counters, metrics log, checkpoint and run dir. A single run
is a group of one. Members whose SAEs can stack (one shape; see SAE.stack_key) step as one batched
model (saesweep.training.stacked), each still with all of the above its own.

The SAE returns a dict of named loss terms; the loop sums them, steps the
optimizer, logs, and at the end evaluates on held-out rows and exports.

Under training.distributed=ddp this process is one rank of several (`Ranks`, see
saesweep.training.distributed): the same loop on its own share of the data and of each batch,
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
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from tqdm import tqdm

from saesweep.activations.buffer import ActivationBuffer
from saesweep.activations.cache import open_training_feed
from saesweep.activations.source import ActivationSource, token_filter
from saesweep.config.schema import TrainConfig
from saesweep.data.rows import load_token_rows
from saesweep.errors import UserError
from saesweep.evaluation.held_out import shared_key
from saesweep.lm.model import check_run_against_model, load_model, model_shape
from saesweep.lm.shape import check_model_against_shape, check_sae_against_shape
from saesweep.training.allocator import keep_freed_memory
from saesweep.training.buffer_size import buffer_capacity
from saesweep.training.checkpoint import CHECKPOINT_NAME, StopSignals, save_checkpoints
from saesweep.training.distributed import SINGLE, Ranks, resolve_device
from saesweep.training.member import Member, autocast, read_back, stream_position
from saesweep.training.run_record import RunRecord
from saesweep.training.stacked import Steppers

log = logging.getLogger(__name__)

# What train_group gives back per member: its eval result, or the exception that stopped it.
Outcome = Union[dict[str, Any], Exception]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, run_dir: Path, ranks: Ranks = SINGLE, record: RunRecord | None = None) -> dict[str, Any]:
    """Train one SAE into run_dir (a group of one); its eval result ({} on ranks other than 0).
    `record`: the run's config as `.hydra/` records it (see saesweep.training.run_record)."""
    outcome = train_group([cfg], [Path(run_dir)], ranks=ranks, records=[record])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def train_group(
    cfgs: list[TrainConfig],
    run_dirs: list[Path],
    resume_hint: str | None = None,
    ranks: Ranks = SINGLE,
    records: list[RunRecord | None] | None = None,
) -> list[Outcome]:
    """Train one SAE per config on one shared activation stream, each into its own run dir.

    The configs must agree on everything but sae, optimizer, scheduler, objectives, logger
    and the hook points (the grouped launcher checks that). The LM runs once per chunk to the
    deepest hook of the group, and each member trains on its own hook's activations, in the
    order it would see them alone. A member that fails (bad checkpoint,
    divergence, an error in its step) gets its exception as outcome; the others go on.
    Members whose checkpoints are at different points of the stream (a member added to
    the sweep, a crash between two checkpoint renames), or of a feed over other hooks, are
    trained one subgroup after another, so each resumes exactly. `resume_hint` says how to rerun, for the stop message.
    With several `ranks` (training.distributed=ddp) this process is one of them: one member only.
    `records`: each member's config as its run dir's `.hydra/` records it; a run dir holding
    a record of other settings refuses the member before anything loads or is written.
    """
    if ranks.active and len(cfgs) > 1:
        raise UserError(
            "config key 'training.distributed': ddp trains one run per job; a group of "
            f"{len(cfgs)} (hydra/launcher=grouped) is not supported"
        )
    run_dirs = [Path(d) for d in run_dirs]
    resume_hint = resume_hint or f"hydra.run.dir={run_dirs[0]}"
    outcomes: list[Outcome | None] = [None] * len(cfgs)
    # By checkpoint position and the feed's hooks then; (None, None): not started.
    subgroups: dict[tuple[int | None, tuple[str, ...] | None], list[Member]] = {}
    shape = model_shape(cfgs[0].model, cfgs[0].cache_dir)  # the members share the model
    for i, (cfg, run_dir, record) in enumerate(zip(cfgs, run_dirs, records or [None] * len(cfgs))):
        try:
            finished = finished_result(cfg, run_dir, record)
            if finished is not None:
                outcomes[i] = finished
                continue
            if shape is not None:  # before anything loads
                check_model_against_shape(cfg, shape)
                check_sae_against_shape(cfg, shape)
            member = Member(i, cfg, run_dir, named=len(cfgs) > 1, ranks=ranks, record=record)
        except UserError as e:
            outcomes[i] = e
            continue
        subgroups.setdefault((member.position, member.feed_hooks), []).append(member)
    if not subgroups:
        return outcomes  # type: ignore[return-value]

    cfg = next(iter(subgroups.values()))[0].cfg  # what the members share
    seed_everything(cfg.training.seed)
    device = resolve_device(cfg.training.device, "training.device", ranks)
    keep_freed_memory()  # before the model and the step's big temporaries are allocated
    model = load_model(cfg.model, device, cfg.cache_dir)
    for key, members in list(subgroups.items()):
        subgroups[key] = []
        for member in members:
            try:
                check_run_against_model(model, member.cfg)  # its own hooks: a bad one fails it alone
            except UserError as e:
                outcomes[member.index] = e
                continue
            subgroups[key].append(member)
    subgroups = {key: members for key, members in subgroups.items() if members}
    if not subgroups:
        return outcomes  # type: ignore[return-value]
    rows = load_token_rows(
        cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed, total_tokens=cfg.training.total_tokens
    )
    # Every hook of the group: a cache (activations.source=cache) holds them all, built once.
    group_hooks = list(dict.fromkeys(h for members in subgroups.values() for m in members for h in m.hooks))
    for members in subgroups.values():
        together = train_together(members, model, rows, device, resume_hint, group_hooks)
        for member, outcome in zip(members, together):
            outcomes[member.index] = outcome
    return outcomes  # type: ignore[return-value]


def finished_result(cfg: TrainConfig, run_dir: Path, record: RunRecord | None) -> dict[str, Any] | None:
    """The eval result of a run dir that has finished (eval.json), unless this config starts
    afresh; a finished run of other settings is refused (a UserError naming the keys)."""
    if cfg.training.resume != "never" and (run_dir / "eval.json").exists():
        if record is not None:
            record.check(run_dir, finished=True, resume=cfg.training.resume)
        log.info("%s has finished already (eval.json); nothing to do", run_dir)
        return json.loads((run_dir / "eval.json").read_text())
    return None


def train_together(
    members: list[Member],
    model: Any,
    rows: Any,
    device: torch.device,
    resume_hint: str,
    group_hooks: list[str] | None = None,
) -> list[Outcome]:
    """The loop: members at the same point of the same activation stream, one batch each step.

    The stream holds a column per hook of the members (the checkpoint's, when resuming): one
    LM pass, or one cache read, feeds them all. Under DDP each rank runs it on its own share
    of the stream and of every batch."""
    cfg, checkpoint, ranks = members[0].cfg, members[0].checkpoint, members[0].ranks
    hooks = list(members[0].feed_hooks or dict.fromkeys(h for m in members for h in m.hooks))
    source = ActivationSource.for_hooks(model, hooks, **token_filter(cfg.activations))
    for member in members:
        member.columns = (hooks.index(member.hooks[0]), hooks.index(member.hooks[-1]))
        member.source = source.subset(member.hooks)  # its own hooks, for its evaluation
    stream = rank_stream(checkpoint, ranks.rank)  # this rank's feed position and buffer
    # Live LM pass or the shared cache; either way the buffer gets chunks of activations.
    feed = open_training_feed(cfg, model, source, rows, stream, ranks, group_hooks or hooks)
    batch_size, every = cfg.training.batch_size, cfg.training.checkpoint_every_tokens
    total_steps = cfg.training.total_tokens // batch_size
    local_batch = batch_size // ranks.world  # divisible: checked when the ranks joined
    buffer = ActivationBuffer(
        feed,
        capacity=buffer_capacity(
            [m.cfg for m in members], source.widths(), device, local_batch, total_steps * local_batch
        ),
        batch_size=local_batch,
        device=device,
        generator=torch.Generator().manual_seed(cfg.training.seed),
        limit=total_steps * local_batch,  # every step reads one batch; pull no more than that
        overlap=True,  # refills pulled beside the steps (a side stream on a GPU)
    )
    # The LM runs inside the buffer's refills, so its forward is under autocast there too.
    amp = autocast(cfg, device)

    segment_start = time.perf_counter()  # throughput counts every LM pass, the first fill included
    if checkpoint is None:
        batches, elapsed_before = 0, 0.0  # batches drawn from the buffer: the stream position
        with amp():
            first = buffer.sample()
        for member in members:
            member.start(member.source, device, total_steps, member.own(first))
    else:
        batches, elapsed_before = stream_position(checkpoint), checkpoint["elapsed"]
        buffer.load_state_dict(stream["buffer"])
        for member in members:
            member.start(member.source, device, total_steps)

    steppers = Steppers()

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
        shared = {"batches": batches, "elapsed": elapsed(), "hooks": hooks, **own}
        if ranks.active:
            shared.update(world_size=ranks.world, rank_streams=streams[1:])
        write = _die_mid_write if batches == crash_at and crash_where == "checkpoint" else torch.save
        save_checkpoints({m.run_dir / CHECKPOINT_NAME: m.state(shared) for m in to_save}, write)

    log.info(
        "training %d SAE(s) (%s) for %d steps of %d tokens on %s%s",
        len(members),
        ", ".join(f"{m.cfg.sae.architecture} d_in={m.sae.d_in} d_sae={m.sae.d_sae} at {m.hooks[0]}" for m in members),
        total_steps,
        batch_size,
        device,
        f" x {ranks.world} ranks of {local_batch}" if ranks.active else "",
    )
    if len(hooks) > 1:
        log.info("one LM pass per chunk feeds hooks %s (the model runs to the deepest)", ", ".join(hooks))
    # The bar is closed however the loop ends, so an error message starts on its own line.
    with (
        StopSignals() as stop,
        tqdm(
            total=total_steps,
            initial=min(m.step for m in members),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not ranks.is_main,
        ) as progress,
    ):
        while training := [m for m in members if m.error is None and m.step < total_steps]:
            with amp():
                batch = buffer.next_batch()
            batches += 1
            # Members whose SAEs share a stack key step as one stacked model, the others alone.
            for stepper in steppers.covering(training):
                stepper.train_step(*stepper.own(batch))
            for member in training:
                if member.error is not None:
                    save([member])  # its last good state: bad steps were never applied
            for member in read_back(training, elapsed):  # logging steps: one transfer for all
                save([member])  # diverged: as above
            # L0 is known from the first logging step on (it costs a host sync to read). The
            # bar redraws at most every 0.1 s (in update), not at every step's postfix.
            known = not all(math.isnan(m.last_l0) for m in members)
            progress.set_postfix(
                tok_s=f"{batches * batch_size / elapsed():.0f}",
                refresh=False,
                **({"L0": "/".join(f"{m.last_l0:.1f}" for m in members)} if known else {}),
            )
            progress.update(min(m.step for m in training) - progress.n)

            crossed = every > 0 and (batches * batch_size) // every > ((batches - 1) * batch_size) // every
            healthy = [m for m in members if m.error is None]
            # A member's step count is the host's guess until it has read back from the device
            # (at its logging steps, its last step among them, and here before a checkpoint).
            done = all(m.step == total_steps for m in healthy)
            # A signal reaches the ranks at different steps: all act on it at the same one.
            stopping = ranks.max_int(stop.received or 0) if ranks.active else stop.received
            if crossed or stopping or done:
                # One found diverged here is saved too: its state is the last good one.
                read_back(healthy, elapsed, everything=True)
                save(healthy)
                healthy = [m for m in healthy if m.error is None]
            if batches == crash_at and not crash_where:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                stop.received = stop.received or stopping  # a rank not signalled itself acts on another's
                if stop.received == signal.SIGINT and ranks.is_main:
                    # Ctrl-C is a person who wants to look at what they have; a preempted
                    # job (USR2/TERM) has seconds left and only needs the checkpoint.
                    for member in healthy:
                        member.export_partial(member.own(buffer.sample())[0])
                log.warning(
                    "stopping on signal %d at step %d; checkpoint saved%s. To resume, rerun the same command with %s",
                    stop.received,
                    batches,
                    " and the SAE so far in sae/" if stop.received == signal.SIGINT else "",
                    resume_hint,
                )
                stop.resend()
                ranks.follow_main(f"stopped on signal {stopping}")  # DDP: go on only if rank 0 does

    train_seconds = elapsed()
    if hasattr(feed, "close"):
        feed.close()  # a cache reader's read-ahead thread: training reads no more
    if not ranks.is_main:
        ranks.barrier()  # rank 0 evaluates and writes the run's results
        return [m.error if m.error is not None else {} for m in members]
    log.info("trained on %d tokens in %.1f s; evaluating on held-out rows", total_steps * batch_size, train_seconds)
    # Members at one hook (of this group, or of a sweep run one after another in this process)
    # share the evaluation's SAE-independent parts: held-out activations, clean and ablated CE;
    # hence one hook's members after another (each member is evaluated at its own hook).
    for member in sorted(members, key=lambda m: [hooks.index(h) for h in m.hooks]):
        if member.error is None:
            eval_key = shared_key(
                member.cfg.model, member.source.hooks, member.source.filter, rows.eval_rows, cfg.eval.batch_rows
            )
            member.finish(member.source, rows, member.own(buffer.sample())[0], train_seconds, feed.name, eval_key)
    ranks.barrier()
    return [member.error if member.error is not None else member.result for member in members]


def rank_stream(checkpoint: dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    """A rank's own part of a checkpoint: feed position and buffer (rank 0's sit at the top
    level, as in a single process's checkpoint)."""
    if checkpoint is None or rank == 0:
        return checkpoint
    return checkpoint["rank_streams"][rank - 1]


def _die_mid_write(state: dict[str, Any], tmp: Path) -> None:
    torch.save(state, tmp)
    os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)
