"""The shared activation cache: one LM pass on disk, read by every member of a sweep.

`python -m saesweep.cache [overrides]` builds it explicitly; training with
`activations.source=cache` (or `auto`) reads it, building it first if absent.

A cache lives in `<activations cache dir>/<key>/`, the key being a hash of everything
that determines the activations (see `activation_spec`), so runs with the same
activation spec share one cache and any difference gets a new one:

    lock                      flock'd by the one process that builds
    shard-00000.safetensors   one [tokens, d] tensor per hook point: token rows a:b
    ...
    manifest.json             written last, atomically: its presence means complete

Shards are written under a temp name and renamed, and carry a sha256 per tensor in
their metadata (copied into the manifest and checked on every read). A build killed
half-way leaves whole shards only; the next builder keeps them and goes on.
Readers never take the lock: they only read caches whose manifest exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from saesweep.activations.prefetch import Prefetcher
from saesweep.activations.source import ActivationSource, Columns, LiveFeed, token_filter
from saesweep.atomic import atomic_write, atomic_write_text
from saesweep.config.schema import TrainConfig, TrainingConfig
from saesweep.errors import UserError
from saesweep.lm.model import cache_root
from saesweep.training.distributed import SINGLE, Ranks

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or the meaning of a key field changes
# The cache's rows are the dataset's training rows shuffled with this fixed seed, not
# with training.seed: sweep members that differ only in their seed share one cache
# (each reads it in its own seeded order). It is the default training seed, so a run
# with that seed trains on the same tokens from the cache as it would live.
CACHE_ROW_SEED = TrainingConfig.seed
MANIFEST = "manifest.json"
LOCK = "lock"
READ_CHUNK_TOKENS = 4096


# --------------------------------------------------------------------------- keys


def cache_hooks(cfg: TrainConfig, group_hooks: Sequence[str] = ()) -> list[str]:
    """The hook points stored: the run's own, plus `activations.cache_hooks` and, for a grouped
    sweep, every member's hooks (`group_hooks`): one LM pass and one cache for all."""
    hooks = {cfg.model.hook_point, *cfg.activations.cache_hooks, *group_hooks}
    if cfg.model.hook_point_out is not None:
        hooks.add(cfg.model.hook_point_out)
    return sorted(hooks)


def tokens_per_row(cfg: TrainConfig, bos: int | None) -> int:
    """Activations a row yields: its positions in activations.seqpos_slice, less a leading BOS
    when exclude_bos (special tokens elsewhere in the row are not foreseen)."""
    positions = range(cfg.dataset.context_size)[slice(*cfg.activations.seqpos_slice)]
    drop = cfg.dataset.prepend_bos and cfg.activations.exclude_bos and bos is not None and 0 in positions
    return max(1, len(positions) - (1 if drop else 0))


def cache_token_rows(cfg: TrainConfig, rows: Any, bos: int | None) -> torch.Tensor:
    """The token rows a cache holds: enough for `activations.cache_tokens` (default: the
    run's total_tokens), at most one epoch of a finite dataset (readers cycle over it)."""
    wanted = cfg.activations.cache_tokens or cfg.training.total_tokens
    n_rows = math.ceil(wanted / tokens_per_row(cfg, bos))
    train_table = getattr(rows, "_train", None)  # None for a streamed dataset: length unknown
    if train_table is not None:
        n_rows = min(n_rows, len(train_table))
    ordered = dataclasses.replace(rows, seed=CACHE_ROW_SEED).train_iter(0)
    return torch.stack([row for _, row in zip(range(n_rows), ordered)])


