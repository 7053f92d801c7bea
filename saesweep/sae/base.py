"""What every SAE architecture shares: parameters, input scaling, export.

An architecture subclasses `SAE`, picks an activation function and names its
extra loss terms. The trainer only calls `forward`, `after_step` and `export`,
so adding an architecture never touches the loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from saesweep.config.domain import Choice, Range, check_domains, in_domain
from saesweep.errors import UserError

# Below this fraction of non-zero codes, `decode` on a CPU takes a sparse product: just
# under where the sparse product starts to win (benchmarks/results/sparse_decode_cpu.md).
SPARSE_DECODE_DENSITY = 0.1


class BDecInit(Choice):
    """How b_dec starts, from the first buffer of (scaled) targets."""

    mean = "mean"
    geometric_median = "geometric_median"
    zeros = "zeros"


class Normalization(Choice):
    none = "none"
    # Scale inputs and targets to an average norm of sqrt(width), estimated on the first
    # buffer (SAELens's name); folded into the weights at export, so saved SAEs read raw
    # activations. One set of coefficients then suits every layer and model.
    expected_average_only_in = "expected_average_only_in"


@dataclass
class SAEConfig:
    # Each architecture's config class sets its own name (conf/train.yaml picks the default
    # architecture); the base is no architecture.
    architecture: str = ""
    d_sae: Optional[int] = in_domain(None, Range(gt=0, null="expansion_factor x the input width"))
    expansion_factor: Optional[int] = in_domain(8, Range(gt=0, null="sae.d_sae sets the width"))
    apply_b_dec_to_input: bool = True
    b_dec_init: BDecInit = BDecInit.mean
    decoder_init_norm: Optional[float] = in_domain(0.1, Range(gt=0, null="kaiming-uniform rows as drawn"))
    normalize_activations: Normalization = Normalization.expected_average_only_in
    # Grid-search the initial weight scale on the first batch's MSE.
    init_norm_search: bool = False
    # The lr of this SAE's parameters is lr_multiplier x optimizer.lr (the scheduler scales
    # it alike): an architecture whose sparsity penalty needs another lr than the TopK
    # family sets it here, so `architecture=X` alone trains X well and a sweep over
    # optimizer.lr still moves every architecture together.
    lr_multiplier: float = in_domain(1.0, Range(gt=0))

    def check(self) -> None:
        """Every field in its domain, then the relations between fields."""
        check_domains(self, "sae.")
        self.check_relations()

    def check_relations(self) -> None:
        """What the fields' domains do not say; an architecture extends it."""
        if self.d_sae is None and self.expansion_factor is None:
            raise UserError("config key 'sae.d_sae': set sae.d_sae or sae.expansion_factor")

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else int(self.expansion_factor * d_in)


@dataclass
class ParamGroup:
    """Parameters that share an optimizer lr: `lr_multiplier` x the configured lr."""

    name: str
    params: list[nn.Parameter]
    lr_multiplier: float = 1.0


@dataclass
class StepOutput:
    """One training forward pass."""

    recon: torch.Tensor  # in the target's raw units
    losses: dict[str, torch.Tensor]  # in the SAE's scaled space; the loop sums them
    l0: torch.Tensor  # mean number of active latents per token
    fired: torch.Tensor  # [d_sae] bool: latents active on some token of the batch


# How data-parallel ranks combine a buffer after each training step (saesweep.training.
# distributed applies them), so every replica holds what one process would after the same
# global batch. Each rank updates its buffers from its own share of the batch.
RANK_RULES = {
    "once": "set before the first step or after the last (rank 0's): nothing to combine",
    "min": "the smallest over the ranks (a counter that any rank's firing resets to 0)",
    "max": "the largest over the ranks",
    "mean": "the mean over the ranks",
    "reset_or_sum": "0 where any rank reset it to 0, else the old value plus every rank's growth",
}


