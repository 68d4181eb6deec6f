"""Checkpoints: trainable weights, optimiser, scheduler, RNG and data position, written atomically.

Two entry points for every script: `save(...)` and `resume(...)`. One process or DDP: rank 0 writes
`checkpoint.pt`; FSDP2 (`sharded=True`): every rank writes its shards under `checkpoint-sharded-STEP/`
(torch.distributed.checkpoint), then rank 0 writes `checkpoint.pt` naming them. Either way the file is
replaced atomically, so a run killed mid-write resumes from the previous checkpoint.
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


def save(path: Path, model: torch.nn.Module, optimizer, scheduler, state: dict, dist: distributed.Distributed,
         sharded: bool = False) -> None:
    """Write a checkpoint (a collective: every rank calls it). `state` holds the data position and
    whatever else the script resumes from (step, epoch, args, ...)."""
    if sharded:
        _save_sharded(path, model, optimizer, scheduler, state, dist)
        return
    if dist.is_main:
        _save_plain(path, model, optimizer, scheduler, state)
    if dist.world_size > 1:
        torch.distributed.barrier()


def resume(path: Path, model, optimizer, scheduler, sharded: bool) -> dict:
    """Load `checkpoint.pt` as `save` wrote it into model, optimiser, scheduler and RNG; returns its state.
    A checkpoint of the other kind (sharded vs plain) is refused with the flag to use."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
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


def _write_atomically(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous checkpoint


def _load_plain(payload: dict, path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    missing = model.load_state_dict(payload["model"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"{path}: parameters the model does not have: {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(payload["optimizer"])
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
        _write_atomically(payload, path)
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
