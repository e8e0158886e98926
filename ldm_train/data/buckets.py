"""Aspect-ratio buckets: a set of (height, width) sizes of about equal area, and which one each image goes to.

Sizes are multiples of `multiple` (what the models need: f for stage 1, f·2^(levels−1) for stage 2, see
`ldm_train.config.size_multiple`) with area close to resolution² and aspect w/h within [min_aspect, max_aspect];
`data.buckets` lists them instead (when the multiple is coarse against a small resolution the generated set can be
the square alone, which the start-up check refuses). An image of size (H, W) goes to the bucket it loses least of
when resized to cover the bucket and center-cropped: kept fraction = min(a_b/a, a/a_b) for aspects a = W/H,
a_b = w/h (ties: the smaller resize).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

Bucket = tuple[int, int]  # (height, width)


def by_aspect(buckets: Iterable[Bucket]) -> list[Bucket]:
    """Buckets sorted by aspect w/h (then height): the order of every bucket set."""
    return sorted(buckets, key=lambda b: (b[1] / b[0], b[0]))


def make_buckets(resolution: int, multiple: int, aspect_range: Sequence[float] = (0.5, 2.0)) -> list[Bucket]:
    """(h, w) sizes, sorted by aspect w/h: for every width w = k·multiple ≥ resolution, h = the multiple nearest
    resolution²/w, and its transpose (w, h); each kept when its aspect w/h lies in aspect_range. Always holds
    (resolution, resolution)."""
    lo, hi = float(aspect_range[0]), float(aspect_range[1])
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"data.bucket_aspect_range={list(aspect_range)} must satisfy 0 < min ≤ 1 ≤ max (aspect = "
                         "width/height), e.g. [0.5, 2.0]")
    if resolution % multiple:
        raise ValueError(f"data.resolution={resolution} is not a multiple of {multiple}")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(resolution, int(resolution * math.sqrt(max(hi, 1 / lo))) + 2 * multiple, multiple):
        h = max(multiple, round(area / w / multiple) * multiple)
        sizes.update(s for s in ((h, w), (w, h)) if lo - 1e-9 <= s[1] / s[0] <= hi + 1e-9)
    return by_aspect(sizes)


def listed_buckets(sizes: Iterable[Sequence[int]], multiple: int) -> list[Bucket]:
    """The user's own bucket set (`data.buckets: [[h, w], ...]`), sorted by aspect w/h like `make_buckets`'; every
    side must be a positive multiple of `multiple`."""
    buckets = by_aspect({(int(h), int(w)) for h, w in sizes})
    bad = [f"{h}x{w}" for h, w in buckets if h <= 0 or w <= 0 or h % multiple or w % multiple]
    if bad:
        raise ValueError(f"data.buckets: {', '.join(bad)} (h×w) have sides that are not multiples of {multiple}")
    return buckets


def suggested_buckets(resolution: int, multiple: int, aspect_range: Sequence[float]) -> list[Bucket]:
    """For a bucket set that came out square only: the square and the next sides up, (r, r + m) and (r + m, r),
    where their aspect fits — larger than resolution² in area, the nearest non-square sizes there are."""
    r, m = resolution, multiple
    lo, hi = float(aspect_range[0]), float(aspect_range[1])
    return [(r, r)] + [s for s in ((r, r + m), (r + m, r)) if lo <= s[1] / s[0] <= hi]


def kept_fraction(height: int, width: int, bucket: Bucket) -> float:
    """The fraction of the image that survives a cover-resize and crop to `bucket`: min(a_b/a, a/a_b)."""
    a, a_b = width / height, bucket[1] / bucket[0]
    return min(a_b / a, a / a_b)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket that crops least of an (height, width) image; ties go to the smaller resize."""
    def cost(i: int) -> tuple[float, float]:
        h, w = buckets[i]
        return (-round(kept_fraction(height, width, buckets[i]), 9), abs(math.log(max(h / height, w / width))))

    return min(range(len(buckets)), key=cost)


