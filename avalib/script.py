"""What every script's main() shares: the preamble, and one-line errors instead of tracebacks.

    args = cli.parse_config(Args, argv, __doc__)
    if args.plan: return memory_plan.print_plan(args, objective, "train_x.py")   # no data, no weights
    dist = script.begin(args)            # process group (torchrun), device checks, CPU threads
    ... the script's own flag checks, --eval-only ...
    output_dir = script.output_directory(args)   # seed, OUTPUT_DIR, --resume's checkpoint
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from avalib import data, distributed, models


def begin(args) -> distributed.Distributed:
    """The process group under torchrun (a no-op in one process), flag checks that need to know the
    device (e.g. --bf16 on a CPU), and --threads: before anything is loaded."""
    dist = distributed.init_distributed()
    distributed.check_scale_flags(args, dist)
    if args.threads:
        torch.set_num_threads(args.threads)
    return dist


def output_directory(args) -> Path:
    """Seed torch (the same on every rank: identical fresh heads; DDP also broadcasts them), create
    OUTPUT_DIR and, with --resume, check that its checkpoint is there, before anything is loaded."""
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and not (output_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"--resume: no checkpoint at {output_dir / 'checkpoint.pt'}")
    return output_dir


def run_script(main) -> None:
    """`if __name__ == "__main__"` of every script: bad data, an unloadable model or a missing file end
    in one line naming it, not a traceback."""
    try:
        main()
    except (data.DataError, models.ModelLoadError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
