"""The AVA paper's Table 1 at CPU scale: reward accuracy on HH-RLHF dev.

SmolLM2-135M-Instruct, trained on hh-rlhf-{harmless,helpful}/train, evaluated on the matching dev
split (200 pairs: accuracies carry a Wilson 95% interval). One configuration for every main row
(MAIN below, at least as strong as the TRL reference run: top 4 layers, max length 512, 8 pairs a
step, lr 1e-4, one epoch); the ablations share a cheaper one (ABLATION). BT, Pref-Trans and AVA-p
run 3 seeds. Every run is cached: its result lands in bench/results/table1/<task>/<row>-seed<k>.json
(committed) and its checkpoints in $AVA_CACHE/bench-runs (resumed if a session was cut), so the
table can be filled in parts across sessions:

    python bench/table1.py --task harmless --rows BT,AVA-p --seeds 0     # run what is missing
    python bench/table1.py --report                                       # rebuild the table only

Throughput (tokens/s) is measured inside each run; the share of CPU time other processes took
during the run is recorded next to it, since a busy machine makes it incomparable.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from bench import runner  # noqa: E402

DATA = Path("..") / "shared" / "data"  # relative to the repository (runs use cwd=ROOT): cache keys survive a move
RESULTS = ROOT / "bench" / "results" / "table1"
MAIN = {"trainable-layers": 4, "max-length": 512, "batch-size": 8, "lr": 1e-4, "epochs": 1}
ABLATION = {"trainable-layers": 2, "max-length": 256, "batch-size": 8, "lr": 1e-4, "epochs": 1}
ROWS = {  # name: (train_rm.py arguments, configuration, seeds)
    "BT": ({"objective": "bt"}, MAIN, 3),
    "BT-var": ({"objective": "bt-var"}, MAIN, 1),
    "Pref-Trans": ({"objective": "pref-trans"}, MAIN, 3),
    "AVA-p": ({"objective": "ava-p"}, MAIN, 3),
    "AVA-d": ({"objective": "ava-d"}, MAIN, 1),
    "AVA-p (ablation config)": ({"objective": "ava-p"}, ABLATION, 1),
    "AVA-p w/o rwt": ({"objective": "ava-p", "ablate": "w/o rwt"}, ABLATION, 1),
    "AVA-p w/o neg": ({"objective": "ava-p", "ablate": "w/o neg"}, ABLATION, 1),
    "AVA-p w/o irl": ({"objective": "ava-p", "ablate": "w/o irl"}, ABLATION, 1),
    "AVA-p w/o cer": ({"objective": "ava-p", "ablate": "w/o cer"}, ABLATION, 1),
    "AVA-p w/o ptq": ({"objective": "ava-p", "ablate": "w/o ptq"}, ABLATION, 1),
}
TASKS = ("harmless", "helpful", "builtin")


def run_arguments(task: str, row: str, seed: int) -> list[str]:
    extra, config, _ = ROWS[row]
    if task == "builtin":
        data = ["--data", "builtin", "--eval-data", "builtin:gold"]  # accuracy against the gold labels
    else:
        data = ["--data", str(DATA / f"hh-rlhf-{task}" / "train.jsonl.gz"),
                "--eval-data", str(DATA / f"hh-rlhf-{task}" / "dev.jsonl.gz"), "--skip-bad-rows"]
    flags = {**config, **extra, "seed": seed}
    return data + [item for k, v in flags.items() for item in (f"--{k}", str(v))]


def result_path(task: str, row: str, seed: int) -> Path:
    return RESULTS / task / f"{runner.slug(row)}-seed{seed}.json"


def run_dir(task: str, row: str, seed: int) -> Path:
    """Where the run's checkpoints and saved model live (outside the repository, under $AVA_CACHE)."""
    key = hashlib.sha256(json.dumps(run_arguments(task, row, seed)).encode()).hexdigest()[:12]
    return common.cache_dir() / "bench-runs" / "table1" / task / f"{result_path(task, row, seed).stem}-{key}"


