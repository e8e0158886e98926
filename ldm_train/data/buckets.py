"""Aspect-ratio buckets: a set of (height, width) sizes of about equal area, and which one each image goes to.

Sizes are multiples of `multiple` (what the models need: f for stage 1, f·2^(levels−1) for stage 2, see
`ldm_train.config.size_multiple`) with area close to resolution² and aspect w/h within [min_aspect, max_aspect].
An image of size (H, W) goes to the bucket it loses least of when resized to cover the bucket and center-cropped:
kept fraction = min(a_b/a, a/a_b) for aspects a = W/H, a_b = w/h (ties: the smaller resize).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

Bucket = tuple[int, int]  # (height, width)


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
    return sorted(sizes, key=lambda b: (b[1] / b[0], b[0]))


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
