"""Table 1's reference row: TRL's RewardTrainer (Bradley-Terry, the implementation users know) on
the same model, data and configuration as bench/table1.py's main rows. TRL is a benchmark-only
dependency: `pip install trl==1.16.0`.

    python bench/trl_reward.py --task harmless [--seed 0] [--max-steps N]

Writes bench/results/table1/<task>/TRL-RewardTrainer-seed<k>.json in table1.py's row format, so
`python bench/table1.py --report` puts it in the table. Data: the pairs our loader yields (the same
prompt split and the same skipped empty responses), given to TRL in its prompt/chosen/rejected
format. TRL drops pairs longer than max_length where we cut them; the count is recorded.
Accuracy is TRL's own `eval_accuracy` on the dev pairs. TRL's default activation checkpointing is
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
import common  # noqa: E402
from bench.table1 import DATA, MAIN, RESULTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("harmless", "helpful"), default="harmless")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one full epoch (the benchmark)")
    parser.add_argument("--eval-limit", type=int, default=0, help="smoke test: only the first N dev pairs (0: all; "
                        "a result is written only for a full run)")
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    os.chdir(ROOT)
    path = common.resolve_model_path(None)
    tokenizer = common.load_tokenizer(None)
    folder = DATA / f"hh-rlhf-{args.task}"
    splits = {}
    for split in ("train", "dev"):
        rows, report = common.load_rows(str(folder / f"{split}.jsonl.gz"), "pairs", skip_bad=True)
        print(report)
        rows = rows[:args.eval_limit] if split == "dev" and args.eval_limit else rows
        splits[split] = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    common.freeze_layers(model, MAIN["trainable-layers"])
    model.score.requires_grad_(True)
    config = RewardConfig(output_dir=str(common.cache_dir() / "bench-runs" / "trl" / f"{args.task}-seed{args.seed}"),
                          max_length=MAIN["max-length"], per_device_train_batch_size=MAIN["batch-size"],
                          per_device_eval_batch_size=16, learning_rate=MAIN["lr"], num_train_epochs=MAIN["epochs"],
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
    started = time.time()
    trainer.train()
    elapsed = time.time() - started
    metrics = trainer.evaluate()
    print(json.dumps(metrics))  # before anything else can fail
    steps = trainer.state.global_step
    result = {"task": args.task, "row": "TRL RewardTrainer", "seed": args.seed, "key": "trl",
              "command": f"python bench/trl_reward.py --task {args.task} --seed {args.seed}",
              "wall_seconds": elapsed, "load_average_at_end": os.getloadavg()[0], "objective": "trl-bt", "steps": steps,
              "train_pairs": kept, "train_pairs_dropped_too_long": len(splits["train"]) - kept,
              "train_tokens_per_second": tokens * steps / max(1, -(-kept // MAIN["batch-size"])) / elapsed,
              "peak_rss_gb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "eval/accuracy": metrics["eval_accuracy"], "eval/ties": 0.0, "eval/pairs": len(splits["dev"]),
              "trl_version": __import__("trl").__version__}
    print(json.dumps(result))
    if args.max_steps < 0:
        out = RESULTS / args.task / f"TRL-RewardTrainer-seed{args.seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
