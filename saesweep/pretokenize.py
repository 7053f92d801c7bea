"""`python -m saesweep.pretokenize [overrides]`: tokenize and window a dataset once, save it.

Shares the `model` and `dataset` groups of training (conf/pretokenize.yaml) but loads
only the model's tokenizer. The rows are exactly the ones training would build from
the same dataset config (saesweep.data.rows.iter_rows), in the same order and not
shuffled, so training from the saved copy (`dataset.source=hf dataset.path=OUT
dataset.is_tokenized=true`) holds out the same rows and trains on the same tokens.

The output is a `Dataset.save_to_disk` folder with one `input_ids` column, plus
`saesweep_pretokenized.json` (tokenizer, context size, windowing, source, version),
which training checks against its own tokenizer and context size. It is written
under a temp name next to the target and renamed, so a crash leaves no half dataset.
`pretokenize.hf_repo_id` also pushes it to the hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saesweep import __version__
from saesweep.cli import run, user_errors
from saesweep.config import CONF_DIR
from saesweep.config.schema import WINDOW_TOKEN_KEYS, ModelConfig, PretokenizeConfig, validate_pretokenize
from saesweep.errors import UserError

log = logging.getLogger("saesweep")


def load_tokenizer(cfg: ModelConfig, cache_dir: str | None) -> Any:
    """The model's tokenizer without its weights: the embedded model's converted dir, or the name/dir."""
    from transformers import AutoTokenizer

    if cfg.source == "embedded":
        from saesweep.lm.model import embedded_model_dir

        return AutoTokenizer.from_pretrained(embedded_model_dir(cfg.name, cache_dir))
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(cfg.name).expanduser()) if Path(cfg.name).expanduser().is_dir() else cfg.name
        )
    except OSError as e:
        raise UserError(f"config key 'model.name': no tokenizer for {cfg.name!r} ({str(e).splitlines()[0]})") from None


def metadata(cfg: PretokenizeConfig, tokenizer: Any, rows: int) -> dict[str, Any]:
    """What the rows depend on; training checks the tokenizer and context size against it."""
    from saesweep.data.rows import tokenizer_fingerprint, vocab_size, window_tokens

    d = cfg.dataset
    ids = window_tokens(d, tokenizer)
    return {
        "saesweep_version": __version__,
        "tokenizer": {
            "name": cfg.model.name,
            "vocab_size": vocab_size(tokenizer),
            "vocab_sha256": tokenizer_fingerprint(tokenizer),
        },
        "context_size": d.context_size,
        "windowing": {
            "prepend_bos": d.prepend_bos,
            "disable_concat_sequences": d.disable_concat_sequences,
            **{key: getattr(d, key) for key in WINDOW_TOKEN_KEYS},
            "token_ids": dataclasses.asdict(ids),
        },
        "source": {
            k: getattr(d, k)
            for k in ("source", "path", "name", "split", "column", "data_files", "streaming", "is_tokenized")
        },
        "rows": rows,
        "tokens": rows * d.context_size,
        "shuffled": False,  # training shuffles as it reads
    }


def pretokenize(cfg: PretokenizeConfig) -> Path | None:
    """Write the dataset's rows and metadata to output_path (and/or push them); return the path."""
    import datasets

    from saesweep.atomic import staged_dir
    from saesweep.data.rows import METADATA_FILE, iter_rows, load_hf_dataset

    p = cfg.pretokenize
    target = Path(p.output_path).expanduser().resolve() if p.output_path else None
    if target is not None and target.exists():
        raise UserError(f"config key 'pretokenize.output_path': {target} exists; remove it or choose another path")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    if cfg.dataset.context_size > getattr(tokenizer, "model_max_length", float("inf")):
        log.warning(
            "dataset.context_size=%d exceeds the tokenizer's model_max_length %d",
            cfg.dataset.context_size,
            tokenizer.model_max_length,
        )
    source = load_hf_dataset(cfg.dataset)
    count = [0]

    def rows() -> Iterator[dict[str, list[int]]]:
        for row in iter_rows(source, cfg.dataset, tokenizer):
            if p.max_rows is not None and count[0] >= p.max_rows:
                return
            count[0] += 1
            yield {"input_ids": row.tolist()}

    # The arrow build cache lives beside the output (same disk) and goes once it is saved.
    build_dir = Path(tempfile.mkdtemp(prefix=".pretokenize-build.", dir=target.parent if target else None))
    try:
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
        # A fresh cache dir: from_generator would otherwise reuse a stale build of the
        # same generator code.
        try:
            built = datasets.Dataset.from_generator(
                rows, features=features, cache_dir=str(build_dir), fingerprint=f"saesweep-{build_dir.name}"
            )
        except datasets.exceptions.DatasetGenerationError as e:
            # `datasets` wraps what our generator raised (a UserError among them): show that instead
            raise (e.__cause__ or e) from None
        if count[0] < 1:
            raise UserError(
                f"config key 'dataset.path': {cfg.dataset.path} gives no rows of {cfg.dataset.context_size} tokens"
            )
        # Pushed from the staged copy, so a failed push leaves nothing at output_path.
        with staged_dir(target if target is not None else build_dir / "dataset", replace=False) as out:
            built.save_to_disk(str(out))
            del built
            meta = metadata(cfg, tokenizer, count[0])
            (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            log.info("%d rows of %d tokens (%d tokens)", count[0], cfg.dataset.context_size, meta["tokens"])
            if p.hf_repo_id:
                push_to_hub(out, p.hf_repo_id, p.hf_private)
        if target is None:
            return None
        log.info("wrote %s", target)
        return target
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def push_to_hub(folder: Path, repo_id: str, private: bool) -> None:
    """The rows as a hub dataset, then the metadata file beside them (as SAELens's runner does)."""
    import datasets
    from huggingface_hub import HfApi

    from saesweep.data.rows import METADATA_FILE

    try:
        datasets.load_from_disk(str(folder)).push_to_hub(repo_id, private=private)
        HfApi().upload_file(
            path_or_fileobj=str(folder / METADATA_FILE),
            path_in_repo=METADATA_FILE,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message="saesweep pretokenize metadata",
        )
    except Exception as e:
        raise UserError(
            f"config key 'pretokenize.hf_repo_id': pushing to {repo_id} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    log.info("pushed to https://huggingface.co/datasets/%s", repo_id)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pretokenize")
def main(cfg: DictConfig) -> None:
    try:
        with user_errors():
            pretokenize(validate_pretokenize(cfg, HydraConfig.get().overrides.task))
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
