"""Image-folder dataset: images found recursively, captions from same-name .txt files; bad files counted, skipped."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ldm_train.data.buckets import Bucket, image_size, nearest_bucket
from ldm_train.data.images import (
    COUNTS_KEY,
    DEFAULT_MAX_PIXELS,
    NAMES_KEY,
    CaptionLimit,
    Counts,
    SkipSample,
    decode_caption,
    open_image,
    size_condition,
    to_rgb,
    to_tensor,
)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_to_rgb = to_rgb  # the old private name


def list_images(root: Path, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Image files below `root` (recursive), sorted by relative POSIX path: the same order on every machine."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


class ImageFolderDataset(Dataset):
    """Images under `root` (recursive, sorted) resized and cropped to a square `resolution`, or with `buckets`
    to the (h, w) bucket nearest each image's aspect (`bucket_of[i]`, from the file headers; an unreadable header
    goes to the square bucket and is skipped, and counted, when loaded).

    An unreadable file is skipped: the item is served from the next readable file instead, and the skip is
    counted (by reason) in the item's `data_counts` vector, so batch shapes never change.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 256,
        random_crop: bool = False,
        flip: bool = False,
        extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        caption_limit: CaptionLimit | None = None,
        buckets: list[Bucket] | None = None,
    ):
        self.root = Path(root)
        self.resolution, self.random_crop, self.flip = resolution, random_crop, flip
        self.max_pixels, self.caption_limit = max_pixels, caption_limit
        self.extensions = tuple(e.lower() for e in extensions)
        expected = (
            f"expected image files ({', '.join(self.extensions)}) anywhere below it, each "
            "optionally with a same-name .txt caption file (e.g. cat.jpg + cat.txt)"
        )
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist; {expected}")
        self.files = list_images(self.root, self.extensions)
        if not self.files:
            raise FileNotFoundError(f"no images found in folder '{self.root}'; {expected}")
        self.buckets = list(buckets) if buckets else None
        if self.buckets:
            square = nearest_bucket(resolution, resolution, self.buckets)  # a listed set may lack the square
            sizes = [image_size(p) for p in self.files]
            self.bucket_of = [square if s is None else nearest_bucket(*s, self.buckets) for s in sizes]

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int, counts: Counts | None = None) -> str:
        """Return the caption of image `index` ("" when it has no .txt file)."""
        txt = self.files[index].with_suffix(".txt")
        return decode_caption(txt.read_bytes() if txt.is_file() else None, counts, self.caption_limit)

    def load_image(self, index: int, counts: Counts | None = None) -> Image.Image:
        """Open image `index` as upright RGB; raises SkipSample (a reason and the file) if unreadable."""
        try:
            return open_image(self.files[index], self.max_pixels, counts)
        except SkipSample as err:
            err.args = (f"{err.args[0]} ('{self.files[index]}')",)
            raise

    def __getitem__(self, index: int) -> dict:
        """Item `index`; an unreadable file is counted here, at its own index only, and replaced by the next
        readable file (the files passed over on the way are counted when their own index is read, so each bad file
        counts once per epoch)."""
        counts = Counts()
        first_error = None
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                img = self.load_image(i, counts)
                break
            except SkipSample as err:
                if offset == 0:
                    counts.add(err.reason, name=str(self.files[i]))
                first_error = first_error or err
        else:
            raise ValueError(f"no readable image in '{self.root}' (first failure: {first_error}); "
                             "remove or replace the broken files")
        size = self.buckets[self.bucket_of[index]] if self.buckets else None  # the requested item's bucket
        crop: list[int] = []
        image = to_tensor(img, self.resolution, self.random_crop, self.flip, counts, size=size, crop=crop)
        caption = self.caption(i, counts)
        return {"image": image, "caption": caption, "label": 0, COUNTS_KEY: counts.take(),
                NAMES_KEY: counts.take_names(), "size_cond": size_condition(img, crop, image)}
