"""Write <sweep dir>/ablation.md and its plots from the jobs' metrics.json (also run by a Hydra callback).

    python scripts/ablation_report.py multirun/2026-11-26_12-00-00 [--wandb | --no-wandb]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm_train.evaluation.ablation import write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (its job folders hold metrics.json)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the table and plots to a wandb summary run (default: when the jobs used wandb)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep.is_dir():
        print(f"error: {args.sweep} is not a folder; pass the multirun folder of a sweep", file=sys.stderr)
        return 2
    out = write_report(args.sweep, wandb_summary=args.wandb)
    if out is None:
        print(f"error: no job folder in {args.sweep} holds metrics.json", file=sys.stderr)
        return 1
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