class SAE(nn.Module):
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Renormalise decoder rows to unit norm after every optimizer step.
    unit_norm_decoder: ClassVar[bool] = False
    # Buffer name -> a rule of RANK_RULES. A buffer without one takes rank 0's value after
    # every step (and ddp warns): declare one for every buffer a step changes.
    rank_combine: ClassVar[dict[str, str]] = {"input_scale": "once", "target_scale": "once"}
    # Name SAELens uses for the saved (inference) architecture; export_tensors and
    # export_config give its weights and cfg.json fields.
    export_architecture: ClassVar[str] = "standard"
    # SAELens's name when it reads one hook and reconstructs another; None: it has no
    # transcoder class of this kind, so save under export_architecture (exact when the two
    # hooks have the same width, as apply_b_dec_to_input is then false).
    export_transcoder_architecture: ClassVar[Optional[str]] = None
    # Reads one hook and reconstructs another (set by build_sae).
    transcoder: bool = False

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_out = d_out or d_in
        self.d_sae = cfg.width(d_in)
        if self.d_in != self.d_out and cfg.apply_b_dec_to_input:
            raise UserError(
                "config key 'sae.apply_b_dec_to_input': must be false for a transcoder "
                f"(input width {self.d_in} != output width {self.d_out})"
            )

        W_dec = torch.empty(self.d_sae, self.d_out)
        nn.init.kaiming_uniform_(W_dec)
        if cfg.decoder_init_norm is not None:
            W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * cfg.decoder_init_norm
        if self.d_in == self.d_out:
            W_enc = W_dec.T.clone()
        else:
            W_enc = torch.empty(self.d_in, self.d_sae)
            nn.init.kaiming_uniform_(W_enc)
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(W_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # Scales that bring inputs and targets to an average norm of sqrt(width);
        # folded into the weights at export, so saved SAEs read raw activations.
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))

    def param_groups(self) -> list[ParamGroup]:
        """Optimizer parameter groups; an architecture overrides this to give some
        parameters (e.g. JumpReLU thresholds) their own lr multiplier. The first
        group is the main one: its lr is what the trainer logs."""
        return [ParamGroup("main", list(self.parameters()), self.cfg.lr_multiplier)]

    # --- set-up from the first buffer of activations -------------------------

    @torch.no_grad()
    def fit_to_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Estimate input scaling and initialise b_dec from a sample of activations."""
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.fill_(self.d_in**0.5 / x.float().norm(dim=-1).mean().item())
            self.target_scale.fill_(self.d_out**0.5 / target.float().norm(dim=-1).mean().item())
        y = target.float() * self.target_scale
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(y.mean(0))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(y))
        if self.cfg.init_norm_search:
            self.search_init_norm(x, target)

    @torch.no_grad()
    def search_init_norm(self, x: torch.Tensor, target: torch.Tensor, max_tokens: int = 4096) -> float:
        """Scale the initial weights to the norm that minimises the first batch's MSE.

        Language-Model-SAEs' `grid_search_init_norm`: a log grid from 0.01 to 10, then a
        finer one around the best. The scale multiplies the decoder rows (kept unit for
        architectures that renormalise them every step, where only the encoder scales)
        and the encoder is re-tied to the decoder's transpose where the widths allow.
        """
        x, target = x[:max_tokens], target[:max_tokens]
        direction = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        enc_direction = direction.T if self.d_in == self.d_out else self.W_enc / self.W_enc.norm(dim=0).clamp_min(1e-12)
        was_training = self.training
        self.eval()  # no running statistics (thresholds, dead counters) from the probes

        def mse_at(scale: float) -> float:
            self.W_dec.copy_(direction if self.unit_norm_decoder else direction * scale)
            self.W_enc.copy_(enc_direction * scale)
            return float(self(x, target, 0).losses["mse"])

        coarse = torch.logspace(-2, 1, 31).tolist()
        best = min(coarse, key=mse_at)
        i = coarse.index(best)
        fine = torch.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)], 21).tolist()
        best = min(fine, key=mse_at)
        mse_at(best)
        self.train(was_training)
        return best

    # --- the maths ------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations for input already in the SAE's (scaled) space."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def decode_scaled(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def loss_terms(self, pre: torch.Tensor, acts: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Architecture-specific loss terms besides reconstruction."""
        return {}

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        """Training pass on raw activations; losses are in the scaled space."""
        target = target * self.target_scale
        pre = self.pre_acts(x * self.input_scale)
        acts = self.activation(pre)
        recon = self.decode_scaled(acts)
        losses = {"mse": mse_loss(recon, target), **self.loss_terms(pre, acts, step)}
        return self.step_output(recon, losses, acts)

    def step_output(self, recon: torch.Tensor, losses: dict[str, torch.Tensor], acts: torch.Tensor) -> StepOutput:
        """A dense training pass's result; `recon` is in the scaled space."""
        active = acts.detach() != 0
        return StepOutput(
            recon=recon / self.target_scale,
            losses=losses,
            l0=active.sum(-1).float().mean(),
            fired=active.any(0),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of raw input, as the exported SAE computes them."""
        return self.inference_activation(self.pre_acts(x * self.input_scale))

    def inference_activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.activation(pre)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        if not acts.requires_grad and acts.is_cpu and acts.ndim >= 2:
            # Evaluation's codes are sparse (L0 32 of 4608 latents): on a CPU a sparse
            # product is most of the evaluation's decoder time saved.
            flat = acts.reshape(-1, acts.shape[-1])
            if int(torch.count_nonzero(flat)) < SPARSE_DECODE_DENSITY * flat.numel():
                with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
                    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
                    recon = torch.addmm(self.b_dec, flat.to_sparse_csr(), self.W_dec)
                return recon.view(*acts.shape[:-1], -1) / self.target_scale
        return self.decode_scaled(acts) / self.target_scale

    @torch.no_grad()
    def after_step(self, applied: Optional[torch.Tensor] = None) -> None:
        """Called after each optimizer step (decoder renormalisation, running stats).

        `applied`: a bool on the device, false where the trainer skipped the step (a
        non-finite one) without the host knowing: then nothing may change."""
        if self.unit_norm_decoder:
            norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            if applied is None:
                self.W_dec.div_(norm)
            else:
                self.W_dec.copy_(torch.where(applied, self.W_dec / norm, self.W_dec))

    # --- several members of a sweep as one batched model (saesweep.sae.stack) ---------------

    def coefficient_warm_up(self) -> int:
        """Steps over which the sparsity coefficient warms up from 0 (`warmed_up`); 0: none."""
        return 0

    def reads_step(self) -> bool:
        """Whether a training step's maths read the step count (in a stack, from a counter the
        stack keeps on the device)."""
        return self.coefficient_warm_up() > 0

    def stack_key(self) -> Optional[tuple[Any, ...]]:
        """What SAEs must share to train as one stack, or None: this one trains on its own. The
        key's first item is the class whose `forward_stacked` and `after_step_stacked` run the
        stack (mostly the SAE's own), then shapes and anything else that batched maths needs
        equal. Such an architecture draws no random numbers in a training step (a stack has no
        per-member RNG)."""
        return None

    @classmethod
    def forward_stacked(cls, stack: Any, x: torch.Tensor, target: torch.Tensor) -> StepOutput:
        """`forward` of every member of `stack` (an SAEStack of this class) on one batch: here
        the dense ReLU pass with `loss_terms_stacked`; an architecture with another activation
        overrides it. Batched products that give each member a separate run's bits."""
        n = stack.n_members
        target = target * stack.target_scale.view(n, 1, 1)
        x = x * stack.input_scale.view(n, 1, 1)
        if stack.configs[0].apply_b_dec_to_input:
            x = x - stack.b_dec.unsqueeze(1)
        pre = x @ stack.W_enc + stack.b_enc.unsqueeze(1)
        acts = cls.activation_stacked(stack, pre)
        recon = acts @ stack.W_dec + stack.b_dec.unsqueeze(1)
        losses = {"mse": mse_loss(recon, target), **cls.loss_terms_stacked(stack, pre, acts)}
        return cls.step_output_stacked(stack, recon, losses, acts)

    @classmethod
    def activation_stacked(cls, stack: Any, pre: torch.Tensor) -> torch.Tensor:
        """`activation` of every member's [M, batch, d_sae] pre-activations."""
        return torch.relu(pre)

    @classmethod
    def loss_terms_stacked(cls, stack: Any, pre: torch.Tensor, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        """`loss_terms` of every member ([M] each), for the dense `forward_stacked`."""
        return {}

    @classmethod
    def step_output_stacked(
        cls, stack: Any, recon: torch.Tensor, losses: dict[str, torch.Tensor], acts: torch.Tensor
    ) -> StepOutput:
        """`step_output` of every member: `recon` [M, batch, d_out] in the scaled space."""
        active = acts.detach() != 0
        return StepOutput(
            recon=recon / stack.target_scale.view(-1, 1, 1),
            losses=losses,
            l0=active.sum(-1).float().mean(-1),
            fired=active.any(1),
        )

    @classmethod
    @torch.no_grad()
    def after_step_stacked(cls, stack: Any, applied: torch.Tensor) -> None:
        """`after_step` of every member; `applied` [M] bool."""
        if cls.unit_norm_decoder:
            norm = stack.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            stack.W_dec.copy_(torch.where(applied.view(-1, 1, 1), stack.W_dec / norm, stack.W_dec))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Called on a sample of recent training inputs before evaluation and export."""

    # --- export to SAELens's on-disk format -----------------------------------

    @torch.no_grad()
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Weights that act on raw activations: input/target scaling folded in."""
        s_in, s_out = self.input_scale, self.target_scale
        return {
            "W_enc": (self.W_enc * s_in).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / s_out).contiguous(),
            "b_dec": (self.b_dec / s_out).contiguous(),
        }

    def export_config(self) -> dict[str, Any]:
        """Architecture-specific SAELens cfg.json fields."""
        return {}


def warmed_up(coefficient: float, step: int, warm_up_steps: int) -> float:
    """`coefficient` at a (0-based) step of its linear warm-up from 0 over `warm_up_steps` steps
    (0: none), as SAELens; a stack's members get the same on the device (`SAEStack.warmed_up`)."""
    return coefficient * (min(1.0, (step + 1) / warm_up_steps) if warm_up_steps > 0 else 1.0)


def mse_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the feature dimension, averaged over tokens (SAELens)."""
    # Over the last two dims only: a stack's [M, batch, d] gives each member's own loss.
    return (recon - target).pow(2).sum(-1).mean(-1)


def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(eps)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, median.norm().item()):
            median = new
            break
        median = new
    return median.float()