def weights_fingerprint(model: Any, hooks: list[str]) -> str:
    """sha256 of the weights that can reach the hooks, plus the architecture config.

    Hashing tensors in memory (not files on disk) works the same for every way a
    model loads (embedded, local dir, hub) and sees what the backend made of
    them; layers after the last hook and the unembedding (and TransformerLens's final
    norm) are left out, as they cannot change the activations; hashing what is left is
    cheap next to one LM pass.
    """
    layers = [model.hook_layer(h) for h in hooks]
    last = None if None in layers else max(layers)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if last is not None:
            layer = model.hook_layer(name)  # parameters are named like hooks: blocks.N..., model.layers.N...
            if layer is not None and layer > last:
                continue
            if name.split(".")[0] in ("ln_final", "unembed", "lm_head"):
                continue
        if name.endswith(".mask"):  # the causal mask follows from n_ctx, hashed below
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(data)
    # Config values decide the computation too (rotary base, norm eps, ...); skip the
    # ones that describe where the model sits rather than what it computes.
    skip = {"device", "n_devices", "seed", "tokenizer_name", "n_params", "model_name"}
    arch = {}
    for key, value in sorted(model.cfg.to_dict().items()):
        if key in skip:
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()  # numpy scalars
        if value is None or isinstance(value, (bool, int, float, str)):
            arch[key] = value
    digest.update(json.dumps(arch, sort_keys=True).encode())
    return digest.hexdigest()


def lm_autocast(cfg: TrainConfig, model: Any) -> Any:
    """The autocast context training runs the LM under (the cache is built under it too, so
    that cached activations are the ones a live run trains on)."""
    device = torch.device(model.cfg.device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.autocast == "bf16")


def activation_dtype(cfg: TrainConfig, model: Any, hooks: list[str]) -> torch.dtype:
    """The dtype the LM emits at the hooks as training runs it: model.dtype, or what
    training.autocast makes of it there (a block's output under bf16 autocast, not the fp32
    residual sum). Shards store this dtype, so a bf16 LM's cache takes half the disk of an
    fp32 one; the buffer converts to the training dtype as it reads."""
    probe = torch.zeros((1, 2), dtype=torch.long)
    with lm_autocast(cfg, model):
        dtypes = [a.dtype for a in ActivationSource.for_hooks(model, hooks, False).hook_activations(probe)]
    widest = dtypes[0]
    for dtype in dtypes[1:]:
        widest = torch.promote_types(widest, dtype)
    return widest


def activation_spec(cfg: TrainConfig, model: Any, token_rows: torch.Tensor, hooks: list[str]) -> dict[str, Any]:
    """Everything that determines the cached activations, as plain JSON data.

    The token rows are hashed as well as described: the hash covers the dataset's
    content, the tokenizer, windowing, prepend_bos, the shuffle and the holdout split,
    so an edited local file or a new tokenizer gets a new cache even if no config
    value changed. The requested token count enters as the number of rows cached.
    """
    dataset = dataclasses.asdict(cfg.dataset)
    if not dataset["disable_concat_sequences"]:  # added later: caches built before it keep their key
        del dataset["disable_concat_sequences"]
    if cfg.dataset.streaming:
        dataset["stream_holdout_rows"] = cfg.eval.rows  # a stream's head is held out
    return {
        "format": CACHE_FORMAT,
        "model": {
            "name": cfg.model.name,
            "source": cfg.model.source,
            "backend": cfg.model.backend,
            "dtype": cfg.model.dtype,
            "from_pretrained_kwargs": dict(cfg.model.from_pretrained_kwargs),
            "weights_sha256": weights_fingerprint(model, hooks),
        },
        "hooks": list(hooks),
        "dataset": dataset,
        "rows": {
            "count": int(token_rows.shape[0]),
            "context_size": int(token_rows.shape[1]),
            "row_seed": CACHE_ROW_SEED,
            "tokens_sha256": hashlib.sha256(token_rows.contiguous().numpy().tobytes()).hexdigest(),
        },
        "exclude_bos": cfg.activations.exclude_bos,
        # Only when set: a cache built before these keys existed keeps its key.
        **({"exclude_special_tokens": True} if cfg.activations.exclude_special_tokens else {}),
        **(
            {"seqpos_slice": list(cfg.activations.seqpos_slice)}
            if slice(*cfg.activations.seqpos_slice) != slice(None)
            else {}
        ),
        # Autocast changes the values even where it leaves the dtype (an fp32 residual sums
        # bf16 block outputs); the stored dtype keeps fp32 and bf16 caches apart.
        "autocast": str(cfg.training.autocast),
        "store_dtype": str(activation_dtype(cfg, model, hooks)).removeprefix("torch."),
    }


