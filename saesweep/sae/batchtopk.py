"""BatchTopK SAE: the k x batch largest activations over the whole batch survive.

For inference it becomes a JumpReLU with one threshold for all latents. During
training that threshold is the running mean of the smallest activation that
survived each batch (bias-corrected like Adam's moments: SAELens starts it at 0
with rate 0.01, so its short runs export L0 in the hundreds instead of k). Before
evaluation and export, `calibrate` replaces it with the exact value at which k
latents per token survive over a large sample of training activations (the whole
buffer) - the running mean lags while the encoder is still moving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saesweep.config.domain import Range, in_domain
from saesweep.sae.registry import register_architecture
from saesweep.sae.sparse import ActiveLatents, batch_topk_indices, cutoff_floor, stacked_batch_topk_indices
from saesweep.sae.topk import TopKFamilySAE, TopKSAEConfig


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    architecture: str = "batchtopk"
    threshold_lr: float = in_domain(0.01, Range(gt=0, le=1))  # an EMA rate


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k * n_rows largest ReLU'd entries of the whole batch; zeros elsewhere."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)


@register_architecture("batchtopk")
class BatchTopKSAE(TopKFamilySAE):
    config_class = BatchTopKSAEConfig
    # threshold_ema: the running mean of each batch's smallest survivor; the calibrated
    # threshold is set once, after training (rank 0).
    rank_combine = {
        **TopKFamilySAE.rank_combine,
        "threshold_ema": "mean",
        "threshold_updates": "max",
        "calibrated_threshold": "once",
    }
    export_architecture = "jumprelu"
    export_transcoder_architecture = "jumprelu_transcoder"

    def __init__(self, cfg: BatchTopKSAEConfig, d_in: int, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        self.register_buffer("threshold_ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("calibrated_threshold", torch.tensor(float("nan"), dtype=torch.float64))
        self._smallest_survivor: torch.Tensor | None = None  # this step's, until after_step

    def select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_topk_indices(pre, k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return batch_topk(pre, self.cfg.k)

    @property
    def threshold(self) -> torch.Tensor:
        """The calibrated threshold if any, else the bias-corrected running mean."""
        if not torch.isnan(self.calibrated_threshold):
            return self.calibrated_threshold
        n = int(self.threshold_updates)
        if n == 0:
            return torch.zeros((), dtype=torch.float64, device=self.threshold_ema.device)
        return self.threshold_ema / (1 - (1 - self.cfg.threshold_lr) ** n)

    def inference_activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, chunk: int = 4096, max_tokens: int = 32768) -> None:
        """Set the threshold so that k latents per token fire on average over x: exactly the
        (k x tokens)-th largest pre-activation of x.

        At most `max_tokens` of x are used: a million winners pin the threshold down, and
        the whole buffer would cost several seconds of encoder passes. Each chunk keeps only
        its entries above a floor, set on the first chunk where twice its share of winners
        lie above; x is shuffled, so the floor holds for the rest. If x holds fewer entries
        above it than it has winners (a first chunk unlike the others), the floor was too
        high: it is set lower and x encoded again.
        """
        x = x[:max_tokens]
        n_keep = self.cfg.k * len(x)
        margin = 2.0
        while True:
            kept, floor = [], None
            for i in range(0, len(x), chunk):
                pre = self.pre_acts(x[i : i + chunk] * self.input_scale).flatten()
                if i == 0:
                    floor = cutoff_floor(pre, self.cfg.k * min(chunk, len(x)), margin)
                kept.append(pre if floor is None else pre[pre >= floor])
            values = torch.cat(kept)
            if values.numel() >= n_keep:
                break
            margin *= 4
        kth = values.kthvalue(values.numel() - n_keep + 1).values
        self.calibrated_threshold.fill_(max(float(kth), 0.0))

    @torch.no_grad()
    def on_active(self, active: ActiveLatents) -> None:
        # Only noted here: the trainer skips a step whose loss is not finite, and such a
        # step's activations must not reach the running threshold. after_step commits it.
        if not self.training or active.values.numel() == 0:
            return
        values = active.values.detach()
        # inf if nothing survived above 0; kept on the device (no host sync per step)
        self._smallest_survivor = torch.where(values > 0, values, torch.inf).amin()

    @torch.no_grad()
    def after_step(self, applied: torch.Tensor | None = None) -> None:
        super().after_step(applied)
        smallest, self._smallest_survivor = self._smallest_survivor, None
        if smallest is not None:
            seen = torch.isfinite(smallest) if applied is None else torch.isfinite(smallest) & applied
            lr = self.cfg.threshold_lr
            updated = self.threshold_ema * (1 - lr) + lr * smallest.double()
            self.threshold_ema.copy_(torch.where(seen, updated, self.threshold_ema))
            self.threshold_updates += seen.long()

    @classmethod
    def select_stacked(
        cls, pre: torch.Tensor, ks: list[int], k_of_member: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        return (*stacked_batch_topk_indices(pre, ks, k_of_member), None)

    @classmethod
    @torch.no_grad()
    def on_active_stacked(cls, stack: Any, members: slice, active: ActiveLatents) -> None:
        if not stack.training:
            return
        values = active.values.detach()
        member = active.rows.div(active.n_rows // stack.n_members, rounding_mode="floor")
        smallest = torch.full((stack.n_members,), torch.inf, dtype=values.dtype, device=values.device)
        smallest = smallest.scatter_reduce(0, member, torch.where(values > 0, values, torch.inf), "amin")
        stack.smallest_survivor = smallest[members]

    @classmethod
    @torch.no_grad()
    def after_step_segment(cls, stack: Any, members: slice, applied: torch.Tensor) -> None:
        # The threshold buffers are stacked over this class's members alone (SAEStack).
        smallest = getattr(stack, "smallest_survivor", None)
        stack.smallest_survivor = None
        if smallest is not None:
            seen = torch.isfinite(smallest) & applied
            lr = stack.per_member("threshold_lr", lambda sae: sae.cfg.threshold_lr, torch.float64, members)
            updated = stack.threshold_ema * (1 - lr) + lr * smallest.double()
            stack.threshold_ema.copy_(torch.where(seen, updated, stack.threshold_ema))
            stack.threshold_updates += seen.long()

    def export_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().export_tensors()
        tensors["threshold"] = torch.full_like(tensors["b_enc"], float(self.threshold))
        return tensors