def run_row(task: str, row: str, seed: int, need_model: bool = False) -> dict:
    """The row's result, run now if it is missing (or, with need_model, if its saved model is not on
    this machine: results are committed, models are not, so a new machine trains it again)."""
    arguments = run_arguments(task, row, seed)
    key = hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    path = result_path(task, row, seed)
    output_dir = run_dir(task, row, seed)
    have_model = (output_dir / "model" / "reward_model.json").is_file()
    if path.is_file() and json.loads(path.read_text()).get("key") == key and (have_model or not need_model):
        return json.loads(path.read_text())
    command = [sys.executable, str(ROOT / "train_rm.py"), *arguments, "--output-dir", str(output_dir), "--save-every", "20"]
    if (output_dir / "checkpoint.pt").is_file():
        command.append("--resume")
    measured = runner.run_measured(command)
    final = json.loads((output_dir / "final.json").read_text())
    result = {"task": task, "row": row, "seed": seed, "key": key, "command": "python train_rm.py " + " ".join(arguments),
              **measured, **final}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def report() -> None:
    """Rebuild bench/results/table1.{json,md} from whatever runs are cached."""
    table = []
    for task in TASKS:
        for row, (_, config, seeds) in ROWS.items():
            runs = [json.loads(p.read_text()) for seed in range(seeds) if (p := result_path(task, row, seed)).is_file()]
            if not runs:
                continue
            accuracies = [r["eval/accuracy"] for r in runs]
            n = runs[0]["eval/pairs"]
            mean = sum(accuracies) / len(accuracies)
            low, high = common.wilson(mean * n, n)
            spread = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5 if len(runs) > 1 else None
            table.append({"task": task, "row": row, "config": "main" if config is MAIN else "ablation",
                          "seeds": [r["seed"] for r in runs], "accuracy": mean, "accuracy_std": spread,
                          "wilson95": [low, high], "eval_pairs": n, "ties": sum(r["eval/ties"] for r in runs) / len(runs),
                          "tokens_per_second": sum(r["train_tokens_per_second"] for r in runs) / len(runs),
                          "other_cpu_share": max((r.get("other_processes_cpu_share") for r in runs), default=None,
                                                 key=lambda v: -1 if v is None else v),
                          "peak_rss_gb": max(r["peak_rss_gb_rank0"] for r in runs),
                          "wall_minutes": sum(r["wall_seconds"] for r in runs) / 60, "command": runs[0]["command"]})
    (ROOT / "bench" / "results" / "table1.json").write_text(json.dumps(table, indent=2))
    lines = ["# Table 1 at CPU scale: reward accuracy on dev", "",
             "Regenerate: `python bench/table1.py --task harmless` (runs what is missing; `--report` only rebuilds).",
             f"Main configuration: {MAIN}. Ablation configuration: {ABLATION}.", "",
             "| task | row | config | seeds | dev accuracy | 95% interval | ties | train tokens/s | other CPU use | peak RSS (GB) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        other = "not recorded" if r["other_cpu_share"] is None else f"{100 * r['other_cpu_share']:.0f}%"
        accuracy = f"{100 * r['accuracy']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if r["accuracy_std"] is not None else "")
        lines.append(f"| {r['task']} | {r['row']} | {r['config']} | {len(r['seeds'])} | {accuracy} | "
                     f"{100 * r['wilson95'][0]:.1f}-{100 * r['wilson95'][1]:.1f} | {100 * r['ties']:.1f} | "
                     f"{r['tokens_per_second']:.0f} | {other} | "
                     f"{r['peak_rss_gb']:.2f} | {r['wall_minutes']:.1f} |")
    missing = [f"{t}/{row}" for t in TASKS[:2] for row in ROWS if not result_path(t, row, 0).is_file()]
    lines += ["", f"Not yet run: {', '.join(missing) if missing else 'none'}.",
              "Accuracy: mean over seeds (± sample std); interval: Wilson 95% on the pooled mean over the dev pairs.",
              "Other CPU use: the share of the machine's CPU time other processes took during the run; tokens/s",
              "is comparable only near 0% (rows marked 'not recorded' ran before this was measured and shared",
              "the machine with other jobs)."]
    (ROOT / "bench" / "results" / "table1.md").write_text("\n".join(lines) + "\n")
    runner.update_readme("\n".join(lines[2:]), "table1")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="harmless")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: each row's own count)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from cached runs")
    args = parser.parse_args()
    if not args.report:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r}: choose from {list(ROWS)}")
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else range(ROWS[row][2])
            for seed in seeds:
                run_row(args.task, row, seed)
    report()


if __name__ == "__main__":
    main()
