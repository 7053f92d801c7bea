"""How `hydra/launcher=slurm_grouped` partitions a sweep into SLURM jobs (pure: no Hydra, no SLURM).

Members that may share an LM pass (equal in everything outside the grouped launcher's
may_differ) form a group; a group becomes one job, or several when it is too big for one
device: at most `members_per_job` members, and at most `device_memory_bytes` of estimated
device memory. A job holds the LM's weights once, one activation buffer per hook point it
feeds, and per member its SAE, gradients, Adam state and the step's activations. Members
are taken in sweep order and a job is filled before the next starts, so the same grid and
settings always give the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GB = 1024**3
PLAN_NAME = "slurm_grouped_plan.json"  # in the sweep dir; the sweep report reads its members
FP32 = 4


class PlanError(ValueError):
    """Launcher settings no plan can satisfy; the message names the key."""


@dataclass(frozen=True)
class PlannedMember:
    number: int  # the member's number in the sweep (its run dir's name)
    overrides: tuple[str, ...]
    shared: Any  # hashable: what must be equal to share one LM pass
    hook: str
    member_bytes: int  # SAE, gradients, Adam state, step activations
    buffer_bytes: int  # the activation buffer of its hook point (shared within a job)


@dataclass
class Job:
    group: int
    members: list[PlannedMember] = field(default_factory=list)
    device_bytes: int = 0
    why: str = ""

    @property
    def numbers(self) -> list[int]:
        return [m.number for m in self.members]


def sae_bytes(d_in: int, d_sae: int, batch_size: int) -> int:
    """A member's device memory in training: encoder, decoder and biases, with their gradients
    and Adam's two moments (4 fp32 copies), plus the step's pre-activations, activations and
    their gradient (batch x d_sae each)."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return FP32 * (4 * params + 3 * batch_size * d_sae)


def buffer_bytes(size_tokens: int | str, batch_size: int, d_in: int) -> int:
    """The shared activation buffer of one hook point (it holds at least two batches).
    `auto` sizes itself from what the job's device has left, so it needs only its minimum."""
    tokens = 2 * batch_size if size_tokens == "auto" else max(int(size_tokens), 2 * batch_size)
    return FP32 * tokens * d_in


def job_bytes(members: list[PlannedMember], lm_bytes: int) -> int:
    buffers = {m.hook: m.buffer_bytes for m in members}
    return lm_bytes + sum(buffers.values()) + sum(m.member_bytes for m in members)


def groups(members: list[PlannedMember]) -> list[list[PlannedMember]]:
    """Members that may share an LM pass, in order of each group's first member."""
    by_key: dict[Any, list[PlannedMember]] = {}
    for member in members:
        by_key.setdefault(member.shared, []).append(member)
    return list(by_key.values())


def plan_jobs(
    members: list[PlannedMember], members_per_job: int | None, device_memory_bytes: int | None, lm_bytes: int
) -> list[Job]:
    """The jobs, each with why it holds what it holds. PlanError for settings that cannot work."""
    if members_per_job is not None and members_per_job < 1:
        raise PlanError(
            f"config key 'hydra.launcher.members_per_job': must be >= 1, or null for as many as fit, got {members_per_job}"
        )
    if device_memory_bytes is not None and device_memory_bytes <= 0:
        raise PlanError(
            "config key 'hydra.launcher.device_memory_gb': must be > 0, or null for no memory limit, "
            f"got {device_memory_bytes / GB:g}"
        )
    jobs: list[Job] = []
    for g, group in enumerate(groups(members)):
        first = len(jobs)
        current: list[PlannedMember] = []
        for member in group:
            alone = job_bytes([member], lm_bytes)
            if device_memory_bytes is not None and alone > device_memory_bytes:
                raise PlanError(
                    f"config key 'hydra.launcher.device_memory_gb': member {member.number} "
                    f"({' '.join(member.overrides) or 'no overrides'}) needs an estimated {alone / GB:.2f} GB "
                    f"alone (LM {lm_bytes / GB:.2f} GB, buffer {member.buffer_bytes / GB:.2f} GB, SAE with "
                    f"Adam state and step {member.member_bytes / GB:.2f} GB), more than device_memory_gb="
                    f"{device_memory_bytes / GB:g}; raise it, or lower sae.expansion_factor, training.batch_size "
                    "or buffer.size_tokens"
                )
            full = members_per_job is not None and len(current) >= members_per_job
            too_big = device_memory_bytes is not None and job_bytes([*current, member], lm_bytes) > device_memory_bytes
            if current and (full or too_big):
                jobs.append(_job(g, current, lm_bytes, "members_per_job" if full else "device_memory_gb"))
                current = []
            current.append(member)
        jobs.append(_job(g, current, lm_bytes, None))
        split = len(jobs) - first
        for job in jobs[first:]:
            job.why = _why(job, len(group), split, members_per_job, device_memory_bytes) + job.why
    return jobs


