"""What every script's main() shares: the preamble, and one-line errors instead of tracebacks.

    args, dist = script.start(Args, argv, __doc__, "train_x.py")   # flags checked; process group, device, threads
    args, dist = script.prepare(Args(...), "train_x.py")            # the same for a config built in code
    if dist is None: return args.plan_printed                       # --plan: printed, no data, no weights
    ... the script's own flag checks, --eval-only ...
    output_dir = script.output_directory(args)   # seed, a writable OUTPUT_DIR, --resume's checkpoint and flags, model
    flags
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

from avalib import checkpoint, cli, data, distributed, memory_plan, metrics, models


def start(cls, argv, description: str, name: str):
    """A script's first line: parse and check its flags (cli.parse_config), then either --plan (print the
    memory plan of its objective, loading no data and no weights: returns (args, None), the plan in
    args.plan_printed) or `begin`: (args, dist)."""
    return prepare(cli.parse_config(cls, argv, description), name)


def prepare(args, name: str):
    """`start` for a config dataclass built in code (train_rm.train_reward_model(Args(...))): its values are
    checked as the command line's are (cli.check_config; a bad one is a SystemExit naming its flag), then
    --plan or `begin`."""
    problems = cli.check_config(args)
    if problems:
        raise SystemExit(f"{name}: " + "; ".join(problems))
    if args.plan:
        args.plan_printed = memory_plan.print_plan(args, args.objective, name)
        return args, None
    return args, begin(args)


def begin(args) -> distributed.Distributed:
    """The process group under torchrun (a no-op in one process), flag checks that need to know the
    device (e.g. --bf16 on a CPU), and --threads: before anything is loaded."""
    metrics.check_report_to(getattr(args, "report_to", "none"))  # a missing tracker package, named before any work
    dist = distributed.init_distributed()
    distributed.check_scale_flags(args, dist)
    if args.threads:
        torch.set_num_threads(args.threads)
    return dist


def output_directory(args) -> Path:
    """Seed torch (the same on every rank: identical fresh heads; DDP also broadcasts them), create
    OUTPUT_DIR and prove it writable, check that --resume's checkpoint loads and was written with this
    run's flags (`check_resumed_flags`; rank 0 says what it resumes) and the flags that depend on the
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
        # a damaged one is named now, not after the model has loaded
        saved = checkpoint.load(checkpoint_path, mmap=True)
        args.resume_changes, report = check_resumed_flags(args, saved, checkpoint_path)
        if int(os.environ.get("RANK", "0")) == 0:
            print(report)
    check_model_flags(args)
    return output_dir


# Flags that may differ on --resume without changing what is optimised: where and how often the run reports,
# evaluates and saves, what it is judged on, how it computes (threads, micro-batches, recomputation, the
# frozen-trunk cache: the same numbers), testing aids and --plan. Every other flag (the objective, --lr,
# --batch-size, --epochs, --data, --model, --seed, the AVA config, ...) is part of the optimisation: a changed
# one is refused, unless --resume-override.
RESUME_HARMLESS = frozenset({
    "resume", "resume_override", "output_dir", "log_every", "save_every", "eval_every", "eval_batch_size",
    "eval_limit", "eval_data", "eval_split", "eval_prompts", "eval_margins", "prompt_limit", "samples_per_prompt",
    "opponent", "judge", "sample_seed", "visualize", "export_hf", "eval_only", "load",
    "threads", "grad_accum", "activation_checkpointing", "frozen_trunk_cache", "skip_bad_rows", "skip_nonfinite",
    "fsdp",  # a checkpoint of the other kind is refused by checkpoint.resume, which names the flag to use
    "crash_at_step", "inject_nan_at_step", "dump_grads", "plan", "plan_world_size", "plan_gpu_gb", "report_to",
    "eval_top_p"})


def _same(then, now) -> bool:
    """Equal values, or two spellings of one existing path (relative and absolute)."""
    if then == now:
        return True
    return (isinstance(then, str) and isinstance(now, str) and bool(then and now) and Path(then).exists()
            and Path(then).resolve() == Path(now).resolve())


def check_resumed_flags(args, saved: dict, path: Path) -> tuple[dict, str]:
    """--resume: this run's flags against the ones the checkpoint at `path` was written with (its "args";
    for the AVA part the resolved config, "ava_config", so that a preset and the flags it stands for
    agree). A changed flag of the optimisation is a SystemExit naming each, unless --resume-override.
    Returns ({flag: [then, now]} of the changed optimisation flags that --resume-override let pass, the
    line that says what is resumed: the checkpoint, its step and data position, and what differs)."""
    import dataclasses

    position = ", ".join(f"{name} {saved[name]}" for name in ("epoch", "batch", "iteration") if name in saved)
    resumed = f"--resume: continuing from {path} at step {saved['step']}{f' ({position})' if position else ''}"
    then = saved.get("args")
    if not isinstance(then, dict):
        return {}, f"{resumed}; it records no flags to compare with this run's"
    ava_names = {f.name for f in dataclasses.fields(cli.AVAFlags)} if hasattr(args, "ava_config") else set()
    changed, harmless = {}, {}
    for f in dataclasses.fields(args):
        flag, before, now = "--" + f.name.replace("_", "-"), then.get(f.name, f.default), getattr(args, f.name)
        if f.name not in ava_names and f.name not in ("resume", "resume_override") and not _same(before, now):
            (harmless if f.name in RESUME_HARMLESS else changed)[flag] = [before, now]
    if ava_names and str(getattr(args, "objective", "ava")).startswith("ava"):  # the AVA config counts where it is used
        before = saved.get("ava_config") or dataclasses.asdict(
            dataclasses.replace(args, **{name: then[name] for name in ava_names if name in then}).ava_config())
        for name, now in dataclasses.asdict(args.ava_config()).items():
            if before.get(name) != now:
                changed[f"--{name.replace('_', '-')} (the resolved AVA config)"] = [before.get(name), now]
    said = lambda flags: ", ".join(f"{flag} {old!r} (now {new!r})" for flag, (old, new) in flags.items())
    if changed and not getattr(args, "resume_override", False):
        raise SystemExit(f"--resume: {path} was written with other flags that change the optimisation: "
                         f"{said(changed)}; resume with the checkpoint's values, or pass --resume-override to continue "
                         f"with these (the change is then recorded in metrics.jsonl)")
    if changed:
        resumed += f"; --resume-override: continuing with changed optimisation flags {said(changed)}"
    if harmless:
        resumed += f"; changed flags that leave the optimisation as it was: {said(harmless)}"
    return changed, resumed


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
    """`if __name__ == "__main__"` of every script: bad data, an unloadable model, a damaged cache entry, a
    missing file, or a disk that is full or not writable end in one line naming it, not a traceback."""
    try:
        main()
    except (data.DataError, models.ModelLoadError, models.CacheError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise  # a bug, not the environment: its traceback is wanted
        sys.exit(f"error: {error}")
