"""The training loop the scripts share."""
from __future__ import annotations

import contextlib
import math
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


def gradient_norm(parameters: list, max_grad_norm: float) -> torch.Tensor:
    """The total gradient norm over `parameters` (reduced across processes already, by DDP or FSDP's
    DTensors), clipped to max_grad_norm when that is > 0 (the norm returned is the one before clipping)."""
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def inject_nan(loss: torch.Tensor, args, step: int) -> torch.Tensor:
    """--inject-nan-at-step N, a testing aid: the loss of step N times NaN (so its gradients are NaN too)."""
    return loss * float("nan") if getattr(args, "inject_nan_at_step", 0) == step else loss


def check_finite(step: str, values: dict, args, dist: distributed.Distributed | None = None, *,
                 checkpoint_path: Path | None = None, checkpoint_step: int | None = None) -> bool:
    """Before an optimiser step: are the loss, its terms and the gradient norm all finite? `values`
    maps names to numbers or tensors; with `dist` they are summed over processes first, so that every
    rank decides alike. Finite: True. Otherwise, with --skip-nonfinite: False (the caller skips the
    optimiser step and counts it); without: SystemExit naming the step and the non-finite terms, with
    nothing saved, so that the last checkpoint (checkpoint_path, at checkpoint_step or as read from the
    file) is the last good state."""
    names = list(values)
    numbers = [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values.values()]
    if dist is not None and dist.world_size > 1:
        numbers = distributed.all_reduce_sum(numbers, dist)
    bad = [f"{name} ({number})" for name, number in zip(names, numbers) if not math.isfinite(number)]
    if not bad:
        return True
    if getattr(args, "skip_nonfinite", False):
        return False
    saved = checkpoint.describe(checkpoint_path,
                                checkpoint_step) if checkpoint_path else "no checkpoint was written yet"
    raise SystemExit(f"{step}: non-finite {', '.join(bad)}; the weights were not updated and nothing was saved: "
                     f"{saved}. Lower --lr (or set --max-grad-norm), check the data, or pass --skip-nonfinite to skip "
                     f"such steps and count them (metric train/skipped_nonfinite)")


