"""TopK SAE: per token, the k largest pre-activations survive (then ReLU).

The TopK family (TopK, BatchTopK, Matryoshka BatchTopK) shares two training aids:

- AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", app. A.2):
  latents that have not fired for `dead_steps_threshold` steps are "dead"; each
  token's `aux_k` largest dead pre-activations must reconstruct the residual the
  live latents left, which gives dead latents a gradient again. Normalised as the
  newest SAELens (6.x, `TopKTrainingSAE.calculate_topk_aux_loss`): squared error
  summed over features and averaged over tokens, like our `mse`, times
  min(n_dead / aux_k, 1) so a handful of dead latents gets a small push, with the
  raw (not ReLU'd) pre-activations and no decoder bias. EleutherAI sparsify instead
  divides by the batch's total variance and ReLUs; the paper weighs it by 1/32
  against a variance-normalised MSE. We follow SAELens, coefficient 1 included.
- a k schedule (OpenMOSS Language-Model-SAEs, seed 004, "Activation Functions" >
  "TopK" and "BatchTopK": `initial_k`, `k_warmup_steps`, `k_cold_booting_steps`,
  `k_schedule_type`, `k_exponential_factor`): training starts with more active
  latents and decays to k; see `scheduled_k`. Inference, calibration and export
  always use the final k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

import saesweep.sae.sparse as kernels
from saesweep.config.domain import Choice, Range, in_domain
from saesweep.errors import UserError
from saesweep.sae.base import SAE, SAEConfig, StepOutput, mse_loss
from saesweep.sae.registry import register_architecture
from saesweep.sae.sparse import (
    ActiveLatents,
    decode_active,
    dense_pre_acts,
    gather_active,
    member_l0,
    row_of_each,
    stacked_topk_indices,
    topk_among,
    topk_indices,
)


class KScheduleType(Choice):
    linear = "linear"
    exponential = "exponential"  # curvature k_exponential_factor


@dataclass
class TopKSAEConfig(SAEConfig):
    architecture: str = "topk"
    k: int = in_domain(32, Range(gt=0))
    decoder_init_norm: float = in_domain(1.0, Range(gt=0))  # decoder rows are kept at unit norm
    # AuxK: null -> half the width of what is reconstructed (d_in for an SAE), the
    # paper's heuristic and SAELens's fixed choice; 0 (or a zero coefficient) -> off.
    aux_k: Optional[int] = in_domain(None, Range(ge=0, null="half the reconstructed width"))
    aux_k_coefficient: float = in_domain(1.0, Range(ge=0))
    # Steps without firing after which a latent counts as dead for AuxK. SAELens's
    # 1000 never triggers in a short run; 50 steps of the default 4096 tokens is
    # the 200k tokens `training.dead_after_tokens` uses in the logs.
    dead_steps_threshold: int = in_domain(50, Range(gt=0))
    # k schedule: k starts at initial_k, stays there k_cold_booting_steps steps, then decays
    # to k over k_warmup_steps. Steps, not fractions.
    initial_k: Optional[int] = in_domain(None, Range(gt=0, null="constant k"))
    k_warmup_steps: int = in_domain(1000, Range(ge=0))
    k_cold_booting_steps: int = in_domain(0, Range(ge=0))
    k_schedule_type: KScheduleType = KScheduleType.linear
    k_exponential_factor: float = in_domain(3.0, Range(gt=0))

    def check_relations(self) -> None:
        super().check_relations()
        if self.d_sae is not None and self.k > self.d_sae:
            raise UserError(f"config key 'sae.k': {self.k} exceeds sae.d_sae={self.d_sae}")
        if self.initial_k is not None:
            if self.initial_k < self.k:
                raise UserError(
                    f"config key 'sae.initial_k': must be >= sae.k={self.k} (k decays to sae.k), got {self.initial_k}"
                )
            if self.d_sae is not None and self.initial_k > self.d_sae:
                raise UserError(f"config key 'sae.initial_k': {self.initial_k} exceeds sae.d_sae={self.d_sae}")
            if self.k_warmup_steps <= 0:
                raise UserError(
                    "config key 'sae.k_warmup_steps': must be > 0 when sae.initial_k is set "
                    f"(steps over which k decays), got {self.k_warmup_steps}"
                )


def scheduled_k(
    step: int,
    k: int,
    initial_k: Optional[int],
    warmup_steps: int,
    cold_booting_steps: int = 0,
    schedule_type: str = "linear",
    exponential_factor: float = 3.0,
) -> int:
    """k at a (0-based) training step, as OpenMOSS Language-Model-SAEs schedules it.

    Seed 004 ("Activation Functions" > "TopK") names the options; the formulas are
    those of its trainer: k = initial_k for the first `cold_booting_steps` steps,
    then with progress p = min(1, (step - cold) / warmup):
      linear:       initial_k + (k - initial_k) * p
      exponential:  initial_k - (initial_k - k) * (1 - e^(-f p)) / (1 - e^(-f))
    rounded up, and never below k. Its step counts may also be fractions of the
    run; ours are whole steps, since an SAE does not know the run's length.
    """
    if initial_k is None or warmup_steps <= 0:
        return k
    if step < cold_booting_steps:
        return initial_k
    progress = min(1.0, (step - cold_booting_steps) / warmup_steps)
    if schedule_type == "exponential":
        f = exponential_factor
        decay = (1.0 - math.exp(-f * progress)) / (1.0 - math.exp(-f))
        current = initial_k - (initial_k - k) * decay
    else:
        current = initial_k + (k - initial_k) * progress
    return max(k, math.ceil(current))


def topk_per_row(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, ReLU'd; zeros elsewhere."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class TopKFamilySAE(SAE):
    """Shared by TopK and BatchTopK: train through the sparse kernels.

    Subclasses say which latents survive (`select`), how that reads densely for
    inference (`activation`) and may add reconstruction terms (`reconstruct`).
    """

    # Unit decoder rows make the ranking of pre-activations mean what it says.
    unit_norm_decoder = True
    # 0 where a latent fired on any rank, else + 1
    rank_combine = {**SAE.rank_combine, "steps_since_fired": "min"}

    def __init__(self, cfg: TopKSAEConfig, d_in: int, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        if cfg.k > self.d_sae:
            raise UserError(f"config key 'sae.k': {cfg.k} exceeds the SAE width {self.d_sae}")
        if cfg.initial_k is not None and cfg.initial_k > self.d_sae:
            raise UserError(f"config key 'sae.initial_k': {cfg.initial_k} exceeds the SAE width {self.d_sae}")
        # The residual AuxK reconstructs has the target's width (d_in for an SAE).
        aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, self.d_out // 2)
        self.aux_k = aux_k if cfg.aux_k_coefficient > 0 else 0
        # Training steps since each latent last fired. A buffer, so checkpoints and
        # resumed runs keep it; updated only in training mode.
        self.register_buffer("steps_since_fired", torch.zeros(self.d_sae, dtype=torch.long))

    def select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def current_k(self, step: int) -> int:
        c = self.cfg
        return scheduled_k(
            step, c.k, c.initial_k, c.k_warmup_steps, c.k_cold_booting_steps, c.k_schedule_type, c.k_exponential_factor
        )

    def reads_step(self) -> bool:
        return self.cfg.initial_k is not None and self.cfg.k_warmup_steps > 0

    def dead_latents(self) -> torch.Tensor:
        """[d_sae] bool: latents silent for at least `dead_steps_threshold` steps.

        SAELens counts a latent dead only after *more than* its window; ours after
        exactly that many steps, like `training.dead_after_tokens`.
        """
        return self.steps_since_fired >= self.cfg.dead_steps_threshold

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        x = x * self.input_scale
        target = target * self.target_scale
        centre = self.b_dec if self.cfg.apply_b_dec_to_input else None
        if centre is not None:
            x = x - centre.detach()  # b_dec's gradient through the encoder comes from gather_active
        pre = dense_pre_acts(x, self.W_enc, self.b_enc)
        rows, cols = self.select(pre, self.current_k(step))
        active = gather_active(pre, x, self.W_enc, self.b_enc, rows, cols, b_dec=centre)
        recon, losses = self.reconstruct(active, target)
        if self.aux_k > 0:
            # Dead as of the steps before this one, as SAELens: this batch's firing
            # only counts from the next step on.
            residual = (target - recon).detach()
            losses["auxk"] = self.auxk_loss(pre, x, residual, self.dead_latents(), centre)
        fired = active.fired()
        self.on_active(active)
        if self.training:
            with torch.no_grad():
                self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        return StepOutput(
            recon=recon / self.target_scale,
            losses=losses,
            l0=active.l0(),
            fired=fired,
        )

    def reconstruct(self, active: ActiveLatents, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction (scaled space) and its loss terms from the selected latents."""
        recon = decode_active(active, self.W_dec, self.b_dec)
        return recon, {"mse": mse_loss(recon, target)}

    def auxk_loss(
        self,
        pre: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor,
        dead: torch.Tensor,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AuxK: each token's top aux_k dead latents reconstruct `residual` (see module doc)."""
        if kernels.KERNELS.fixed_size(pre.device):
            return self._auxk_loss_fixed(pre, x, residual, dead, centre)
        dead_idx = dead.nonzero().squeeze(1)
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return residual.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        scale = min(n_dead / self.aux_k, 1.0)
        rows, cols = topk_among(pre, dead_idx, k_aux)
        # Raw pre-activations, as SAELens: a negative one is still told which way to move.
        aux = gather_active(pre, x, self.W_enc, self.b_enc, rows, cols, relu=False, b_dec=centre)
        recon = decode_active(aux, self.W_dec)
        return self.cfg.aux_k_coefficient * scale * mse_loss(recon, residual)

    def _auxk_loss_fixed(
        self,
        pre: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor,
        dead: torch.Tensor,
        centre: torch.Tensor | None,
    ) -> torch.Tensor:
        """`auxk_loss` with sizes the host knows (no dead-latent count read back): each token's
        top aux_k over all latents, live ones ranked last; where fewer than aux_k are dead,
        the live ones picked count with weight 0. Same terms, same gradients."""
        k_aux = min(self.aux_k, self.d_sae)
        ranked = pre.masked_fill(~dead, -torch.inf)
        cols = ranked.topk(k_aux, dim=-1, sorted=False).indices.flatten()
        rows = row_of_each(pre.shape[0], k_aux, pre.device)
        aux = gather_active(pre, x, self.W_enc, self.b_enc, rows, cols, relu=False, b_dec=centre)
        aux.values = aux.values * dead[cols]
        recon = decode_active(aux, self.W_dec)
        scale = (dead.sum() / self.aux_k).clamp(max=1.0)
        return self.cfg.aux_k_coefficient * scale * mse_loss(recon, residual)

    def on_active(self, active: Any) -> None:
        """Hook for running statistics of the selected activations."""

    # --- a stack of members (saesweep.sae.stack): the same maths, batched --------------------

    def stack_key(self) -> Optional[tuple[Any, ...]]:
        # k, its schedule, the AuxK coefficient and the dead window may differ per member, and
        # so may the class: TopK and BatchTopK members share one stack, each class selecting
        # for its own members.
        return (TopKFamilySAE, self.d_in, self.d_out, self.d_sae, self.cfg.apply_b_dec_to_input, self.aux_k)

    @classmethod
    def select_stacked(
        cls, pre: torch.Tensor, ks: list[int], k_of_member: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`select` of each member of a stack: (rows, cols, keep), see sparse.stacked_topk_indices.
        `k_of_member`: the ks as a tensor on the device, made once (one made in each step would
        be a copy from the host, which on a GPU waits for the device)."""
        raise NotImplementedError

    @classmethod
    def select_segments(cls, stack: Any, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Each class's `select_stacked` for its own members, joined: rows stay sorted, since the
        segments follow each other."""
        ks, k_of_member = cls.current_ks(stack)
        if len(stack.segments) == 1:
            return stack.segments[0][0].select_stacked(pre, ks, k_of_member)
        batch, picks = pre.shape[1], []
        for kind, members in stack.segments:
            rows, cols, keep = kind.select_stacked(pre[members], ks[members], k_of_member[members])
            picks.append((rows + members.start * batch, cols, keep))
        rows, cols, keeps = zip(*picks)
        keep = None
        if any(k is not None for k in keeps):
            keep = torch.cat(
                [k if k is not None else r.new_ones(r.shape, dtype=torch.bool) for r, k in zip(rows, keeps)]
            )
        return torch.cat(rows), torch.cat(cols), keep

    @classmethod
    def current_ks(cls, stack: Any) -> tuple[list[int], torch.Tensor]:
        """Each member's `current_k` at its step: on the host (for shapes) and on the device
        ([M] long). Where k is scheduled, the device's comes from a table of every member's
        schedule, made once and read at the stack's step counter: no step copies it over."""
        if stack.steps is None:
            return [c.k for c in stack.configs], stack.per_member("k", lambda sae: sae.cfg.k, torch.long)
        ks = [sae.current_k(step) for sae, step in zip(stack.saes, stack.step_counts)]
        # k stays put after cold_booting + warmup steps: the table ends there.
        end = max(c.k_cold_booting_steps + c.k_warmup_steps for c in stack.configs) + 1
        table = stack.per_member("k_schedule", lambda sae: [sae.current_k(s) for s in range(end)], torch.long)
        return ks, table.gather(1, stack.steps.clamp(max=end - 1).unsqueeze(1)).squeeze(1)

    @classmethod
    def forward_stacked(cls, stack: Any, x: torch.Tensor, target: torch.Tensor) -> StepOutput:
        n = stack.n_members
        x = x * stack.input_scale.view(n, 1, 1)
        target = target * stack.target_scale.view(n, 1, 1)
        centre = stack.b_dec if stack.configs[0].apply_b_dec_to_input else None
        if centre is not None:
            x = x - centre.detach().unsqueeze(1)
        pre = dense_pre_acts(x, stack.W_enc, stack.b_enc)
        rows, cols, keep = cls.select_segments(stack, pre)
        active = gather_active(pre, x, stack.W_enc, stack.b_enc, rows, cols, b_dec=centre)
        if keep is not None:
            active.values = active.values * keep
        recon, losses = cls.reconstruct_stacked(stack, active, target)
        if stack.saes[0].aux_k > 0:
            residual = (target - recon).detach()
            losses["auxk"] = cls.auxk_loss_stacked(stack, pre, x, residual, centre)
        fired = active.fired().view(n, stack.d_sae)
        for kind, members in stack.segments:
            kind.on_active_stacked(stack, members, active)
        if stack.training:
            with torch.no_grad():
                stack.steps_since_fired.add_(1).masked_fill_(fired, 0)
        return StepOutput(
            recon=recon / stack.target_scale.view(n, 1, 1), losses=losses, l0=member_l0(active, n), fired=fired
        )

    @classmethod
    def reconstruct_stacked(
        cls, stack: Any, active: ActiveLatents, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`reconstruct` of every member: the reconstruction [M, batch, d_out], scaled space."""
        n, batch, d_out = target.shape
        recon = decode_active(active, stack.W_dec.view(n * stack.d_sae, d_out)).view(n, batch, d_out)
        recon = recon + stack.b_dec.unsqueeze(1)
        return recon, {"mse": mse_loss(recon, target)}

    @classmethod
    def auxk_loss_stacked(
        cls, stack: Any, pre: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, centre: torch.Tensor | None
    ) -> torch.Tensor:
        """`auxk_loss` of each member ([M]). Fixed-size selections (GPUs) batch it; with compact
        ones (CPUs) each member with dead latents takes its own, which costs little while few
        are dead (the fixed form gathers and decodes aux_k latents per token regardless: twice
        a CPU step)."""
        n, batch, d_sae = pre.shape
        window = stack.per_member("dead_steps_threshold", lambda sae: sae.cfg.dead_steps_threshold, torch.long)
        dead = stack.steps_since_fired >= window[:, None]
        if not kernels.KERNELS.fixed_size(pre.device):
            # Each member's own tensors are views of the stack's and its grads slices of the
            # stack's grads, so its own AuxK's gradient lands in the stack's. A member with no
            # dead latent gets the 0 its own would return, without its own ops.
            any_dead = dead.any(1).tolist()  # a host read, as the compact selections make
            if not any(any_dead):
                return residual.new_zeros(n)
            centres = centre if centre is not None else [None] * n
            zero = residual.new_zeros(())
            return torch.stack(
                [
                    sae.auxk_loss(*args) if some else zero
                    for some, sae, *args in zip(any_dead, stack.saes, pre, x, residual, dead, centres)
                ]
            )
        aux_k = stack.saes[0].aux_k
        k_aux = min(aux_k, d_sae)
        cols = pre.masked_fill(~dead.unsqueeze(1), -torch.inf).topk(k_aux, dim=-1, sorted=False).indices.flatten()
        rows = row_of_each(n * batch, k_aux, pre.device)
        aux = gather_active(pre, x, stack.W_enc, stack.b_enc, rows, cols, relu=False, b_dec=centre)
        aux.values = aux.values * dead.flatten()[aux.cols]
        recon = decode_active(aux, stack.W_dec.view(n * d_sae, stack.d_out)).view(n, batch, -1)
        scale = (dead.sum(1) / aux_k).clamp(max=1.0)
        coefficient = stack.per_member("aux_k_coefficient", lambda sae: sae.cfg.aux_k_coefficient)
        return coefficient * scale * mse_loss(recon, residual)

    @classmethod
    def on_active_stacked(cls, stack: Any, members: slice, active: ActiveLatents) -> None:
        """`on_active` of the stack's `members` (this class's segment)."""

    @classmethod
    @torch.no_grad()
    def after_step_stacked(cls, stack: Any, applied: torch.Tensor) -> None:
        super().after_step_stacked(stack, applied)
        for kind, members in stack.segments:
            kind.after_step_segment(stack, members, applied[members])

    @classmethod
    def after_step_segment(cls, stack: Any, members: slice, applied: torch.Tensor) -> None:
        """`after_step` of the stack's `members` (this class's segment) past the decoder's
        renormalisation, which `after_step_stacked` does for the whole stack."""


@register_architecture("topk")
class TopKSAE(TopKFamilySAE):
    config_class = TopKSAEConfig
    export_architecture = "topk"

    def select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_indices(pre, k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_per_row(pre, self.cfg.k)

    @classmethod
    def select_stacked(
        cls, pre: torch.Tensor, ks: list[int], k_of_member: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return stacked_topk_indices(pre, ks, k_of_member)

    def export_config(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
