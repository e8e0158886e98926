"""Write WebDataset shards from an image folder (images + same-name .txt) or from the shapes dataset.

    python -m ldm_train.data.make_shards --folder photos/ --out shards/ [--shard-size 1000] [--val-fraction 0.1]
    python -m ldm_train.data.make_shards --shapes 50000 --resolution 64 --out shards/

Folder images are checked with the training decoder (bad ones are skipped and counted by reason) and stored as
their original bytes (no re-encoding). Writes `<out>/train-%06d.tar` (and `val-%06d.tar`) through a temporary
folder, so an interrupted run leaves no half-written shards, and prints a count summary and the data.urls to use.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm_train.data.folder import DEFAULT_EXTENSIONS
from ldm_train.data.images import (
    DEFAULT_MAX_PIXELS,
    Counts,
    SkipSample,
    decode_caption,
    open_image,
    parse_names,
    summarize,
)
from ldm_train.utils.io import atomic_write_dir

_EXT = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def folder_samples(root: Path, counts: Counts, max_pixels: int = DEFAULT_MAX_PIXELS,
                   indices: list[int] | None = None) -> Iterator[dict]:
    """Readable images under `root` (sorted; only those at `indices` when given), as shard samples; unreadable ones
    are counted and skipped."""
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in DEFAULT_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(DEFAULT_EXTENSIONS)}) found below '{root}'")
    chosen = [(i, files[i]) for i in (range(len(files)) if indices is None else sorted(indices))]
    for i, path in tqdm(chosen, desc=f"checking {root}", unit="img"):
        data = path.read_bytes()
        try:
            open_image(data, max_pixels, counts)
        except SkipSample as err:
            counts.add(err.reason, name=str(path))
            continue
        ext = _EXT.get(path.suffix.lower())
        if ext is None:  # e.g. .bmp: not a shard image type, so re-encode losslessly
            buf = io.BytesIO()
            open_image(data, max_pixels).save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        txt = path.with_suffix(".txt")
        caption = decode_caption(txt.read_bytes() if txt.is_file() else None, counts)
        counts.add("samples")
        # keys must not contain dots (webdataset splits a member name at its first dot)
        yield {"__key__": f"{i:09d}", ext: data, "txt": caption,
               "json": {"path": path.relative_to(root).as_posix(), "caption": caption}}


def folder_split(root: Path, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of the sorted image files under `root`: a seeded random `val_fraction` held out, at
    least one image (none when val_fraction is 0), as `data=folder` holds out its validation split."""
    from ldm_train.data import folder_val_size

    n = sum(1 for p in root.rglob("*") if p.suffix.lower() in DEFAULT_EXTENSIONS and p.is_file())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = folder_val_size(n, val_fraction) if val_fraction > 0 else 0
    return order[n_val:], order[:n_val]


def shapes_samples(n: int, resolution: int, split: str, seed: int, counts: Counts) -> Iterator[dict]:
    from ldm_train.data.shapes import ShapesDataset

    ds = ShapesDataset(resolution, n, split, seed)
    for i in tqdm(range(n), desc=f"rendering shapes ({split})", unit="img"):
        item = ds[i]
        arr = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        counts.add("samples")
        yield {"__key__": f"{split}{i:09d}", "png": buf.getvalue(), "txt": item["caption"], "cls": str(item["label"])}


def write_shards(samples: Iterator[dict], pattern: str, shard_size: int) -> int:
    n = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
    return n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="images (recursive) with optional same-name .txt captions")
    src.add_argument("--shapes", type=int, metavar="N", help="render N training images of the shapes dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--resolution", type=int, default=64, help="--shapes only")
    p.add_argument("--val", type=int, default=0, help="--shapes: also N validation images")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="--folder: hold out this seeded random fraction (at least one image) as val-*.tar for "
                        "data.val_urls, as data=folder holds out data.val_fraction; 0 (default): none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = p.parse_args(argv)
    counts = Counts()
    written: dict[str, int] = {}

    def write(tmp: Path) -> None:
        if args.folder is not None:
            train, val = folder_split(args.folder, args.val_fraction, args.seed)
            written["train"] = write_shards(folder_samples(args.folder, counts, args.max_pixels, train),
                                            str(tmp / "train-%06d.tar"), args.shard_size)
            if val:
                written["val"] = write_shards(folder_samples(args.folder, counts, args.max_pixels, val),
                                              str(tmp / "val-%06d.tar"), args.shard_size)
        else:
            written["train"] = write_shards(shapes_samples(args.shapes, args.resolution, "train", args.seed, counts),
                                            str(tmp / "train-%06d.tar"), args.shard_size)
            if args.val:
                written["val"] = write_shards(shapes_samples(args.val, args.resolution, "val", args.seed, counts),
                                              str(tmp / "val-%06d.tar"), args.shard_size)

    atomic_write_dir(args.out, write)
    summary = summarize(counts.pending)
    summary.pop("samples")
    print(f"wrote {sum(written.values())} samples to {args.out}: {written}; "
          f"bad inputs (skipped or converted): {summary or 'none'}")
    for reason, name in parse_names(counts.take_names()):
        print(f"  skipped ({reason}): {name}")
    for split in written:
        shards = sorted(args.out.glob(f"{split}-*.tar"))
        key = "data.urls" if split == "train" else "data.val_urls"
        pattern = f"{args.out.resolve()}/{split}-{{000000..{len(shards) - 1:06d}}}.tar"
        print(f"  {len(shards)} {split} shard(s): '{key}=\"{pattern}\"'")  # Hydra needs braces quoted
    return {"written": written, "bad": summary}


if __name__ == "__main__":
    main()
