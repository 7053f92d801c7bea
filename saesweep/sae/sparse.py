"""Sparse kernels for TopK-style SAEs: touch only the active latents.

With k active latents out of d_sae per token, the dense decoder, its backward and
the encoder's weight gradient all waste d_sae/k of their work on zeros. Here the
encoder's forward stays dense (every pre-activation is needed to rank them), and
everything after the selection works on the (row, latent, value) triples:
- decode: `embedding_bag` over the active decoder rows (autograd built in);
- encoder backward: a custom autograd function whose weight gradient is a sparse
  [d_sae, batch] x [batch, d_in] product instead of a dense one.
Both match the dense computation to float rounding (tests/test_sae.py,
tests/test_sae_topk_family.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ActiveLatents:
    """Active latents of a batch, sorted by row: values carry the autograd graph."""

    rows: torch.Tensor  # [n_active] long, non-decreasing
    cols: torch.Tensor  # [n_active] long
    values: torch.Tensor  # [n_active]
    n_rows: int
    d_sae: int

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.n_rows, self.d_sae)
        return dense.index_put((self.rows, self.cols), self.values)

    def offsets(self) -> torch.Tensor:
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        return torch.cumsum(counts, 0) - counts

    def fired(self) -> torch.Tensor:
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.cols.device)
        return fired.index_fill(0, self.cols[self.values.detach() != 0], True)

    def l0(self) -> torch.Tensor:
        return (self.values.detach() != 0).sum() / self.n_rows


def topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k largest entries of each row, sorted by row."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.flatten()


def batch_topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k * n_rows largest entries of the whole batch, sorted by row.

    Ranks each row's 4k best candidates first (much cheaper than ranking all
    n_rows * d_sae entries); if some row had all its candidates chosen it might
    deserve more, and the exact full ranking is used instead. Among the candidates,
    the winners are those at or above the n_keep-th largest value (a selection, not a
    sort), and a boolean mask lists them already in row order; ties at that value
    would let more through, so then the candidates are ranked instead.
    """
    n_rows, d_sae = pre.shape
    n_keep = min(k * n_rows, pre.numel())
    width = min(d_sae, 4 * k)
    cand_vals, cand_cols = pre.topk(width, dim=-1, sorted=False)
    flat_vals = cand_vals.flatten()
    cutoff = flat_vals.kthvalue(flat_vals.numel() - n_keep + 1).values
    chosen = (flat_vals >= cutoff).nonzero().squeeze(1)
    if chosen.numel() != n_keep:  # ties at the cutoff
        chosen = flat_vals.topk(n_keep, sorted=False).indices.sort().values
    rows = chosen // width
    if width < d_sae and bool((torch.bincount(rows, minlength=n_rows) == width).any()):
        flat = pre.flatten().topk(n_keep, sorted=False).indices.sort().values
        return flat // d_sae, flat % d_sae
    return rows, cand_cols.flatten()[chosen]


class _GatherPreActs(torch.autograd.Function):
    """Pre-activations at (rows, cols), with a backward that stays sparse."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc, rows, cols)
        return values

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # S[latent, row] = grad, so grad_W_enc = (S @ x)^T and grad_x = S^T @ W_enc^T.
            S = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), grad, (d_sae, x.shape[0]), check_invariants=False
            )
            if ctx.needs_input_grad[2]:
                grad_W = torch.sparse.mm(S, x).T
            if ctx.needs_input_grad[1]:
                grad_x = torch.sparse.mm(S.t(), W_enc.T.contiguous())
        return None, grad_x, grad_W, grad_b, None, None


def dense_pre_acts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """All pre-activations, outside autograd: used only to rank latents."""
    with torch.no_grad():
        return torch.addmm(b_enc, x, W_enc)


def gather_active(
    pre: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    relu: bool = True,
) -> ActiveLatents:
    """Pre-activations at (rows, cols) of `dense_pre_acts`, differentiable and sparse."""
    values = _GatherPreActs.apply(pre[rows, cols], x, W_enc, b_enc, rows, cols)
    if relu:
        values = values.relu()
    return ActiveLatents(rows, cols, values, x.shape[0], W_enc.shape[1])


def encode_active(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, select
) -> ActiveLatents:
    """Dense pre-activations, `select(pre) -> (rows, cols)`, then ReLU'd active values."""
    pre = dense_pre_acts(x, W_enc, b_enc)
    rows, cols = select(pre)
    return gather_active(pre, x, W_enc, b_enc, rows, cols)


def topk_among(pre: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest entries among the latents `candidates`.

    Ranks only the candidate columns, so a few dead latents cost a few columns.
    """
    sub = pre.index_select(1, candidates)
    idx = sub.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, candidates[idx.flatten()]


def decode_active(
    active: ActiveLatents, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of value x decoder row over each row's active latents (+ b_dec if given)."""
    out = F.embedding_bag(
        active.cols, W_dec, active.offsets(), mode="sum", per_sample_weights=active.values
    )
    return out if b_dec is None else out + b_dec


def latents_in(active: ActiveLatents, lo: int, hi: int) -> ActiveLatents:
    """The active entries whose latent index lies in [lo, hi); rows stay sorted."""
    keep = (active.cols >= lo) & (active.cols < hi)
    return ActiveLatents(active.rows[keep], active.cols[keep], active.values[keep], active.n_rows, active.d_sae)
