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

On a GPU the matrix units change the trade: a dense [batch, d_sae] matrix product in
bf16 can beat the sparse gather and scatter. `KERNELS` says which path each piece
takes; "auto" picks per device as measured (benchmarks/results/gpu_h100.md).

Selections come in two kinds (`Kernels.selection`). "compact" ones keep only the
entries they need (BatchTopK's candidates above an estimated cutoff, AuxK's dead
columns, a Matryoshka level's latents): data-dependent sizes, so the host must learn
a count from the device, which on a CPU costs nothing. "fixed" ones have sizes known
on the host (`nonzero_static`, masks over every column): a GPU's step never waits
for it (tests/test_sync_free.py). Both select the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Kernels:
    """sparse | dense | auto for the encoder's weight gradient and for the decoder;
    compact | fixed | auto for the selections (see the module's doc)."""

    encoder_backward: str = "auto"
    decoder: str = "auto"
    selection: str = "auto"

    def dense(self, which: str, device: torch.device) -> bool:
        choice = getattr(self, which)
        if choice == "auto":
            return device.type == "cuda" and AUTO_DENSE_ON_CUDA[which]
        return choice == "dense"

    def fixed_size(self, device: torch.device) -> bool:
        """Selections of sizes the host knows: a GPU's choice, as a host sync stalls it."""
        return self.selection == "fixed" or (self.selection == "auto" and device.type == "cuda")

    def as_on(self, device_type: str) -> Kernels:
        """What "auto" picks on that device, spelled out: lets a CPU run the GPU's paths."""
        return Kernels(
            *(
                "dense" if self.dense(w, torch.device(device_type)) else "sparse"
                for w in ("encoder_backward", "decoder")
            ),
            selection="fixed" if self.fixed_size(torch.device(device_type)) else "compact",
        )


# What "auto" uses on CUDA; CPUs always take the sparse paths (benchmarks/results/step_cpu.md).
# On an H100 in bf16 (benchmarks/results/step_cuda*.md) the dense encoder gradient beat the
# sparse one at every SAE width tried, while the dense decoder lost or tied, so the decoder
# stays sparse.
AUTO_DENSE_ON_CUDA = {"encoder_backward": True, "decoder": False}
KERNELS = Kernels()


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
        # rows are sorted: row i starts at the first entry >= i (bincount would sync on a GPU)
        return torch.searchsorted(self.rows, torch.arange(self.n_rows, device=self.rows.device))

    def fired(self) -> torch.Tensor:
        nonzero = (self.values.detach() != 0).to(torch.int32)
        counts = torch.zeros(self.d_sae, dtype=torch.int32, device=self.cols.device).index_add_(0, self.cols, nonzero)
        return counts > 0

    def l0(self) -> torch.Tensor:
        return (self.values.detach() != 0).sum() / self.n_rows


def topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k largest entries of each row, sorted by row."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    return row_of_each(pre.shape[0], k, pre.device), cols.flatten()


def row_of_each(n_rows: int, k: int, device: torch.device) -> torch.Tensor:
    """[n_rows * k] long: 0 k times, then 1 k times, ... (repeat_interleave, but with no
    output size for the device to report back)."""
    return torch.arange(n_rows, device=device)[:, None].expand(n_rows, k).reshape(-1)


def batch_topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See `_batch_topk_indices`; compiled (training.compile) only with fixed-size selections."""
    if KERNELS.fixed_size(pre.device):
        return _batch_topk_indices(pre, k)
    return _batch_topk_indices_eager(pre, k)


def _batch_topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k * n_rows largest entries of the whole batch, sorted by row.

    A selection, not a ranking: a strided sample of the batch estimates a value a little
    below the cutoff (1.5x the entries it should keep lie above it), one pass lists the
    entries above that estimate in row-major order, and the exact cutoff is the n_keep-th
    largest among them. Winners are the entries above the cutoff plus, if several equal
    it, the first of those in row order. If the estimate was too high (too few entries
    above it), the whole batch is ranked instead.

    With fixed-size selections (GPUs) the cutoff comes from a top-k over the whole batch,
    and the same winners are listed by `nonzero_static`: exactly n_keep of them, so no
    count has to come back to the host.
    """
    n_rows, d_sae = pre.shape
    flat = pre.flatten()
    n_keep = min(k * n_rows, flat.numel())
    if KERNELS.fixed_size(pre.device):
        # NaN ranks as +inf (as in topk), so a batch with NaN (a step the trainer will skip)
        # still selects exactly n_keep entries, its NaNs among them.
        ranked = flat.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
        cutoff = ranked.topk(n_keep, sorted=False).values.amin()
        chosen = torch.nonzero_static(_first_winners(ranked, cutoff, n_keep), size=n_keep).squeeze(1)
        return chosen // d_sae, chosen % d_sae
    candidates = _entries_likely_above_cutoff(flat, n_keep)  # flat indices, ascending
    if candidates.numel() < n_keep:  # the sample misled us: rank everything
        candidates = torch.arange(flat.numel(), device=flat.device)
    values = flat[candidates]
    if pre.is_cuda:  # CUDA's kthvalue ranks a slice in one thread block; its top-k is multi-block
        cutoff = values.topk(n_keep, sorted=False).values.amin()
    else:
        cutoff = values.kthvalue(values.numel() - n_keep + 1).values
    chosen = candidates[_first_winners(values, cutoff, n_keep)]
    return chosen // d_sae, chosen % d_sae


def _first_winners(values: torch.Tensor, cutoff: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
    """Mask of exactly n_keep entries of each last-dim row: those above the cutoff, then the
    first that equal it (cutoff and n_keep broadcast against the rows: one per member of a stack)."""
    above, at = values > cutoff, values == cutoff
    return above | (at & (at.cumsum(-1) <= n_keep - above.sum(-1, keepdim=True)))


SAMPLE_SIZE = 65536


def _entries_likely_above_cutoff(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the entries at or above an estimate of the n_keep-th largest value, chosen
    so that ~1.5 n_keep entries qualify (all entries if that is most of them)."""
    floor = cutoff_floor(flat, n_keep, margin=1.5)
    if floor is None:
        return torch.arange(flat.numel(), device=flat.device)
    return (flat >= floor).nonzero().squeeze(1)  # the one host sync of the selection


def cutoff_floor(flat: torch.Tensor, n_keep: int, margin: float) -> torch.Tensor | None:
    """A value that about margin x n_keep entries of `flat` reach, estimated from a strided
    sample; None where that would be most of them (or flat is small): keep everything."""
    n = flat.numel()
    if 4 * margin * n_keep >= 3 * n or n <= SAMPLE_SIZE:
        return None
    # An odd stride walks through every column of an even-width batch; the sample is
    # deterministic, so the RNG stream (and a resumed run) is untouched.
    sample = flat[:: (n // SAMPLE_SIZE) | 1]
    rank = min(sample.numel(), int(margin * n_keep * sample.numel() / n) + 1)
    return sample.topk(rank, sorted=False).values.amin()


class _GatherPreActs(torch.autograd.Function):
    """Pre-activations at (rows, cols), with a backward that stays sparse (or goes dense
    through the matrix units, see KERNELS).

    The input x never needs a gradient of its own, only b_dec does where it centred x
    (x = raw - b_dec), and that gradient is -W_enc @ grad_b_enc: a vector, so the
    [batch, d_in] input gradient is never formed.
    """

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc, rows, cols)
        ctx.compute_dtype = values.dtype  # bf16 under autocast
        return values

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W_enc, rows, cols = ctx.saved_tensors
        if W_enc.ndim == 3:
            return _stacked_backward(ctx, grad, x, W_enc, rows, cols)
        d_sae = W_enc.shape[1]
        _, _, want_W, want_b, want_b_dec, _, _ = ctx.needs_input_grad
        grad = grad.to(W_enc.dtype)
        grad_W = grad_b = grad_b_dec = None
        if want_b or want_b_dec:
            grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
            if want_b_dec:
                # A row vector times W_enc^T, not W_enc @ grad_b: the batched form of this product
                # (a stack's) gives each member these very bits, a batched mv does not.
                grad_b_dec = -(grad_b.unsqueeze(0) @ W_enc.T).squeeze(0)
        if want_W and KERNELS.dense("encoder_backward", grad.device):
            # G[row, latent] = grad, built at the forward's precision: grad_W_enc = x^T G.
            dt = ctx.compute_dtype
            G = torch.zeros(x.shape[0], d_sae, dtype=dt, device=grad.device).index_put_((rows, cols), grad.to(dt))
            grad_W = (x.to(dt).T @ G).to(W_enc.dtype)
        elif want_W:
            # S[latent, row] = grad, so grad_W_enc = (S @ x)^T.
            S = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (d_sae, x.shape[0]), check_invariants=False)
            grad_W = torch.sparse.mm(S, x.to(grad.dtype)).T
        return None, None, grad_W, grad_b if want_b else None, grad_b_dec, None, None


def _stacked_backward(ctx, grad, x, W_enc, rows, cols):  # type: ignore[no-untyped-def]
    """`_GatherPreActs.backward` for a stack of M SAEs (saesweep.sae.stack): W_enc [M, d_in, d_sae],
    x [M * batch, d_in], rows and cols global ([0, M * batch) and [0, M * d_sae)). Member m's
    entries only meet its own rows and latents, so each sum runs over the entries a separate run
    sums, in the same order: the sparse path gives its bits exactly."""
    n_members, _, d_sae = W_enc.shape
    _, _, want_W, want_b, want_b_dec, _, _ = ctx.needs_input_grad
    grad = grad.to(W_enc.dtype)
    grad_W = grad_b = grad_b_dec = None
    if want_b or want_b_dec:
        grad_b = torch.zeros(n_members * d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        grad_b = grad_b.view(n_members, d_sae)
        if want_b_dec:
            grad_b_dec = -(grad_b.unsqueeze(1) @ W_enc.transpose(1, 2)).squeeze(1)
    if want_W and KERNELS.dense("encoder_backward", grad.device):
        dt = ctx.compute_dtype
        batch = x.shape[0] // n_members
        local = cols - rows.div(batch, rounding_mode="floor") * d_sae
        G = torch.zeros(x.shape[0], d_sae, dtype=dt, device=grad.device).index_put_((rows, local), grad.to(dt))
        xs = x.to(dt).view(n_members, batch, -1)
        grad_W = torch.bmm(xs.transpose(1, 2), G.view(n_members, batch, d_sae)).to(W_enc.dtype)
    elif want_W:
        S = torch.sparse_coo_tensor(
            torch.stack([cols, rows]), grad, (n_members * d_sae, x.shape[0]), check_invariants=False
        )
        grad_W = torch.sparse.mm(S, x.to(grad.dtype)).view(n_members, d_sae, -1).transpose(1, 2)
    return None, None, grad_W, grad_b if want_b else None, grad_b_dec, None, None


def dense_pre_acts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """All pre-activations, outside autograd: used only to rank latents. Of a stack too:
    x [M, batch, d_in], W_enc [M, d_in, d_sae], b_enc [M, d_sae] (each member's bits are an
    addmm's)."""
    with torch.no_grad():
        if W_enc.ndim == 3:
            return torch.baddbmm(b_enc.unsqueeze(1), x, W_enc)
        return torch.addmm(b_enc, x, W_enc)


def gather_active(*args: Any, **kwargs: Any) -> ActiveLatents:
    """See `_gather_active`; compiled (training.compile) only with fixed-size selections."""
    if KERNELS.fixed_size(args[0].device):
        return _gather_active(*args, **kwargs)
    return _gather_active_eager(*args, **kwargs)


def _gather_active(
    pre: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    relu: bool = True,
    b_dec: torch.Tensor | None = None,
) -> ActiveLatents:
    """Pre-activations at (rows, cols) of `dense_pre_acts(x, ...)`, differentiable and sparse.

    x is the encoder's input as a plain tensor; if it was centred as raw - b_dec, pass
    b_dec so that it gets its gradient through the encoder.

    Of a stack (pre [M, batch, d_sae], x [M, batch, d_in]): rows are global (m * batch + b),
    cols each member's own latent; the result numbers latents globally (m * d_sae + j).
    """
    if pre.ndim == 3:
        n_members, batch, d_sae = pre.shape
        values = pre.view(n_members * batch, d_sae)[rows, cols]
        cols = cols + rows.div(batch, rounding_mode="floor") * d_sae
        x = x.reshape(n_members * batch, -1)
    else:
        values = pre[rows, cols]
    values = _GatherPreActs.apply(values, x.detach(), W_enc, b_enc, b_dec, rows, cols)
    if relu:
        values = values.relu()
    return ActiveLatents(rows, cols, values, x.shape[0], b_enc.numel())


# Data-dependent shapes (compact selections) and sparse tensors: torch.compile leaves these eager.
_batch_topk_indices_eager = torch.compiler.disable(_batch_topk_indices)
_gather_active_eager = torch.compiler.disable(_gather_active)


def topk_among(pre: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest entries among the latents `candidates`.

    Ranks only the candidate columns, so a few dead latents cost a few columns.
    """
    sub = pre.index_select(1, candidates)
    idx = sub.topk(k, dim=-1, sorted=False).indices
    return row_of_each(pre.shape[0], k, pre.device), candidates[idx.flatten()]


def decode_active(active: ActiveLatents, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of value x decoder row over each row's active latents (+ b_dec if given)."""
    if KERNELS.dense("decoder", W_dec.device):
        out = active.to_dense() @ W_dec  # a matrix product: autocast runs it in bf16
    else:
        # The gather is cheap in fp32, and embedding_bag wants one dtype (autocast gives bf16 values).
        values, offsets = active.values.to(W_dec.dtype), active.offsets()
        if W_dec.device.type == "cpu":  # a stack's members get their separate runs' bits (see _DecodeActive)
            out = _DecodeActive.apply(values, W_dec, active.rows, active.cols, offsets)
        else:  # not yet timed on a GPU: embedding_bag's own backward, as before stacks
            out = F.embedding_bag(active.cols, W_dec, offsets, mode="sum", per_sample_weights=values)
    return out if b_dec is None else out + b_dec


class _DecodeActive(torch.autograd.Function):
    """embedding_bag's sum over the active decoder rows, with the decoder's gradient as a sparse
    [d_sae, batch] x [batch, d_out] product (embedding_bag's own backward sorts the entries in
    an order of its own, so a stack of SAEs would not get a separate run's bits; this sum runs
    over each latent's entries in row order, stacked or not)."""

    @staticmethod
    def forward(ctx, values, W_dec, rows, cols, offsets):  # type: ignore[override]
        ctx.save_for_backward(values, W_dec, rows, cols, offsets)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, W_dec, rows, cols, offsets = ctx.saved_tensors
        want_values, want_W, _, _, _ = ctx.needs_input_grad
        grad_values = grad_W = None
        if want_values:  # what embedding_bag's backward gives per_sample_weights (rows: each entry's bag)
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, W_dec, cols, offsets, rows, 0)
        if want_W:
            S = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), values, (W_dec.shape[0], grad.shape[0]), check_invariants=False
            )
            grad_W = torch.sparse.mm(S, grad)
        return grad_values, grad_W, None, None, None


def latents_in(active: ActiveLatents, lo: int, hi: int, width: int | None = None) -> ActiveLatents:
    """The active entries whose latent index lies in [lo, hi); rows stay sorted. Of a stack
    (latents numbered m * width + j), those whose j does.

    With fixed-size selections every entry stays, those outside with value 0: the same
    sums (adding an exact 0), at the price of decoding all entries for each level."""
    latent = active.cols if width is None else active.cols % width
    keep = (latent >= lo) & (latent < hi)
    if KERNELS.fixed_size(active.cols.device):
        return ActiveLatents(active.rows, active.cols, active.values * keep, active.n_rows, active.d_sae)
    return ActiveLatents(active.rows[keep], active.cols[keep], active.values[keep], active.n_rows, active.d_sae)


# --- a stack of M SAEs of one shape (saesweep.sae.stack) ------------------------------------
# Pre-activations are [M, batch, d_sae]; an ActiveLatents of the stack numbers rows m * batch + b
# and latents m * d_sae + j, so decoding is one embedding_bag over the stacked decoder seen as
# [M * d_sae, d_out], and the encoder's backward is `_stacked_backward`.


def member_l0(active: ActiveLatents, n_members: int) -> torch.Tensor:
    """[M] mean active latents per token of each member of a stack's `active`."""
    batch = active.n_rows // n_members
    nonzero = (active.values.detach() != 0).long()
    member = active.rows.div(batch, rounding_mode="floor")
    counts = torch.zeros(n_members, dtype=torch.long, device=nonzero.device).index_add_(0, member, nonzero)
    return counts / batch


def stacked_topk_indices(
    pre: torch.Tensor, ks: list[int], k_of_member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, cols, keep) of each member's per-row top ks[m] (`k_of_member`: the same on the
    device): rows global, cols the member's own. One top-k at the largest k; where the ks
    differ, it is sorted and `keep` (a 0/1 weight per entry) drops each row's entries past the
    member's k."""
    n_members, batch, _ = pre.shape
    k_max = max(ks)
    differ = len(set(ks)) > 1
    cols = pre.topk(k_max, dim=-1, sorted=differ).indices.flatten()
    rows = row_of_each(n_members * batch, k_max, pre.device)
    if not differ:
        return rows, cols, None
    keep = torch.arange(k_max, device=pre.device) < k_of_member[:, None, None]  # [M, 1, k_max]
    return rows, cols, keep.expand(n_members, batch, k_max).flatten()


def stacked_batch_topk_indices(
    pre: torch.Tensor, ks: list[int], k_of_member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each member's `batch_topk_indices(pre[m], ks[m])` (`k_of_member`: the
    ks on the device): the same entries in the same order, rows global and sorted, cols the
    member's own.

    Fixed-size selections (GPUs): one top-k over all members, at the largest count, gives each
    member's cutoff, and one `nonzero_static` lists the winners. Compact ones (CPUs, where a
    host read costs nothing, and a top-k over the whole batch 3.3x the time of the sampled
    cutoff): `_stacked_compact_selection`, or where it cannot, each member's own."""
    n_members, batch, d_sae = pre.shape
    keeps = [min(k * batch, batch * d_sae) for k in ks]
    if not KERNELS.fixed_size(pre.device):
        stacked = _stacked_compact_selection(pre, keeps)
        if stacked is not None:
            return stacked
        picks = [batch_topk_indices(p, k) for p, k in zip(pre, ks)]
        rows = torch.cat([r + m * batch for m, (r, _) in enumerate(picks)])
        return rows, torch.cat([c for _, c in picks])
    ranked = pre.view(n_members, -1).nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
    n_keep = (k_of_member * batch).clamp(max=batch * d_sae)[:, None]  # keeps, with no copy from the host
    top = ranked.topk(max(keeps), dim=1, sorted=len(set(keeps)) > 1).values
    cutoff = top.gather(1, n_keep - 1) if len(set(keeps)) > 1 else top.amin(1, keepdim=True)
    winners = _first_winners(ranked, cutoff, n_keep)
    chosen = torch.nonzero_static(winners.flatten(), size=sum(keeps)).squeeze(1)
    return chosen.div(d_sae, rounding_mode="floor"), chosen % d_sae


