"""Reward modelling with AVA-p / AVA-d and the baselines (Bradley-Terry, BT-var, Preference Transformer).

  python train_rm.py                                   # AVA-p on the built-in offline task, SmolLM2
  torchrun --nproc_per_node 2 train_rm.py --objective bt \
      --data ../shared/data/hh-rlhf-harmless/train.jsonl.gz --eval-data ../shared/data/hh-rlhf-harmless/dev.jsonl.gz
  python train_rm.py --objective ava-p --ablate "w/o rwt"          # a Table 1 ablation
  python train_rm.py --objective ava-d --data demos.jsonl          # AVA-d on demonstrations
  python train_rm.py --objective bt --afd --data demos.jsonl       # AfD: (demonstration, initial-policy sample) pairs
  python train_rm.py --eval-only --load runs/rm/model --eval-data pairs.jsonl

Data: "builtin" (the offline task with a gold reward, task.py), a local .json/.jsonl/.jsonl.gz/.parquet
file, or a hub dataset id. Preference rows: Anthropic HH raw, TRL prompt/chosen/rejected (strings or
message lists). Demonstration rows: prompt/response, prompt/completion, instruction/input/output,
question/answer, or the chosen half of pairs. Output: OUTPUT_DIR/model (save_pretrained, heads,
config), OUTPUT_DIR/metrics.jsonl, OUTPUT_DIR/final.json, OUTPUT_DIR/checkpoint.pt (for --resume).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import ava
import common
from common import arg

OBJECTIVES = ("ava-p", "ava-d", "bt", "bt-var", "pref-trans")


@dataclass
class Args:
    objective: str = arg("ava-p", "training objective", choices=OBJECTIVES)
    ablate: str = arg("", "comma-separated Table 1 ablations of ava-p/ava-d, e.g. 'w/o rwt,w/o neg' "
                          f"(from: {', '.join(ava.ABLATIONS)})")
    afd: bool = arg(False, "AfD: train on (demonstration, sample of the initial policy) pairs built from demonstrations")
    data: str = arg("builtin", "training data: builtin[:tiny], a local file, or a hub dataset id")
    train_split: str = arg("train", "split of --data (builtin and hub datasets)")
    eval_data: str = arg("", "preference pairs to evaluate on (default: builtin's dev split when --data is builtin)")
    eval_split: str = arg("dev", "split of --eval-data (builtin and hub datasets)")
    model: str = arg(common.DEFAULT_MODEL, "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    output_dir: str = arg("runs/rm", "where the model, metrics and checkpoints go")
    max_length: int = arg(512, "tokens per sequence: prompts cut from the left, responses from the right")
    batch_size: int = arg(8, "pairs (or demonstrations) per optimiser step, over all processes")
    eval_batch_size: int = arg(16, "pairs per evaluation batch, per process")
    lr: float = arg(1e-4, "AdamW learning rate (linear decay to 0)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)")
    epochs: int = arg(1, "passes over the training data")
    max_steps: int = arg(0, "stop after this many optimiser steps (0: run all epochs)")
    trainable_layers: int = arg(4, "top decoder layers trained, the rest frozen (-1: train everything)")
    seed: int = arg(0, "seed of initialisation, data order and sampling")
    limit: int = arg(0, "use only the first N training rows (0: all)")
    eval_limit: int = arg(0, "use only the first N evaluation pairs (0: all)")
    eval_every: int = arg(0, "evaluate every N steps (0: at the end only)")
    save_every: int = arg(50, "write a checkpoint every N steps (and at the end)")
    log_every: int = arg(1, "write a metrics line every N steps")
    resume: bool = arg(False, "continue from OUTPUT_DIR/checkpoint.pt")
    eval_only: bool = arg(False, "only evaluate --load on --eval-data and print accuracy")
    load: str = arg("", "a saved reward model directory (for --eval-only)")
    skip_bad_rows: bool = arg(False, "skip malformed rows and count them, instead of stopping at the first")
    threads: int = arg(0, "torch CPU threads per process (0: torch's default)")
    # AVA hyper-parameters and variants (ava.AVAConfig; see README)
    alpha: float = arg(ava.AVAConfig.alpha, "Eq. 12 temperature mapping LM probabilities to Q-values")
    beta: float = arg(ava.AVAConfig.beta, "likelihood weight (Eq. 13) / Boltzmann temperature (Eq. 3)")
    gamma: float = arg(ava.AVAConfig.gamma, "TD discount (Eq. 14)")
    lam: float = arg(ava.AVAConfig.lam, "weight of the TD log-density term (lambda, Eq. 13)")
    cer_weight: float = arg(ava.AVAConfig.cer_weight, "weight of CER (Eq. 18)")
    reward_weighting: str = arg(ava.AVAConfig.reward_weighting, "Eq. 11 weights", choices=("mean-one", "literal", "off"))
    negative: str = arg(ava.AVAConfig.negative, "rejected-likelihood term", choices=("literal", "unlikelihood", "off"))
    cer: str = arg(ava.AVAConfig.cer, "CER form", choices=("sigmoid", "logsigmoid", "off"))
    kl_td_on: str = arg(ava.AVAConfig.kl_td_on, "sequences that get KL and TD terms", choices=("both", "chosen"))
    pretrained_q: bool = arg(ava.AVAConfig.pretrained_q, "Q from the pretrained LM head via Eq. 12 (--no-pretrained-q = w/o ptq)")
    irl: bool = arg(ava.AVAConfig.irl, "KL and TD terms (--no-irl = w/o irl)")
    # AfD sampling from the initial policy
    afd_max_new_tokens: int = arg(128, "AfD: length cap of the initial policy's samples")
    afd_temperature: float = arg(1.0, "AfD: sampling temperature")
    afd_top_p: float = arg(0.95, "AfD: nucleus sampling")
    crash_at_step: int = arg(0, "testing aid: SIGKILL this process right after step N (to test --resume)")

    def ava_config(self) -> ava.AVAConfig:
        names = {f.name for f in dataclasses.fields(ava.AVAConfig)}
        config = ava.AVAConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        ablations = [a.strip() if a.strip().startswith("w/o") else f"w/o {a.strip()}" for a in self.ablate.split(",") if a.strip()]
        return ava.ablate(config, *ablations)


# ---- data ----

def afd_pairs(demos: list[dict], lm, tokenizer, args: Args, dist: common.Distributed) -> list[dict]:
    """AfD: pair every demonstration with a sample of the initial policy (the untrained --model).
    Samples are cached on disk under a key of the prompts, model and sampling settings."""
    settings = {"model": common.resolve_model_path(args.model), "prompts": [d["prompt"] for d in demos],
                "max_new_tokens": args.afd_max_new_tokens, "temperature": args.afd_temperature,
                "top_p": args.afd_top_p, "seed": args.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = common.cache_dir() / "afd" / f"{key}.json"
    if not path.is_file() and dist.is_main:
        samples = common.generate(lm, tokenizer, settings["prompts"], max_new_tokens=args.afd_max_new_tokens,
                                  temperature=args.afd_temperature, top_p=args.afd_top_p, seed=args.seed,
                                  chat_template=False, desc="AfD: sampling the initial policy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"settings": settings, "samples": samples}))
        os.replace(tmp, path)
    if dist.world_size > 1:
        torch.distributed.barrier()
    samples = json.loads(path.read_text())["samples"]
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": s, "where": d["where"]}
             for d, s in zip(demos, samples) if s.strip() and s != d["response"]]
    if dist.is_main and len(pairs) < len(demos):
        print(f"AfD: {len(demos) - len(pairs)} demonstrations dropped: the initial policy's sample was empty or identical")
    return pairs


def load_training_rows(args: Args, kind: str, tokenizer):
    """Rows of --data: pairs, or demonstrations for AVA-d and AfD (the chosen half of pairs serves)."""
    wants_demos = kind == "ava-d" or args.afd
    return common.load_rows(args.data, "demos" if wants_demos else "pairs", args.train_split, tokenizer,
                            args.skip_bad_rows, args.limit or None)


def encode_items(rows: list[dict], kind: str, tokenizer, max_length: int, report) -> list[tuple]:
    """Encoded training items: (chosen, rejected) example pairs, or (demonstration,) for AVA-d."""
    items = []
    for row in rows:
        texts = [row["response"]] if "response" in row else [row["chosen"], row["rejected"]]
        examples, cut = common.encode(tokenizer, row["prompt"], texts, max_length)
        report.cut += cut
        items.append(tuple(examples[:1]) if kind == "ava-d" else tuple(examples))
    return items


def load_eval_items(args: Args, tokenizer):
    source = args.eval_data or (args.data if args.data.startswith("builtin") else "")
    if not source:
        return [], None
    rows, report = common.load_rows(source, "pairs", args.eval_split, tokenizer, args.skip_bad_rows, args.eval_limit or None)
    items = []
    for row in rows:
        chosen, rejected, cut = common.encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], args.max_length)
        report.cut += cut
        items.append((chosen, rejected))
    return items, report


# ---- one step, one evaluation ----

def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def compute_loss(model, items: list[tuple], kind: str, config: ava.AVAConfig, pad_id: int):
    """Chosen and rejected go through the model as one batch, then are taken apart."""
    if kind == "ava-d":
        return ava.ava_d_loss(model(**common.collate([item[0] for item in items], pad_id)), config)
    n = len(items)
    out = model(**common.collate([item[0] for item in items] + [item[1] for item in items], pad_id))
    chosen, rejected = ava.take_rows(out, slice(0, n)), ava.take_rows(out, slice(n, 2 * n))
    if kind == "ava-p":
        return ava.ava_p_loss(chosen, rejected, config)
    return unwrap(model).loss(chosen, rejected)


@torch.no_grad()
def evaluate(model, items: list[tuple], batch_size: int, pad_id: int, dist: common.Distributed) -> dict:
    """Pairwise accuracy on preference pairs: wins / pairs, with exact ties reported apart."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    wins = ties = margin = 0.0
    mine = items[dist.rank::dist.world_size]
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        n = len(part)
        score = common.reward_forward(model, common.collate([p[0] for p in part] + [p[1] for p in part], pad_id))[0]
        difference = score[:n] - score[n:]
        wins += float((difference > 0).sum())
        ties += float((difference == 0).sum())
        margin += float(difference.sum())
    model.train(was_training)
    wins, ties, margin, total = common.all_reduce_sum([wins, ties, margin, len(mine)], dist)
    return {"eval/accuracy": wins / max(total, 1), "eval/ties": ties / max(total, 1),
            "eval/margin": margin / max(total, 1), "eval/pairs": int(total)}


