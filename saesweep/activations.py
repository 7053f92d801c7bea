"""Activations from a live LM pass: run the model only as far as the hooks need."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from saesweep.models import hook_layer


class ActivationSource:
    """Turns token rows into activations: (input,) for an SAE, (input, target) for a transcoder.

    For an SAE the target is the input; for a transcoder it is a second hook.
    BOS positions are dropped when `exclude_bos` is set.
    """

    def __init__(self, model: Any, hook_in: str, hook_out: str | None, exclude_bos: bool):
        self.model = model
        self.hooks = [hook_in] if hook_out in (None, hook_in) else [hook_in, hook_out]
        layers = [hook_layer(h) for h in self.hooks]
        self.stop_at_layer = None if None in layers else max(layers) + 1
        self.exclude_bos = exclude_bos
        self.bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None

    @property
    def d_in(self) -> int:
        return self._widths()[0]

    @property
    def d_out(self) -> int:
        return self._widths()[-1]

    def _widths(self) -> list[int]:
        if not hasattr(self, "_width_cache"):
            probe = torch.full((1, 2), self.bos or 0, dtype=torch.long)
            self._width_cache = [a.shape[-1] for a in self.hook_activations(probe)]
        return self._width_cache

    @torch.inference_mode()
    def hook_activations(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[rows, ctx, d] activations at each hook."""
        captured: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = act

        tokens = tokens.to(self.model.cfg.device)
        self.model.run_with_hooks(
            tokens,
            fwd_hooks=[(h, grab) for h in self.hooks],
            stop_at_layer=self.stop_at_layer,
            return_type=None,
        )
        return [captured[h] for h in self.hooks]

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.exclude_bos and self.bos is not None:
            return tokens != self.bos
        return torch.ones_like(tokens, dtype=torch.bool)

    def batches(self, rows: Iterable[torch.Tensor], batch_rows: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x,) or (x, target) chunks of [n_tokens, d], from batch_rows rows at a time."""
        it = iter(rows)
        while True:
            chunk = [r for _, r in zip(range(batch_rows), it)]
            if not chunk:
                return
            tokens = torch.stack(chunk)
            acts = self.hook_activations(tokens)
            mask = self.token_mask(tokens).to(acts[0].device)
            yield tuple(a[mask] for a in acts)