def _stacked_compact_selection(pre: torch.Tensor, keeps: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`batch_topk_indices`'s compact path for every member at once: each member's floor from
    its strided sample (as `cutoff_floor`), one pass listing every member's entries above its
    floor, each member's exact cutoff (a kthvalue of its candidates) and the first winners.
    A member whose floor is not sampled (a small or dense batch) has every entry a candidate,
    NaN too, as alone. None where a sampled floor misled (too few candidates): then each
    member takes its own path, as a separate run would."""
    n_members, batch, d_sae = pre.shape
    flat = pre.view(n_members, -1)
    n, margin = flat.shape[1], 1.5
    sampled = [n > SAMPLE_SIZE and 4 * margin * keep < 3 * n for keep in keeps]
    if any(sampled):
        sample = flat[:, :: (n // SAMPLE_SIZE) | 1]
        ranks = [min(sample.shape[1], int(margin * keep * sample.shape[1] / n) + 1) for keep in keeps]
        top = sample.topk(max(ranks), dim=1, sorted=True).values
        beyond = torch.arange(max(ranks), device=pre.device) >= torch.tensor(ranks, device=pre.device)[:, None]
        floor = top.masked_fill(beyond, torch.inf).amin(1, keepdim=True)  # NaN if a member's top ranks hold one
        candidate = flat >= floor
        if not all(sampled):
            candidate |= ~torch.tensor(sampled, device=pre.device)[:, None]
    else:
        candidate = torch.ones_like(flat, dtype=torch.bool)
    member, index = candidate.nonzero().unbind(1)  # by member, then in row order
    counts = torch.bincount(member, minlength=n_members).tolist()  # the host read a compact selection makes
    if any(count < keep for count, keep in zip(counts, keeps)):
        return None
    values = flat[member, index]
    cutoff = torch.stack([v.kthvalue(len(v) - keep + 1).values for v, keep in zip(values.split(counts), keeps)])
    # `_first_winners` within each member: above its cutoff, then its first entries equal to it.
    at, above = values == cutoff[member], values > cutoff[member]
    n_above = torch.zeros(n_members, dtype=torch.long, device=pre.device).index_add_(0, member, above.long())
    n_at = torch.zeros(n_members, dtype=torch.long, device=pre.device).index_add_(0, member, at.long())
    at_so_far = at.long().cumsum(0) - (n_at.cumsum(0) - n_at)[member]  # within the member
    room = torch.tensor(keeps, device=pre.device) - n_above
    winners = above | (at & (at_so_far <= room[member]))
    member, index = member[winners], index[winners]
    return member * batch + index.div(d_sae, rounding_mode="floor"), index % d_sae