def histogram(assigned: Iterable[int], buckets: Sequence[Bucket]) -> dict[str, int]:
    """{"HxW": images} over all buckets (empty ones included), in bucket order."""
    n = Counter(assigned)
    return {f"{h}x{w}": n.get(i, 0) for i, (h, w) in enumerate(buckets)}


def image_size(path) -> tuple[int, int] | None:
    """(height, width) of an image file as `open_image` will orient it (EXIF rotations swap the sides), read from
    its header only; None when the header cannot be read (the file is skipped, and counted, when it is loaded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            swap = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation: transposed or rotated by 90°
    except Exception:  # any header failure: the loader reports the reason
        return None
    return (w, h) if swap else (h, w)


def dataset_buckets(dataset) -> tuple[list[int], list[Bucket]] | None:
    """(bucket index of each item, bucket sizes) of a bucketed dataset or a Subset of one; None otherwise."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = dataset_buckets(dataset.dataset)
        return None if inner is None else ([inner[0][i] for i in dataset.indices], inner[1])
    if getattr(dataset, "buckets", None):
        return list(dataset.bucket_of), list(dataset.buckets)
    return None


def bucket_batches(bucket_of: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: a permutation seeded by (seed, epoch), grouped by bucket in that order, cut into
    batches of `batch_size` (each bucket's incomplete last batch is left out this epoch), the batches shuffled."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    groups: dict[int, list[int]] = {}
    for i in torch.randperm(len(bucket_of), generator=g).tolist():
        groups.setdefault(bucket_of[i], []).append(i)
    batches = [idx[k:k + batch_size] for _, idx in sorted(groups.items())
               for k in range(0, len(idx) - batch_size + 1, batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def batches_per_rank(bucket_of: Sequence[int], batch_size: int, world_size: int) -> int:
    """Batches every rank gets per epoch: ⌊(Σ_b ⌊n_b / B⌋) / W⌋ (the same on every rank and every epoch)."""
    return sum(n // batch_size for n in Counter(bucket_of).values()) // world_size


# ---------------------------------------------------------------------------------------------- streams

def item_bucket(item: dict) -> tuple[int, ...]:
    """The bucket of a decoded item, as a stream groups it: the shape of its `latent` (a latent cache) or `image`
    (the decoder has already resized and cropped it to its nearest bucket)."""
    return tuple((item["latent"] if "latent" in item else item["image"]).shape)


def stream_batches(samples: int, batch_size: int, n_buckets: int) -> int:
    """Whole batches a reader of `samples` samples fills whatever their mix over `n_buckets` buckets:
    N = max(0, ⌈(S − K·(B − 1)) / B⌉), since Σ_b ⌊n_b / B⌋ = (S − Σ_b r_b) / B with every remainder r_b ≤ B − 1."""
    return max(0, -(-(samples - n_buckets * (batch_size - 1)) // batch_size))


def stream_bucket_batches(items: Iterable[dict], batch_size: int, limit: int | None = None) -> Iterator[list[dict]]:
    """Per-bucket buffers over a stream (a stream cannot be sorted): each item joins its bucket's buffer
    (`item_bucket`); a buffer that reaches `batch_size` items is released as one batch, so at most B − 1 items wait
    per bucket. With `limit`, stops after that many batches (what is still buffered, or unread, is left over);
    without, the partial buffers are released at the end, buckets in the order they first appeared."""
    buffers: dict[tuple[int, ...], list[dict]] = {}
    done = 0
    if limit is not None and limit <= 0:
        return
    for item in items:
        buf = buffers.setdefault(item_bucket(item), [])
        buf.append(item)
        if len(buf) == batch_size:
            yield buf[:]
            buf.clear()
            done += 1
            if limit is not None and done >= limit:
                return
    if limit is None:
        yield from (buf for buf in buffers.values() if buf)
