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
config; bt / bt-var also model/sequence_classification, a Hugging Face sequence classifier, see
avalib/export.py), OUTPUT_DIR/metrics.jsonl, OUTPUT_DIR/final.json, OUTPUT_DIR/checkpoint.pt (for --resume).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import ava
from avalib import (cli, data, distributed, evaluation, export, frozen_trunk, loop, metrics, models, reward_models,
                    script, sources, viz)
from avalib.cli import arg

OBJECTIVES = ("ava-p", "ava-d", "bt", "bt-var", "pref-trans")


@dataclass
class Args(cli.AVAFlags, cli.TrainFlags):
    """train_rm.py"""
    objective: str = arg("ava-p", "training objective", choices=OBJECTIVES)
    afd: bool = arg(False,
                    "AfD: train on (demonstration, sample of the initial policy) pairs built from demonstrations")
    data: str = arg("builtin", "training data: builtin[:tiny], a local file, or a hub dataset id")
    train_split: str = arg("train", "split of --data (builtin and hub datasets)")
    eval_data: str = arg("", "preference pairs to evaluate on (default with --data builtin[:SIZE]: its dev split "
                             "labelled by the gold, builtin[:SIZE]:gold)")
    # defaults of this script (train_direct.py and train_ppo.py keep TrainFlags'): a budget at which the
    # built-in task's main command trains in minutes on 2 CPU cores (docs/train_rm.md, "The main command")
    trainable_layers: int = arg(2, "top decoder layers trained, the rest frozen (-1: train everything)", low=-1)
    batch_size: int = arg(16, "pairs (or demonstrations) per optimiser step, over all processes", low=1)
    lr: float = arg(1e-3, "AdamW learning rate (linear decay to 0)", above=0)
    eval_split: str = arg("dev", "split of --eval-data (builtin and hub datasets)")
    output_dir: str = arg("runs/rm", "where the model, metrics and checkpoints go")
    eval_only: bool = arg(False, "only evaluate --load on --eval-data and print accuracy")
    load: str = arg("", "a saved reward model directory (for --eval-only)")
    eval_margins: str = arg("", "also write each eval pair's margin (chosen - rejected score, in the order of the "
                                "pairs kept) to this JSON file, for paired comparisons; a training run writes "
                                "OUTPUT_DIR/eval_margins.json anyway")
    frozen_trunk_cache: bool = arg(True, "compute the frozen bottom layers' outputs once per sequence, keep them on "
                                         "disk ($AVA_CACHE/frozen-trunk, reused by every later run on the same model, "
                                         "--trainable-layers and sequences) and train the top layers from them: the "
                                         "same model, without the frozen layers' forward pass at every step. Where it "
                                         "cannot be exact (GPT-2-like models, --fsdp, no frozen layer) the run says so "
                                         "and trains the whole model")
    visualize: bool = arg(False, "at the end, draw the per-token rewards of the first 3 eval pairs (training rows if "
                                 "none): OUTPUT_DIR/token_rewards.png and .html")
    afd_max_new_tokens: int = arg(128, "AfD: length cap of the initial policy's samples", low=1)
    afd_temperature: float = arg(1.0, "AfD: sampling temperature (0: greedy)", low=0)
    afd_top_p: float = arg(0.95, "AfD: nucleus sampling", above=0, high=1)
    export_hf: bool = arg(True, "bt / bt-var: also write OUTPUT_DIR/model/sequence_classification, a Hugging Face "
                                "sequence classifier with the same scores (AutoModelForSequenceClassification; "
                                "avalib/export.py)")


# ---- data ----

def load_training_rows(args: Args, kind: str, tokenizer):
    """Rows of --data: pairs, or demonstrations for AVA-d and AfD (the chosen half of pairs serves)."""
    wants_demos = kind == "ava-d" or args.afd
    return sources.load_rows(args.data, "demos" if wants_demos else "pairs", args.train_split, tokenizer,
                            args.skip_bad_rows, args.limit or None)


# ---- one step, one evaluation ----

def compute_loss(model, items: list[tuple], kind: str, config: ava.AVAConfig, pad_id: int):
    """Chosen and rejected go through the model as one batch (on the model's device), then are taken apart."""
    device = models.device_of(model)
    if kind == "ava-d":
        return ava.ava_d_loss(model(**data.collate([item[0] for item in items], pad_id, device=device)), config)
    n = len(items)
    out = model(**data.collate([item[0] for item in items] + [item[1] for item in items], pad_id, device=device))
    chosen, rejected = ava.take_rows(out, slice(0, n)), ava.take_rows(out, slice(n, 2 * n))
    if kind == "ava-p":
        return ava.ava_p_loss(chosen, rejected, config)
    return distributed.unwrap(model).loss(chosen, rejected)


