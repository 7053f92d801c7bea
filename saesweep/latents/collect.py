"""What chosen latents respond to, from one pass over held-out rows.

`choose_latents` picks the latents to show from their firing rates: the most and the
least frequent among those that fired at all, and a seeded random sample of the rest.
`LatentCollector` then takes, batch by batch, the latents' activations on every token
of the rows ([rows, positions, latents], zero where evaluation would not count the
token, e.g. BOS) and keeps, for each latent:
- its top contexts: the rows where its largest activation is largest (one context per
  row, so one long repetitive passage cannot fill the list), each with the position of
  that activation and the latent's activation on a window of tokens around it;
- every non-zero activation, for its histogram.
It is pure tensor work (no model), so tests feed it hand-made activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GROUPS = ("most frequent", "least frequent", "random sample")


def choose_latents(fire_rate: torch.Tensor, n_sample: int, n_extreme: int, seed: int) -> dict[str, list[int]]:
    """Latents to show by group; only latents with a positive rate (that fired) are chosen.

    Most frequent: the n_extreme highest rates, highest first; least frequent: the
    n_extreme lowest, lowest first (ties by index); random sample: n_sample of the
    others, drawn with `seed`, in index order. No latent is in two groups.
    """
    rate = fire_rate.double().cpu()
    alive = torch.nonzero(rate > 0).flatten()
    # Stable sort by index first, so ties are broken by index in both directions.
    by_rate = alive[torch.argsort(-rate[alive], stable=True)].tolist()
    most = by_rate[:n_extreme]
    rest = by_rate[n_extreme:]
    least = sorted(rest, key=lambda i: (rate[i].item(), i))[:n_extreme]
    taken = set(most) | set(least)
    others = [i for i in sorted(alive.tolist()) if i not in taken]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n_sample]
    sample = sorted(others[i] for i in order.tolist())
    return {"most frequent": most, "least frequent": least, "random sample": sample}


@dataclass
class Context:
    """One row where a latent fired: its peak and the latent's activations around it."""

    row: int  # index of the row among the scanned rows
    position: int  # of the peak token in the row
    value: float  # the latent's activation there
    start: int  # row position of acts[0] (may be < 0: the window starts before the row)
    acts: list[float]  # the latent's activation on each window position (0 outside the row)


@dataclass
class LatentResult:
    index: int
    fires: int  # tokens it was non-zero on
    contexts: list[Context] = field(default_factory=list)  # by value, largest first
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # its non-zero activations


class LatentCollector:
    """Running top contexts and activation values of `latents` over batches of rows."""

    def __init__(self, latents: list[int], n_contexts: int, before: int, after: int):
        self.latents = list(latents)
        self.n_contexts, self.before, self.after = n_contexts, before, after
        n, width = len(self.latents), before + after + 1
        self.top_values = torch.full((n, 0), -torch.inf)
        self.top_rows = torch.zeros((n, 0), dtype=torch.long)
        self.top_positions = torch.zeros((n, 0), dtype=torch.long)
        self.top_windows = torch.zeros((n, 0, width))
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.rows_seen = 0

    def update(self, acts: torch.Tensor) -> None:
        """acts: [rows, positions, len(latents)] for the next rows of the scan."""
        acts = acts.detach().float().cpu()
        rows, positions, n = acts.shape
        assert n == len(self.latents), f"expected activations of {len(self.latents)} latents, got {n}"
        flat = acts.reshape(-1, n)
        for j in range(n):
            column = flat[:, j]
            self.values[j].append(column[column != 0].clone())

        peak, peak_at = acts.max(dim=1)  # [rows, n]: each row's largest activation and where
        k = min(self.n_contexts, rows)
        cand_values, cand_rows = peak.topk(k, dim=0)  # [k, n]
        cand_values, cand_rows = cand_values.T, cand_rows.T  # [n, k]
        cand_positions = peak_at.gather(0, cand_rows.T).T  # [n, k]
        # Windows: pad the positions so a window may run past either end of its row.
        padded = torch.nn.functional.pad(acts, (0, 0, self.before, self.after))
        offsets = torch.arange(self.before + self.after + 1)
        latent = torch.arange(n)[:, None, None]
        windows = padded[cand_rows[..., None], cand_positions[..., None] + offsets, latent]  # [n, k, width]

        values = torch.cat([self.top_values, cand_values], dim=1)
        keep = values.topk(min(self.n_contexts, values.shape[1]), dim=1).indices
        self.top_values = values.gather(1, keep)
        self.top_rows = torch.cat([self.top_rows, cand_rows + self.rows_seen], dim=1).gather(1, keep)
        self.top_positions = torch.cat([self.top_positions, cand_positions], dim=1).gather(1, keep)
        windows = torch.cat([self.top_windows, windows], dim=1)
        self.top_windows = windows.gather(1, keep[..., None].expand(-1, -1, windows.shape[2]))
        self.rows_seen += rows

    def results(self) -> list[LatentResult]:
        out = []
        for j, index in enumerate(self.latents):
            values = torch.cat(self.values[j]) if self.values[j] else torch.zeros(0)
            contexts = [
                Context(
                    row=int(self.top_rows[j, c]),
                    position=int(self.top_positions[j, c]),
                    value=float(self.top_values[j, c]),
                    start=int(self.top_positions[j, c]) - self.before,
                    acts=[float(v) for v in self.top_windows[j, c]],
                )
                for c in range(self.top_values.shape[1])
                if self.top_values[j, c] > 0  # a row where it did not fire is no context
            ]
            out.append(LatentResult(index=index, fires=len(values), contexts=contexts, values=values))
        return out