def cache_key(spec: dict[str, Any]) -> str:
    """A stable hash of the spec: canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def activations_root(cfg: TrainConfig) -> Path:
    """`activations.cache_dir`, else `<cache_dir>/activations` (cache_dir: config, $SAESWEEP_CACHE_DIR, ~/.cache)."""
    if cfg.activations.cache_dir:
        return Path(cfg.activations.cache_dir).expanduser()
    return cache_root(cfg.cache_dir) / "activations"


# --------------------------------------------------------------------------- shards


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def corrupt(path: Path, cache_dir: Path, why: str) -> UserError:
    return UserError(
        f"activation cache shard {path} is corrupt ({why}); delete {cache_dir} "
        "(or rerun python -m saesweep.cache) to rebuild it"
    )


def read_shard(path: Path, hooks: list[str], cache_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shard's tensors for `hooks`, each checked against the sha256 in its metadata."""
    from safetensors import safe_open

    if not path.exists():
        raise corrupt(path, cache_dir, "file missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            info = {"rows": json.loads(meta["rows"]), "sha256": json.loads(meta["sha256"])}
            tensors = {h: f.get_tensor(h) for h in hooks}
    except UserError:
        raise
    except Exception as e:  # unparsable header, missing tensor or metadata: the file is damaged
        raise corrupt(path, cache_dir, f"unreadable: {type(e).__name__}") from None
    for hook, tensor in tensors.items():
        if tensor_sha256(tensor) != info["sha256"].get(hook):
            raise corrupt(path, cache_dir, f"checksum mismatch in {hook}")
    return tensors, info


def write_shard(path: Path, tensors: dict[str, torch.Tensor], rows: tuple[int, int]) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = {h: t.contiguous() for h, t in tensors.items()}
    sums = {h: tensor_sha256(t) for h, t in tensors.items()}
    meta = {"rows": json.dumps(list(rows)), "sha256": json.dumps(sums, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return {"file": path.name, "rows": list(rows), "tokens": len(next(iter(tensors.values()))), "sha256": sums}


# --------------------------------------------------------------------------- the cache


@dataclasses.dataclass
class ActivationCache:
    """A complete cache: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    def load_shard(self, index: int, hooks: list[str]) -> list[torch.Tensor]:
        entry = self.manifest["shards"][index]
        path = self.path / entry["file"]
        tensors, info = read_shard(path, hooks, self.path)
        # The shard checks itself; the manifest must agree too (a shard swapped in from
        # another build would pass its own checksum).
        for hook in hooks:
            if info["sha256"][hook] != entry["sha256"][hook] or len(tensors[hook]) != entry["tokens"]:
                raise corrupt(path, self.path, "does not match manifest.json")
        return [tensors[h] for h in hooks]

    def reader(
        self,
        hooks: list[str],
        seed: int,
        position: int = 0,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 0,
        pin: bool = False,
    ) -> "CacheReader":
        missing = [h for h in hooks if h not in self.manifest["hooks"]]
        if missing:
            raise UserError(f"activation cache {self.path} holds no {', '.join(missing)}")
        if self.tokens < world:
            raise UserError(
                f"activation cache {self.path} holds {self.tokens} tokens, fewer than the {world} "
                "data-parallel ranks; raise activations.cache_tokens"
            )
        return CacheReader(self, hooks, seed, position, rank, world, prefetch, pin)


def load_manifest(path: Path) -> ActivationCache | None:
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"activation cache manifest {manifest_path} is unreadable ({e}); delete {path} to rebuild it"
        ) from None
    return ActivationCache(path, manifest)


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, logging while it waits.

    The kernel drops a flock when its process dies, so a builder that was killed
    never blocks the next one. (On NFS, Linux maps flock onto POSIX locks.)
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting: another process is building the activation cache %s", path.parent)
            started = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("waited %.1f s for the activation cache build", time.perf_counter() - started)
        yield
    finally:
        os.close(fd)  # releases the lock


def finished_shards(path: Path, hooks: list[str]) -> list[dict[str, Any]]:
    """Shards a killed build left complete: a verified, contiguous prefix. The rest is removed.

    Called under the build lock, so nobody else is writing here.
    """
    for tmp in path.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    done: list[dict[str, Any]] = []
    next_row = 0
    for index in range(len(list(path.glob("shard-*.safetensors")))):
        shard = path / shard_name(index)
        try:
            tensors, info = read_shard(shard, hooks, path)
        except UserError as e:
            log.warning("discarding %s from the interrupted build: %s", shard.name, e)
            break
        if info["rows"][0] != next_row:
            break
        done.append(
            {"file": shard.name, "rows": info["rows"], "tokens": len(tensors[hooks[0]]), "sha256": info["sha256"]}
        )
        next_row = info["rows"][1]
    for stale in path.glob("shard-*.safetensors"):
        if stale.name not in {d["file"] for d in done}:
            stale.unlink()
    return done


def build_cache(
    path: Path,
    key: str,
    spec: dict[str, Any],
    model: Any,
    token_rows: torch.Tensor,
    source_filter: dict[str, Any],
    batch_rows: int,
    shard_mb: float,
    amp: Any = None,
) -> ActivationCache:
    """Run the LM over `token_rows` once and store every hook's activations. Hold the lock.

    `amp`: the autocast context the LM runs under (see lm_autocast); the shards hold
    spec["store_dtype"]."""
    hooks = spec["hooks"]
    source = ActivationSource.for_hooks(model, hooks, **source_filter)
    widths = source.widths()
    store = getattr(torch, spec["store_dtype"])
    bytes_per_row = tokens_for(token_rows[:1], source) * sum(widths) * torch.finfo(store).bits // 8
    # Whole LM batches per shard, so that a shard's content never depends on the layout.
    shard_rows = max(1, int(shard_mb * 2**20 / max(1, bytes_per_row)) // batch_rows) * batch_rows
    atomic_write_text(path / "spec.json", json.dumps(spec, indent=2, sort_keys=True, default=str) + "\n")

    done = finished_shards(path, hooks)
    start = done[-1]["rows"][1] if done else 0
    if done:
        log.info(
            "resuming the activation cache build %s from shard %d (%d of %d rows already done)",
            key,
            len(done),
            start,
            len(token_rows),
        )
    crash_after = int(os.environ.get("SAESWEEP_CACHE_CRASH_AFTER_SHARDS", 0))  # fault injection for tests
    written = 0
    started = time.perf_counter()
    from tqdm import tqdm

    progress = tqdm(total=len(token_rows), initial=start, desc="cache", unit="row", dynamic_ncols=True)
    while start < len(token_rows):
        end = min(len(token_rows), start + shard_rows)
        parts: list[list[torch.Tensor]] = [[] for _ in hooks]
        for a in range(start, end, batch_rows):
            batch = token_rows[a : min(a + batch_rows, end)]
            with amp if amp is not None else contextlib.nullcontext():
                acts = source.chunk(batch)
            for part, act in zip(parts, acts):
                part.append(act.to("cpu", store))
            progress.update(len(batch))
        tensors = {h: torch.cat(p) for h, p in zip(hooks, parts)}
        done.append(write_shard(path / shard_name(len(done)), tensors, (start, end)))
        start, written = end, written + 1
        if written == crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "spec": spec,
        "hooks": hooks,
        "widths": dict(zip(hooks, widths)),
        "dtype": spec["store_dtype"],
        "rows": len(token_rows),
        "tokens": sum(d["tokens"] for d in done),
        "shards": done,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1, default=str) + "\n")
    return ActivationCache(path, manifest)


def tokens_for(rows: torch.Tensor, source: ActivationSource) -> int:
    return int(source.token_mask(rows).sum())


def ensure_cache(
    cfg: TrainConfig, model: Any, rows: Any, build: bool = True, group_hooks: Sequence[str] = ()
) -> ActivationCache | None:
    """The complete cache for this config (and a group's hooks, see `cache_hooks`): found
    ("cache hit") or built here ("cache built").

    With build=False, returns None instead of building (or waiting for a builder).
    """
    hooks = cache_hooks(cfg, group_hooks)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    token_rows = cache_token_rows(cfg, rows, bos)
    spec = activation_spec(cfg, model, token_rows, hooks)
    key = cache_key(spec)
    path = activations_root(cfg) / key
    found = load_manifest(path)  # no lock: a manifest is only ever renamed in, complete
    if found is not None:
        log.info(
            "cache hit: activation cache %s (%d tokens, %d shards)", path, found.tokens, len(found.manifest["shards"])
        )
        return found
    if not build:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock_path = path / LOCK
        with open(lock_path, "a"):
            pass
    except OSError as e:
        raise UserError(
            f"activation cache dir {path.parent} is not writable ({e.strerror}); set activations.cache_dir, "
            "cache_dir or $SAESWEEP_CACHE_DIR to a writable directory"
        ) from None
    with build_lock(lock_path):
        found = load_manifest(path)  # built by another process while we waited
        if found is not None:
            log.info("cache hit: activation cache %s was built by another process", path)
            return found
        log.info(
            "building activation cache %s: %d rows x %d tokens, hooks %s",
            path,
            len(token_rows),
            token_rows.shape[1],
            ", ".join(hooks),
        )
        built = build_cache(
            path,
            key,
            spec,
            model,
            token_rows,
            token_filter(cfg.activations),
            cfg.activations.batch_rows,
            cfg.activations.shard_mb,
            lm_autocast(cfg, model),
        )
    log.info(
        "cache built: activation cache %s (%d tokens, %d shards, %.1f s)",
        path,
        built.tokens,
        len(built.manifest["shards"]),
        built.manifest["build_seconds"],
    )
    return built


# --------------------------------------------------------------------------- reading


def _seeded(*parts: int) -> torch.Generator:
    """A generator seeded from several integers, so each (seed, pass, shard) gets its own stream."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class CacheReader:
    """Endless chunks of cached activations in a seeded random order; `position` says how far.

    Each pass over the cache visits the shards in a fresh random order and each shard's
    tokens in a fresh random order; the ActivationBuffer then mixes tokens of several
    shards. The order is a pure function of (manifest, seed, position), so a checkpoint
    only needs the position to resume exactly.

    Data-parallel rank `rank` of `world` reads only its share: each pass's shards, in that
    pass's order, are dealt out to the ranks in turn, so a rank opens only its own files
    (with fewer shards than ranks, each shard is first split into interleaved parts). The
    shares of a pass are disjoint and hold every token once; a rank may get a shard more
    than another in a pass. `position` counts the rank's own tokens.

    With `prefetch` > 0 the shards are read, checked and cut into chunks on a background
    thread, up to that many chunks ahead (saesweep.activations.prefetch), into pinned
    memory with `pin`; the chunks, their order, the errors and `position` (tokens handed
    out, not read ahead) are those of the synchronous reader.
    """

    def __init__(
        self,
        cache: ActivationCache,
        hooks: list[str],
        seed: int,
        position: int = 0,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 0,
        pin: bool = False,
    ):
        self.cache = cache
        self.hooks = hooks
        self.seed = seed
        self.rank, self.world = rank, world
        self.position = position  # tokens handed out, over all passes
        self._chunks: Iterator[Columns] = self._generate(position)
        if prefetch > 0:
            self._chunks = Prefetcher(self._chunks, prefetch, pin, name=f"saesweep-cache-{cache.key[:8]}")

    def close(self) -> None:
        """Stop reading ahead (a no-op for a synchronous reader)."""
        if isinstance(self._chunks, Prefetcher):
            self._chunks.close()

    def __iter__(self) -> "CacheReader":
        return self

    def __next__(self) -> Columns:
        chunk = next(self._chunks)
        self.position += len(chunk[0])
        return chunk

    def share(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's part of a pass: (shard index, part, tokens) in reading order. A shard
        is split into `parts` interleaved parts only when there are fewer shards than ranks."""
        shards = self.cache.manifest["shards"]
        parts = -(-self.world // len(shards))
        order = torch.randperm(len(shards), generator=_seeded(self.seed, epoch)).tolist()
        mine = [(index, part) for index in order for part in range(parts)][self.rank :: self.world]
        return [(index, part, len(range(part, shards[index]["tokens"], parts))) for index, part in mine]

    def _generate(self, position: int) -> Iterator[Columns]:
        shards = self.cache.manifest["shards"]
        parts = -(-self.world // len(shards))
        epoch, offset = 0, position
        while True:
            share = self.share(epoch)
            if offset >= sum(n for _, _, n in share):  # a pass read before a resume
                offset -= sum(n for _, _, n in share)
                epoch += 1
                continue
            if epoch > 0 and offset == 0:
                log.info(
                    "activation cache %s: pass %d over its %d tokens", self.cache.key, epoch + 1, self.cache.tokens
                )
            for index, part, n in share:
                if offset >= n:
                    offset -= n
                    continue
                columns = self.cache.load_shard(index, self.hooks)
                perm = torch.randperm(shards[index]["tokens"], generator=_seeded(self.seed, epoch, index))[part::parts]
                for i in range(offset, n, READ_CHUNK_TOKENS):
                    take = perm[i : i + READ_CHUNK_TOKENS]
                    yield tuple(c[take] for c in columns)
                offset = 0
            epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"activation_cache": {"key": self.cache.key, "position": self.position}}

    @property
    def name(self) -> str:
        return f"cache:{self.cache.key}"


# --------------------------------------------------------------------------- training


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def open_training_feed(
    cfg: TrainConfig,
    model: Any,
    source: ActivationSource,
    rows: Any,
    checkpoint: dict[str, Any] | None,
    ranks: Ranks = SINGLE,
    group_hooks: Sequence[str] = (),
) -> LiveFeed | CacheReader:
    """Where training activations come from: a live LM pass or the shared cache.

    auto: a resumed run keeps the source it started with; otherwise a complete cache
    is used if there is one, a sweep member builds it (the others wait, then share
    it), and a single run without a cache trains live (building a cache for one run
    would cost the same LM pass plus the disk). `checkpoint` holds this rank's feed
    position; under DDP every rank takes rank 0's choice and reads its own share.
    `group_hooks`: every hook of a grouped sweep's members, so that the group builds and
    reads one cache holding them all (each subgroup's `source` reads its own columns).
    """
    choice = cfg.activations.source
    saved = checkpoint.get("activation_cache") if checkpoint else None
    if choice == "auto" and checkpoint is not None:
        choice = "cache" if saved else "live"
    for hook in cfg.activations.cache_hooks:
        from saesweep.lm.model import check_hook

        check_hook(model, hook, "activations.cache_hooks")
    cache = None
    if choice == "auto":
        cache = ensure_cache(cfg, model, rows, build=in_multirun(), group_hooks=group_hooks)
        choice = ranks.broadcast_object("cache" if cache is not None else "live")  # a cache may appear meanwhile
        log.info(
            "activations.source=auto: %s",
            "reading the cache" if choice == "cache" else "live LM pass (no cache yet, single run)",
        )
    if choice == "live":
        start = checkpoint["rows_consumed"] if checkpoint and "rows_consumed" in checkpoint else 0
        return LiveFeed(source, rows, cfg.activations.batch_rows, start, ranks.rank, ranks.world)
    cache = cache or ensure_cache(cfg, model, rows, group_hooks=group_hooks)
    position = 0
    if saved:
        position = saved["position"]
        if saved["key"] != cache.key:
            log.warning(
                "resuming from activation cache %s, but this config's cache is %s; the data order "
                "will differ from the interrupted run's",
                saved["key"],
                cache.key,
            )
    # Pinned memory only pays (and only exists) where the buffer copies to a GPU.
    pin = torch.device(model.cfg.device).type == "cuda" and torch.cuda.is_available()
    return cache.reader(
        source.hooks, cfg.training.seed, position, ranks.rank, ranks.world, cfg.activations.prefetch_chunks, pin
    )