def _job(group: int, members: list[PlannedMember], lm_bytes: int, cut_by: str | None) -> Job:
    return Job(group, list(members), job_bytes(members, lm_bytes), f"; full by {cut_by}" if cut_by else "")


def _why(job: Job, group_size: int, split: int, per_job: int | None, budget: int | None) -> str:
    hooks = sorted({m.hook for m in job.members})
    text = (
        f"group {job.group} ({group_size} member(s) that may share one LM pass"
        + (f" over {len(hooks)} hook points" if len(hooks) > 1 else "")
        + ")"
    )
    if split > 1:
        limits = [f"members_per_job={per_job}"] if per_job is not None else []
        limits += [f"device_memory_gb={budget / GB:g}"] if budget is not None else []
        text += f", split into {split} jobs by {' and '.join(limits)}"
    return text + f"; est. {job.device_bytes / GB:.2f} GB on the device"


def plan_record(jobs: list[Job], finished: list[PlannedMember], array_parallelism: int) -> dict[str, Any]:
    """The plan as slurm_grouped_plan.json holds it (the sweep report reads `members`)."""
    members = []
    for j, job in enumerate(jobs):
        members += [{"member": m.number, "job": j, "overrides": list(m.overrides)} for m in job.members]
    members += [{"member": m.number, "job": None, "overrides": list(m.overrides)} for m in finished]
    return {
        "jobs": [
            {"job": j, "group": job.group, "members": job.numbers, "device_gb": job.device_bytes / GB, "why": job.why}
            for j, job in enumerate(jobs)
        ],
        "finished": [m.number for m in finished],
        "array_parallelism": array_parallelism,
        "members": sorted(members, key=lambda m: m["member"]),
    }


def plan_text(jobs: list[Job], finished: list[PlannedMember]) -> str:
    """What the launcher prints before it submits: each job, its members and why."""
    lines = [f"slurm_grouped plan: {sum(len(j.members) for j in jobs)} member(s) in {len(jobs)} job(s)"]
    for j, job in enumerate(jobs):
        lines.append(f"  job {j}: members {', '.join(map(str, job.numbers))} - {job.why}")
        lines += [f"    #{m.number} : {' '.join(m.overrides)}" for m in job.members]
    if finished:
        lines.append(f"  finished already (eval.json), not submitted: {', '.join(str(m.number) for m in finished)}")
    return "\n".join(lines)


def lm_bytes(config: dict[str, Any], dtype_bytes: int) -> int:
    """The LM's weights on the device, from its config.json: per layer attention (4 d^2) and
    MLP (2 or, gated, 3 d x d_mlp), plus the embedding (and an untied unembedding). 0 when
    the file does not say."""
    from saesweep.lm.shape import ModelShape

    shape = ModelShape.from_config(config)
    vocab = config.get("vocab_size")
    if not (shape.n_layers and shape.d_model and isinstance(vocab, int)):
        return 0
    d, d_mlp = shape.d_model, shape.d_mlp or 4 * shape.d_model
    gated = 3 if config.get("hidden_act") in ("silu", "swiglu") or "llama" in str(config.get("model_type")) else 2
    embeddings = (1 if config.get("tie_word_embeddings", True) else 2) * vocab * d
    return dtype_bytes * (shape.n_layers * (4 * d * d + gated * d * d_mlp) + embeddings)
