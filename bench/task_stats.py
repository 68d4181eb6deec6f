"""Benchmark of the built-in task (avalib/task.py): what it costs to load, and how informative its labels are.

Measures
- the shipped file (avalib/task_data/, avalib/shipped_task.py): its size, sha256 and replies hash, the
  sampling time its build recorded (MANIFEST.json), and the wall time to load it: a second load_task in this
  process, and a fresh `python -c` process that imports task and loads (imports included: what a training
  script pays);
- with --rebuild: the wall time of sampling the size afresh on this machine (task.rebuild: model load +
  sampling) and where the rebuild differs from the shipped file (shipped_task.compare);
- per split: prompts, replies, pairs, replies ended by EOS, mean reply length, gold sign counts,
  pairs tied exactly and within the judge's TIE_MARGIN;
- label ceiling: how often the Bradley-Terry label agrees with the sign of the gold difference
  (pairs with equal gold excluded), over 5 label seeds (mean, std), next to its expectation under the
  BT model, mean over pairs of sigmoid(|gold difference| / tau);
- a trivial baseline: "the longer reply wins" (in tokens), its agreement with the gold sign (pairs
  with equal gold or equal length excluded) and with the BT labels;
- spread: quantiles of the gold of the replies and of the gold difference within pairs.

Writes bench/results/task.{json,md} for the default size (task v2), task-<size>.{json,md} for the
others (task-v1.* is task v1's default size). Run from the repository root:
    python bench/task_stats.py                     # default size: the shipped file, loaded and described
    python bench/task_stats.py --size v1           # task v1
    python bench/task_stats.py --rebuild           # also sample it afresh (minutes) and compare with the shipped file
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalib import gold, task  # noqa: E402


@dataclass
class Args:
    size: str = "default"
    """task size to measure"""
    rebuild: bool = False
    """also sample the task afresh to time it and compare it with the shipped file"""
    label_seeds: int = 5
    """Bradley-Terry label seeds to average the label ceiling over"""
    out: str = str(ROOT / "bench" / "results")
    """directory for task.json and task.md"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Args()
    parser.add_argument("--size", default=defaults.size, choices=sorted(task.SIZES), help="task size to measure")
    parser.add_argument("--rebuild", action="store_true", help="also sample it afresh (minutes) and compare with the shipped file")
    parser.add_argument("--label-seeds", type=int, default=defaults.label_seeds,
                        help="Bradley-Terry label seeds to average the label ceiling over")
    parser.add_argument("--out", default=defaults.out, help="directory for task.json and task.md")
    return Args(**vars(parser.parse_args()))


class CpuShare:
    """How much of the machine other processes used while a block ran: (busy CPU-seconds of the whole
    machine, from /proc/stat, minus this process's own) / (wall seconds x cores). Timings are only
    clean when this is near 0; the benchmark reports it next to them."""

    def __enter__(self):
        self.machine, self.own, self.wall = self._machine_busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        busy = self._machine_busy() - self.machine
        self.other_share = max(0.0, (busy - (self._own() - self.own)) / (wall * os.cpu_count()))
        self.seconds = wall

    @staticmethod
    def _machine_busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system


def fresh_process_load_seconds(size: str) -> dict:
    """Load the task in a new Python process: (seconds inside load_task, seconds for the whole process)."""
    code = ("import time; from avalib import task; t = time.perf_counter(); task.load_task(%r, progress=False); "
            "print(time.perf_counter() - t)" % size)
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return {"load_task_seconds": float(output.strip().splitlines()[-1]),
            "process_seconds": time.perf_counter() - started}


def longer_wins(pairs: list[dict], length: dict[tuple[str, str], int]) -> dict:
    """Agreement of "the longer reply is preferred" with the gold sign and with the BT labels;
    pairs of equal length are left out (and counted)."""
    gold_hits = gold_total = label_hits = label_total = 0
    for pair in pairs:
        chosen_length = length[pair["instruction"], pair["chosen"]]
        rejected_length = length[pair["instruction"], pair["rejected"]]
        if chosen_length == rejected_length:
            continue
        chosen_is_longer = chosen_length > rejected_length
        label_total += 1
        label_hits += chosen_is_longer
        if pair["score_chosen"] != pair["score_rejected"]:
            gold_total += 1
            gold_hits += chosen_is_longer == (pair["score_chosen"] > pair["score_rejected"])
    return {"agreement_with_gold": gold_hits / gold_total if gold_total else None, "pairs_scored_gold": gold_total,
            "agreement_with_labels": label_hits / label_total if label_total else None,
            "pairs_scored_labels": label_total, "pairs_equal_length": len(pairs) - label_total}


