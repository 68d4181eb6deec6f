"""Checkpoints: trainable weights, optimiser, scheduler, RNG and data position, written atomically.

Two entry points for every script: `save(...)` and `resume(...)`. One process or DDP: rank 0 writes
`checkpoint.pt`; FSDP2 (`sharded=True`): every rank writes its shards under `checkpoint-sharded-STEP/`
(torch.distributed.checkpoint), then rank 0 writes `checkpoint.pt` naming them. Either way the file is
replaced atomically, so a run killed mid-write resumes from the previous checkpoint.

Faults end in one message that says what to do, never in a traceback: a write that fails (a full disk,
an unwritable directory) leaves the previous checkpoint in place and says so; a damaged or foreign
checkpoint on --resume is named (`load`), with the previous one, kept as `checkpoint.pt.prev` (plain
checkpoints), offered instead.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from avalib import distributed


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class WriteError(Exception):
    """A checkpoint that could not be written; the previous one is intact."""


def save(path: Path, model: torch.nn.Module, optimizer, scheduler, state: dict, dist: distributed.Distributed,
         sharded: bool = False) -> None:
    """Write a checkpoint (a collective: every rank calls it). `state` holds the data position and
    whatever else the script resumes from (step, epoch, args, ...). A failed write (e.g. a full disk)
    stops every rank with one message; the previous checkpoint stays as it was."""
    if sharded:
        _save_sharded(path, model, optimizer, scheduler, state, dist)
        return
    failure = None
    if dist.is_main:
        try:
            _save_plain(path, model, optimizer, scheduler, state)
        except WriteError as error:
            failure = str(error)
    failed = failure is not None
    if dist.world_size > 1:  # also the barrier after rank 0's write: every rank learns whether it failed
        failed = distributed.all_reduce_sum([float(failed)], dist)[0] > 0
    if failed:
        raise SystemExit(failure or f"rank 0 could not write {path} (see its message); "
                                    "the previous checkpoint is intact")


def saved_step(path: Path) -> int | None:
    """The step of a loadable checkpoint at `path` (read lazily: tensors stay on disk), or None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(payload["step"])
    except Exception:  # missing, damaged or foreign: there is no step to report
        return None


def describe(path: Path, step: int | None = None) -> str:
    """'the last checkpoint X (step N) is intact', or that there is none yet: for messages that stop a run."""
    step = saved_step(path) if step is None else step
    if step is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint {path} (step {step}) is intact"


