"""WebDataset shards: one stream per (rank, worker) reader, a fixed number of samples per reader and epoch.

Splitting rule. The shard list (brace patterns, local paths and `pipe:` URLs, expanded by webdataset) is shuffled
identically on every rank with seed (data.seed, epoch) when `shardshuffle` is on, then split with webdataset's
`split_by_node` (rank) and `split_by_worker` (DataLoader worker): reader k of R = world_size × num_workers reads
shards k, k+R, k+2R, … Every reader delivers exactly `epoch_size // R` samples per epoch: a reader whose shards run
out starts them again, one with more stops early. So every rank yields the same number of batches (no hang at
epoch end), and each sample is read exactly once per epoch when every reader's shards hold the same number of
samples (shards of equal size, a shard count divisible by R). Otherwise a warning gives the numbers; fewer shards
than readers is an error.

Aspect buckets (`n_buckets` > 0 and a `batch_size`, set by make_loader): each reader passes its samples through
per-bucket buffers (`stream_bucket_batches`) and delivers them as runs of `batch_size` consecutive samples of one
bucket, which the DataLoader collates into one batch. Every reader delivers exactly N = `stream_batches(epoch_size
// R, B, K)` runs per epoch, the number its share fills whatever the mix of aspects (webdataset's `with_epoch`: a
fixed number of batches), so every rank still yields the same number of batches. The rest of its share (at most
K·(B − 1) samples: still buffered or not read) is left over this epoch and counted as `bucket_leftover`.
"""

from __future__ import annotations

import json
import logging
import tarfile
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from ldm_train.data.buckets import Bucket, nearest_bucket, stream_batches, stream_bucket_batches
from ldm_train.data.images import (
    COUNT_KEYS,
    COUNTS_KEY,
    DEFAULT_MAX_PIXELS,
    NAMES_KEY,
    CaptionLimit,
    Counts,
    SkipSample,
    decode_caption,
    open_image,
    size_condition,
    to_tensor,
)
from ldm_train.errors import UserError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class BucketBatchError(UserError, ValueError):
    """A reader's share of the epoch is too small to be sure of one whole batch of one aspect bucket."""


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns and `::`-joined lists → shard URLs (webdataset's own expansion)."""
    out = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not out:
        raise ValueError(f"data.urls={urls!r} names no shards")
    return out


def local_path(url: str) -> Path | None:
    """The file of a local shard URL; None for `pipe:` and remote URLs."""
    path = url.removeprefix("file:")
    return None if ":" in path.split("/")[0] else Path(path)


def count_samples(url: str) -> int | None:
    """Samples (distinct keys) in a local tar shard, from its headers; None for `pipe:` and remote URLs."""
    path = local_path(url)
    if path is None:
        return None
    with tarfile.open(path) as tar:
        keys = {wds.tariterators.base_plus_ext(m.name)[0] for m in tar if m.isreg()}
    return len(keys - {None})


def reader_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) as webdataset's splitters see them (RANK/WORLD_SIZE env first)."""
    return wds.utils.pytorch_worker_info()


