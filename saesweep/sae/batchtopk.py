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

import torch

from saesweep.errors import UserError
from saesweep.sae.sparse import ActiveLatents, batch_topk_indices
from saesweep.sae.topk import TopKFamilySAE, TopKSAEConfig


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    architecture: str = "batchtopk"
    threshold_lr: float = 0.01

    def check(self) -> None:
        super().check()
        if not 0 < self.threshold_lr <= 1:
            raise UserError("config key 'sae.threshold_lr': must be in (0, 1]")


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k * n_rows largest ReLU'd entries of the whole batch; zeros elsewhere."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)


class BatchTopKSAE(TopKFamilySAE):
    config_class = BatchTopKSAEConfig
    export_architecture = "jumprelu"

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
        """Set the threshold so that k latents per token fire on average over x.

        At most `max_tokens` of x are used: a million winners pin the threshold down,
        and the whole buffer would cost several seconds of encoder passes.
        """
        x = x[:max_tokens]
        n_keep = self.cfg.k * len(x)
        width = min(self.d_sae, 4 * self.cfg.k)
        complete: list[torch.Tensor] = []  # candidates of rows that hold all their values above kth
        while True:
            # Each row's `width` best are candidates. A row whose candidates all clear the
            # threshold may hold more above it: only those rows are encoded again, wider.
            cands = torch.cat([
                self.pre_acts(x[i : i + chunk] * self.input_scale).topk(width, dim=-1, sorted=False).values
                for i in range(0, len(x), chunk)
            ])
            flat = torch.cat([*complete, cands.flatten()])
            kth = flat.kthvalue(flat.numel() - n_keep + 1).values
            saturated = cands.min(-1).values >= kth
            if width == self.d_sae or not bool(saturated.any()):
                break
            # Adding candidates can only raise the k-th largest, so a complete row stays complete.
            complete.append(cands[~saturated].flatten())
            x, width = x[saturated], min(self.d_sae, 2 * width)
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
    def after_step(self) -> None:
        super().after_step()
        smallest, self._smallest_survivor = self._smallest_survivor, None
        if smallest is not None:
            seen = torch.isfinite(smallest)
            lr = self.cfg.threshold_lr
            updated = self.threshold_ema * (1 - lr) + lr * smallest.double()
            self.threshold_ema.copy_(torch.where(seen, updated, self.threshold_ema))
            self.threshold_updates += seen.long()

    def export_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().export_tensors()
        tensors["threshold"] = torch.full_like(tensors["b_enc"], float(self.threshold))
        return tensors