def accumulate_gradients(model, local: list[int], loss_fn, args, dist: distributed.Distributed, step: int,
                         batch_items: int, weight=len):
    """Forward and backward this rank's part of a global batch in --grad-accum micro-batches, the
    gradients synchronised across processes only after the last (DDP no_sync; FSDP2
    set_requires_gradient_sync, which its backward reads, so each backward runs inside the context).
    `model` is the (maybe wrapped) model, or a tuple of them (PPO: policy and value model), handed to
    loss_fn as given; every one of them waits for the last micro-batch. Each micro-batch's loss is
    weighted by its share of weight(local): by default the items, so the gradient is the batch's average
    over items, as without accumulation; a loss that is a mean over tokens passes its token count (PPO:
    the valid tokens), so the sum is the whole batch's token mean. Returns (loss, terms), each the same
    weighted average of the micro-batches' values. Every process runs as many micro-batches (FSDP2's
    forward is a collective): at most the smallest process's share of the `batch_items`."""
    count = max(1, min(getattr(args, "grad_accum", 1), batch_items // dist.world_size))
    parts = [local[i::count] for i in range(count)]
    modules = model if isinstance(model, tuple) else (model,)
    total = weight(local)
    loss_sum, term_sums = 0.0, {}
    for index, part in enumerate(parts):
        share = weight(part) / total
        with contextlib.ExitStack() as synced:
            for module in modules:
                synced.enter_context(distributed.gradient_sync(module, index == len(parts) - 1))
            with distributed.autocast_context(args, dist):
                loss, terms = loss_fn(model, part)  # bf16 under DDP or one process (FSDP2 casts by its own policy)
            loss = inject_nan(loss, args, step)
            (loss * share).backward()
        loss_sum = loss_sum + share * loss.detach()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + share * value.detach()
    return loss_sum, term_sums


def record_resume(log: metrics.MetricsLog, args, step: int) -> None:
    """A run resumed with --resume-override over changed optimisation flags says so in metrics.jsonl, at the
    step it resumed from ({"step", "resumed_with_changed_flags": {flag: [then, now]}}): mixed runs do not
    read as clean ones."""
    if getattr(args, "resume", False) and getattr(args, "resume_changes", None):
        log.write({"step": step, "resumed_with_changed_flags": args.resume_changes})


def train_loop(args, model, lengths: list[int], loss_fn, dist: distributed.Distributed, output_dir: Path, *,
               evaluate=None, desc: str = "", metric_name=lambda term: term, state: dict | None = None):
    """AdamW with linear decay to 0, gradient clipping, length-grouped batches sharded across ranks,
    DDP (or FSDP2 with --fsdp) when there are several processes, a tqdm bar and JSON-lines metrics on rank 0, a
    checkpoint
    every `args.save_every` steps and at the end, and `args.resume` from OUTPUT_DIR/checkpoint.pt.

    A step whose loss, loss terms or gradient norm is NaN or infinite stops the run before the weights
    or a checkpoint see it, or with --skip-nonfinite is skipped and counted (`check_finite`).

    `args` needs: batch_size, lr, weight_decay, max_grad_norm, epochs, max_steps, seed, eval_every,
    save_every, log_every, resume, crash_at_step, and may set report_to (metrics.MetricsLog), grad_accum
    (`accumulate_gradients`), the non-finite flags (skip_nonfinite,
    inject_nan_at_step) and the scale flags of TrainFlags (fsdp, bf16,
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
    # DDP wrapper, FSDP2 in place, or the model itself (section "scale")
    model = distributed.distribute(model, args, dist)
    trainable = [p for p in inner.parameters() if p.requires_grad]  # after fully_shard: this rank's shards
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(lengths) // args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    step, epoch, batch_index, skipped, saved_step = 0, 0, 0, 0, None
    if args.resume:
        saved = checkpoint.resume(checkpoint_path, inner, optimizer, scheduler, sharded)
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch"]
        skipped, saved_step = saved.get("skipped_nonfinite", 0), step
    first_step = step
    log = metrics.MetricsLog(output_dir / "metrics.jsonl", dist.is_main, resume_step=step if args.resume else None,
                             report_to=getattr(args, "report_to", "none"), config=dataclasses.asdict(args))
    dumped = []  # --dump-grads

    record_resume(log, args, step)
    ava_config = dataclasses.asdict(args.ava_config()) if hasattr(args, "ava_config") else None  # the resolved config

    def save():
        nonlocal saved_step
        state_now = {"step": step, "epoch": epoch, "batch": batch_index, "skipped_nonfinite": skipped, **(state or {}),
                     "args": dataclasses.asdict(args), "ava_config": ava_config}
        checkpoint.save(checkpoint_path, inner, optimizer, scheduler, state_now, dist, sharded)
        saved_step = step

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not dist.is_main)
    tokens, started = 0, time.perf_counter()
    try:
        while step < total_steps and epoch < args.epochs:
            batches = length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
            while batch_index < len(batches) and step < total_steps:
                local = distributed.shard(batches[batch_index], dist)
                optimizer.zero_grad(set_to_none=True)
                loss, terms = accumulate_gradients(model, local, loss_fn, args, dist, step + 1,
                                                   len(batches[batch_index]))
                if getattr(args, "dump_grads", ""):
                    distributed.dump_gradients(args.dump_grads, inner, dumped, dist)
                norm = gradient_norm(trainable, args.max_grad_norm)
                names = sorted(terms)
                values = [float(terms[k].detach()) for k in names] + [float(loss.detach()), float(norm)]
                reduced = distributed.all_reduce_sum(values, dist)
                record = {metric_name(k): v / dist.world_size for k, v in zip(names, reduced)}
                checked = {**record, "loss": reduced[-2] / dist.world_size,
                           "gradient norm": reduced[-1] / dist.world_size}
                if check_finite(f"step {step + 1}", checked, args,
                                checkpoint_path=checkpoint_path if saved_step is not None else None,
                                checkpoint_step=saved_step):
                    optimizer.step()
                    scheduler.step()
                else:  # --skip-nonfinite: as if the batch were not there (no update, the schedule waits), counted;
                    skipped += 1  # its non-finite values (the loss as used) are not logged
                    record = {k: checked[k] for k in record if math.isfinite(checked[k])}
                if getattr(args, "skip_nonfinite", False):
                    record["train/skipped_nonfinite"] = skipped
                step, batch_index = step + 1, batch_index + 1
                tokens += sum(lengths[i] for i in local)
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
    except SystemExit:  # a non-finite stop or a failed checkpoint write: its message on a line of its own
        bar.close()
        raise
    bar.close()
    seconds = time.perf_counter() - started
    save()
    if sharded:  # the full weights, gathered into a plain model on every rank: evaluation and export as usual
        del model, optimizer, scheduler, trainable  # AdamW's shards go before the full weights come
        inner = distributed.gather_full_model(inner, skeleton, dist)
    return inner, {"steps": step, "first_step": first_step, "tokens": distributed.all_reduce_sum([tokens], dist)[0],
                   "seconds": seconds,
                   "metrics": log}
