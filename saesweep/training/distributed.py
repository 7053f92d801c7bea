"""Data-parallel training over several processes: `training.distributed=ddp`.

torchrun, or a SLURM job of several tasks, starts one process per GPU; each is a rank.
Every rank reads its own share of the activations into its own buffer and trains a
replica of the SAE on batch_size / world tokens per step. Gradients are averaged over
the ranks after backward, so each optimizer step sees the gradient of the global batch
of `training.batch_size` tokens and the replicas stay identical. Whatever else a step
decides (skip a non-finite step, which latents fired, running thresholds) is combined
over the ranks too, so that they all decide alike. Rank 0 alone writes the run dir.

A plain all_reduce of the gradients rather than DistributedDataParallel: an SAE is a
handful of tensors with nothing to overlap with backward, and the trainer's own step
(skipped steps, clipping, running state) stays as it is.

One process (no launcher, or `none`) gets `SINGLE`, whose every method is a no-op, so
the trainer reads the same either way.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from saesweep.config.schema import DISTRIBUTED_MODES, TrainingConfig
from saesweep.errors import UserError

log = logging.getLogger(__name__)

# Overrides for the Hydra job of every rank but 0: no .hydra/ and no log file in the run
# dir (rank 0 writes those), and Python's default logging: warnings and errors, once.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]

# Rank 0 alone evaluates (and may be building the activation cache) while the others
# wait in a collective; torch's default (10 min for NCCL) would end such a wait.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def rank_rule(module: nn.Module, name: str) -> str | None:
    """How the ranks combine buffer `name` of `module`: the rule its SAE class declares in
    `rank_combine` (saesweep.sae.base.RANK_RULES), None if it declares none."""
    return getattr(module, "rank_combine", {}).get(_leaf(name))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # A process group exists: collectives run (even for a world of one under torchrun,
    # so that path is the one tested on a single GPU).
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """training.device for this rank: each takes cuda:LOCAL_RANK (modulo the GPUs it
        sees: SLURM may show every task only its own GPU, as cuda:0)."""
        if self.active and name in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    # --- one step ---------------------------------------------------------------------

    def average_gradients(self, module: nn.Module) -> None:
        """Every rank's gradient becomes the mean over ranks: the global batch's gradient
        (each rank's loss is a mean over its equal share of the batch)."""
        if not self.active:
            return
        for p in module.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # every rank must send the same tensors
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """True on every rank iff true on every rank; a bool on the device (no host sync)."""
        if not self.active:
            return flag
        value = flag.detach().to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.reshape(()).bool()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over ranks (gloo has no bool reductions)."""
        if not self.active:
            return mask
        value = mask.to(torch.uint8)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.bool()

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks: a per-batch measurement (loss, L0, EV) of the
        global batch, from equal shares (for EV, the mean of the shares' EVs)."""
        if not self.active:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(values, (t / self.world).tolist()))

    @contextmanager
    def running_state(self, module: nn.Module) -> Iterator[None]:
        """Around a training step: afterwards every SAE buffer with a rank_combine rule holds
        the value for the global batch, any other changing buffer rank 0's (see check_state).
        A step that raises combines nothing: every rank raises alike (a diverged run),
        or the job ends."""
        if not self.active:
            yield
            return
        before = {
            name: buf.clone() for name, buf in module.named_buffers() if rank_rule(module, name) == "reset_or_sum"
        }
        yield
        for name, buf in module.named_buffers():
            rule = rank_rule(module, name)
            if rule == "min":
                dist.all_reduce(buf, op=dist.ReduceOp.MIN)
            elif rule == "max":
                dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            elif rule == "mean":
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world)
            elif rule == "reset_or_sum":
                # A counter that the SAE zeroes where a latent fired and otherwise grows
                # by the rank's share; never zero otherwise, as every share is > 0.
                fired = self.any(buf == 0)
                grown = buf - before[name]
                dist.all_reduce(grown, op=dist.ReduceOp.SUM)
                buf.copy_(torch.where(fired, torch.zeros_like(buf), before[name] + grown))
            elif rule != "once":
                dist.broadcast(buf, src=0)

    # --- start, checkpoint, end ----------------------------------------------------------

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank: the SAE starts identical
        everywhere (its input scaling and b_dec are fitted to rank 0's first fill)."""
        if not self.active:
            return
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    def check_state(self, module: nn.Module) -> None:
        """Say which buffers have no rank_combine rule: they are kept equal by taking rank 0's
        after every step, so they only reflect rank 0's share of the data."""
        unknown = sorted(n for n, _ in module.named_buffers() if rank_rule(module, n) is None)
        if self.active and unknown and self.is_main:
            log.warning(
                "training.distributed=ddp: SAE buffer(s) %s have no rule for combining ranks in "
                "the SAE class's rank_combine; every rank takes rank 0's after each step",
                ", ".join(unknown),
            )

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order; None on the others."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def follow_main(self, why: str) -> None:
        """Wait for rank 0 and go on with it, or end this process if rank 0 has ended (after a
        stop signal whose handler ended it, as submitit's requeue does). Under NCCL a rank
        waits here until the launcher ends it."""
        if not self.active:
            return
        try:
            dist.barrier()
        except Exception as e:  # gloo: the connection to rank 0 closed
            raise SystemExit(
                f"rank {self.rank}: {why}; rank 0 has ended ({type(e).__name__}), so does this rank"
            ) from None

    def _comm_device(self) -> torch.device:
        # NCCL communicates from the GPU; gloo from the CPU.
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


SINGLE = Ranks()


def resolve_device(name: str, key: str, ranks: Ranks = SINGLE) -> torch.device:
    """The device a config value names (`auto`: cuda when present), this rank's under DDP.
    `key` is the config key the value came from, for the error."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key '{key}': {name!r} but no CUDA GPU is visible; use auto or cpu")
    return ranks.device(name)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launch:
    """What the launcher says about this process: torchrun's env, or SLURM's."""

    rank: int
    world: int
    local_rank: int
    by: str  # "torchrun" | "slurm"


def launched() -> Launch | None:
    """This process's rank as its launcher set it, or None for a process started alone.

    torchrun exports RANK/WORLD_SIZE/LOCAL_RANK (and wins inside a SLURM allocation,
    where it is what started us). srun, as submitit's batch script runs it, starts one
    process per task with SLURM_PROCID/SLURM_LOCALID and the step's task count.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    tasks = env.get("SLURM_STEP_NUM_TASKS")  # set by srun for its tasks; not in a batch script
    if tasks is not None and "SLURM_PROCID" in env and int(tasks) > 1:
        return Launch(int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return None


def launched_rank() -> int:
    """0 unless this process is a later rank of a multi-process launch (Hydra-time checks)."""
    launch = launched()
    return launch.rank if launch is not None else 0


def rank_overrides(args: list[str]) -> list[str]:
    """Command-line overrides for this rank of a torchrun/srun launch: none for rank 0, for
    the others those that keep Hydra out of the run dir. A sweep (--multirun) under such a
    launch is refused: every process would run the whole sweep and write its own sweep
    dir; hydra/launcher=slurm_ddp runs each member as one multi-task job instead."""
    launch = launched()
    if launch is None:
        return []
    if launch.world > 1 and ("--multirun" in args or "-m" in args):
        raise UserError(
            f"--multirun under {launch.by} ({launch.world} processes) is not supported: run one job "
            "per launch, or sweep with hydra/launcher=slurm_ddp training.distributed=ddp"
        )
    return QUIET_RANK_OVERRIDES if launch.rank != 0 else []


def check_launch(training: TrainingConfig, launch: Launch | None) -> None:
    """training.* against the processes the launcher started, before joining them."""
    mode, device = training.distributed, training.device
    if mode not in DISTRIBUTED_MODES:
        raise UserError(f"config key 'training.distributed': {mode!r}; valid: {', '.join(DISTRIBUTED_MODES)}")
    if mode == "none" and launch is not None and launch.world > 1:
        raise UserError(
            f"config key 'training.distributed': none, but {launch.by} started {launch.world} processes "
            "(each would train the same run); set training.distributed=ddp, or start one process"
        )
    if mode == "ddp" and device.startswith("cuda:") and launch is not None and launch.world > 1:
        raise UserError(
            f"config key 'training.device': {device} with training.distributed=ddp; each rank takes "
            "cuda:LOCAL_RANK, so use auto or cuda"
        )
    if mode == "ddp" and launch is not None and training.batch_size % launch.world:
        raise UserError(
            f"config key 'training.batch_size': {training.batch_size} tokens per step do not split evenly over "
            f"{launch.world} ranks; use a multiple of {launch.world}"
        )


@contextmanager
def process_group(training: TrainingConfig) -> Iterator[Ranks]:
    """The ranks of this run: SINGLE for one process, else a process group joined here
    (nccl on CUDA, gloo on CPU) and left on exit."""
    mode, device = training.distributed, training.device
    launch = launched()
    check_launch(training, launch)
    if mode == "none" or launch is None:
        if mode == "ddp":
            log.info("training.distributed=ddp in a single process (no torchrun or SLURM tasks): one rank")
        yield SINGLE
        return
    if launch.by == "slurm":
        _export_slurm_rendezvous()
    ranks = Ranks(launch.rank, launch.world, launch.local_rank, active=True)
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ranks.device(device))  # NCCL talks from the current device
    backend = "nccl" if cuda else "gloo"
    log.info(
        "joining %d ranks as rank %d (%s, master %s:%s)",
        launch.world,
        launch.rank,
        backend,
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def _export_slurm_rendezvous() -> None:
    """MASTER_ADDR/PORT for env:// under srun: the job's first node, and a port every task
    derives from the job id (submitit's TorchDistributedEnvironment); set ones are kept."""
    from submitit.helpers import TorchDistributedEnvironment

    found = TorchDistributedEnvironment()
    os.environ.setdefault("MASTER_ADDR", found.master_addr)
    os.environ.setdefault("MASTER_PORT", str(found.master_port))


def shared_run_dir(ranks: Ranks, own: Path) -> Path:
    """Rank 0's run dir, on every rank. Hydra names the dir from each process's clock, so
    ranks started across a second boundary disagree; a later rank's own dir, if Hydra made
    one and it is still empty, is removed, with its empty parents below the dir the two share."""
    chosen = Path(ranks.broadcast_object(str(own)))
    if chosen != own and not ranks.is_main:
        common = Path(os.path.commonpath([own, chosen]))
        path = own
        while path != common and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent
    return chosen