def split_report(loaded: task.Task, split: str, label_seeds: int) -> dict:
    stats = loaded.stats()["splits"][split]
    n_tokens = {(record["instruction"], response): n for record in loaded.records
                for response, n in zip(record["responses"], record["n_tokens"])}
    n_characters = {(record["instruction"], response): len(response) for record in loaded.records
                    for response in record["responses"]}
    agreements = [task.label_agreement(loaded.pairs(split, seed=seed)) for seed in range(label_seeds)]
    agreements = [a for a in agreements if a is not None]
    pairs = loaded.pairs(split)
    decided = [p for p in pairs if p["score_chosen"] != p["score_rejected"]]
    expected = [task.preference_probability(abs(p["score_chosen"] - p["score_rejected"]), 0.0, loaded.config.bt_temperature)
                for p in decided]
    differences = sorted(abs(p["score_chosen"] - p["score_rejected"]) for p in pairs)
    replies = sorted(g for record in loaded.records if record["split"] == split for g in record["gold"])
    quantiles = lambda values: {f"q{q}": values[min(len(values) - 1, int(q / 100 * len(values)))]
                                for q in (10, 25, 50, 75, 90)} if values else {}
    return {
        **{k: v for k, v in stats.items() if k != "label_agreement_bt"},
        "demonstrations": len(loaded.demonstrations(split)),
        "demonstration_gold_mean": statistics.fmean(d["score"] for d in loaded.demonstrations(split)),
        "pairs_gold_differs": len(decided),
        "median_abs_gold_difference": differences[len(differences) // 2] if differences else None,
        "abs_gold_difference_quantiles": quantiles(differences),
        "reply_gold_quantiles": quantiles(replies),
        "label_ceiling_mean": statistics.fmean(agreements) if agreements else None,
        "label_ceiling_std": statistics.stdev(agreements) if len(agreements) > 1 else None,
        "label_ceiling_per_seed": agreements,
        "label_ceiling_expected": statistics.fmean(expected) if expected else None,
        "longer_wins_tokens": longer_wins(pairs, n_tokens),
        "longer_wins_characters": longer_wins(pairs, n_characters),
    }


def markdown(result: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    b = result.get("rebuild")
    lines = [
        f"# Built-in task: `{result['size']}` size",
        "",
        "Regenerate with: `python bench/task_stats.py" + ("" if result["size"] == "default" else f" --size {result['size']}")
        + (" --rebuild" if b else "") + "` (from the repository root).",
        "",
        f"Machine: {result['machine']['cpus']} CPU cores, torch {result['machine']['torch']} "
        f"({result['machine']['threads']} threads), {result['date']}.",
        "",
        f"The shipped file: `avalib/task_data/{result['shipped']['file']}`, {result['shipped']['bytes'] / 1e6:.2f} MB, sha256 "
        f"`{result['shipped']['sha256'][:16]}...`, replies `{result.get('replies_sha256', '-')}` (Task.replies_sha256), "
        f"sampled on {result['shipped']['build']['date']} ({result['shipped']['build']['cpu']}, torch "
        f"{result['shipped']['build']['torch']}, {result['shipped']['build']['threads']} threads). Every machine loads these "
        "replies; sampling them again on another CPU can give other replies (`python -m avalib.task --rebuild SIZE` says where).",
        "",
        "| cost | value |",
        "|---|---|",
        f"| sampling, when the shipped build was made (model load + sampling) | {result['shipped']['build']['seconds']:.1f} s |",
        f"| second load, same process | {result['load']['same_process_seconds']:.2f} s |",
        f"| load in a fresh process (load_task / whole process incl. imports) | "
        f"{result['load']['fresh_process']['load_task_seconds']:.2f} s / "
        f"{result['load']['fresh_process']['process_seconds']:.2f} s |",
        *([f"| rebuild on this machine (model load + sampling) | {b['seconds']:.1f} s |"] if b else []),
        "",
        (f"Other processes used {100 * b['cpu_share_used_by_other_processes']:.0f}% of the CPUs during the rebuild and "
         if b else "Other processes used ")
        + f"{100 * result['load']['cpu_share_used_by_other_processes']:.0f}% during the fresh-process load "
        "(timings are clean only near 0%).",
        "",
        f"Settings: {result['config']['samples_per_prompt']} replies per prompt, <= {result['config']['max_new_tokens']} "
        f"new tokens, temperature {result['config']['temperature']}, top-p {result['config']['top_p']}, "
        f"seed {result['config']['seed']}; Bradley-Terry temperature tau = {result['bt_temperature']}, "
        f"judge tie margin {result['tie_margin']}.",
        "",
        "| split | prompts | replies | ended by EOS | mean tokens | gold > 0 / = 0 / < 0 | pairs | exact gold ties | "
        "judge ties | label ceiling (5 seeds) | expected under BT | longer-wins vs gold: tokens | characters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, s in result["splits"].items():
        ceiling = "-" if s["label_ceiling_mean"] is None else (
            f"{pct(s['label_ceiling_mean'])} ± {100 * (s['label_ceiling_std'] or 0):.1f}")
        lines.append(
            f"| {split} | {s['prompts']} | {s['responses']} | {s['finished_with_eos']} | {s['mean_tokens']:.1f} | "
            f"{s['gold_positive']} / {s['gold_zero']} / {s['gold_negative']} | {s['pairs']} | "
            f"{s['pairs_exact_gold_tie']} | {s['pairs_judge_tie']} | {ceiling} | {pct(s['label_ceiling_expected'])} | "
            f"{pct(s['longer_wins_tokens']['agreement_with_gold'])} (n={s['longer_wins_tokens']['pairs_scored_gold']}) | "
            f"{pct(s['longer_wins_characters']['agreement_with_gold'])} (n={s['longer_wins_characters']['pairs_scored_gold']}) |")
    lines += [
        "",
        "- label ceiling: share of Bradley-Terry labels (seeds 0-4, mean ± std) that agree with the sign of the "
        "gold difference, over pairs whose gold differs; a reward model that knew the gold would score this "
        "accuracy on the labels. 'expected under BT': mean of sigmoid(|gold difference| / tau) over the same pairs.",
        "- longer-wins: the longer reply (in tokens, or in characters) predicted preferred; agreement with the gold "
        "sign over pairs with different gold and different lengths (n). Most replies reach the token cap, so the "
        "token version leaves most pairs undecided.",
        "- rebuild: " + ("not run here (`--rebuild`)." if not b else f"{b['comparison']}."),
        "- judge ties: pairs whose gold differs by at most the tie margin (judge() says \"tie\").",
        "",
        "| split | reply gold: 10% / 25% / 50% / 75% / 90% | abs gold difference in a pair: 10% / 25% / 50% / 75% / 90% |",
        "|---|---|---|",
    ]
    for split, s in result["splits"].items():
        spread = lambda q: " / ".join(f"{v:+.2f}" for v in q.values()) if q else "-"
        lines.append(f"| {split} | {spread(s.get('reply_gold_quantiles'))} | {spread(s.get('abs_gold_difference_quantiles'))} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch

    from avalib import shipped_task

    rebuild = None
    if args.rebuild:
        with CpuShare() as build_share:
            records, build = task.rebuild(args.size, progress=True)
        report = shipped_task.compare(shipped_task.read(args.size)[0], records)
        rebuild = {"seconds": build_share.seconds, "cpu_share_used_by_other_processes": build_share.other_share,
                   "identical": report["identical"], "differing_replies": report["differing_replies"],
                   "comparison": shipped_task.describe(report).splitlines()[0], "build": build}
    task.load_task(args.size, progress=False)
    with CpuShare() as load_share:
        loaded = task.load_task(args.size, progress=False)
    with CpuShare() as fresh_share:
        fresh = fresh_process_load_seconds(args.size)

    result = {
        "size": args.size,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": asdict(task.SIZES[args.size]),
        "key": loaded.key,
        "replies_sha256": loaded.replies_sha256(),
        "bt_temperature": task.SIZES[args.size].bt_temperature,
        "tie_margin": gold.TIE_MARGIN,
        "shipped": shipped_task.manifest()[args.size],
        **({"rebuild": rebuild} if rebuild else {}),
        "load": {"same_process_seconds": load_share.seconds, "fresh_process": fresh,
                 "cpu_share_used_by_other_processes": fresh_share.other_share},
        "splits": {split: split_report(loaded, split, args.label_seeds) for split in task.SPLITS},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "task" if args.size == "default" else f"task-{args.size}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
