"""Activations from a live LM pass: run the model only as far as the hooks need.

`ActivationSource` turns token rows into activations (for training, evaluation and
building the cache); `LiveFeed` is the training feed that runs it over the training
rows. The other feed, `saesweep.activations.cache.CacheReader`, reads the same chunks from disk;
the buffer cannot tell them apart.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from saesweep.activations.buffer import to_device
from saesweep.lm.model import LanguageModel

Columns = tuple[torch.Tensor, ...]


def run_hooks(hook_in: str, hook_out: str | None) -> list[str]:
    """A run's hooks, in column order: [input] for an SAE, [input, target] for a transcoder."""
    return [hook_in] if hook_out in (None, hook_in) else [hook_in, hook_out]


def token_filter(cfg: Any) -> dict[str, Any]:
    """The keys of an ActivationsConfig that pick which positions of a row give activations,
    as ActivationSource's keywords (and, being plain data, as part of cache and eval keys)."""
    return {
        "exclude_bos": bool(cfg.exclude_bos),
        "exclude_special_tokens": bool(cfg.exclude_special_tokens),
        "seqpos_slice": list(cfg.seqpos_slice),
    }


class ActivationSource:
    """Turns token rows into activations: (input,) for an SAE, (input, target) for a transcoder.

    For an SAE the target is the input; for a transcoder it is a second hook. Positions are
    dropped by `token_mask`: BOS tokens (`exclude_bos`), every special token of the tokenizer
    (`exclude_special_tokens` true) or the token ids it lists, and positions outside `seqpos_slice`.
    """

    def __init__(
        self,
        model: LanguageModel,
        hook_in: str,
        hook_out: str | None,
        exclude_bos: bool,
        exclude_special_tokens: bool | Sequence[int] = False,
        seqpos_slice: Sequence[Optional[int]] = (None,),
    ):
        self.model = model
        self.hooks = run_hooks(hook_in, hook_out)
        self._setup(exclude_bos, exclude_special_tokens, seqpos_slice)

    @classmethod
    def for_hooks(
        cls,
        model: LanguageModel,
        hooks: list[str],
        exclude_bos: bool,
        exclude_special_tokens: bool | Sequence[int] = False,
        seqpos_slice: Sequence[Optional[int]] = (None,),
    ) -> "ActivationSource":
        """Any number of hooks from one pass (the cache stores several at once)."""
        source = cls.__new__(cls)
        source.model = model
        source.hooks = list(hooks)
        source._setup(exclude_bos, exclude_special_tokens, seqpos_slice)
        return source

    def subset(self, hooks: list[str]) -> "ActivationSource":
        """A source for some of this one's hooks (a grouped member's own), on the same model,
        its widths taken from this one's (no probe pass of its own)."""
        widths = dict(zip(self.hooks, self.widths()))
        source = ActivationSource.for_hooks(self.model, hooks, **self.filter)
        source._width_cache = [widths[h] for h in hooks]
        return source

    def _setup(
        self, exclude_bos: bool, exclude_special_tokens: bool | Sequence[int], seqpos_slice: Sequence[Optional[int]]
    ) -> None:
        self.filter = {
            "exclude_bos": exclude_bos,
            "exclude_special_tokens": exclude_special_tokens,
            "seqpos_slice": list(seqpos_slice),
        }
        tokenizer = self.model.tokenizer
        self.bos = tokenizer.bos_token_id if tokenizer is not None else None
        excluded = {self.bos} if exclude_bos and self.bos is not None else set()
        if isinstance(exclude_special_tokens, (list, tuple)):  # token ids (an SAELens SAE's record)
            excluded |= {int(t) for t in exclude_special_tokens}
        elif exclude_special_tokens and tokenizer is not None:
            excluded |= set(tokenizer.all_special_ids)
        self._excluded = torch.tensor(sorted(excluded), dtype=torch.long)
        self._excluded_on: dict[torch.device, torch.Tensor] = {}
        self._positions = slice(*seqpos_slice)

    @property
    def d_in(self) -> int:
        return self._widths()[0]

    @property
    def d_out(self) -> int:
        return self._widths()[-1]

    def widths(self) -> list[int]:
        """Each hook's width, in hook order."""
        return list(self._widths())

    def _widths(self) -> list[int]:
        if not hasattr(self, "_width_cache"):
            probe = torch.full((1, 2), self.bos or 0, dtype=torch.long)
            self._width_cache = [a.shape[-1] for a in self.hook_activations(probe)]
        return self._width_cache

    def hook_activations(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[rows, ctx, d] activations at each hook (the model stops after the last one)."""
        return self.model.run_to_hooks(to_device(tokens, torch.device(self.model.cfg.device)), self.hooks)

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where a [..., ctx] batch of token rows gives activations."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self._positions != slice(None):
            in_slice = torch.zeros(tokens.shape[-1], dtype=torch.bool, device=tokens.device)
            in_slice[self._positions] = True
            keep &= in_slice
        if len(self._excluded):
            # A copy per device, made once: a copy to a GPU on each call would wait on it.
            if tokens.device not in self._excluded_on:
                self._excluded_on[tokens.device] = self._excluded.to(tokens.device)
            keep &= ~torch.isin(tokens, self._excluded_on[tokens.device])
        return keep

    def chunk(self, tokens: torch.Tensor) -> Columns:
        """[n_tokens, d] per hook for a [rows, ctx] batch, without the positions token_mask drops."""
        acts = self.hook_activations(tokens)
        mask = self.token_mask(tokens).to(acts[0].device)
        return tuple(a[mask] for a in acts)

    def batches(self, rows: Iterable[torch.Tensor], batch_rows: int) -> Iterator[Columns]:
        """(x,) or (x, target) chunks of [n_tokens, d], from batch_rows rows at a time."""
        it = iter(rows)
        while True:
            chunk = [r for _, r in zip(range(batch_rows), it)]
            if not chunk:
                return
            yield self.chunk(torch.stack(chunk))


class LiveFeed:
    """Training activations from a live LM pass over the training rows.

    Its position is the number of token rows consumed, which is all a checkpoint
    needs: the rows' order is a function of the seed. Data-parallel rank `rank` of
    `world` reads its own share of that order (see TokenRows.train_iter) and counts it.
    """

    name = "live"

    def __init__(
        self,
        source: ActivationSource,
        rows: Any,
        batch_rows: int,
        rows_consumed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.source = source
        self.batch_rows = batch_rows
        self.rows_consumed = rows_consumed
        self._rows = rows.train_iter(rows_consumed, rank, world)

    def __iter__(self) -> "LiveFeed":
        return self

    def __next__(self) -> Columns:
        return self.next_chunk()

    def next_chunk(self, budget: int | None = None) -> Columns:
        """Activations of the next batch_rows rows, or of fewer: only as many rows as hold
        `budget` tokens when that is all the run still needs (its last LM pass would
        otherwise compute up to a whole batch of activations no step trains on)."""
        taken: list[torch.Tensor] = []
        tokens = 0
        for row in self._rows:
            taken.append(row)
            tokens += int(self.source.token_mask(row).sum())
            if len(taken) == self.batch_rows or (budget is not None and tokens >= budget):
                break
        if not taken:
            raise StopIteration
        self.rows_consumed += len(taken)
        return self.source.chunk(torch.stack(taken))

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": self.rows_consumed}
