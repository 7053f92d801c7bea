"""`python -m saesweep.cache [overrides]`: build the shared activation cache ahead of time.

Takes the training config (conf/train.yaml and its groups) and builds exactly the cache
a run with the same overrides would read with `activations.source=cache` (see
saesweep.activations.cache), then prints where it is and what it holds.
"""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig

from saesweep.cli import run, user_errors
from saesweep.config import CONF_DIR
from saesweep.config.schema import validate  # also gives Hydra the schema conf/train.yaml extends


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: Any) -> None:
    from saesweep.activations.cache import ensure_cache
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import check_hook, load_model_checked
    from saesweep.training.allocator import keep_freed_memory
    from saesweep.training.distributed import resolve_device

    with user_errors():  # one line, and no job end for the sweep report to record
        typed = validate(cfg, HydraConfig.get().overrides.task)
        keep_freed_memory()
        model = load_model_checked(typed, resolve_device(typed.training.device, "training.device"))
        for hook in typed.activations.cache_hooks:
            check_hook(model, hook, "activations.cache_hooks")
        rows = load_token_rows(typed.dataset, model.tokenizer, typed.eval.rows, typed.training.seed)
        cache = ensure_cache(typed, model, rows)
    print(f"cache dir: {cache.path}")
    print(f"key: {cache.key}")
    print(
        f"tokens: {cache.tokens} in {len(cache.manifest['shards'])} shards; hooks: {', '.join(cache.manifest['hooks'])}"
    )


def cli() -> None:
    run(main)  # a UserError or a bad override: one line, exit 2


if __name__ == "__main__":
    cli()
