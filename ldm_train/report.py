"""Rebuild a sweep's ablation report (ablation.md and figures) from its job folders.

    python -m ldm_train.report multirun/2026-11-26_12-00-00 [--wandb | --no-wandb]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_train.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (one sub-folder per job)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the tables, curves and figures to a wandb summary run (default: when the jobs "
                             "used wandb)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep.is_dir():
        print(f"error: {args.sweep} is not a folder; pass the multirun folder of a sweep", file=sys.stderr)
        return 2
    from ldm_train.evaluation.ablation import write_report
    from ldm_train.evaluation.sweep import upload_command

    out = write_report(args.sweep, wandb_summary=args.wandb)
    if out is None:
        print(f"error: {args.sweep} holds no job folder (<n>_<stage>_<name>/.hydra); pass the multirun folder "
              "of a sweep", file=sys.stderr)
        return 1
    print(out.read_text())
    command = upload_command(args.sweep)
    if command:
        print(f"offline wandb runs: upload the whole sweep with\n  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