class ShardStream(IterableDataset):
    """Samples of webdataset shards decoded by `decode(sample, counts) -> item` (SkipSample drops one)."""

    def __init__(self, urls: str | list[str], decode: Callable[[dict, Counts], dict], *,
                 epoch_size: int | None = None, shardshuffle: bool = True, shuffle_buffer: int = 1000,
                 seed: int = 0, n_buckets: int = 0):
        super().__init__()
        self.urls = expand_urls(urls)
        missing = [u for u in self.urls if (p := local_path(u)) is not None and not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shards in {urls!r} do not exist (first: "
                                    f"{missing[0]}); check data.urls / data.val_urls")
        self.decode = decode
        self.shardshuffle, self.shuffle_buffer, self.seed = bool(shardshuffle), int(shuffle_buffer), int(seed)
        self.shard_sizes = None
        if epoch_size is None:
            sizes = [count_samples(u) for u in self.urls]
            if any(s is None for s in sizes):
                raise ValueError(f"cannot count the samples of {self.urls[0]!r} (not a local file): set "
                                 "data.epoch_size=<samples per epoch over all ranks>")
            self.shard_sizes, epoch_size = sizes, sum(sizes)
        self.epoch_size = int(epoch_size)
        self.num_workers = 0  # set by make_loader; only __len__ needs it, readers ask the DataLoader
        self.n_buckets = int(n_buckets)  # > 0: aspect buckets, batched by bucket once batch_size is known
        self.batch_size: int | None = None  # set by make_loader (None: one sample at a time, nothing left over)
        # shared memory, so persistent DataLoader workers see the epoch the main process sets
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def readers(self, world_size: int, num_workers: int) -> int:
        """Number of readers R; raises when some reader would get no shard."""
        r = world_size * max(1, num_workers)
        if len(self.urls) < r:
            raise ValueError(f"{len(self.urls)} shards for {world_size} rank(s) × {max(1, num_workers)} worker(s) = "
                             f"{r} readers: every reader needs a shard. Write more, smaller shards "
                             "(make_shards --shard-size) or lower data.num_workers")
        return r

    def per_reader(self, world_size: int, num_workers: int) -> int:
        n = self.epoch_size // self.readers(world_size, num_workers)
        if n < 1:
            raise ValueError(f"data.epoch_size={self.epoch_size} is smaller than the number of readers")
        return n

    @property
    def bucketed(self) -> bool:
        return self.n_buckets > 0 and bool(self.batch_size)

    def bucket_batches(self, world_size: int, num_workers: int) -> int:
        """Batches of one bucket each reader delivers per epoch (module docstring); raises when none."""
        n = self.per_reader(world_size, num_workers)
        batches = stream_batches(n, self.batch_size, self.n_buckets)
        if batches < 1:
            readers = self.readers(world_size, num_workers)
            raise BucketBatchError(
                f"aspect buckets on a stream: each of the {readers} readers gets {n} samples per epoch, too few to be "
                f"sure of one whole batch of {self.batch_size} over {self.n_buckets} buckets (that needs at least "
                f"{self.n_buckets} x {self.batch_size - 1} + 1). Add samples (data.epoch_size), lower the batch size "
                "or data.num_workers, or set data.aspect_buckets=false")
        return batches

    def check_split(self, world_size: int, num_workers: int) -> str | None:
        """A warning text when the split cannot read every sample exactly once per epoch (None when it can)."""
        r = self.readers(world_size, num_workers)
        if self.shard_sizes is None:
            return None if len(self.urls) % r == 0 else (
                f"{len(self.urls)} shards do not divide over {r} readers: some samples are read twice per epoch "
                "and others not at all")
        held = [sum(self.shard_sizes[k::r]) for k in range(r)]
        if len(set(held)) == 1:
            return None
        return (f"{len(self.urls)} shards over {r} readers ({world_size} rank(s) × {max(1, num_workers)} worker(s)) "
                f"give them {min(held)}..{max(held)} samples; each reads {self.per_reader(world_size, num_workers)} "
                "per epoch, so some samples repeat and others wait for a later epoch. For exactly once per epoch "
                "use equal-size shards and a shard count divisible by the readers")

    def __len__(self) -> int:
        """Samples this rank delivers per epoch."""
        _, world, _, _ = reader_info()
        if self.bucketed:
            return self.bucket_batches(world, self.num_workers) * self.batch_size * max(1, self.num_workers)
        return self.per_reader(world, self.num_workers) * max(1, self.num_workers)

    def _pipeline(self, epoch: int, reader: int) -> wds.DataPipeline:
        seed = self.seed * 1_000_003 + epoch if self.shardshuffle else None  # same shard order on every rank
        stages = [wds.SimpleShardList(self.urls, seed=seed), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(handler=self._tar_error)]
        if self.shuffle_buffer > 1:  # a seeded buffer per reader and epoch: runs repeat exactly
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      seed=hash((self.seed, epoch, reader))))
        return wds.DataPipeline(*stages)

    def _tar_error(self, exn: Exception) -> bool:
        self._counts.add("unreadable_shard")
        warnings.warn(f"skipping unreadable shard data: {exn}", stacklevel=2)
        return True  # keep going with the next member / shard

    def _decoded(self, epoch: int, reader: int) -> Iterator[dict]:
        for sample in self._pipeline(epoch, reader):
            try:
                item = self.decode(sample, self._counts)
            except SkipSample as err:
                self._counts.add(err.reason, name=f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")
                continue
            item["key"] = sample["__key__"]
            item[COUNTS_KEY] = self._counts.take()
            item[NAMES_KEY] = self._counts.take_names()
            yield item

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = reader_info()
        if rank == 0 and worker == 0 and (msg := self.check_split(world, workers)):
            warnings.warn(msg, stacklevel=2)
        n, epoch = self.per_reader(world, workers), int(self.epoch)
        self._counts = Counts()

        def forever() -> Iterator[dict]:
            while True:  # a reader whose shards run out starts them again (equal samples on every reader)
                got = 0
                for item in self._decoded(epoch, rank * max(1, workers) + worker):
                    got += 1
                    yield item
                if got == 0:
                    raise RuntimeError(f"reader {worker} of rank {rank} found no readable sample in its shards of "
                                       f"{self.urls[0]}…; check the shards (skips: {self._counts.pending.tolist()})")

        if not self.bucketed:
            yield from islice(forever(), n)
            return
        runs, size = self.bucket_batches(world, workers), self.batch_size
        for k, batch in enumerate(stream_bucket_batches(islice(forever(), n), size, runs)):
            if k == runs - 1:  # the epoch's last batch carries the count of this reader's unused samples
                batch[-1][COUNTS_KEY][COUNT_KEYS.index("bucket_leftover")] += n - runs * size
            yield from batch


# ---------------------------------------------------------------------------------------------- image shards

class ImageSampleDecoder:
    """A shard sample {jpg|jpeg|png|webp, txt|json} → {"image", "caption", "label"} (picklable for workers)."""

    def __init__(self, resolution: int, random_crop: bool = False, flip: bool = False,
                 caption_key: str = "txt", json_field: str = "caption", max_pixels: int = DEFAULT_MAX_PIXELS,
                 caption_limit: CaptionLimit | None = None, buckets: list[Bucket] | None = None):
        if caption_key not in ("txt", "json"):
            raise ValueError(f"data.caption_key={caption_key!r}; valid: txt, json (with data.json_field)")
        self.resolution, self.random_crop, self.flip = resolution, random_crop, flip
        self.caption_key, self.json_field = caption_key, json_field
        self.max_pixels, self.caption_limit = max_pixels, caption_limit
        self.buckets = list(buckets) if buckets else None

    def caption_bytes(self, sample: dict) -> bytes | str | None:
        if self.caption_key == "txt":
            return sample.get("txt")
        raw = sample.get("json")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        value = value.get(self.json_field) if isinstance(value, dict) else None
        return value if isinstance(value, str) else None

    def __call__(self, sample: dict, counts: Counts) -> dict:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise SkipSample("no_image", f"keys {sorted(k for k in sample if not k.startswith('__'))}")
        img = open_image(data, self.max_pixels, counts)
        size = self.buckets[nearest_bucket(img.height, img.width, self.buckets)] if self.buckets else None
        crop: list[int] = []
        image = to_tensor(img, self.resolution, self.random_crop, self.flip, counts, size=size, crop=crop)
        label = sample.get("cls")
        return {"image": image, "caption": decode_caption(self.caption_bytes(sample), counts, self.caption_limit),
                "label": int(label) if label is not None and label.strip().isdigit() else 0,
                "size_cond": size_condition(img, crop, image)}


def image_streams(cfg, caption_limit: CaptionLimit | None = None,
                  buckets: list[Bucket] | None = None) -> tuple[ShardStream, ShardStream]:
    """(train, val) streams for `data=webdataset`; val is unaugmented, unshuffled and square (like the folder's)."""
    common = dict(caption_key=cfg.caption_key, json_field=cfg.json_field, max_pixels=cfg.max_image_pixels,
                  caption_limit=caption_limit)
    decode = ImageSampleDecoder(cfg.resolution, cfg.random_crop, cfg.flip, buckets=buckets, **common)
    train = ShardStream(cfg.urls, decode, epoch_size=cfg.epoch_size, shardshuffle=cfg.shardshuffle,
                        shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, n_buckets=len(buckets or ()))
    if not cfg.val_urls:
        log.warning("data.val_urls is not set: validation reads the training shards")
    val = ShardStream(cfg.val_urls or cfg.urls, ImageSampleDecoder(cfg.resolution, **common),
                      epoch_size=cfg.val_size, shardshuffle=False, shuffle_buffer=0, seed=cfg.seed)
    return train, val