def eval_only(args: Args, dist: common.Distributed) -> dict:
    if not args.load:
        raise SystemExit("--eval-only needs --load DIR (a model saved by train_rm.py)")
    model, tokenizer, meta = common.load_reward_model(args.load, dist.device)
    if not args.eval_data:
        args.eval_data = meta.get("args", {}).get("eval_data") or ""
    items, report = load_eval_items(args, tokenizer)
    if not items:
        raise SystemExit("--eval-only needs --eval-data (a preference file or dataset)")
    result = evaluate(model, items, args.eval_batch_size, tokenizer.pad_token_id, dist)
    if dist.is_main:
        print(report)
        print(json.dumps(result))
    return result


# ---- the run ----

def main(argv=None) -> dict:
    args = common.parse_config(Args, argv, __doc__)
    dist = common.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        return eval_only(args, dist)
    if args.objective not in ("ava-p", "ava-d") and args.ablate:
        raise SystemExit("--ablate applies to ava-p and ava-d only")
    torch.manual_seed(args.seed)  # the same on every rank: identical heads (DDP also broadcasts them)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = output_dir / "checkpoint.pt"
    if args.resume and not checkpoint_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")

    tokenizer = common.load_tokenizer(args.model)
    kind, config = args.objective, args.ava_config()
    rows, report = load_training_rows(args, kind, tokenizer)  # bad data fails before the model loads
    eval_items, eval_report = load_eval_items(args, tokenizer)
    lm, _ = common.load_model(args.model, tokenizer=tokenizer)
    if args.afd:
        rows = afd_pairs(rows, lm, tokenizer, args, dist)
    items = encode_items(rows, kind, tokenizer, args.max_length, report)
    common.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
    model = common.build_reward_model(lm, kind, config).to(dist.device)
    if dist.is_main:
        print(report)
        if eval_report:
            print(eval_report)
    if len(items) < dist.world_size:
        raise SystemExit(f"{len(items)} training rows cannot feed {dist.world_size} processes")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    lengths = [sum(len(example["input_ids"]) for example in item) for item in items]
    steps_per_epoch = -(-len(items) // args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    step, epoch, batch_index = 0, 0, 0
    if args.resume:
        state = common.load_checkpoint(checkpoint_path, model, optimizer, scheduler)
        step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    metrics = common.MetricsLog(output_dir / "metrics.jsonl", dist.is_main, resume_step=step if args.resume else None)

    def save():
        if dist.is_main:
            common.save_checkpoint(checkpoint_path, unwrap(model), optimizer, scheduler,
                                   {"step": step, "epoch": epoch, "batch": batch_index, "args": dataclasses.asdict(args)})
        if dist.world_size > 1:
            torch.distributed.barrier()

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"{kind}{' ' + args.ablate if args.ablate else ''}", disable=not dist.is_main)
    tokens = 0
    started = time.perf_counter()
    while step < total_steps and epoch < args.epochs:
        batches = common.length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
        while batch_index < len(batches) and step < total_steps:
            local = common.shard(batches[batch_index], dist)
            loss, terms = compute_loss(model, [items[i] for i in local], kind, config, tokenizer.pad_token_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step, batch_index = step + 1, batch_index + 1
            tokens += sum(lengths[i] for i in local)
            names = sorted(terms)
            reduced = common.all_reduce_sum([float(terms[k].detach()) for k in names], dist)
            record = {metric_name(k): v / dist.world_size for k, v in zip(names, reduced)}
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record.get('rewards/accuracies', float('nan')):.2f}")
            if args.eval_every and step % args.eval_every == 0 and eval_items:
                record.update(evaluate(model, eval_items, args.eval_batch_size, tokenizer.pad_token_id, dist))
            if step % args.log_every == 0 or "eval/accuracy" in record:
                metrics.write({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **record})
            if args.save_every and step % args.save_every == 0:
                save()
            if args.crash_at_step and step == args.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - started
    save()

    total_tokens = common.all_reduce_sum([tokens], dist)[0]
    final = {"objective": kind, "ablate": args.ablate, "afd": args.afd, "steps": step,
             "train_pairs": len(items), "train_rows_cut": report.cut, "train_rows_skipped": sum(report.skipped.values()),
             "train_tokens_per_second": total_tokens / elapsed if elapsed > 0 and total_tokens else None,
             "peak_rss_gb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if eval_items:
        final.update(evaluate(model, eval_items, args.eval_batch_size, tokenizer.pad_token_id, dist))
    if dist.is_main:
        meta = {"kind": kind, "ava_config": dataclasses.asdict(config) if kind in ("ava-p", "ava-d") else None,
                "args": dataclasses.asdict(args)}
        common.save_reward_model(output_dir / "model", unwrap(model), tokenizer, meta)
        (output_dir / "final.json").write_text(json.dumps(final, indent=2))
        metrics.write({"step": step, "final": True, **final})
        print(json.dumps(final))
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return final


METRIC_NAMES = {"loss": "loss", "accuracy": "rewards/accuracies", "margin": "rewards/margins", "sigma": "ava/sigma"}


def metric_name(term: str) -> str:
    """TRL's names where users know them (rewards/accuracies, rewards/margins), ava/<term> otherwise."""
    return METRIC_NAMES.get(term, f"ava/{term}")


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, common.ModelLoadError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