@torch.no_grad()
def evaluate(model, items: list[tuple], batch_size: int, pad_id: int, dist: distributed.Distributed,
             margins: list | None = None) -> dict:
    """Pairwise accuracy on preference pairs (evaluation.pairwise_accuracy: ties count half and are
    reported apart). Given a list `margins`, it is filled with each pair's margin (chosen - rejected
    score), in the order of `items`."""
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    mine, my_margins = items[dist.rank::dist.world_size], []
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        n = len(part)
        batch = data.collate([p[0] for p in part] + [p[1] for p in part], pad_id, device=models.device_of(model))
        score = reward_models.reward_forward(model, batch)[0]
        my_margins += (score[:n] - score[n:]).tolist()
    model.train(was_training)
    every = distributed.gather_strided(my_margins, dist)
    if margins is not None:
        margins.extend(every)
    return evaluation.pairwise_accuracy(every)


def eval_only(args: Args, dist: distributed.Distributed) -> dict:
    if not args.load:
        raise SystemExit("--eval-only needs --load DIR (a model saved by train_rm.py)")
    model, tokenizer, meta = reward_models.load_reward_model(args.load, dist.device)
    if not args.eval_data:
        args.eval_data = meta.get("args", {}).get("eval_data") or ""
    items, report = sources.load_eval_pairs(args, tokenizer)
    if not items:
        raise SystemExit("--eval-only needs --eval-data (a preference file or dataset)")
    margins: list[float] = []
    result = evaluate(model, items, args.eval_batch_size, tokenizer.pad_token_id, dist, margins)
    if dist.is_main:
        print(report)
        print(json.dumps(result))
        if args.eval_margins:
            write_margins(Path(args.eval_margins), args.eval_data, margins)
    return result


def write_margins(path: Path, eval_data: str, margins: list[float]) -> None:
    """Each eval pair's margin, so that two models scored on the same pairs can be compared pair by pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"eval_data": eval_data, "pairs": len(margins), "margins": margins}))


# ---- the run ----

def summary(final: dict, args: Args, output_dir: Path) -> str:
    """The run's last words: the dev accuracy with its interval, and where the model went."""
    saved = (f"model saved to {output_dir / 'model'} (metrics: {output_dir / 'metrics.jsonl'}, "
             f"{output_dir / 'final.json'})")
    if "eval/accuracy" not in final:
        return (f"{final['objective']}: trained {final['steps']} steps on {final['train_pairs']} rows; "
                f"no evaluation pairs; {saved}")
    low, high = final["eval/accuracy_wilson95"]
    source = args.eval_data or f"{args.data} [{args.eval_split}]"
    return (f"{final['objective']}: accuracy {100 * final['eval/accuracy']:.1f}% (95% interval {100 * low:.1f}-"
            f"{100 * high:.1f}%) on {final['eval/pairs']} pairs of {source}, mean margin {final['eval/margin']:+.3f}, "
            f"after {final['steps']} steps; {saved}")


def main(argv=None) -> dict:
    """The command line: parse the flags into Args, then train_reward_model."""
    return train_reward_model(cli.parse_config(Args, argv, __doc__))


