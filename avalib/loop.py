"""The training loop the scripts share."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avalib import checkpoint, distributed, metrics


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, then sort by length inside mega-batches of 64 batches, so a batch pads little
    (HH dialogues pad to ~2.2x their tokens at random, ~1.1x grouped); batch order shuffled again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * 64
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_loop(args, model, lengths: list[int], loss_fn, dist: distributed.Distributed, output_dir: Path, *,
               evaluate=None, desc: str = "", metric_name=lambda term: term, state: dict | None = None):
    """AdamW with linear decay to 0, gradient clipping, length-grouped batches sharded across ranks,
    DDP (or FSDP2 with --fsdp) when there are several processes, a tqdm bar and JSON-lines metrics on rank 0, a checkpoint
    every `args.save_every` steps and at the end, and `args.resume` from OUTPUT_DIR/checkpoint.pt.

    `args` needs: batch_size, lr, weight_decay, max_grad_norm, epochs, max_steps, seed, eval_every,
    save_every, log_every, resume, crash_at_step, and may set the scale flags of TrainFlags (fsdp, bf16,
    activation_checkpointing, dump_grads; see `distribute`). `lengths[i]` is item i's token count (batching and
    tokens/s). `loss_fn(model, indices) -> (loss, {term: tensor})` gets the (maybe DDP- or FSDP-wrapped) model
    and this rank's item indices; `evaluate(model) -> dict` runs every `args.eval_every` steps.
    Returns (unwrapped model, {"steps", "first_step", "tokens", "seconds"}): tokens summed over ranks;
    tokens and seconds cover this process's steps, from `first_step` (0, or the resumed checkpoint's step)."""
    import dataclasses
    import signal
    import time

    checkpoint_path = output_dir / "checkpoint.pt"
    if args.resume and not checkpoint_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
    if len(lengths) < dist.world_size:
        raise SystemExit(f"{len(lengths)} training rows cannot feed {dist.world_size} processes")
    distributed.check_scale_flags(args, dist)
    inner, sharded = model, distributed.is_sharded(args, dist)
    skeleton = distributed.meta_skeleton(model) if sharded else None  # what FSDP's full weights go back into at the end
    model = distributed.distribute(model, args, dist)  # DDP wrapper, FSDP2 in place, or the model itself (section "scale")
    trainable = [p for p in inner.parameters() if p.requires_grad]  # after fully_shard: this rank's shards
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(lengths) // args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    step, epoch, batch_index = 0, 0, 0
    if args.resume:
        saved = checkpoint.resume(checkpoint_path, inner, optimizer, scheduler, sharded)
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch"]
    first_step = step
    log = metrics.MetricsLog(output_dir / "metrics.jsonl", dist.is_main, resume_step=step if args.resume else None)
    dumped = []  # --dump-grads

    def save():
        state_now = {"step": step, "epoch": epoch, "batch": batch_index, **(state or {}), "args": dataclasses.asdict(args)}
        checkpoint.save(checkpoint_path, inner, optimizer, scheduler, state_now, dist, sharded)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not dist.is_main)
    tokens, started = 0, time.perf_counter()
    while step < total_steps and epoch < args.epochs:
        batches = length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
        while batch_index < len(batches) and step < total_steps:
            local = distributed.shard(batches[batch_index], dist)
            with distributed.autocast_context(args, dist):  # bf16 under DDP or one process (FSDP2 casts by its own policy)
                loss, terms = loss_fn(model, local)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if getattr(args, "dump_grads", ""):
                distributed.dump_gradients(args.dump_grads, inner, dumped, dist)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step, batch_index = step + 1, batch_index + 1
            tokens += sum(lengths[i] for i in local)
            names = sorted(terms)
            reduced = distributed.all_reduce_sum([float(terms[k].detach()) for k in names], dist)
            record = {metric_name(k): v / dist.world_size for k, v in zip(names, reduced)}
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "rewards/accuracies")})
            if evaluate is not None and args.eval_every and step % args.eval_every == 0:
                record.update(evaluate(model))
            if step % args.log_every == 0 or any(k.startswith("eval/") for k in record):
                log.write({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **record})
            if args.save_every and step % args.save_every == 0:
                save()
            if args.crash_at_step and step == args.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    save()
    if sharded:  # the full weights, gathered into a plain model on every rank: evaluation and export as usual
        del model, optimizer, scheduler, trainable  # AdamW's shards go before the full weights come
        inner = distributed.gather_full_model(inner, skeleton, dist)
    return inner, {"steps": step, "first_step": first_step, "tokens": distributed.all_reduce_sum([tokens], dist)[0], "seconds": seconds,
                   "metrics": log}
