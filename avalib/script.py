"""What every script's main() shares: the preamble, and one-line errors instead of tracebacks.

    args, dist = script.start(Args, argv, __doc__, "train_x.py")   # flags checked; process group, device, threads
    if dist is None: return args.plan_printed                       # --plan: printed, no data, no weights
    ... the script's own flag checks, --eval-only ...
    output_dir = script.output_directory(args)   # seed, a writable OUTPUT_DIR, --resume's checkpoint, model flags
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

from avalib import checkpoint, cli, data, distributed, memory_plan, models


def start(cls, argv, description: str, name: str):
    """A script's first line: parse and check its flags (cli.parse_config), then either --plan (print the
    memory plan of its objective, loading no data and no weights: returns (args, None), the plan in
    args.plan_printed) or `begin`: (args, dist)."""
    args = cli.parse_config(cls, argv, description)
    if args.plan:
        args.plan_printed = memory_plan.print_plan(args, args.objective, name)
        return args, None
    return args, begin(args)


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
    OUTPUT_DIR and prove it writable, check --resume's checkpoint loads and the flags that depend on the
    model: all before anything is loaded, so that no bad flag or directory costs a training run."""
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"--output-dir {args.output_dir}: cannot write there ({error.strerror or error}); "
                         f"choose a directory you can write to, with room for checkpoints") from None
    checkpoint_path = output_dir / "checkpoint.pt"
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint.load(checkpoint_path, mmap=True)  # a damaged one is named now, not after the model has loaded
    check_model_flags(args)
    return output_dir


def model_layers(name_or_path: str) -> int | None:
    """The number of decoder layers in the model's config (config.json only, no weights), or None
    when it cannot be read here (a hub id offline, no such model: loading the model says why)."""
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(models.resolve_model_path(name_or_path)).num_hidden_layers)
    except Exception:  # whatever stops the config here stops the model load next, with its own message
        return None


def check_model_flags(args) -> None:
    """Flags whose range depends on the model: --trainable-layers at most its decoder layers."""
    layers = model_layers(args.model) if args.trainable_layers > 0 else None
    if layers is not None and args.trainable_layers > layers:
        raise SystemExit(f"--trainable-layers {args.trainable_layers}: {args.model} has {layers} decoder layers; "
                         f"use at most {layers}, or -1 to train them all")


ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR)


def run_script(main) -> None:
    """`if __name__ == "__main__"` of every script: bad data, an unloadable model, a missing file, or a
    disk that is full or not writable end in one line naming it, not a traceback."""
    try:
        main()
    except (data.DataError, models.ModelLoadError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise  # a bug, not the environment: its traceback is wanted
        sys.exit(f"error: {error}")