def train_reward_model(args: Args) -> dict:
    """Train a reward model as `args` says (or evaluate one, args.eval_only): the function behind the
    command line, for code that trains reward models (ML-IRL, the notebooks, benchmarks):

        final = train_reward_model(Args(objective="bt", data="pairs.jsonl", output_dir="runs/bt"))

    Args is checked as the command line is (a bad value is a SystemExit naming its flag). Returns the
    run's final metrics (final.json); the model is in OUTPUT_DIR/model (RewardModel.from_pretrained)."""
    args, dist = script.prepare(args, "train_rm.py")
    if dist is None:  # --plan: bytes per GPU for these flags, from a model on the meta device
        return args.plan_printed
    if args.eval_only:
        return eval_only(args, dist)
    if args.objective not in ("ava-p", "ava-d") and args.ablate:
        raise SystemExit("--ablate applies to ava-p and ava-d only")
    output_dir = script.output_directory(args)

    tokenizer = models.load_tokenizer(args.model)
    kind, config = args.objective, args.ava_config()
    rows, report = load_training_rows(args, kind, tokenizer)  # bad data fails before the model loads
    eval_items, eval_report = sources.load_eval_pairs(args, tokenizer)
    # FSDP2: rank 0 reads the weights, the others build on meta
    lean = distributed.lean_loading(args, dist.world_size, kind)
    lm, _ = models.load_model(args.model, tokenizer=tokenizer, on_meta=lean and not dist.is_main)
    if args.afd:
        rows = sources.afd_pairs(rows, args.model, max_new_tokens=args.afd_max_new_tokens,
                                 temperature=args.afd_temperature,
                                top_p=args.afd_top_p, seed=args.seed, model=lm, tokenizer=tokenizer, dist=dist)
    items = data.encode_rows(rows, tokenizer, args.max_length, report)
    models.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
    lm = lm if lean else lm.to(dist.device)  # lean: fully_shard puts each rank's shards on its device
    trunk = None
    if args.frozen_trunk_cache:  # pairs in order, so that a pair's prompt is computed once (eval pairs too: cheap)
        try:
            trunk = frozen_trunk.build_frozen_trunk(lm, args, [e for item in items + eval_items for e in item], dist)
        except frozen_trunk.Refused as refused:
            if dist.is_main:
                print(f"{refused}; training the whole model instead (the same result, slower)")
    model = reward_models.build_reward_model(lm, kind, config, trunk=trunk,
                                             share_prompts=distributed.share_prompts(args))
    model = model if lean else model.to(dist.device)
    if dist.is_main:
        print(report)
        if eval_report:
            print(eval_report)

    def loss_fn(model, local):
        return compute_loss(model, [items[i] for i in local], kind, config, tokenizer.pad_token_id)

    lengths = [sum(len(example["input_ids"]) for example in item) for item in items]
    model, run = loop.train_loop(
        args, model, lengths, loss_fn, dist, output_dir, metric_name=metrics.metric_name,
        evaluate=(lambda m: evaluate(m, eval_items, args.eval_batch_size, tokenizer.pad_token_id,
                                     dist)) if eval_items else None,
        desc=f"{kind}{' ' + args.ablate if args.ablate else ''}")
    step, elapsed, total_tokens, log = run["steps"], run["seconds"], run["tokens"], run["metrics"]

    final = {"objective": kind, "ablate": args.ablate, "afd": args.afd, "steps": step,
             "resumed_from_step": run["first_step"],  # tokens/s and peak RSS are this process's, from that step on
             "train_pairs": len(items), "train_rows_cut": report.cut,
             "train_rows_skipped": sum(report.skipped.values()),
             "train_tokens_per_second": total_tokens / elapsed if elapsed > 0 and total_tokens else None,
             # tokens/s count training steps only; the trunk's build time is in here
             "train_seconds": elapsed, "frozen_trunk": trunk and trunk.report}
    margins: list[float] = []
    if eval_items:
        final.update(evaluate(model, eval_items, args.eval_batch_size, tokenizer.pad_token_id, dist, margins))
    if dist.is_main:
        meta = {"kind": kind, "ava_config": dataclasses.asdict(config) if kind in ("ava-p", "ava-d") else None,
                "args": dataclasses.asdict(args)}
        reward_models.save_reward_model(output_dir / "model", distributed.unwrap(model), tokenizer, meta, final)
        if args.export_hf and kind in export.EXPORTABLE:  # loadable by AutoModelForSequenceClassification
            export.export_sequence_classification(distributed.unwrap(model), tokenizer,
                                                  output_dir / "model" / export.SUBDIRECTORY)
        metrics.write_final(final, output_dir, log, step, summary(final, args, output_dir))
        if eval_items:
            write_margins(Path(args.eval_margins) if args.eval_margins else output_dir / "eval_margins.json",
                          args.eval_data or args.data, margins)
        if args.visualize:  # where the reward is earned (avalib/viz.py); the builtin task adds its gold
            source = args.eval_data or sources.builtin_default(args.data, gold=True)
            shown = sources.load_rows(source, "pairs", args.eval_split, tokenizer, True, 3)[0] if source else rows[:3]
            viz.write_token_reward_views(distributed.unwrap(model), tokenizer, shown, output_dir, args.max_length,
                                         gold=source.startswith("builtin"))
    distributed.end_distributed(dist)
    return final


if __name__ == "__main__":
    script.run_script(main)
