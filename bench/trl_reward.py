"""Table 1's reference row: TRL's RewardTrainer (Bradley-Terry, the implementation users know) on
the same model, data and configuration as bench/table1.py's main rows. TRL is a benchmark-only
dependency: `pip install trl==1.16.0`.

    python bench/trl_reward.py --task harmless [--seed 0] [--max-steps N] [--rescore]

Writes bench/results/table1/<task>/TRL-RewardTrainer-seed<k>.json in table1.py's row format, so
`python bench/table1.py --report` puts it in the table. Data: the pairs our loader yields (the same
prompt split and the same skipped empty responses), given to TRL in its prompt/chosen/rejected
format. TRL drops pairs longer than max_length where we cut them; the count is recorded.

Accuracy is counted here, pair by pair, on every dev pair (the same 200 as our rows): the trained
model scores each pair's halves tokenised exactly as TRL tokenises them (checked against TRL's own
dev set before training), and the pairs TRL would drop as too long are cut the way ours are (the
prompt from the left, then the response from the right). TRL's own `eval_accuracy` is kept beside it
but is not the row's figure: it is a mean of per-batch accuracies over the pairs it kept, so an
uneven last batch weighs its pairs more, and the pairs it dropped are not counted. The dev
margins are kept, so the row pairs with our BT pair by pair. The trained model is saved in the run
directory; `--rescore` counts again from it without training.

TRL's default activation checkpointing is
switched off, as in bench/throughput.py, so its speed is comparable with ours. `python bench/table1.py
--rows "TRL RewardTrainer"` runs this script and adds the machine's load during it to the result.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import models, sources  # noqa: E402
from bench.table1 import DATA, MAIN, RESULTS  # noqa: E402

EVAL_BATCH = 16  # TRL's per-device eval batch: its eval_accuracy averages the accuracies of batches this size


def trl_ids(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], bool]:
    """One half of a pair as TRL tokenises it (prompt + response + EOS, one call), and whether TRL would
    drop it as too long; if so, cut as train_rm.py cuts: the prompt from the left, then the response
    from the right."""
    eos = tokenizer.eos_token
    ids = tokenizer(text=prompt + (response if response.endswith(eos) else response + eos))["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    start = len(tokenizer(text=prompt)["input_ids"])  # where the response begins (to a token at the seam)
    return (ids[start:start + max_length] if len(ids) - start >= max_length else ids[-max_length:]), True


def score_pairs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Each pair's margin (chosen score - rejected score) from a sequence-classification model, batched and
    padded as TRL's collator pads (right, with the pad token): the model pools each sequence as in training."""
    import torch

    model.eval()
    margins = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            batch = [c for c, _ in pairs[i:i + batch_size]] + [r for _, r in pairs[i:i + batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
            half = len(batch) // 2
            margins += [c - r for c, r in zip(scores[:half], scores[half:])]
    return margins


def count(margins: list[float], kept: list[bool], trl_batch: int) -> dict:
    """Pooled accuracy with ties apart, as train_rm.py counts, on every pair; and TRL's own figure (the mean of
    per-batch accuracies over the kept pairs) recomputed from the same margins, to check the two agree on what
    the model does and differ only in how they count."""
    kept_margins = [m for m, k in zip(margins, kept) if k]
    batches = [kept_margins[i:i + trl_batch] for i in range(0, len(kept_margins), trl_batch)]
    return {"eval/accuracy": sum(m > 0 for m in margins) / len(margins),
            "eval/ties": sum(m == 0 for m in margins) / len(margins), "eval/pairs": len(margins),
            "eval/margin": sum(margins) / len(margins), "dev_margins": margins,
            "eval/trl_kept_pairs": len(kept_margins),
            "eval/trl_batch_mean_recomputed": sum(sum(m > 0 for m in b) / len(b) for b in batches) / max(1, len(batches))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("harmless", "helpful"), default="harmless")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one full epoch (the benchmark)")
    parser.add_argument("--rescore", action="store_true", help="count the dev accuracy again from the saved model of a "
                        "finished run (no training) and update its result")
    parser.add_argument("--eval-limit", type=int, default=0, help="smoke test: only the first N dev pairs (0: all; "
                        "a result is written only for a full run)")
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    os.chdir(ROOT)
    path = models.resolve_model_path(None)
    tokenizer = models.load_tokenizer(None)
    folder = DATA / f"hh-rlhf-{args.task}"
    splits = {}
    for split in ("train", "dev"):
        rows, report = sources.load_rows(str(folder / f"{split}.jsonl.gz"), "pairs", skip_bad=True)
        print(report)
        rows = rows[:args.eval_limit] if split == "dev" and args.eval_limit else rows
        splits[split] = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    dev_ids = [(trl_ids(tokenizer, r["prompt"], r["chosen"], MAIN["max-length"]),
                trl_ids(tokenizer, r["prompt"], r["rejected"], MAIN["max-length"])) for r in splits["dev"]]
    dev_pairs = [(c, r) for (c, _), (r, _) in dev_ids]
    dev_kept = [not (c_cut or r_cut) for (_, c_cut), (_, r_cut) in dev_ids]
    run_dir = models.cache_dir() / "bench-runs" / "trl" / f"{args.task}-seed{args.seed}"
    out = RESULTS / args.task / f"TRL-RewardTrainer-seed{args.seed}.json"
    if args.rescore:
        if not (run_dir / "model").is_dir() or not out.is_file():
            raise SystemExit(f"--rescore needs a finished run: {run_dir / 'model'} and {out}")
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", dtype=torch.float32)
        counted = count(score_pairs(model, tokenizer, dev_pairs), dev_kept, EVAL_BATCH)
        result = {**json.loads(out.read_text()), **counted}
        print(json.dumps({k: v for k, v in result.items() if k != "dev_margins"}))
        out.write_text(json.dumps(result, indent=2))
        return

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    models.freeze_layers(model, MAIN["trainable-layers"])
    model.score.requires_grad_(True)
    config = RewardConfig(output_dir=str(run_dir),
                          max_length=MAIN["max-length"], per_device_train_batch_size=MAIN["batch-size"],
                          per_device_eval_batch_size=EVAL_BATCH, learning_rate=MAIN["lr"], num_train_epochs=MAIN["epochs"],
                          max_steps=args.max_steps, seed=args.seed, logging_steps=10, save_strategy="no",
                          report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False,
                          gradient_checkpointing=False)  # TRL defaults to True; ours does not recompute activations
    trainer = RewardTrainer(model=model, args=config, train_dataset=splits["train"], eval_dataset=splits["dev"],
                            processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    # Counted before training, so that a renamed column fails now and not after an hour. TRL 1.x names the
    # tokenised columns chosen_ids / rejected_ids (older releases: chosen_input_ids / rejected_input_ids).
    columns = trainer.train_dataset.column_names
    chosen, rejected = ("chosen_ids", "rejected_ids") if "chosen_ids" in columns else ("chosen_input_ids", "rejected_input_ids")
    tokens = sum(len(r[chosen]) + len(r[rejected]) for r in trainer.train_dataset)
    theirs = [(r[chosen], r[rejected]) for r in trainer.eval_dataset]
    if theirs != [p for p, k in zip(dev_pairs, dev_kept) if k]:
        raise SystemExit("trl_ids does not tokenise the dev pairs as this TRL version does: the pooled count would "
                         "score other sequences than the model was trained on")
    started = time.time()
    trainer.train()
    elapsed = time.time() - started
    metrics = trainer.evaluate()
    print(json.dumps(metrics))  # before anything else can fail
    full = args.max_steps < 0 and not args.eval_limit  # the benchmark run, not a smoke test
    if full:
        trainer.save_model(str(run_dir / "model"))  # for --rescore
    counted = count(score_pairs(trainer.model, tokenizer, dev_pairs), dev_kept, EVAL_BATCH)
    if abs(counted["eval/trl_batch_mean_recomputed"] - metrics["eval_accuracy"]) > 1e-6:
        print(f"warning: TRL's eval_accuracy {metrics['eval_accuracy']} and the same figure from our scoring "
              f"{counted['eval/trl_batch_mean_recomputed']} differ: the two score the model differently")
    steps = trainer.state.global_step
    result = {"task": args.task, "row": "TRL RewardTrainer", "seed": args.seed, "key": "trl",
              "command": f"python bench/trl_reward.py --task {args.task} --seed {args.seed}",
              "wall_seconds": elapsed, "load_average_at_end": os.getloadavg()[0], "objective": "trl-bt", "steps": steps,
              "train_pairs": kept, "train_pairs_dropped_too_long": len(splits["train"]) - kept,
              "train_tokens_per_second": tokens * steps / max(1, -(-kept // MAIN["batch-size"])) / elapsed,
              "peak_rss_gb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              **counted, "eval/trl_eval_accuracy": metrics["eval_accuracy"], "trl_version": __import__("trl").__version__}
    print(json.dumps({k: v for k, v in result.items() if k != "dev_margins"}))
    if full:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