def load(path: Path, mmap: bool = False) -> dict:
    """torch.load a checkpoint written by `save`. A damaged file (truncated, overwritten, not a
    checkpoint) is a SystemExit naming it and what to do: resume from `checkpoint.pt.prev` when that
    one loads, or start over. mmap=True reads only the structure (a cheap check before any work)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        problem = None if isinstance(payload, dict) and "step" in payload and "rng" in payload and (
            "model" in payload or "sharded" in payload) else "not a checkpoint written by these scripts"
    except Exception as error:  # torch.load of a damaged file: RuntimeError (zip), EOFError, UnpicklingError, ...
        import zipfile

        problem = ("truncated or overwritten: no complete zip archive, as torch.save writes"
                   if not zipfile.is_zipfile(path)
                   else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}")
    if problem is None:
        return payload
    previous = path.with_name(path.name + ".prev")
    previous_step = saved_step(previous) if previous.is_file() else None
    advice = (f"the previous checkpoint {previous} (step {previous_step}) loads: move it to {path} and --resume again, "
              f"or run without --resume to start over" if previous_step is not None else
              "run without --resume to start over (it overwrites the checkpoint)")
    raise SystemExit(f"--resume: {path} is damaged or not a checkpoint ({problem}); {advice}")


def resume(path: Path, model, optimizer, scheduler, sharded: bool) -> dict:
    """Load `checkpoint.pt` as `save` wrote it into model, optimiser, scheduler and RNG; returns its state.
    A checkpoint of the other kind (sharded vs plain) is refused with the flag to use; a damaged one,
    or one written for other flags (another model, --trainable-layers, --lora-r), is named."""
    payload = load(path)
    if bool(payload.get("sharded")) != sharded:
        kind = "sharded (FSDP2)" if payload.get("sharded") else "unsharded (DDP / one process)"
        raise SystemExit(f"--resume: {path} is {kind}: resume with{'' if payload.get('sharded') else 'out'} --fsdp "
                         f"under torchrun with more than one process")
    if not sharded:
        return _load_plain(payload, path, model, optimizer, scheduler)
    return _load_sharded(payload, path, model, optimizer, scheduler)


def _save_plain(path: Path, model: torch.nn.Module, optimizer, scheduler, state: dict) -> None:
    """Everything a run needs to continue: only trainable parameters are stored (frozen ones come
    back from the base model), so a checkpoint of SmolLM2 with 4 trainable layers is small."""
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    payload = {"model": trainable, "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict() if scheduler is not None else None,
               "rng": rng_state(), **state}
    _write_atomically(payload, path)


def _write_atomically(payload: dict, path: Path, keep_previous: bool = True) -> None:
    """Write to checkpoint.pt.tmp, then rename over checkpoint.pt: a run killed mid-write, or a write
    that fails (a full disk), keeps the previous checkpoint. keep_previous: the replaced file stays as
    checkpoint.pt.prev (a hard link, so no copy), the fallback if checkpoint.pt is ever damaged."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports ENOSPC as a RuntimeError
        tmp.unlink(missing_ok=True)
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WriteError(f"cannot write the checkpoint {path} ({detail}); {describe(path)}: free some space "
                         f"(or copy OUTPUT_DIR somewhere with room) and run again with --resume") from None
    if keep_previous and path.is_file():
        previous, link = path.with_name(path.name + ".prev"), path.with_name(path.name + ".prev.tmp")
        try:
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, previous)
        except OSError:  # a file system without hard links: no fallback copy, the checkpoint itself is unaffected
            pass
    os.replace(tmp, path)


def _load_plain(payload: dict, path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    other_flags = "was it written with another --model, objective, --trainable-layers or --lora-r? resume with those"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - payload["model"].keys())
    try:
        missing = model.load_state_dict(payload["model"], strict=False)
        if missing.unexpected_keys or absent:
            raise ValueError(f"parameters the model does not have: {missing.unexpected_keys[:3]}"
                             if missing.unexpected_keys else f"no weights for trainable parameters {absent[:3]}")
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or parameter groups that do not match
        raise SystemExit(f"--resume: {path} does not fit this run ({str(error).splitlines()[0]}); {other_flags}, "
                         f"or run without --resume to start over") from None
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload


def _save_sharded(path: Path, model, optimizer, scheduler, state: dict, dist: distributed.Distributed) -> None:
    """FSDP2's checkpoint: every rank writes its shards of the trainable weights and AdamW state to
    OUTPUT_DIR/checkpoint-sharded-STEP/ (torch.distributed.checkpoint), then rank 0 writes
    `checkpoint.pt` (scheduler, RNG, data position, args, and the name of that directory) atomically
    and deletes older sharded directories: a run killed mid-write resumes from the previous one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = path.parent / f"checkpoint-sharded-{state['step']:07d}"
    if dist.is_main and directory.exists():
        shutil.rmtree(directory)  # a leftover of a killed run at this step
    torch.distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    dcp.save({"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state},
             checkpoint_id=directory)
    torch.distributed.barrier()
    if dist.is_main:
        payload = {"sharded": directory.name, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "rng": rng_state(), **state}
        _write_atomically(payload, path, keep_previous=False)  # it names shards that are deleted next
        for old in path.parent.glob("checkpoint-sharded-*"):
            if old != directory:
                shutil.rmtree(old)
    torch.distributed.barrier()


def _load_sharded(payload: dict, path: Path, model, optimizer, scheduler) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, to be filled
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in model_state.items() if k in trainable}
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path.parent / payload["sharded"])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload
