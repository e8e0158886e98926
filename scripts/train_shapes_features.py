"""Train the shapes feature network behind `fd_shapes` / `rfd_shapes` (about a minute on 2 CPU cores).

    python scripts/train_shapes_features.py [--out artifacts/features/shapes.safetensors] [--steps 400]

`stage=evaluate` (and the pipeline) trains it on first use at the default path; this script retrains it. Scores
are comparable only between runs that used the same weights file (evaluations record its sha256).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ldm_train.evaluation.features import train_shapes_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/features/shapes.safetensors"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = train_shapes_features(args.out, steps=args.steps, seed=args.seed)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
